"""The built-in curriculum: a deterministic, bilingual dataset in MiniMind's formats for every stage.

`synthesize(out_dir, size, seed)` invents a small world (towns, people, animals), then writes what each
training stage reads, in the JSONL layouts MiniMind's own datasets use, so the same readers serve both:

    pretrain.jsonl     {"text"}: facts about the world stated many ways, worked arithmetic, drills of the
                       one-step facts that worked solutions are chained from, short stories
    sft.jsonl          {"conversations"}: questions about those facts, arithmetic (answers that show their
                       steps, or that state the result, some after the steps as `reasoning_content`),
                       identity, multi-turn chats, calculator / unit-converter tool calls
    dpo.jsonl          {"chosen", "rejected"}: one prompt, the rejected answer wrong, in the wrong language
                       or rambling; arithmetic pairs in the same mix of worked and stated answers as SFT's
    rl.jsonl           {"conversations", "gt"}: the last assistant turn is an empty placeholder; `gt` is
                       the checkable answer (an arithmetic result, a town, an age ...)
    agent_rl.jsonl     the same with tools on the system message; `gt` lists one value per expected tool call
    lora_domain.jsonl  SFT conversations about a planet catalogue that appears nowhere else
    eval_*.jsonl       held-out items for each of the above, plus manifest.json (line counts, sha256)

Evaluation items are held out by *item*, not by line: chosen (fact, question-kind) pairs are never asked
in training (the fact itself is still stated in pretraining text, which is the point: can the model answer
a question it was never drilled on?), and chosen arithmetic operand pairs, unit conversions and identity
phrasings never appear in any training file. So no evaluation prompt is ever a training prompt.

Everything comes from `random.Random` streams seeded by (seed, file name): the same seed gives
byte-identical files on every machine and Python version.

The worlds nest: for one seed, a smaller size's towns, people and planets are the first ones of every
larger size's, with the same attributes, and an item held out in one size is held out in every size that
has it, so more data of a larger size never contradicts a smaller one or trains on its evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------------
# Sizes


@dataclass(frozen=True)
class Size:
    people: int
    towns: int
    planets: int
    lines: dict  # file stem -> training lines; every evaluation file gets `eval_lines` (or fewer: see eval_records)
    eval_lines: int


SIZES = {
    # tiny: for tests, ~2.5K lines in about a second.
    "tiny": Size(people=8, towns=4, planets=4, eval_lines=40,
                 lines=dict(pretrain=1000, sft=800, dpo=150, rl=150, agent_rl=100, lora_domain=150)),
    # small: the CPU demo; a 1-3M parameter model learns the facts and the answer formats in minutes.
    "small": Size(people=24, towns=8, planets=10, eval_lines=200,
                  lines=dict(pretrain=12000, sft=8000, dpo=1500, rl=1500, agent_rl=1000, lora_domain=1500)),
    "medium": Size(people=100, towns=20, planets=30, eval_lines=1000,
                   lines=dict(pretrain=100000, sft=60000, dpo=10000, rl=10000, agent_rl=6000, lora_domain=8000)),
}

EVAL_FRACTION = 0.12  # of facts, arithmetic problems and unit conversions kept for evaluation only

# ---------------------------------------------------------------------------------------------------
# Vocabulary: every word comes as an (English, Chinese) pair, so each fact can be said in both languages.


@dataclass(frozen=True)
class Name:
    en: str
    zh: str

    def pick(self, zh: bool) -> str:
        return self.zh if zh else self.en


def _names(pairs) -> list[Name]:
    return [Name(en, zh) for en, zh in pairs]


# People's names are two syllables, each with a fixed Chinese rendering, so "Belwyn" is always "贝温".
PERSON_SYLLABLES = (
    _names([("Al", "阿"), ("Bel", "贝"), ("Cor", "科"), ("Dar", "达"), ("El", "艾"), ("Fen", "芬"), ("Gil", "吉"),
            ("Hal", "哈"), ("Ism", "伊"), ("Jor", "乔"), ("Kal", "卡"), ("Lin", "林"), ("Mor", "莫"), ("Nor", "诺"),
            ("Os", "奥"), ("Pel", "佩"), ("Ros", "罗"), ("Sil", "西"), ("Tam", "塔"), ("Ul", "乌"), ("Wil", "威"),
            ("Yor", "约")]),
    _names([("a", "娅"), ("en", "恩"), ("ric", "里克"), ("ina", "伊娜"), ("o", "欧"), ("wyn", "温"), ("eth", "丝"),
            ("ian", "安"), ("ora", "拉"), ("us", "斯"), ("ette", "特"), ("mund", "蒙德")]),
)
TOWN_PARTS = (
    _names([("Moss", "苔"), ("Stone", "石"), ("Willow", "柳"), ("Amber", "琥珀"), ("Frost", "霜"), ("Copper", "铜"),
            ("Maple", "枫"), ("Silver", "银"), ("Raven", "鸦"), ("Thorn", "棘"), ("Lark", "雀"), ("Ash", "灰"),
            ("Oak", "橡"), ("Fern", "蕨"), ("Salt", "盐"), ("Honey", "蜜")]),
    _names([("bridge", "桥镇"), ("ford", "渡镇"), ("vale", "谷镇"), ("haven", "港镇"), ("field", "田镇"),
            ("brook", "溪镇")]),
)
# Planets (the LoRA domain) use syllables and characters that no person or town uses, so none of their
# facts can leak into the pretraining or SFT files (a test checks it).
PLANET_PARTS = (
    _names([("Vel", "维"), ("Quor", "库"), ("Zeph", "泽"), ("Thal", "萨"), ("Ory", "欧瑞"), ("Xan", "桑"),
            ("Myr", "米"), ("Drav", "德拉")]),
    _names([("ion", "翁星"), ("ax", "克斯星"), ("une", "努星"), ("ara", "拉拉星"), ("is", "伊斯星")]),
)
STARS = _names([("Kessa", "凯萨"), ("Orvin", "奥文"), ("Talis", "塔利斯"), ("Ymra", "依姆拉"), ("Dovan", "多万")])

COLOURS = _names([("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
                  ("orange", "橙色"), ("white", "白色"), ("black", "黑色"), ("pink", "粉色"), ("brown", "棕色"),
                  ("grey", "灰色"), ("gold", "金色")])
JOBS = _names([("a baker", "面包师"), ("a teacher", "老师"), ("a fisher", "渔夫"), ("a doctor", "医生"),
               ("a farmer", "农民"), ("a painter", "画家"), ("a carpenter", "木匠"), ("a musician", "音乐家"),
               ("a gardener", "园丁"), ("a tailor", "裁缝"), ("a potter", "陶艺师"), ("a librarian", "图书管理员")])
PRODUCTS = _names([("apples", "苹果"), ("pottery", "陶器"), ("kites", "风筝"), ("cheese", "奶酪"), ("tea", "茶叶"),
                   ("boats", "小船"), ("honey", "蜂蜜"), ("clocks", "钟表"), ("wool", "羊毛"), ("lanterns", "灯笼"),
                   ("glass", "玻璃"), ("bread", "面包")])
LANDSCAPES = _names([("the sea", "大海"), ("the mountains", "群山"), ("a lake", "一个湖"), ("a forest", "一片森林"),
                     ("a river", "一条河"), ("the hills", "丘陵")])
LEGS = {2: Name("two", "两"), 4: Name("four", "四")}


@dataclass(frozen=True)
class Animal:
    name: Name  # "dog" / "狗"
    measure: str  # the Chinese measure word: 一只狗, 一匹马
    legs: int
    food: Name

    @property
    def as_subject(self) -> Name:  # "an owl" / "猫头鹰", as in "an owl has two legs"
        article = "an" if self.name.en[0] in "aeiou" else "a"
        return Name(f"{article} {self.name.en}", self.name.zh)

    @property
    def as_pet(self) -> Name:  # "an owl" / "一只猫头鹰", as in "Belwyn has an owl"
        return Name(self.as_subject.en, f"一{self.measure}{self.name.zh}")


ANIMALS = [Animal(Name(en, zh), measure, legs, Name(food_en, food_zh)) for en, zh, measure, legs, food_en, food_zh in [
    ("dog", "狗", "只", 4, "bones", "骨头"), ("cat", "猫", "只", 4, "fish", "鱼"),
    ("rabbit", "兔子", "只", 4, "carrots", "胡萝卜"), ("parrot", "鹦鹉", "只", 2, "seeds", "种子"),
    ("tortoise", "乌龟", "只", 4, "leaves", "树叶"), ("hamster", "仓鼠", "只", 4, "grain", "谷子"),
    ("horse", "马", "匹", 4, "hay", "干草"), ("goat", "山羊", "只", 4, "grass", "青草"),
    ("owl", "猫头鹰", "只", 2, "mice", "老鼠"), ("duck", "鸭子", "只", 2, "water plants", "水草"),
]]

# ---------------------------------------------------------------------------------------------------
# Facts: (kind, subject, value). Each kind has several ways to state it and to ask it, in both languages.
# "{s}" is the subject, "{v}" the value. Sentences are capitalised after filling in ("a dog has ...").

FACT_TEMPLATES = {
    "home": dict(
        state_en=["{s} lives in {v}.", "{s}'s home town is {v}.", "{s} comes from {v}.",
                  "{v} is the home town of {s}."],
        state_zh=["{s}住在{v}。", "{s}的家乡是{v}。", "{s}来自{v}。", "{v}是{s}的家乡。"],
        ask_en=["Where does {s} live?", "What is {s}'s home town?", "Which town does {s} come from?"],
        ask_zh=["{s}住在哪里？", "{s}的家乡是哪里？", "{s}来自哪个镇？"]),
    "pet": dict(
        state_en=["{s} has {v} as a pet.", "{s}'s pet is {v}.", "{s} keeps {v} at home."],
        state_zh=["{s}养了{v}。", "{s}的宠物是{v}。", "{s}家里有{v}。"],
        ask_en=["What pet does {s} have?", "What kind of pet does {s} keep?", "Which animal is {s}'s pet?"],
        ask_zh=["{s}养了什么宠物？", "{s}的宠物是什么？", "{s}家里养的是什么动物？"]),
    "colour": dict(
        state_en=["{s}'s favourite colour is {v}.", "{s} likes {v} more than any other colour.",
                  "The colour {s} loves most is {v}."],
        state_zh=["{s}最喜欢的颜色是{v}。", "{s}最爱{v}。", "在所有颜色里，{s}最喜欢{v}。"],
        ask_en=["What is {s}'s favourite colour?", "Which colour does {s} like best?",
                "What colour does {s} love most?"],
        ask_zh=["{s}最喜欢什么颜色？", "{s}最喜欢的颜色是什么？", "哪种颜色是{s}最爱的？"]),
    "age": dict(
        state_en=["{s} is {v} years old.", "{s}'s age is {v}.", "{s} has lived for {v} years."],
        state_zh=["{s}今年{v}岁。", "{s}的年龄是{v}岁。", "{s}已经{v}岁了。"],
        ask_en=["How old is {s}?", "What is {s}'s age?", "What age is {s}?"],
        ask_zh=["{s}多大了？", "{s}今年几岁？", "{s}的年龄是多少？"]),
    "job": dict(
        state_en=["{s} is {v}.", "{s} works as {v}.", "By trade, {s} is {v}."],
        state_zh=["{s}是一名{v}。", "{s}的工作是{v}。", "{s}以当{v}为生。"],
        ask_en=["What does {s} do for a living?", "What is {s}'s job?", "What work does {s} do?"],
        ask_zh=["{s}是做什么工作的？", "{s}的职业是什么？", "{s}靠什么谋生？"]),
    "known_for": dict(
        state_en=["{s} is famous for its {v}.", "{s} is known for {v}.", "People visit {s} for its {v}."],
        state_zh=["{s}以{v}闻名。", "{s}最有名的是{v}。", "人们去{s}是为了那里的{v}。"],
        ask_en=["What is {s} famous for?", "What is {s} known for?", "Why do people visit {s}?"],
        ask_zh=["{s}以什么闻名？", "{s}最有名的是什么？", "人们为什么去{s}？"]),
    "near": dict(
        state_en=["{s} lies near {v}.", "{s} is a town close to {v}.", "{s} sits beside {v}."],
        state_zh=["{s}靠近{v}。", "{s}是一座靠近{v}的小镇。", "{s}就在{v}旁边。"],
        ask_en=["What is {s} near?", "What lies close to {s}?", "Where is {s}?"],
        ask_zh=["{s}靠近什么？", "{s}附近有什么？", "{s}在哪里？"]),
    "legs": dict(
        state_en=["{s} has {v} legs.", "{s} walks on {v} legs."],
        state_zh=["{s}有{v}条腿。", "{s}用{v}条腿走路。"],
        ask_en=["How many legs does {s} have?", "On how many legs does {s} walk?"],
        ask_zh=["{s}有几条腿？", "{s}用几条腿走路？"]),
    "food": dict(
        state_en=["{s} likes to eat {v}.", "{s} eats {v}.", "The favourite food of {s} is {v}."],
        state_zh=["{s}喜欢吃{v}。", "{s}吃{v}。", "{s}最爱吃的是{v}。"],
        ask_en=["What does {s} eat?", "What food does {s} like?"],
        ask_zh=["{s}吃什么？", "{s}喜欢吃什么？"]),
    # The LoRA domain: a planet catalogue.
    "moons": dict(
        state_en=["{s} has {v} moons.", "The planet {s} has {v} moons.", "{v} moons circle {s}."],
        state_zh=["{s}有{v}颗卫星。", "{s}一共有{v}颗卫星。", "有{v}颗卫星绕着{s}转。"],
        ask_en=["How many moons does {s} have?", "How many moons circle the planet {s}?"],
        ask_zh=["{s}有几颗卫星？", "有多少颗卫星绕着{s}转？"]),
    "sky": dict(
        state_en=["The sky on {s} is {v}.", "On {s} the sky looks {v}."],
        state_zh=["{s}的天空是{v}的。", "在{s}上，天空看起来是{v}的。"],
        ask_en=["What colour is the sky on {s}?", "How does the sky look on {s}?"],
        ask_zh=["{s}的天空是什么颜色？", "{s}上的天空看起来是什么颜色的？"]),
    "day": dict(
        state_en=["A day on {s} lasts {v} hours.", "One day on the planet {s} is {v} hours long."],
        state_zh=["{s}上的一天有{v}个小时。", "{s}的一天长达{v}小时。"],
        ask_en=["How long is a day on {s}?", "How many hours does a day on {s} last?"],
        ask_zh=["{s}上的一天有多长？", "{s}的一天有几个小时？"]),
    "star": dict(
        state_en=["{s} orbits the star {v}.", "The star of {s} is called {v}."],
        state_zh=["{s}绕着恒星{v}运行。", "{s}的恒星叫作{v}。"],
        ask_en=["Which star does {s} orbit?", "What is the name of the star of {s}?"],
        ask_zh=["{s}绕着哪颗恒星运行？", "{s}的恒星叫什么名字？"]),
}


def _cap(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


@dataclass(frozen=True)
class Fact:
    kind: str  # a key of FACT_TEMPLATES
    subject: Name
    value: Name  # as the sentence says it: "a rabbit" / "一只兔子"
    answer: Name  # the short checkable answer, the RL ground truth: "rabbit" / "兔子"

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.subject.en}"

    def state(self, rng: random.Random, zh: bool) -> str:
        template = rng.choice(FACT_TEMPLATES[self.kind]["state_zh" if zh else "state_en"])
        return _cap(template.format(s=self.subject.pick(zh), v=self.value.pick(zh)))

    def ask(self, rng: random.Random, zh: bool) -> str:
        template = rng.choice(FACT_TEMPLATES[self.kind]["ask_zh" if zh else "ask_en"])
        return _cap(template.format(s=self.subject.pick(zh)))


def _number(n) -> Name:
    return Name(str(n), str(n))


# ---------------------------------------------------------------------------------------------------
# The world


@dataclass(frozen=True)
class Town:
    name: Name
    known_for: Name
    near: Name


@dataclass(frozen=True)
class Person:
    name: Name
    she: bool
    home: Town
    pet: Animal
    colour: Name
    age: int
    job: Name

    def pronoun(self, zh: bool, form: str = "subject") -> str:
        if zh:
            return "她" if self.she else "他"
        return {"subject": ("he", "she"), "possessive": ("his", "her"), "object": ("him", "her")}[form][self.she]


@dataclass(frozen=True)
class Planet:
    name: Name
    moons: int
    sky: Name
    day_hours: int
    star: Name


@dataclass
class World:
    """Everything the curriculum talks about, and which items are held out for evaluation."""

    seed: int
    towns: list[Town]
    people: list[Person]
    planets: list[Planet]
    facts: dict  # split ("train" / "eval") -> facts whose questions belong to it
    domain_facts: dict  # the same for the planet catalogue (LoRA)
    all_facts: list[Fact]
    all_domain_facts: list[Fact]
    values: dict  # fact kind -> every (value, answer) the kind can take: wrong answers come from here
    identity_questions: dict  # split -> (english phrasings, chinese phrasings)

    @classmethod
    def build(cls, seed: int = 0, size: str = "small") -> "World":
        """The world of `size`: the first towns, people and planets of one seeded order, so it nests.

        Each size takes a prefix of every name population, shuffled once per seed, and each entity's
        attributes come from its own stream seeded by (seed, kind, name), so a larger size adds entities
        without changing any. Person i's home is one of the towns of the smallest size that has person i,
        so it exists, unchanged, in every size that has that person.
        """
        spec = SIZES[size]
        towns = [Town(name, r.choice(PRODUCTS), r.choice(LANDSCAPES))
                 for name, r in _entities(seed, "town", TOWN_PARTS, spec.towns)]
        people = [Person(name, r.random() < 0.5, r.choice(towns[:_home_towns(i)]), r.choice(ANIMALS),
                         r.choice(COLOURS), r.randint(8, 80), r.choice(JOBS))
                  for i, (name, r) in enumerate(_entities(seed, "person", PERSON_SYLLABLES, spec.people))]
        planets = [Planet(name, r.randint(0, 9), r.choice(COLOURS), r.randint(10, 60), r.choice(STARS))
                   for name, r in _entities(seed, "planet", PLANET_PARTS, spec.planets)]
        facts, domain = _world_facts(people, towns), _planet_facts(planets)
        # The smallest world is a prefix of this one: its facts are those about its people, towns and planets.
        least = min(SIZES.values(), key=lambda s: (s.people, s.towns, s.planets))
        least_facts = _world_facts(people[:least.people], towns[:least.towns])
        least_domain = _planet_facts(planets[:least.planets])

        pairs = lambda names: [(n, n) for n in names]  # noqa: E731 - a value that is also its own answer
        values = dict(
            home=pairs([t.name for t in towns]), pet=[(a.as_pet, a.name) for a in ANIMALS], colour=pairs(COLOURS),
            age=pairs([_number(n) for n in range(8, 81)]), job=[(j, Name(j.en.split(" ", 1)[1], j.zh)) for j in JOBS],
            known_for=pairs(PRODUCTS), near=pairs(LANDSCAPES), legs=[(LEGS[n], _number(n)) for n in LEGS],
            food=pairs([a.food for a in ANIMALS]), moons=pairs([_number(n) for n in range(10)]), sky=pairs(COLOURS),
            day=pairs([_number(n) for n in range(10, 61)]), star=pairs(STARS))

        # Identity phrasings are held out by their own stream: the same ones in every size.
        rng, identity = random.Random(f"nanomind-world/{seed}/identity"), {}
        for lang, questions in (("en", IDENTITY_QUESTIONS_EN), ("zh", IDENTITY_QUESTIONS_ZH)):
            shuffled = rng.sample(questions, len(questions))
            identity[lang] = {"train": shuffled[2:], "eval": shuffled[:2]}
        identity = {s: (identity["en"][s], identity["zh"][s]) for s in ("train", "eval")}
        return cls(seed, towns, people, planets, _hold_out(seed, facts, least_facts),
                   _hold_out(seed, domain, least_domain), facts, domain, values, identity)

    def wrong_value(self, rng: random.Random, fact: Fact) -> Fact:
        """The same fact with another value of its kind: a plausible but wrong answer.

        Never one whose answer contains the right one, as an owl (猫头鹰) would for a cat (猫): a grader
        that looks for the right answer in the text would count it as right.
        """
        right = fact.answer
        value, answer = rng.choice([(v, a) for v, a in self.values[fact.kind]
                                    if v != fact.value and right.en not in a.en and right.zh not in a.zh])
        return dataclasses.replace(fact, value=value, answer=answer)

    @functools.cached_property
    def _by_subject(self) -> dict:
        index = {}
        for fact in self.all_facts + self.all_domain_facts:
            index.setdefault(fact.subject, []).append(fact)
        return index

    def facts_about(self, subject: Name) -> list[Fact]:
        """Every fact about a person, town, animal or planet (in a fixed order)."""
        return self._by_subject[subject]

    def residents(self, town: Town) -> list[Person]:
        return [p for p in self.people if p.home == town]


def _join(a: Name, b: Name) -> Name:
    return Name(a.en + b.en, a.zh + b.zh)


def _entities(seed: int, kind: str, parts: tuple, count: int) -> list[tuple[Name, random.Random]]:
    """The first `count` names of a kind, in an order fixed by the seed alone, each with its own stream."""
    population = [_join(a, b) for a in parts[0] for b in parts[1]]
    names = random.Random(f"nanomind-world/{seed}/{kind}s").sample(population, len(population))[:count]
    return [(name, random.Random(f"nanomind-world/{seed}/{kind}/{name.en}")) for name in names]


def _home_towns(person: int) -> int:
    """How many towns person number `person` may live in: those of the smallest size that has the person."""
    return min(s.towns for s in SIZES.values() if s.people > person)


def _world_facts(people: list[Person], towns: list[Town]) -> list[Fact]:
    facts = []
    for p in people:
        facts += [Fact("home", p.name, p.home.name, p.home.name), Fact("pet", p.name, p.pet.as_pet, p.pet.name),
                  Fact("colour", p.name, p.colour, p.colour), Fact("age", p.name, _number(p.age), _number(p.age)),
                  Fact("job", p.name, p.job, Name(p.job.en.split(" ", 1)[1], p.job.zh))]
    for t in towns:
        facts += [Fact("known_for", t.name, t.known_for, t.known_for), Fact("near", t.name, t.near, t.near)]
    for a in ANIMALS:
        facts += [Fact("legs", a.as_subject, LEGS[a.legs], _number(a.legs)), Fact("food", a.as_subject, a.food, a.food)]
    return facts


def _planet_facts(planets: list[Planet]) -> list[Fact]:
    return [f for p in planets for f in (
        Fact("moons", p.name, _number(p.moons), _number(p.moons)), Fact("sky", p.name, p.sky, p.sky),
        Fact("day", p.name, _number(p.day_hours), _number(p.day_hours)), Fact("star", p.name, p.star, p.star))]


def _hold_out(seed: int, facts: list[Fact], least: list[Fact]) -> dict:
    """Split facts into "train" and "eval" the same way in every size: by a hash of each fact's key.

    The hash alone might hold out nothing of the smallest world, so its lowest-hash facts (the share
    EVAL_FRACTION of them, at least one) are held out too. Every larger world has those same facts,
    so they are held out there as well, and no fact is held out in one size but trained in another.
    """
    ranked = sorted(least, key=lambda f: _hash_fraction(seed, f.key))
    held = {f.key for f in ranked[:max(1, round(EVAL_FRACTION * len(least)))]}
    held |= {f.key for f in facts if _hash_fraction(seed, f.key) < EVAL_FRACTION}
    return {"train": [f for f in facts if f.key not in held], "eval": [f for f in facts if f.key in held]}


# ---------------------------------------------------------------------------------------------------
# Arithmetic, and which problems are held out


OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


@dataclass(frozen=True)
class Problem:
    a: int
    op: str  # "+", "-" or "×"
    b: int

    @property
    def result(self) -> int:
        return OPS[self.op](self.a, self.b)

    @property
    def text(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    @property
    def expression(self) -> str:  # what the calculator tool receives
        return self.text.replace("×", "*")

    @property
    def holdable(self) -> bool:
        """Whether this problem may be held out: never for the steps that worked solutions are made of.

        A worked solution splits the second operand (or, for ×, the first) into tens and ones, so every
        step has a multiple of ten or a single digit in it. Holding out only problems whose operands are
        neither keeps every held-out problem out of every training text, steps included.
        """
        def plain(n):
            return n >= 11 and n % 10 != 0
        if self.op == "×":
            return plain(max(self.a, self.b)) and min(self.a, self.b) >= 2
        return plain(self.a) and plain(self.b)

    def split(self, seed: int) -> str:
        # a + b and b + a are the same item: knowing one gives away the other.
        a, b = (min(self.a, self.b), max(self.a, self.b)) if self.op in "+×" else (self.a, self.b)
        return "eval" if self.holdable and _hash_fraction(seed, f"{a}{self.op}{b}") < EVAL_FRACTION else "train"


def _hash_fraction(seed: int, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for `key` (Python's hash() changes between runs)."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def draw_problem(rng: random.Random, seed: int, split: str, large: bool = False) -> Problem:
    """A problem of the given split: small ones to solve step by step, large ones for the calculator."""
    while True:
        op = rng.choice("+-×")
        if large:
            a, b = {"+": (rng.randint(100, 999), rng.randint(100, 999)),
                    "-": (rng.randint(1000, 9999), rng.randint(100, 999)),
                    "×": (rng.randint(100, 999), rng.randint(11, 99))}[op]
        elif op == "×":
            small_table = rng.random() < 0.4  # 7 × 8 as well as 37 × 8
            a, b = rng.randint(2, 9) if small_table else rng.randint(11, 99), rng.randint(2, 9)
        else:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            if op == "-" and a < b:
                a, b = b, a
        problem = Problem(a, op, b)
        if problem.split(seed) == split:
            return problem


def worked_steps(p: Problem) -> list[tuple[str, Problem]]:
    """The steps of a column-free mental method, as (label key, sub-problem); empty for one-step facts."""
    if p.op in "+-" and p.b >= 10:
        tens, ones = p.b - p.b % 10, p.b % 10
        first = Problem(p.a, p.op, tens)
        return [("tens", first)] + ([("ones", Problem(first.result, p.op, ones))] if ones else [])
    if p.op == "×" and p.a >= 10 and p.b < 10 and p.a % 10:
        tens, ones = Problem(p.a - p.a % 10, "×", p.b), Problem(p.a % 10, "×", p.b)
        return [("tens", tens), ("ones", ones), ("sum", Problem(tens.result, "+", ones.result))]
    return []


STEP_LABELS = {
    ("+", "tens"): ("First add the tens", "先加十位"), ("+", "ones"): ("Then add the ones", "再加个位"),
    ("-", "tens"): ("First subtract the tens", "先减十位"), ("-", "ones"): ("Then subtract the ones", "再减个位"),
    ("×", "tens"): ("First multiply the tens", "先算十位"), ("×", "ones"): ("Then multiply the ones", "再算个位"),
    ("×", "sum"): ("Finally add the two parts", "最后把两部分相加"),
}


def explain(p: Problem, zh: bool, wrong_result: int | None = None) -> str:
    """The steps written out, ending in the result; every step is a checkable `a op b = c`. With
    `wrong_result`, the same steps with a slip in the last one (whose result is always the final one),
    so that they end in that wrong result instead."""
    r = p.result if wrong_result is None else wrong_result
    steps = worked_steps(p)
    if not steps:
        return f"这是基本运算：{p.text} = {r}。" if zh else f"This is a basic fact: {p.text} = {r}."
    results = [s.result for _, s in steps[:-1]] + [r]
    lines = [f"{STEP_LABELS[p.op, key][zh]}：{s.text} = {c}。" if zh else
             f"{STEP_LABELS[p.op, key][zh]}: {s.text} = {c}." for (key, s), c in zip(steps, results)]
    lines.append(f"所以 {p.text} = {r}。" if zh else f"So {p.text} = {r}.")
    return ("" if zh else " ").join(lines)


def worked_answer(p: Problem, zh: bool, wrong_result: int | None = None) -> str:
    """The steps as an answer (or a pretraining document): `explain` after an opener."""
    return (f"我们来算 {p.text}。" if zh else f"Let us work out {p.text}. ") + explain(p, zh, wrong_result)


REASONING_LABELS = {"tens": ("Tens", "十位"), "ones": ("Ones", "个位"), "sum": ("Sum", "相加"),
                    "fact": ("Fact", "基本运算")}


def reasoning_steps(p: Problem, zh: bool) -> str:
    """The same steps as reasoning (inside <think>), worded tersely. Were they worded as a worked answer
    is, every sentence would read the same in both, and only the text far back would tell a model
    whether to end with </think> or with its end of turn: a model trained for few steps ended worked
    answers with a stray </think> (most of the SFT format failures of slow runs)."""
    steps = worked_steps(p) or [("fact", p)]
    lines = [f"{REASONING_LABELS[key][zh]}：{s.text} = {s.result}。" if zh else
             f"{REASONING_LABELS[key][zh]}: {s.text} = {s.result}."
             for key, s in steps]
    lines.append(f"结果：{p.result}。" if zh else f"Result: {p.result}.")
    return ("" if zh else " ").join(lines)


ASK_ARITHMETIC_EN = ["What is {p}?", "Compute {p}.", "Please work out {p}.", "How much is {p}?"]
ASK_ARITHMETIC_ZH = ["{p} 等于多少？", "计算 {p}。", "请算一下 {p}。", "{p} 是多少？"]
ANSWER_ARITHMETIC_EN = ["{p} = {r}.", "The answer is {r}, because {p} = {r}.", "{p} = {r}. The answer is {r}."]
ANSWER_ARITHMETIC_ZH = ["{p} = {r}。", "答案是 {r}，因为 {p} = {r}。", "{p} = {r}，所以答案是 {r}。"]

# Unit conversions for the unit_converter tool: (abbreviation, singular, plural, Chinese).
UNITS = {u[0]: u for u in [("km", "kilometre", "kilometres", "千米"), ("m", "metre", "metres", "米"),
                           ("cm", "centimetre", "centimetres", "厘米"), ("kg", "kilogram", "kilograms", "千克"),
                           ("g", "gram", "grams", "克"), ("h", "hour", "hours", "小时"),
                           ("min", "minute", "minutes", "分钟"), ("s", "second", "seconds", "秒"),
                           ("L", "litre", "litres", "升"), ("mL", "millilitre", "millilitres", "毫升")]}
CONVERSIONS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("h", "min", 60), ("min", "s", 60),
               ("L", "mL", 1000)]


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Conversion:
    value: float
    src: str
    dst: str
    result: float

    def split(self, seed: int) -> str:
        # "1 km = 1000 m" is stated outright in pretraining text, so one-unit conversions stay in training.
        holdable = 1 not in (self.value, self.result)
        # 7 km -> m and 7000 m -> km are the same item: knowing one gives away the other.
        key = ">".join(sorted([f"{_fmt(self.value)} {self.src}", f"{_fmt(self.result)} {self.dst}"]))
        return "eval" if holdable and _hash_fraction(seed, key) < EVAL_FRACTION else "train"


def draw_conversion(rng: random.Random, seed: int, split: str) -> Conversion:
    while True:
        big, small, factor = rng.choice(CONVERSIONS)
        amount = rng.randint(1, 40) / (2 if rng.random() < 0.3 else 1)  # halves are exact in binary: no 0.1 + 0.2
        # Downward (km -> m) multiplies; upward (m -> km) starts from the round result so it stays short.
        c = Conversion(amount, big, small, amount * factor) if rng.random() < 0.6 else \
            Conversion(amount * factor, small, big, amount)
        if c.split(seed) == split:
            return c


# ---------------------------------------------------------------------------------------------------
# Fixed phrases

IDENTITY_QUESTIONS_EN = ["Who are you?", "What is your name?", "Introduce yourself.", "What are you?",
                         "Tell me about yourself.", "Are you a person?", "Who made you?", "What can you do?"]
IDENTITY_QUESTIONS_ZH = ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "你是什么？", "说说你自己吧。", "你是人吗？",
                         "谁创造了你？", "你能做什么？"]
IDENTITY_ANSWERS_EN = [
    "I am nanomind, a small language model trained from scratch. I can answer questions, do arithmetic and use tools.",
    "My name is nanomind. I am a small language model, not a person.",
    "I am nanomind, a small language model trained from scratch on a small bilingual curriculum."]
IDENTITY_ANSWERS_ZH = [
    "我是 nanomind，一个从零开始训练的小型语言模型。我可以回答问题、做算术，还会使用工具。",
    "我叫 nanomind，是一个小型语言模型，不是真人。",
    "我是 nanomind，一个用一套中英双语小课程从零训练出来的小型语言模型。"]
WRONG_IDENTITY_EN = ["I am a person called Bob, and I live in a big city.", "I am a search engine. Type some words."]
WRONG_IDENTITY_ZH = ["我是一个叫小王的真人，住在大城市里。", "我是一个搜索引擎，请输入关键词。"]
GREETINGS_EN = [("Hello!", "Hello! I am nanomind. How can I help you today?"),
                ("Hi there.", "Hi! What would you like to know?"), ("Good morning!", "Good morning! How can I help?")]
GREETINGS_ZH = [("你好！", "你好！我是 nanomind，有什么可以帮你的吗？"), ("嗨。", "嗨！你想知道什么？"),
                ("早上好！", "早上好！需要我帮什么忙？")]
THANKS_EN = [("Thank you!", "You're welcome!"), ("Thanks, that helps.", "Glad I could help.")]
THANKS_ZH = [("谢谢！", "不客气！"), ("谢谢你，这很有帮助。", "很高兴能帮到你。")]
SYSTEM_EN = "You are nanomind, a helpful assistant."
SYSTEM_ZH = "你是 nanomind，一个乐于助人的助手。"
TOOL_SYSTEM_EN = "You are nanomind. Call a tool when it helps you answer."
TOOL_SYSTEM_ZH = "你是 nanomind。需要时请调用工具来回答。"
RAMBLE_EN = ["Well, that is a very interesting question, and there are many ways to think about it.",
             "Before I answer, let me say that questions like this come up quite often.",
             "Some people would say one thing and some would say another, so it is hard to be sure.",
             "I could talk about this for a long time, and perhaps I will.",
             "It reminds me of many other questions, which are also interesting in their own way."]
RAMBLE_ZH = ["嗯，这是一个很有意思的问题，可以从很多角度来想。", "在回答之前，我想先说，这类问题经常有人问。",
             "有人会这么说，也有人会那么说，所以很难确定。", "这个话题我可以讲很久很久，也许我真的会讲很久。",
             "它让我想起了很多别的问题，那些问题也各有各的意思。"]

# Tools as MiniMind's datasets describe them (OpenAI function schema); the names match MiniMind's mock tools.
TOOLS = [
    {"type": "function", "function": {
        "name": "calculate_math", "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {"type": "object", "properties": {"expression": {
            "type": "string", "description": "the expression, e.g. 256 * 37"}}, "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "unit_converter", "description": "Convert a value from one unit to another.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number", "description": "the amount to convert"},
            "from_unit": {"type": "string", "description": "unit of the value, e.g. km"},
            "to_unit": {"type": "string", "description": "unit wanted, e.g. m"}},
            "required": ["value", "from_unit", "to_unit"]}}},
]
TOOLS_JSON = json.dumps(TOOLS, ensure_ascii=False)

# ---------------------------------------------------------------------------------------------------
# Question-answer items: the shared unit of SFT, DPO and RL records


@dataclass
class QA:
    question: str
    answer: str
    gt: str  # the short checkable answer
    wrong: str  # a plausible wrong answer, same language (for DPO)
    other_language: str  # the right answer in the other language (for DPO)
    reasoning: str = ""  # step-by-step, where the item has some


def fact_qa(world: World, rng: random.Random, zh: bool, split: str, domain: bool = False) -> QA:
    fact = rng.choice((world.domain_facts if domain else world.facts)[split])
    statement = fact.state(rng, zh)
    reasoning = (f"问题问的是{fact.subject.zh}。我知道：{statement}" if zh else
                 f"The question is about {fact.subject.en}. What I know: {statement}")
    return QA(fact.ask(rng, zh), statement, fact.answer.pick(zh), world.wrong_value(rng, fact).state(rng, zh),
              fact.state(rng, not zh), reasoning)


# The share of arithmetic answers, in SFT and in DPO's pairs, that show their steps instead of
# stating the result (and then need no reasoning block). A model this small answers few held-out sums
# right in one go but many more when it works them out; with both kinds of answer to choose from, GRPO
# on arithmetic learns which one earns the reward. DPO's pairs keep the same mix: when they all stated
# the result, DPO taught the model to stop showing steps before GRPO could learn to.
WORKED_ANSWER_SHARE = 0.3


def arithmetic_qa(world: World, rng: random.Random, zh: bool, split: str, worked_share: float = 0.0) -> QA:
    """An arithmetic question; with probability `worked_share` its answer shows the steps (and it has no
    separate reasoning), else it states the result and has the steps as its reasoning."""
    p = draw_problem(rng, world.seed, split)
    ask, answers = (ASK_ARITHMETIC_ZH, ANSWER_ARITHMETIC_ZH) if zh else (ASK_ARITHMETIC_EN, ANSWER_ARITHMETIC_EN)
    template = rng.choice(answers)
    wrong = p.result + rng.choice([-10, -2, -1, 1, 2, 10])
    wrong = wrong if wrong >= 0 else p.result + 1
    other = rng.choice(ANSWER_ARITHMETIC_EN if zh else ANSWER_ARITHMETIC_ZH)
    answer, wrong_answer, other_language, reasoning = (template.format(p=p.text, r=p.result),
                                                       template.format(p=p.text, r=wrong),
                                                       other.format(p=p.text, r=p.result), reasoning_steps(p, zh))
    # No draw at all when every answer states its result, so that the RL files, whose questions come
    # from the same draws, stay byte-identical to those written before worked answers existed.
    if worked_share and rng.random() < worked_share:
        answer, wrong_answer, other_language, reasoning = (worked_answer(p, zh), worked_answer(p, zh, wrong),
                                                           worked_answer(p, not zh), "")
    return QA(rng.choice(ask).format(p=p.text), answer, str(p.result), wrong_answer, other_language, reasoning)


# SFT's and DPO's arithmetic: the mix of worked and stated answers
mixed_arithmetic_qa = functools.partial(arithmetic_qa, worked_share=WORKED_ANSWER_SHARE)


def identity_qa(world: World, rng: random.Random, zh: bool, split: str) -> QA:
    question = rng.choice(world.identity_questions[split][zh])
    answer = rng.choice(IDENTITY_ANSWERS_ZH if zh else IDENTITY_ANSWERS_EN)
    return QA(question, answer, "nanomind", rng.choice(WRONG_IDENTITY_ZH if zh else WRONG_IDENTITY_EN),
              rng.choice(IDENTITY_ANSWERS_EN if zh else IDENTITY_ANSWERS_ZH))


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(qa: QA, rng: random.Random, thinking: float) -> dict:
    """The answer turn; with probability `thinking` it carries the reasoning, else an empty or no reasoning."""
    message = {"role": "assistant", "content": qa.answer}
    roll = rng.random()
    if roll < thinking and qa.reasoning:
        message["reasoning_content"] = qa.reasoning
    elif roll < thinking + (1 - thinking) / 2:
        message["reasoning_content"] = ""  # MiniMind's "no thinking" samples: an explicitly empty <think>
    return message


# ---------------------------------------------------------------------------------------------------
# Tool tasks


@dataclass
class ToolTask:
    question: str
    calls: list  # [{"name": ..., "arguments": {...}}]
    results: list  # one tool message content per call
    answer: str
    gt: list  # one checkable value per call, as MiniMind's agent RL counts expected calls by len(gt)


def _calculator_task(world: World, rng: random.Random, zh: bool, split: str) -> ToolTask:
    p = draw_problem(rng, world.seed, split, large=True)
    question = rng.choice(ASK_ARITHMETIC_ZH + ["帮我用计算器算一下 {p}。"] if zh else
                          ASK_ARITHMETIC_EN + ["Use the calculator for {p}."]).format(p=p.text)
    answer = f"{p.text} = {p.result}" + ("。" if zh else ".")
    return ToolTask(question, [{"name": "calculate_math", "arguments": {"expression": p.expression}}],
                    [json.dumps({"result": str(p.result)})], answer, [str(p.result)])


def _conversion_task(world: World, rng: random.Random, zh: bool, split: str) -> ToolTask:
    c = draw_conversion(rng, world.seed, split)
    src, dst, value, result = UNITS[c.src], UNITS[c.dst], _fmt(c.value), _fmt(c.result)
    if zh:
        question = rng.choice(["{v} {a}是多少{b}？", "把 {v} {a}换算成{b}。", "{v} {a}等于多少{b}？"]).format(
            v=value, a=src[3], b=dst[3])
        answer = f"{value} {src[3]}等于 {result} {dst[3]}。"
    else:
        question = rng.choice(["How many {B} are in {v} {A}?", "Convert {v} {a} to {b}.",
                               "What is {v} {A} in {B}?"]).format(
            v=value, a=src[0], b=dst[0], A=src[1] if c.value == 1 else src[2], B=dst[2])
        answer = f"{value} {src[0]} is {result} {dst[0]}."
    arguments = {"value": int(c.value) if float(c.value).is_integer() else c.value,
                 "from_unit": c.src, "to_unit": c.dst}
    return ToolTask(question, [{"name": "unit_converter", "arguments": arguments}],
                    [json.dumps({"result": result, "unit": c.dst})], answer, [result])


def tool_task(world: World, rng: random.Random, zh: bool, split: str) -> ToolTask:
    """One or (sometimes) two tool calls the question cannot be answered without."""
    make = lambda: rng.choice([_calculator_task, _conversion_task])(world, rng, zh, split)  # noqa: E731
    task = make()
    if rng.random() < 0.2:
        second = make()
        task = ToolTask((f"两个问题：{task.question}{second.question}" if zh else
                         f"Two questions. {task.question} {second.question}"), task.calls + second.calls,
                        task.results + second.results, task.answer + ("" if zh else " ") + second.answer,
                        task.gt + second.gt)
    return task


def _tool_system(zh: bool) -> dict:
    return {"role": "system", "content": TOOL_SYSTEM_ZH if zh else TOOL_SYSTEM_EN, "tools": TOOLS_JSON}


def tool_conversation(world: World, rng: random.Random, zh: bool, split: str) -> list[dict]:
    """system (tools) -> user -> assistant tool_calls -> tool results -> assistant answer."""
    task = tool_task(world, rng, zh, split)
    call = {"role": "assistant", "content": "", "tool_calls": json.dumps(task.calls, ensure_ascii=False)}
    if rng.random() < 0.5:
        names = ", ".join(c["name"] for c in task.calls)
        call["reasoning_content"] = (f"这需要精确计算，我来调用 {names}。" if zh else
                                     f"This needs an exact answer, so I will call {names}.")
    return ([_tool_system(zh), _user(task.question), call] + [{"role": "tool", "content": r} for r in task.results]
            + [{"role": "assistant", "content": task.answer}])


# ---------------------------------------------------------------------------------------------------
# Records, one maker per file kind. Each takes (world, rng, split) and returns one JSON-able dict.


def pretrain_record(world: World, rng: random.Random, split: str) -> dict:
    zh = rng.random() < 0.5
    # Stories are the longest records and teach no fact the others do not, so they give up tokens to drills
    # and, with people's facts (which the other kinds repeat too), to worked tool uses.
    kind = rng.choices(["person", "town", "animal", "story", "worked", "drills", "units", "tool_use"],
                       weights=[27, 10, 5, 9, 20, 14, 7, 8])[0]
    sep = "" if zh else " "
    if kind == "person":
        person = rng.choice(world.people)
        facts = world.facts_about(person.name)
        text = sep.join(f.state(rng, zh) for f in rng.sample(facts, rng.randint(2, len(facts))))
    elif kind == "town":
        town = rng.choice(world.towns)
        facts = world.facts_about(town.name)
        sentences = [f.state(rng, zh) for f in rng.sample(facts, len(facts))]
        people = [p.name.pick(zh) for p in world.residents(town)]
        if people:
            names = people[0] if len(people) == 1 else (
                ("、".join(people[:-1]) + "和" if zh else ", ".join(people[:-1]) + " and ") + people[-1])
            sentences.append(f"{names}住在{town.name.zh}。" if zh else f"{names} "
                             f"{'live' if len(people) > 1 else 'lives'} in {town.name.en}.")
        text = sep.join(sentences)
    elif kind == "animal":
        animal = rng.choice(ANIMALS)
        text = sep.join(f.state(rng, zh) for f in world.facts_about(animal.as_subject))
    elif kind == "story":
        text = story(world, rng, zh)
    elif kind == "worked":
        p = draw_problem(rng, world.seed, split)
        text = worked_answer(p, zh)
    elif kind == "drills":
        # The one-step facts that worked solutions are chained from (a ± tens, a ± one digit, the times
        # table, tens × one digit, the sum of the parts), stated bare: a model this small learns them only
        # from many repetitions, and a held-out problem is then solved step by step from them. The
        # held-out text states its problems whole, so that it stays held out.
        facts = [draw_problem(rng, world.seed, split) for _ in range(rng.randint(2, 4))]
        if split == "train":
            facts = [step for p in facts for step in ([s for _, s in worked_steps(p)] or [p])]
        text = ("，" if zh else ", ").join(f"{p.text} = {p.result}" for p in facts) + ("。" if zh else ".")
    elif kind == "tool_use":
        text = worked_tool_use(world, rng, zh, split)
    else:
        facts = rng.sample(CONVERSIONS, 3)
        text = sep.join(f"1 {UNITS[big][3]}等于 {f} {UNITS[small][3]}。" if zh else
                        f"One {UNITS[big][1]} is {f} {UNITS[small][2]}." for big, small, f in facts)
    return {"text": text}


def worked_tool_use(world: World, rng: random.Random, zh: bool, split: str) -> str:
    """A tool task worked in prose: the question, the call with its JSON arguments, what the tool returned
    and the answer. SFT has few tool conversations (each carries the long tool schema), too few for a
    model this small to learn to copy 3-4 digit operands and unit names into a call; plain text teaches
    that copying where tokens are cheap."""
    task = tool_task(world, rng, zh, split)
    calls = [f"{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})" for c in task.calls]
    if zh:
        steps = "".join(f"调用 {c}，得到 {r}。" for c, r in zip(calls, task.results))
        return f"{task.question}{steps}{task.answer}"
    steps = " ".join(f"Calling {c} returns {r}." for c, r in zip(calls, task.results))
    return f"{task.question} {steps} {task.answer}"


def story(world: World, rng: random.Random, zh: bool) -> str:
    """A short story that agrees with every fact about the people in it."""
    p = rng.choice(world.people)
    name, town, he = p.name.pick(zh), p.home.name.pick(zh), p.pronoun(zh)
    kind = rng.randrange(3)
    if kind == 0:
        if zh:
            return (f"{name}住在靠近{p.home.near.zh}的{town}。{he}今年{p.age}岁，是一名{p.job.zh}。每天早上，{he}都会先喂"
                    f"{he}的{p.pet.name.zh}，再去工作。有一天，{he}在路上捡到一条{p.colour.zh}的丝带，开心地笑了，"
                    f"因为{p.colour.zh}是{he}最喜欢的颜色。")
        his = p.pronoun(False, "possessive")
        return (f"{name} lived in {town}, a town near {p.home.near.en}. {_cap(he)} was {p.age} years old and worked "
                f"as {p.job.en}. Every morning {he} fed {his} {p.pet.name.en} before work. One day {he} found a "
                f"{p.colour.en} ribbon in the street and smiled, because {p.colour.en} was {his} favourite colour.")
    if kind == 1:
        others = [q for q in world.people if q.home != p.home] or [q for q in world.people if q != p]
        friend = rng.choice(others)
        there, product = friend.home.name.pick(zh), friend.home.known_for.pick(zh)
        if zh:
            return (f"一天，{town}的{name}去{there}看望朋友{friend.name.zh}。{friend.name.zh}带{p.pronoun(True)}去看"
                    f"{there}最有名的{product}。{name}买了一些{product}，高高兴兴地回到了{town}。")
        return (f"One day {name} from {town} went to see {p.pronoun(False, 'possessive')} friend {friend.name.en} in "
                f"{there}. {friend.name.en} showed {p.pronoun(False, 'object')} the {product} that {there} is famous "
                f"for. {name} bought some {product} and went happily home to {town}.")
    if zh:
        return (f"一天下午，{name}的{p.pet.name.zh}跑丢了。{name}在{town}到处找。最后，{he}在{p.home.near.zh}旁边"
                f"找到了它，它正在吃{p.pet.food.zh}。")
    return (f"One afternoon {name}'s {p.pet.name.en} ran away. {name} looked everywhere in {town}. At last {he} "
            f"found it near {p.home.near.en}, eating {p.pet.food.en}.")


def sft_record(world: World, rng: random.Random, split: str) -> dict:
    zh = rng.random() < 0.5
    # Evaluation has no greetings, thanks or "tell me about" requests: those prompts are training-only.
    kinds, weights = (["fact", "arithmetic", "identity", "profile", "multi", "tool", "tool_unused"],
                      [33, 20, 7, 8, 15, 13, 4]) if split == "train" else \
        (["fact", "arithmetic", "identity", "multi", "tool"], [35, 25, 5, 15, 20])
    kind = rng.choices(kinds, weights)[0]
    if kind == "tool":
        return {"conversations": tool_conversation(world, rng, zh, split)}
    messages = [{"role": "system", "content": SYSTEM_ZH if zh else SYSTEM_EN}] if rng.random() < 0.1 else []
    if kind == "tool_unused":  # tools are on offer but a remembered fact needs none
        messages = [_tool_system(zh)]
        kind = "fact"
    if kind == "profile":
        person = rng.choice(world.people)
        facts = world.facts_about(person.name)
        messages += [_user(f"介绍一下{person.name.zh}。" if zh else f"Tell me about {person.name.en}."),
                     {"role": "assistant", "content": ("" if zh else " ").join(f.state(rng, zh) for f in facts)}]
    elif kind == "multi":
        if split == "train" and rng.random() < 0.6:
            messages += _pair(rng.choice(GREETINGS_ZH if zh else GREETINGS_EN))
        for _ in range(rng.randint(2, 3)):
            qa = (fact_qa if rng.random() < 0.6 else mixed_arithmetic_qa)(world, rng, zh, split)
            messages += [_user(qa.question), _assistant(qa, rng, thinking=0.3)]
        if split == "train" and rng.random() < 0.5:
            messages += _pair(rng.choice(THANKS_ZH if zh else THANKS_EN))
    else:
        make, thinking = {"fact": (fact_qa, 0.2), "identity": (identity_qa, 0),
                          "arithmetic": (mixed_arithmetic_qa, 0.5)}[kind]
        qa = make(world, rng, zh, split)
        messages += [_user(qa.question), _assistant(qa, rng, thinking)]
    return {"conversations": messages}


def _pair(exchange: tuple[str, str]) -> list[dict]:
    return [_user(exchange[0]), {"role": "assistant", "content": exchange[1]}]


def dpo_record(world: World, rng: random.Random, split: str) -> dict:
    zh = rng.random() < 0.5
    make = rng.choices([fact_qa, mixed_arithmetic_qa, identity_qa], weights=[50, 40, 10])[0]
    qa = make(world, rng, zh, split)
    flaw = rng.choice(["wrong", "language", "rambling"])
    if flaw == "wrong":
        rejected = qa.wrong
    elif flaw == "language":
        rejected = qa.other_language
    else:  # long, vague, and the answer (if any) buried at the end
        filler = rng.sample(RAMBLE_ZH if zh else RAMBLE_EN, rng.randint(3, 5))
        rejected = ("" if zh else " ").join(filler + ([qa.answer] if rng.random() < 0.5 else []))
    prompt = [_user(qa.question)]
    return {"chosen": prompt + [{"role": "assistant", "content": qa.answer}],
            "rejected": prompt + [{"role": "assistant", "content": rejected}]}


def rl_record(world: World, rng: random.Random, split: str) -> dict:
    zh = rng.random() < 0.5
    qa = (arithmetic_qa if rng.random() < 0.7 else fact_qa)(world, rng, zh, split)
    # MiniMind's RL prompts end with an assistant placeholder that the trainer drops before generating.
    return {"conversations": [_user(qa.question), {"role": "assistant", "content": ""}], "gt": qa.gt}


def agent_rl_record(world: World, rng: random.Random, split: str) -> dict:
    zh = rng.random() < 0.5
    task = tool_task(world, rng, zh, split)
    return {"conversations": [_tool_system(zh), _user(task.question), {"role": "assistant", "content": ""}],
            "gt": task.gt}


def lora_domain_record(world: World, rng: random.Random, split: str) -> dict:
    zh = rng.random() < 0.5
    roll = rng.random()
    if split == "train" and roll < 0.25:  # the whole catalogue entry: how the held-out facts are taught
        planet = rng.choice(world.planets)
        facts = world.facts_about(planet.name)
        return {"conversations": [
            _user(f"介绍一下{planet.name.zh}。" if zh else f"Tell me about the planet {planet.name.en}."),
            {"role": "assistant", "content": ("" if zh else " ").join(f.state(rng, zh) for f in facts)}]}
    messages = []
    for _ in range(2 if roll > 0.85 else 1):
        qa = fact_qa(world, rng, zh, split, domain=True)
        messages += [_user(qa.question), _assistant(qa, rng, thinking=0.2)]
    return {"conversations": messages}


RECORD_MAKERS = {"pretrain": pretrain_record, "sft": sft_record, "dpo": dpo_record, "rl": rl_record,
                 "agent_rl": agent_rl_record, "lora_domain": lora_domain_record}
# Each file's format, as `nanomind prepare --kind` names it.
FORMATS = {"pretrain": "pretrain", "sft": "sft", "dpo": "dpo", "rl": "rl", "agent_rl": "agent", "lora_domain": "sft"}


# ---------------------------------------------------------------------------------------------------
# Writing


def prompt_of(record: dict) -> str:
    """What a record asks: pretraining text, or its user messages. Evaluation prompts never repeat training ones."""
    if "text" in record:
        return record["text"]
    messages = record.get("conversations") or record["chosen"]
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def eval_records(world: World, stem: str, n: int, rng: random.Random, exclude: set) -> list[dict]:
    """Up to `n` held-out records with distinct prompts, none of them in `exclude`.

    The held-out pool is small for the tiny size (a handful of facts and phrasings), so this may return
    fewer than `n` rather than repeat an item: each evaluation item counts once.
    """
    seen, records = set(exclude), []
    for _ in range(n * 20):
        record = RECORD_MAKERS[stem](world, rng, "eval")
        if prompt_of(record) not in seen:
            seen.add(prompt_of(record))
            records.append(record)
            if len(records) == n:
                break
    return records


def _write_jsonl(path: Path, records: list[dict]) -> dict:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.write_bytes(data)
    return {"lines": len(records), "sha256": hashlib.sha256(data).hexdigest()}


def synthesize(out_dir: str | Path, size: str = "small", seed: int = 0, stems: list[str] | None = None) -> dict:
    """Write the curriculum under `out_dir` and return its manifest (also written as manifest.json).

    `stems` limits it to some of the files (e.g. ["pretrain"]: more text about the same world); each
    file is the same whichever others are written."""
    if size not in SIZES:
        raise ValueError(f"unknown curriculum size {size!r}; choose one of {', '.join(SIZES)}")
    spec = SIZES[size]
    unknown = sorted(set(stems or ()) - set(spec.lines))
    if unknown:
        raise ValueError(f"unknown curriculum file {', '.join(unknown)}; choose from {', '.join(spec.lines)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    world = World.build(seed, size)
    files = {}
    for stem, n in spec.lines.items():
        if stems and stem not in stems:
            continue
        rng = random.Random(f"nanomind-synth/{seed}/{stem}")  # one stream per file: sizes do not shift each other
        train = [RECORD_MAKERS[stem](world, rng, "train") for _ in range(n)]
        # Held-out items are already absent from training by construction; excluding training prompts as
        # well also covers pretraining documents, which share their generators.
        held_out = eval_records(world, stem, spec.eval_lines, random.Random(f"nanomind-synth/{seed}/eval_{stem}"),
                                exclude={prompt_of(r) for r in train})
        for name, records in ((f"{stem}.jsonl", train), (f"eval_{stem}.jsonl", held_out)):
            files[name] = {"format": FORMATS[stem], "split": "eval" if name.startswith("eval_") else "train",
                           **_write_jsonl(out_dir / name, records)}
    manifest = {"generator": "nanomind.synth", "size": size, "seed": seed, "files": files}
    earlier = out_dir / "manifest.json"
    if stems and earlier.exists():
        # Some files only, into a folder of the same curriculum: the manifest keeps listing the others.
        before = json.loads(earlier.read_text(encoding="utf-8"))
        if all(before.get(key) == manifest[key] for key in ("generator", "size", "seed")):
            manifest["files"] = {**before["files"], **files}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return manifest

