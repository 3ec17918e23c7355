"""The built-in curriculum: deterministic, well-formed, bilingual, correct, and evaluation held out."""

import hashlib
import json
import random
import re
import subprocess
import sys

import pytest

from nanomind.data import read_records
from nanomind.synth import (SIZES, UNITS, CONVERSIONS, WORKED_ANSWER_SHARE, Conversion, Problem, World, explain,
                            pretrain_record, reasoning_steps, synthesize, worked_answer)
from nanomind.tokenizer import train_tokenizer

STEMS = ["pretrain", "sft", "dpo", "rl", "agent_rl", "lora_domain"]
ROLES = {"system", "user", "assistant", "tool"}
EQUATION = re.compile(r"(\d+) ([-+×]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = synthesize(out, size="tiny", seed=0)
    return out, manifest


def read(out, name):
    with (out / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def messages_of(record):
    return record.get("conversations") or record["chosen"] + record["rejected"]


def user_messages(record):
    return [m["content"] for m in messages_of(record) if m["role"] == "user"]


def texts(record, with_rejected=True):
    """Every piece of natural text in a record (not tool-call JSON)."""
    if "text" in record:
        return [record["text"]]
    messages = record.get("conversations") or record["chosen"] + (record["rejected"] if with_rejected else [])
    return [m[key] for m in messages for key in ("content", "reasoning_content") if m.get(key)]


def test_same_seed_same_bytes_other_seed_other_world(curriculum, tmp_path):
    out, manifest = curriculum
    again = synthesize(tmp_path / "again", size="tiny", seed=0)
    assert again == manifest
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] == again["files"][name]["sha256"]
        assert data.count(b"\n") == entry["lines"] > 0
    assert (out / "manifest.json").read_text(encoding="utf-8") == (tmp_path / "again" / "manifest.json").read_text(
        encoding="utf-8")
    other = synthesize(tmp_path / "other", size="tiny", seed=1)
    assert other["files"]["pretrain.jsonl"]["sha256"] != manifest["files"]["pretrain.jsonl"]["sha256"]
    assert World.build(1, "tiny").people != World.build(0, "tiny").people


def test_every_file_has_its_documented_schema(curriculum):
    out, manifest = curriculum
    assert set(manifest["files"]) == {f"{p}{s}.jsonl" for s in STEMS for p in ("", "eval_")}
    for stem in STEMS:
        for name in (f"{stem}.jsonl", f"eval_{stem}.jsonl"):
            for i, record in enumerate(read(out, name), start=1):
                where = f"{name}:{i}"
                if stem == "pretrain":
                    assert list(record) == ["text"] and record["text"].strip(), where
                    continue
                if stem == "dpo":
                    chosen, rejected = record["chosen"], record["rejected"]
                    assert chosen[:-1] == rejected[:-1] and chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
                    assert chosen[-1]["content"] != rejected[-1]["content"], where
                for m in messages_of(record):
                    assert m["role"] in ROLES and isinstance(m["content"], str), where
                    assert set(m) <= {"role", "content", "reasoning_content", "tools", "tool_calls"}, where
                    if "tools" in m:
                        assert m["role"] == "system"
                        assert {t["function"]["name"] for t in json.loads(m["tools"])} == {"calculate_math",
                                                                                           "unit_converter"}
                    if "tool_calls" in m:
                        calls = json.loads(m["tool_calls"])
                        assert m["role"] == "assistant" and calls, where
                        assert all(set(c) == {"name", "arguments"} and isinstance(c["arguments"], dict) for c in calls)
                conversation = record.get("conversations")
                if stem in ("rl", "agent_rl"):
                    assert conversation[-1] == {"role": "assistant", "content": ""}, where
                    assert conversation[-2]["role"] == "user", where
                    gt = record["gt"]
                    assert (isinstance(gt, str) and gt) if stem == "rl" else \
                        (isinstance(gt, list) and gt and all(isinstance(g, str) and g for g in gt)), where
                    assert ("tools" in conversation[0]) == (stem == "agent_rl"), where
                elif stem in ("sft", "lora_domain"):
                    assert conversation[-1]["role"] == "assistant" and conversation[-1]["content"], where
                    assert "gt" not in record


def test_the_project_readers_accept_every_file(curriculum):
    """Each file passes nanomind's strict data reader for the format the manifest names."""
    out, manifest = curriculum
    for name, entry in manifest["files"].items():
        assert sum(1 for _ in read_records([out / name], entry["format"])) == entry["lines"]


def test_sft_covers_thinking_tools_and_multi_turn(curriculum):
    out, _ = curriculum
    records = read(out, "sft.jsonl")
    assistants = [m for r in records for m in r["conversations"] if m["role"] == "assistant"]
    assert any(m.get("reasoning_content") for m in assistants)  # with thinking
    assert any(m.get("reasoning_content") == "" for m in assistants)  # explicitly empty thinking
    assert any("reasoning_content" not in m for m in assistants)
    assert any(sum(m["role"] == "user" for m in r["conversations"]) >= 2 for r in records)  # multi-turn
    assert any("nanomind" in m["content"] for m in assistants)  # identity
    tool_records = [r["conversations"] for r in records if any(m["role"] == "tool" for m in r["conversations"])]
    names = {c["name"] for conv in tool_records for m in conv if "tool_calls" in m for c in json.loads(m["tool_calls"])}
    assert names == {"calculate_math", "unit_converter"}
    for conv in tool_records:
        # A tool result follows each call, and the assistant answers after the results.
        roles = [m["role"] for m in conv]
        calls = json.loads(conv[roles.index("tool") - 1]["tool_calls"])
        assert roles.count("tool") == len(calls) and roles[-1] == "assistant" and roles[-2] == "tool"


def test_both_languages_in_every_file(curriculum):
    out, manifest = curriculum
    for name in manifest["files"]:
        joined = " ".join(t for r in read(out, name) for t in texts(r))
        assert re.search(r"[\u4e00-\u9fff]", joined), name
        assert re.search(r"\b(the|is|What|How)\b", joined), name


def test_evaluation_prompts_never_appear_in_training(curriculum):
    out, manifest = curriculum
    train_prompts, train_text = set(), []
    for stem in STEMS:
        for record in read(out, f"{stem}.jsonl"):
            train_prompts.update([record["text"]] if stem == "pretrain" else user_messages(record))
            train_text += texts(record)
    # Arithmetic is held out by problem: no training text states a held-out problem, not even as a
    # worked step, and every problem an evaluation prompt asks is a held-out one.
    train_problems = {Problem(int(a), op, int(b)) for t in train_text for a, op, b, _ in EQUATION.findall(t)}
    assert all(p.split(manifest["seed"]) == "train" for p in train_problems)
    asked = 0
    for stem in STEMS:
        for record in read(out, f"eval_{stem}.jsonl"):
            prompts = [record["text"]] if stem == "pretrain" else user_messages(record)
            assert prompts and not set(prompts) & train_prompts, (stem, prompts)
            for prompt in prompts:
                for a, op, b in re.findall(r"(\d+) ([-+×]) (\d+)", prompt):
                    problem = Problem(int(a), op, int(b))
                    if problem.split(manifest["seed"]) == "eval":
                        asked += 1
                        assert problem not in train_problems and Problem(int(b), op, int(a)) not in train_problems
                    else:  # only a worked document shows problems that are not held out: its steps
                        assert stem == "pretrain", prompt
    assert asked > 20

    # The LoRA domain (planets) is new: no planet name appears in the pretraining or SFT data.
    world = World.build(manifest["seed"], manifest["size"])
    general = " ".join(t for stem in ("pretrain", "sft") for r in read(out, f"{stem}.jsonl") for t in texts(r))
    domain = " ".join(t for r in read(out, "lora_domain.jsonl") for t in texts(r))
    for planet in world.planets:
        assert planet.name.en not in general and planet.name.zh not in general
        assert planet.name.en in domain and planet.name.zh in domain


UNIT_WORDS = {word: abbr for abbr, singular, plural, zh in UNITS.values() for word in (abbr, singular, plural, zh)}
UNIT_PATTERN = re.compile("(?<![A-Za-z])(" + "|".join(sorted(map(re.escape, UNIT_WORDS), key=len, reverse=True))
                          + ")(?![A-Za-z])")


def expected_tool_answers(question):
    """The values an agent prompt asks for, read from its text: each sentence is a sum or a conversion."""
    answers = []
    for sentence in re.split(r"[?？。]|\.(?=\s|$)", question):
        problem = re.search(r"(\d+) ([-+×]) (\d+)", sentence)
        if problem:
            a, op, b = problem.groups()
            answers.append(str(OPS[op](int(a), int(b))))
            continue
        amount = re.search(r"(\d+(?:\.\d+)?) ?", sentence)
        if not amount:
            continue
        src = UNIT_WORDS[UNIT_PATTERN.match(sentence, amount.end()).group(1)]  # the unit right after the number
        dst = next(UNIT_WORDS[m.group(1)] for m in UNIT_PATTERN.finditer(sentence) if m.start() != amount.end())
        answers.append(convert(float(amount.group(1)), src, dst))
    return answers


def convert(value, src, dst):
    factors = {(big, small): f for big, small, f in CONVERSIONS}
    value = value * factors[src, dst] if (src, dst) in factors else value / factors[dst, src]
    return str(int(value)) if float(value).is_integer() else str(value)


def calculator_problem(expression):
    a, op, b = expression.split()
    return Problem(int(a), "×" if op == "*" else op, int(b))


def run_tool(call):
    args = call["arguments"]
    if call["name"] == "calculate_math":
        p = calculator_problem(args["expression"])
        return str(OPS[p.op](p.a, p.b))
    return convert(args["value"], args["from_unit"], args["to_unit"])


def test_arithmetic_tool_results_and_ground_truths_are_correct(curriculum):
    out, manifest = curriculum
    checked = 0
    for name in manifest["files"]:
        for record in read(out, name):
            for text in texts(record, with_rejected=False):  # rejected DPO answers are wrong on purpose
                for a, op, b, result in EQUATION.findall(text):
                    assert OPS[op](int(a), int(b)) == int(result), (name, text)
                    checked += 1
    assert checked > 1000

    for stem in ("sft", "agent_rl"):
        for name in (f"{stem}.jsonl", f"eval_{stem}.jsonl"):
            for record in read(out, name):
                conv = record["conversations"]
                for i, m in enumerate(conv):
                    if "tool_calls" in m:
                        calls = json.loads(m["tool_calls"])
                        results = [json.loads(t["content"])["result"] for t in conv[i + 1:i + 1 + len(calls)]]
                        assert results == [run_tool(c) for c in calls]
                        assert all(r in conv[-1]["content"] for r in results)  # the answer uses the results
                if "gt" in record:  # agent RL: work each expected value out from the question's own words
                    assert record["gt"] == expected_tool_answers(conv[-2]["content"]), conv[-2]["content"]
    for record in read(out, "rl.jsonl") + read(out, "eval_rl.jsonl"):
        question = record["conversations"][0]["content"]
        problem = re.search(r"(\d+) ([-+×]) (\d+)", question)
        if problem:
            a, op, b = problem.groups()
            assert record["gt"] == str(OPS[op](int(a), int(b))), question


def test_rl_fact_ground_truths_agree_with_the_world(curriculum):
    out, manifest = curriculum
    world = World.build(manifest["seed"], manifest["size"])
    answers = {f.subject.pick(zh): set() for f in world.all_facts for zh in (False, True)}
    for f in world.all_facts:
        for zh in (False, True):
            answers[f.subject.pick(zh)].add(f.answer.pick(zh))
    fact_items = 0
    for record in read(out, "rl.jsonl") + read(out, "eval_rl.jsonl"):
        question = record["conversations"][0]["content"]
        subjects = [s for s in answers if s in question]
        if subjects:
            fact_items += 1
            subject = max(subjects, key=len)
            assert record["gt"] in answers[subject], (question, record["gt"])
    assert fact_items > 10


def test_the_chat_template_renders_every_conversation(curriculum, tmp_path):
    """The SFT files feed straight into the tokenizer trainer and the chat template, tools included."""
    out, _ = curriculum
    files = [out / "pretrain.jsonl", out / "sft.jsonl", out / "lora_domain.jsonl"]
    tokenizer = train_tokenizer(files, vocab_size=400)
    for name in ("sft.jsonl", "eval_sft.jsonl", "lora_domain.jsonl"):
        for record in read(out, name):
            conv = record["conversations"]
            rendered = tokenizer.apply_chat_template(conv, tools=conv[0].get("tools"))
            assert rendered.count("<|im_start|>assistant") == sum(m["role"] == "assistant" for m in conv)
            assert conv[-1]["content"] in rendered


def test_sizes_are_ordered_and_tiny_is_quick(tmp_path):
    import time
    start = time.perf_counter()
    synthesize(tmp_path, size="tiny", seed=5)
    assert time.perf_counter() - start < 2
    totals = [sum(s.lines.values()) for s in SIZES.values()]
    assert totals == sorted(totals)
    for count in ("people", "towns", "planets", "eval_lines"):  # the worlds nest only if every count grows
        counts = [getattr(s, count) for s in SIZES.values()]
        assert counts == sorted(counts), count
    with pytest.raises(ValueError, match="tiny, small, medium"):
        synthesize(tmp_path, size="huge")


@pytest.mark.parametrize("seed", [0, 7])
def test_a_smaller_world_is_a_sub_world_of_every_larger_one(seed):
    """Same towns, people (homes, ages, jobs ...) and planets first, and the same items held out."""
    worlds = [World.build(seed, size) for size in SIZES]  # World.build alone: no medium-sized files
    for small, large in zip(worlds, worlds[1:]):
        assert large.towns[:len(small.towns)] == small.towns and len(large.towns) > len(small.towns)
        assert large.people[:len(small.people)] == small.people and len(large.people) > len(small.people)
        assert large.planets[:len(small.planets)] == small.planets and len(large.planets) > len(small.planets)
        assert all(p.home in small.towns for p in small.people)
        assert large.identity_questions == small.identity_questions
        for split_of in (lambda w: w.facts, lambda w: w.domain_facts):
            small_keys = {s: {f.key for f in split_of(small)[s]} for s in ("train", "eval")}
            large_keys = {s: {f.key for f in split_of(large)[s]} for s in ("train", "eval")}
            assert small_keys["eval"] <= large_keys["eval"] and small_keys["train"] <= large_keys["train"]
            assert not small_keys["eval"] & large_keys["train"] and not small_keys["train"] & large_keys["eval"]
    for world in worlds:  # every size has something held out, and trains on most
        for split in (world.facts, world.domain_facts):
            assert 0 < len(split["eval"]) < len(split["train"])


def test_cli_writes_the_curriculum(tmp_path):
    result = subprocess.run([sys.executable, "-m", "nanomind.cli", "data", "synth", "--out", str(tmp_path / "cli"),
                             "--size", "tiny", "--seed", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest == synthesize(tmp_path / "api", size="tiny", seed=3)
    assert "sft.jsonl" in result.stdout


def test_some_files_only_are_the_same_files(curriculum, tmp_path):
    out, manifest = curriculum
    some = synthesize(tmp_path / "some", size="tiny", seed=0, stems=["pretrain", "rl"])
    assert sorted(some["files"]) == ["eval_pretrain.jsonl", "eval_rl.jsonl", "pretrain.jsonl", "rl.jsonl"]
    for name, entry in some["files"].items():
        assert entry == manifest["files"][name]
    # Written again into the full curriculum's folder, the manifest still lists every file.
    assert synthesize(out, size="tiny", seed=0, stems=["rl"]) == manifest
    with pytest.raises(ValueError, match="unknown curriculum file sfft"):
        synthesize(tmp_path / "bad", size="tiny", stems=["sfft"])


def test_every_town_is_said_to_hold_only_its_residents():
    world = World.build(0, "small")  # it has towns of one resident, as the tiny one has not
    rng = random.Random(0)
    said = {False: 0, True: 0}  # per language: the bug this guards against was in the Chinese sentence
    for _ in range(3000):
        text = pretrain_record(world, rng, "train")["text"]
        for town in world.towns:
            residents = world.residents(town)
            for zh in (False, True):
                lives = re.search(rf"(?:^|。)([^。]*?)住在{town.name.zh}。" if zh else
                                  rf"(?:^|\. )([^.]*?) lives? in {town.name.en}\.", text)
                if lives and residents:
                    # what the counter needs: a one-resident town's own record (its two facts, then who
                    # lives there: the name three times), not a person's "lives in" sentence
                    said[zh] += len(residents) == 1 and text.count(town.name.pick(zh)) >= 3
                    named = re.split(r"、|和" if zh else r", | and ", lives.group(1))
                    names = [p.name.pick(zh) for p in residents]
                    # a person's own facts name one resident; a town's list names them all
                    assert named == names or (len(named) == 1 and named[0] in names), text
    assert min(said.values()) > 10, said


def test_pretraining_drills_the_steps_that_worked_solutions_are_chained_from(curriculum):
    out, _ = curriculum
    texts = [r["text"] for r in read(out, "pretrain.jsonl")]
    drills = [text for text in texts if EQUATION.match(text)]  # worked solutions open with words
    stated = {(int(a), op, int(b)) for text in drills for a, op, b, _ in EQUATION.findall(text)}
    assert len(drills) > 50
    # the kinds of fact a worked solution chains: a ± tens, a ± one digit, the times table, tens × one digit
    assert any(op == "+" and a >= 10 and 0 < b < 10 for a, op, b in stated)
    assert any(op == "-" and a >= 10 and b % 10 == 0 for a, op, b in stated)
    assert any(op == "×" and a < 10 and b < 10 for a, op, b in stated)
    assert any(op == "×" and a % 10 == 0 and b < 10 for a, op, b in stated)
    # never a problem of the kind held out (needing steps of its own), only the steps
    assert not any(Problem(a, op, b).holdable for a, op, b in stated)
    assert any("work out" in text or "我们来算" in text for text in texts)  # the worked solutions are still there


def arithmetic_answers(records):
    """(problem, assistant message) for each arithmetic question answered without a tool."""
    for record in records:
        conv = record.get("conversations") or record["chosen"]
        for question, answer in zip(conv, conv[1:]):
            problem = re.search(r"(\d+) ([-+×]) (\d+)", question["content"]) if question["role"] == "user" else None
            if problem and answer["role"] == "assistant" and not answer.get("tool_calls"):
                a, op, b = problem.groups()
                yield Problem(int(a), op, int(b)), answer


def is_worked(problem, message):
    return message["content"] in (worked_answer(problem, False), worked_answer(problem, True))


def test_some_arithmetic_answers_show_their_steps_in_place_of_reasoning(curriculum):
    out, _ = curriculum
    for stem in ("sft", "dpo"):  # DPO's pairs keep SFT's mix, so that DPO does not unteach the steps
        worked, stated = [], []
        for p, m in arithmetic_answers(read(out, f"{stem}.jsonl")):
            (worked if is_worked(p, m) else stated).append((p, m))
        share = len(worked) / (len(worked) + len(stated))
        assert len(worked) >= 10 and abs(share - WORKED_ANSWER_SHARE) < 0.1, (stem, len(worked), len(stated))
        assert not any(m.get("reasoning_content") for _, m in worked)  # the steps are said once (in SFT)
        # the others state the result
        assert all(str(p.result) in m["content"] for p, m in stated)
    # and those with reasoning work it out there, worded otherwise (no sentence of one is in the other)
    reasoned = [(p, m) for p, m in arithmetic_answers(read(out, "sft.jsonl")) if m.get("reasoning_content")]
    assert reasoned and all(m["reasoning_content"] in (reasoning_steps(p, False), reasoning_steps(p, True))
                            for p, m in reasoned)
    for p, m in reasoned[:50]:
        answer_sentences = set(re.split(r"(?<=[.。])\s*", worked_answer(p, False) + worked_answer(p, True)))
        assert not answer_sentences & set(re.split(r"(?<=[.。])\s*", m["reasoning_content"])) - {""}
        assert EQUATION.findall(m["reasoning_content"])[-1][3] == str(p.result)
    # a worked answer DPO prefers against a wrong one: the same steps with a slip in the last, ending wrong
    slips = 0
    for record in read(out, "dpo.jsonl"):
        found = list(arithmetic_answers([record]))
        if not found or not is_worked(*found[0]):
            continue
        p, chosen = found[0]
        equations, chosen_equations = (EQUATION.findall(m["content"]) for m in (record["rejected"][-1], chosen))
        if equations and equations[-1][3] != str(p.result):
            assert [e[:3] for e in equations] == [e[:3] for e in chosen_equations]  # the same operations
            assert equations[:-2] == chosen_equations[:-2]  # with the same results before the slip
            assert len(equations) == 1 or equations[-2][3] == equations[-1][3]  # the slip is carried to the end
            slips += 1
    assert slips > 3


WORKED_CALL = re.compile(r"(calculate_math|unit_converter)\((\{.*?\})\)(?: returns |，得到 )(\{.*?\})(?:\.|。)")


def held_out_item(call, seed):
    """Whether a tool call's problem or conversion is one that evaluation holds out."""
    args = call["arguments"]
    if call["name"] == "calculate_math":
        return calculator_problem(args["expression"]).split(seed) == "eval"
    result = float(run_tool(call))
    return Conversion(float(args["value"]), args["from_unit"], args["to_unit"], result).split(seed) == "eval"


def test_pretraining_works_tool_uses_in_prose_with_correct_calls(curriculum):
    out, manifest = curriculum
    texts = [r["text"] for r in read(out, "pretrain.jsonl")]
    worked = [(text, list(WORKED_CALL.finditer(text))) for text in texts if WORKED_CALL.search(text)]
    assert len(worked) > 30 and {"calculate_math", "unit_converter"} == {m[1] for _, ms in worked for m in ms}
    for text, matches in worked:
        answer = text[matches[-1].end():]  # what follows the last call: the answer, which uses every result
        for m in matches:
            call = {"name": m[1], "arguments": json.loads(m[2])}
            result = json.loads(m[3])["result"]
            assert result == run_tool(call), text
            assert re.search(rf"(?<![\d.]){re.escape(result)}(?![\d]|\.\d)", answer), text
            assert not held_out_item(call, manifest["seed"]), text
    # while the calls of held-out tool conversations are all held-out items, so none is worked above
    held_out_calls = [call for record in read(out, "eval_sft.jsonl") for message in record["conversations"]
                      for call in json.loads(message.get("tool_calls") or "[]")]
    assert held_out_calls and all(held_out_item(call, manifest["seed"]) for call in held_out_calls)


def test_a_conversion_and_its_inverse_are_held_out_together():
    seed, held = 0, 0
    for big, small, factor in CONVERSIONS:
        for amount in range(2, 41):
            down = Conversion(amount, big, small, amount * factor)
            up = Conversion(amount * factor, small, big, amount)
            assert down.split(seed) == up.split(seed)
            held += down.split(seed) == "eval"
    assert held > 0
