"""A tiny bilingual corpus made on the spot, so demos and tests run offline.

The documents come from a handful of templates (facts, sums, counting, weekdays, colours, short
stories), in English and Chinese. They are repetitive on purpose: a model with a few hundred thousand
parameters can visibly learn them in a minute, which is all the demo and the tests need before a real
data pipeline is wired in. The same seed always gives the same documents.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
NUMBERS_EN = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
NUMBERS_ZH = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九", "十"]

# (thing, colour) in both languages.
COLOURED_THINGS = [
    (("grass", "green"), ("草", "绿色")),
    (("the sky", "blue"), ("天空", "蓝色")),
    (("snow", "white"), ("雪", "白色")),
    (("a lemon", "yellow"), ("柠檬", "黄色")),
    (("a strawberry", "red"), ("草莓", "红色")),
    (("coal", "black"), ("煤", "黑色")),
    (("an orange", "orange"), ("橙子", "橙色")),
]

FACTS_EN = [
    "Water boils at one hundred degrees Celsius.",
    "The sun rises in the east and sets in the west.",
    "A week has seven days.",
    "A cat has four legs and a bird has two.",
    "Fish live in water and breathe with gills.",
    "The moon goes around the earth.",
    "Ice is frozen water.",
    "Bees make honey from flowers.",
    "Trees grow from seeds.",
    "Paris is the capital of France.",
]
FACTS_ZH = [
    "水在一百摄氏度时沸腾。",
    "太阳从东方升起，从西方落下。",
    "一个星期有七天。",
    "猫有四条腿，鸟有两条腿。",
    "鱼生活在水里，用鳃呼吸。",
    "月亮绕着地球转。",
    "冰是冻住的水。",
    "蜜蜂用花蜜酿造蜂蜜。",
    "树是从种子长出来的。",
    "北京是中国的首都。",
]

NAMES_EN = ["Lily", "Tom", "Mia", "Ben", "Anna", "Sam"]
NAMES_ZH = ["小明", "小红", "小华", "小丽", "阿强", "小兰"]
ANIMALS = [("dog", "小狗"), ("cat", "小猫"), ("rabbit", "兔子"), ("duck", "鸭子"), ("bird", "小鸟")]
PLACES = [("park", "公园"), ("river", "河边"), ("garden", "花园"), ("market", "市场"), ("beach", "海边")]
FEELINGS = [("happy", "开心"), ("tired", "累"), ("excited", "兴奋"), ("calm", "平静")]


def _fact(rng: random.Random, zh: bool) -> str:
    return rng.choice(FACTS_ZH if zh else FACTS_EN)


def _colour(rng: random.Random, zh: bool) -> str:
    (thing, colour), (thing_zh, colour_zh) = rng.choice(COLOURED_THINGS)
    return f"{thing_zh}是{colour_zh}的。" if zh else f"The colour of {thing} is {colour}."


def _arithmetic(rng: random.Random, zh: bool) -> str:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return f"{a} 加 {b} 等于 {a + b}。" if zh else f"{a} plus {b} equals {a + b}."
    a, b = max(a, b), min(a, b)
    return f"{a} 减 {b} 等于 {a - b}。" if zh else f"{a} minus {b} equals {a - b}."


def _counting(rng: random.Random, zh: bool) -> str:
    start = rng.randint(0, 5)
    stop = rng.randint(start + 2, 10)
    if zh:
        return "数数：" + "、".join(NUMBERS_ZH[start : stop + 1]) + "。"
    return "Counting: " + ", ".join(NUMBERS_EN[start : stop + 1]) + "."


def _weekday(rng: random.Random, zh: bool) -> str:
    i = rng.randrange(7)
    if zh:
        return f"{DAYS_ZH[i]}之后是{DAYS_ZH[(i + 1) % 7]}。"
    return f"After {DAYS_EN[i]} comes {DAYS_EN[(i + 1) % 7]}."


def _story(rng: random.Random, zh: bool) -> str:
    k = rng.randrange(len(NAMES_EN))
    animal, animal_zh = rng.choice(ANIMALS)
    place, place_zh = rng.choice(PLACES)
    feeling, feeling_zh = rng.choice(FEELINGS)
    (_, colour), (_, colour_zh) = rng.choice(COLOURED_THINGS)
    day = rng.randrange(7)
    if zh:
        name = NAMES_ZH[k]
        return (
            f"{name}有一只{colour_zh}的{animal_zh}。{DAYS_ZH[day]}，{name}和{animal_zh}一起去{place_zh}。"
            f"它们玩了一整天，回家的时候很{feeling_zh}。"
        )
    name = NAMES_EN[k]
    return (
        f"{name} had a {colour} {animal}. On {DAYS_EN[day]}, {name} and the {animal} went to the {place}. "
        f"They played all day and came home {feeling}."
    )


_GENERATORS = [_fact, _colour, _arithmetic, _counting, _weekday, _story]


def builtin_documents(n: int, seed: int = 0) -> list[str]:
    """Return `n` short documents, each one to four sentences in a single language."""
    rng = random.Random(seed)
    documents = []
    for _ in range(n):
        zh = rng.random() < 0.5
        parts = [rng.choice(_GENERATORS)(rng, zh) for _ in range(rng.randint(1, 4))]
        documents.append(("" if zh else " ").join(parts))
    return documents


def write_builtin_jsonl(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` builtin documents as `{"text": ...}` lines and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for text in builtin_documents(n, seed):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def _sum_exchange(rng: random.Random, zh: bool) -> list[dict]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if zh:
        user, answer = f"{a} 加 {b} 等于几？", f"{a} 加 {b} 等于 {a + b}。"
        reasoning = f"先拿 {a}，再加上 {b}，一共是 {a + b}。"
    else:
        user, answer = f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}."
        reasoning = f"Start from {a} and add {b}: that makes {a + b}."
    assistant = {"role": "assistant", "content": answer}
    if rng.random() < 0.5:  # half with visible reasoning, half answering directly
        assistant["reasoning_content"] = reasoning
    return [{"role": "user", "content": user}, assistant]


def _weekday_exchange(rng: random.Random, zh: bool) -> list[dict]:
    i = rng.randrange(7)
    if zh:
        user, answer = f"{DAYS_ZH[i]}之后是星期几？", f"{DAYS_ZH[i]}之后是{DAYS_ZH[(i + 1) % 7]}。"
    else:
        user, answer = f"What day comes after {DAYS_EN[i]}?", f"After {DAYS_EN[i]} comes {DAYS_EN[(i + 1) % 7]}."
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _colour_exchange(rng: random.Random, zh: bool) -> list[dict]:
    (thing, colour), (thing_zh, colour_zh) = rng.choice(COLOURED_THINGS)
    if zh:
        user, answer = f"{thing_zh}是什么颜色的？", f"{thing_zh}是{colour_zh}的。"
    else:
        user, answer = f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def builtin_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    """Return `n` MiniMind-style `conversations` lists: one to three user/assistant pairs each."""
    rng = random.Random(seed)
    exchanges = [_sum_exchange, _weekday_exchange, _colour_exchange]
    conversations = []
    for _ in range(n):
        zh = rng.random() < 0.5
        messages = []
        for _ in range(rng.randint(1, 3)):
            messages += rng.choice(exchanges)(rng, zh)
        conversations.append(messages)
    return conversations
