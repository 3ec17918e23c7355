"""Evaluation agrees with an independent computation on hand-made files: held-out loss, preference
accuracy, multiple choice, checked answers, tool use, and the `nanomind eval` command."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from nanomind import cli
from nanomind.builtin_text import write_builtin_jsonl
from nanomind.checkpoint import save_checkpoint
from nanomind.data import DataError, read_records
from nanomind.dpo import sequence_logps
from nanomind.evaluation import (answer_accuracy, choice_accuracy, held_out_loss, preference_accuracy,
                                 read_choice_questions, tool_use_accuracy)
from nanomind.evaluation import main as evaluate
from nanomind.generation import SamplingParams, generate
from nanomind.rewards import answer_text
from nanomind.synth import synthesize
from nanomind.tokenizer import Tokenizer, train_tokenizer
from test_agent import ScriptedModel, agent_script


def test_loss_perplexity_and_bits_per_byte_of_a_text_file(tmp_path):
    corpus = write_builtin_jsonl(tmp_path / "text.jsonl", 300)
    tokenizer = train_tokenizer([corpus], vocab_size=400, out_dir=tmp_path / "tok")
    docs = ["The cat sat on the mat.", "北京是中国的首都。", "3 plus 4 equals 7."]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    result = held_out_loss(model, tokenizer, tmp_path / "tok", [tmp_path / "eval.jsonl"], kind="pretrain", seq_len=64)

    # Independently: each document followed by end-of-text, every next token scored once.
    stream = [t for d in docs for t in tokenizer.encode(d) + [tokenizer.pad_id]]
    ids = torch.tensor([stream])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    losses = F.cross_entropy(logits[0].double(), ids[0, 1:], reduction="none")
    n_bytes = sum(len(tokenizer.token_bytes(t)) for t in stream[1:])
    assert result["tokens"] == len(stream) - 1
    assert math.isclose(result["loss"], losses.mean().item(), rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(losses.mean().item()), rel_tol=1e-4)
    assert math.isclose(result["bits_per_byte"], losses.sum().item() / math.log(2) / n_bytes, rel_tol=1e-5)


def test_preference_accuracy_counts_pairs_the_model_prefers(tmp_path):
    corpus = write_builtin_jsonl(tmp_path / "text.jsonl", 300)
    tokenizer = train_tokenizer([corpus], vocab_size=400, out_dir=tmp_path / "tok")
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    answers = [("Seven.", "Eight, I think."), ("Paris is the capital.", "No idea."), ("Yes.", "Yes.")]
    pairs = [{"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": c}],
              "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": r}]}
             for c, r in answers]
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = preference_accuracy(model, tokenizer, tmp_path / "tok", [tmp_path / "dpo.jsonl"])

    def score(conversation):  # the assistant tokens' summed log-probability, computed on its own
        prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(conversation)
        ids = tokenizer.encode(full)
        start = len(tokenizer.encode(prompt))
        end = ids.index(tokenizer.eos_id, start) + 1  # the answer and its end-of-turn token
        targets = torch.full((1, len(ids) - 1), -100)
        targets[0, start - 1:end - 1] = torch.tensor(ids[start:end])
        with torch.no_grad():
            return sequence_logps(model(torch.tensor([ids[:-1]])).logits, targets)[0].item()

    wins = sum(score(p["chosen"]) > score(p["rejected"]) for p in pairs)
    assert result["pairs"] == 3 and result["accuracy"] == wins / 3  # the tie (third pair) is not a win


# ----------------------------------------------------------------------------------------------
# nanomind eval: multiple choice, checked answers, tool use, chat, the command


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    corpus = write_builtin_jsonl(folder / "text.jsonl", 300)
    train_tokenizer([corpus], vocab_size=400, out_dir=folder / "tok")
    return folder / "tok"


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return Tokenizer.load(tok_dir)


def write_question_files(folder):
    """The same kind of questions in the three layouts: C-Eval CSV (header), MMLU CSV (none), JSONL."""
    (folder / "physics_val.csv").write_text(
        "id,question,A,B,C,D,answer\n"
        "0,What falls faster in a vacuum?,a feather,a stone,neither,both at once,C\n"
        '1,"What is the unit of force?",newton,joule,watt,pascal,A\n'
        "2,光在真空中的速度约是多少？,每秒三十万千米,每秒三百米,每秒三千米,每秒三万米,A\n", encoding="utf-8")
    (folder / "algebra_test.csv").write_text(
        "What is 2 + 2?,3,4,5,22,B\n"
        "Solve x + 1 = 3.,x = 1,x = 2,x = 3,x = 4,B\n", encoding="utf-8")
    lines = [{"question": "Which animal barks?", "A": "dog", "B": "cat", "C": "fish", "D": "owl", "answer": "A"},
             {"question": "猫有几条腿？", "A": "两条", "B": "三条", "C": "四条", "D": "六条", "answer": "C"},
             {"question": "Which is a colour?", "choices": ["red", "seven", "run"], "answer": 0,
              "subject": "words"}]
    (folder / "daily.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                                        encoding="utf-8")
    return [folder / "physics_val.csv", folder / "algebra_test.csv", folder / "daily.jsonl"]


def expected_choices(model, tokenizer, questions, shots, scoring):
    """Each option scored alone, one forward pass per option, with the documented prompt format."""
    predictions = []
    for q in questions:
        zh = any("\u4e00" <= c <= "\u9fff" for c in q["question"])
        ask, ans, space = ("问题：", "答案：", "") if zh else ("Question: ", "Answer:", " ")

        def block(x, ask=ask, ans=ans):
            if scoring == "letter":
                return x["question"] + "".join(f"\n{'ABCD'[i]}. {o}" for i, o in enumerate(x["options"])) + "\n" + ans
            return f"{ask}{x['question']}\n{ans}"

        examples = [x for x in questions if x["subject"] == q["subject"] and x is not q][:shots]
        context = "\n\n".join([block(x) + space + ("ABCD"[x["answer"]] if scoring == "letter" else
                                                   x["options"][x["answer"]]) for x in examples] + [block(q)])
        scores = []
        for i, option in enumerate(q["options"]):
            continuation = space + ("ABCD"[i] if scoring == "letter" else option)
            ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
            with torch.no_grad():
                logits = model(torch.tensor([ctx + cont])).logits[0]
            logp = F.log_softmax(logits[len(ctx) - 1:-1].double(), -1).gather(-1, torch.tensor(cont)[:, None]).sum()
            scores.append(logp.item() / (len(option.encode()) if scoring == "text" else 1))
        predictions.append(max(range(len(scores)), key=scores.__getitem__))
    return predictions


HAND_QUESTIONS = [  # what the files above hold, written out again
    ("physics", "What falls faster in a vacuum?", ["a feather", "a stone", "neither", "both at once"], 2),
    ("physics", "What is the unit of force?", ["newton", "joule", "watt", "pascal"], 0),
    ("physics", "光在真空中的速度约是多少？", ["每秒三十万千米", "每秒三百米", "每秒三千米", "每秒三万米"], 0),
    ("algebra", "What is 2 + 2?", ["3", "4", "5", "22"], 1),
    ("algebra", "Solve x + 1 = 3.", ["x = 1", "x = 2", "x = 3", "x = 4"], 1),
    ("daily", "Which animal barks?", ["dog", "cat", "fish", "owl"], 0),
    ("daily", "猫有几条腿？", ["两条", "三条", "四条", "六条"], 2),
    ("words", "Which is a colour?", ["red", "seven", "run"], 0),
]


@pytest.mark.parametrize("shots,scoring", [(0, "text"), (1, "text"), (1, "letter")])
def test_multiple_choice_matches_scoring_each_option_alone(tmp_path, tokenizer, shots, scoring):
    questions = read_choice_questions(write_question_files(tmp_path))
    hand = [{"subject": s, "question": q, "options": o, "answer": a} for s, q, o, a in HAND_QUESTIONS]
    assert [(q.subject, q.question, q.options, q.answer) for q in questions] == [tuple(h.values()) for h in hand]
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    result = choice_accuracy(model, tokenizer, questions, shots=shots, batch_size=3, scoring=scoring)

    predicted = expected_choices(model, tokenizer, hand, shots, scoring)
    assert [p["predicted"] for p in result["predictions"]] == ["ABCD"[i] for i in predicted]
    for subject in ("physics", "algebra", "daily", "words"):
        rows = [(h, p) for h, p in zip(hand, predicted) if h["subject"] == subject]
        assert result["subjects"][subject]["accuracy"] == sum(h["answer"] == p for h, p in rows) / len(rows)
    assert result["accuracy"] == sum(h["answer"] == p for h, p in zip(hand, predicted)) / len(hand)


def test_bad_question_files_name_the_line(tmp_path):
    bad = tmp_path / "bad_val.csv"
    bad.write_text("id,question,A,B,C,D,answer\n0,Q?,a,b,c,d,A\n1,Q2?,a,b,c,d,E\n")
    with pytest.raises(DataError, match=r"bad_val.csv:3: bad answer"):
        read_choice_questions([bad])
    bad.write_text("id,question,A,B,C,D,answer\n0,Q?,a,b,c,d,\n")
    with pytest.raises(DataError, match=r"bad_val.csv:2: .*no public answers"):
        read_choice_questions([bad])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "A": "a", "B": "b", "answer": "A"}\n{"question": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_choice_questions([bad])


def rl_records(questions, gts):
    return [(f"file:{i + 1}", {"conversations": [{"role": "user", "content": q}], "gt": gt})
            for i, (q, gt) in enumerate(zip(questions, gts))]


def test_exact_accuracy_on_answers_known_in_advance(tokenizer):
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    params = SamplingParams(max_new_tokens=8)
    questions = ["What is 2 + 2?", "Hello", "谁是你？", "Name a colour.", "Count to three."]
    alone = [generate(model, tokenizer, [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                                       add_generation_prompt=True)], params)[0]
             for q in questions]
    gts = [answer_text(c.text) if i in (0, 2, 3) else "a wrong answer" for i, c in enumerate(alone)]
    result = answer_accuracy(model, tokenizer, rl_records(questions, gts), "exact", params, batch_size=2)
    assert result["accuracy"] == 3 / 5 and [c["correct"] for c in result["details"]] == [1, 0, 1, 1, 0]
    assert [c["reply"] for c in result["details"]] == [c.text for c in alone]


def test_math_accuracy_with_answers_the_model_is_scripted_to_give(tokenizer):
    def script(text):
        return {"Q1": "2 + 2 = 4.", "Q2": "The answer is 41.", "Q3": "<think>\nhmm\n</think>\n\nIt is 1,000."}[
            re.search(r"user\n(Q\d)", text).group(1)]

    model = ScriptedModel(tokenizer, script)
    records = rl_records(["Q1", "Q2", "Q3", "Q1"], ["4", "42", "1000", ["2", "4"]])
    result = answer_accuracy(model, tokenizer, records, "math", SamplingParams(max_new_tokens=60), batch_size=3)
    assert [c["reward"] for c in result["details"]] == [1.0, 0.0, 1.0, 1.0]
    assert result["accuracy"] == 3 / 4 and [c["answer"] for c in result["details"]][:3] == ["4", "41", "1,000"]


def test_answer_accuracy_reads_records_as_an_rl_file_holds_them(tokenizer):
    """Straight from a file, an RL record ends with MiniMind's empty assistant placeholder: the prompt is
    the conversation before it (the placeholder rendered as a turn would show the model an empty answer)."""
    prompts = []

    def script(text):
        prompts.append(text)
        return "4"

    model = ScriptedModel(tokenizer, script)
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    raw = [("rl.jsonl:1", {"conversations": question + [{"role": "assistant", "content": ""}], "gt": "4"})]
    assert answer_accuracy(model, tokenizer, raw, "math", SamplingParams(max_new_tokens=4))["accuracy"] == 1
    expected = tokenizer.apply_chat_template(question, add_generation_prompt=True)
    assert prompts[0] == tokenizer.decode(tokenizer.encode(expected))
    with pytest.raises(DataError, match=r"rl.jsonl:2: no prompt"):
        answer_accuracy(model, tokenizer, [("rl.jsonl:2", {"conversations": [{"role": "assistant", "content": ""}],
                                                         "gt": "4"})], "math")


def agent_records(questions, gts):
    return [(f"agent.jsonl:{i + 1}", {"conversations": [{"role": "user", "content": q}], "gt": gt})
            for i, (q, gt) in enumerate(zip(questions, gts))]


def test_tool_use_is_scored_per_criterion(tokenizer):
    model = ScriptedModel(tokenizer, agent_script)
    records = agent_records(["What is 256 * 37?", "Wrong", "Malformed", "Hi"], [["9472"], ["36"], ["1"], ["Hello"]])
    result = tool_use_accuracy(model, tokenizer, records, params=SamplingParams(max_new_tokens=120), batch_size=3)
    names = ("right_tools", "valid_arguments", "call_count", "final_answer", "all")
    criteria = [tuple(c["criteria"][name] for name in names) for c in result["details"]]
    assert criteria == [(True, True, True, True, True),  # called the calculator, answered with its result
                        (True, True, True, False, False),  # the right call, then a wrong answer
                        (False, False, False, False, False),  # a malformed call
                        (False, False, False, True, False)]  # no call, but the answer holds the gt
    assert (result["right_tools"], result["valid_arguments"], result["call_count"], result["final_answer"],
            result["all"]) == (0.5, 0.5, 0.5, 0.5, 0.25)
    first, _, malformed, _ = result["details"]
    assert first["calls"] == [{"name": "calculate_math", "arguments": {"expression": "256 * 37"}, "valid": True,
                               "error": None, "result": '{"result": "9472"}'}]
    assert first["answer"] == "256 * 37 = 9472." and first["end"] == "answer" and first["turns"] == 2
    assert malformed["calls"][0]["valid"] is False and "not valid JSON" in malformed["calls"][0]["result"]
    assert result["invalid_calls"] == 1 and result["finished"] == 1.0


def test_eval_command_loss_tools_and_chat(tmp_path, tokenizer, tok_dir, capsys):
    model = random_model(tiny_config(vocab_size=tokenizer.vocab_size))
    save_checkpoint(model, tmp_path / "ckpt", tokenizer)
    docs = ["The cat sat on the mat.", "北京是中国的首都。"]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
    cli.main(["eval", "--model", str(tmp_path / "ckpt"), "--task", "loss", "--data", str(tmp_path / "eval.jsonl"),
              "--seq-len", "64", "--out", str(tmp_path / "loss.json"), "--device", "cpu"])
    saved = json.loads((tmp_path / "loss.json").read_text())
    direct = held_out_loss(model, tokenizer, tok_dir, [tmp_path / "eval.jsonl"], kind="pretrain", seq_len=64)
    assert saved["task"] == "loss" and saved["kind"] == "pretrain"
    assert math.isclose(saved["loss"], direct["loss"], rel_tol=1e-6) and saved["tokens"] == direct["tokens"]
    assert "perplexity" in capsys.readouterr().out

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": 1}\n')
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(tmp_path / "ckpt"), "--task", "math", "--data", str(tmp_path / "bad.jsonl"),
                  "--device", "cpu"])
    assert "bad.jsonl:1:" in capsys.readouterr().err

    # tools through the command, with a scripted model in place of the checkpoint
    (tmp_path / "agent.jsonl").write_text("".join(json.dumps(
        {"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": ""}], "gt": gt}) + "\n"
        for q, gt in [("What is 256 * 37?", ["9472"]), ("Hi", ["Hello"])]))
    args = cli.build_parser().parse_args(["eval", "--model", "scripted", "--task", "tools", "--data",
                                          str(tmp_path / "agent.jsonl"), "--max-new-tokens", "120",
                                          "--out", str(tmp_path / "tools.json")])
    evaluate(args, load=lambda folder: (ScriptedModel(tokenizer, agent_script), tokenizer))
    saved = json.loads((tmp_path / "tools.json").read_text())
    assert saved["all"] == 0.5 and saved["details"][0]["where"].endswith("agent.jsonl:1")
    assert "right tools 0.500" in capsys.readouterr().out

    cli.main(["eval", "--model", str(tmp_path / "ckpt"), "--model", str(tmp_path / "ckpt"), "--task", "chat",
              "--limit", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "chat.json"), "--device", "cpu"])
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert len(saved["rows"]) == 3 and len(saved["rows"][0]["answers"]) == 2
    answers = list(saved["rows"][0]["answers"].values())
    assert answers[0] == answers[1]  # the same checkpoint twice, greedy
    assert "prompt" in capsys.readouterr().out


def test_the_curriculums_own_tool_answers_score_full_marks(tmp_path, tokenizer):
    """Replaying the tool conversations of the built-in curriculum as the model's replies: the built-in
    tools return what the curriculum says they return, and every criterion is met."""
    synthesize(tmp_path, size="tiny")
    replies, records = {}, []
    for _, line, record in read_records([tmp_path / "eval_sft.jsonl"], "sft"):
        messages = record["conversations"]
        if not any(m.get("tool_calls") for m in messages):
            continue
        system, user, call, *results, answer = messages
        replies[user["content"]] = ("\n".join(
            f'<tool_call>\n{json.dumps({"name": c["name"], "arguments": c["arguments"]}, ensure_ascii=False)}\n'
            "</tool_call>" for c in call["tool_calls"]), answer["content"])
        gt = [json.loads(r["content"])["result"] for r in results]
        records.append((f"eval_sft.jsonl:{line}", {"conversations": [system, user], "gt": gt, "results": results}))
    assert len(records) >= 3

    def replay(text):
        question = re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.DOTALL)[0]
        return replies[question][1 if "<tool_response>" in text else 0]

    result = tool_use_accuracy(ScriptedModel(tokenizer, replay), tokenizer, records,
                               params=SamplingParams(max_new_tokens=300), batch_size=4)
    assert result["all"] == 1.0 and result["finished"] == 1.0
    for case, (_, record) in zip(result["details"], records):
        assert [c["result"] for c in case["calls"]] == [r["content"] for r in record["results"]]
