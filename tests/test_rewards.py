"""Rewards: answers are read the way people write them, each reward scores hand-made cases as documented,
user rewards load from files, weights combine, and a reward model scores a batch as it scores one."""

import json
import random

import pytest

from nanomind.rewards import (RewardModel, RewardSet, exact_reward, extract_final_answer, length_reward,
                              load_reward, math_reward, numbers_equal, parse_number, repeated_ngram_share,
                              repetition_penalty, think_format_reward, tool_call_reward)
from nanomind.synth import TOOLS_JSON, World, arithmetic_qa, fact_qa, tool_task


@pytest.mark.parametrize("text, answer", [
    (r"So the result is \boxed{42}.", "42"),
    (r"\boxed{1} first, then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),  # the last box, braces nested
    (r"\boxed{x^{2}} is not it; \boxed{ {7} }", "{7}"),
    ("答案是 72982，因为 802 × 91 = 72982。", "72982"),
    ("802 × 91 = 72982，所以答案是 72982。", "72982"),
    ("答案：-15", "-15"),
    ("The answer is 0, because 69 - 69 = 0.", "0"),
    ("Let me see. The answer is: 3.5.", "3.5"),
    ("answer: 3/4", "3/4"),
    ("The answer is **1,121**.", "1,121"),
    ("罗特今年45岁。", "45"),  # digits next to Chinese text are a number
    ("643 + 153 = 796.", "796"),  # the last number
    ("It is 10-3 or so", "3"),  # a minus between numbers is subtraction
    ("x = -3", "-3"),
    ("<think>\nThe answer is 5\n</think>\n\nIt is 7.", "7"),  # reasoning ignored
    ("the answer is 9, hmm\n</think>\n\n8", "8"),  # the prompt opened the block
    ('<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "2*21"}}\n</tool_call>', None),
    ("H2O is water", None),
    ("I do not know.", None),
])
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


@pytest.mark.parametrize("a, b, equal", [
    ("1,234", "1234", True), ("3/4", "0.75", True), (r"\frac{3}{4}", "0.75", True), ("-12", "-12.0", True),
    ("45岁", "45", True), ("12 km.", "12", True), ("$5", "5", True), ("0.1", "0.1000000001", True),
    ("796", "797", False), ("-3", "3", False), ("abc", "1", False), (None, "1", False), ("1/0", "1", False),
])
def test_numbers_equal(a, b, equal):
    assert numbers_equal(a, b) is equal


def test_parse_number_is_exact():
    assert parse_number("1,234.5 km") * 2 == 2469
    assert parse_number("−7") == -7  # a typographic minus


def test_math_reward():
    def score(completion, gt):
        return math_reward("", completion, {"gt": gt})

    assert score("802 × 91 = 72982。", "72982") == 1.0
    assert score("The answer is 72983, because 802 × 91 = 72982.", "72982") == 0.0  # the stated answer counts
    assert score(r"<think>maybe 72982</think>\boxed{72981}", "72982") == 0.0
    assert score("17 hours is 1,020 minutes.", ["1020"]) == 1.0
    assert score("Rosette keeps a duck at home.", "duck") == 1.0  # a text answer, as synth's fact questions
    assert score("Rosette keeps a duckling.", "duck") == 0.0  # whole words only
    assert score("罗特养了一只兔子。", "兔子") == 1.0
    # several values (agent records): the share found, in order
    two = ["796", "1121"]
    assert score("643 + 153 = 796. 921 + 200 = 1121.", two) == 1.0
    assert score("643 + 153 = 796. 921 + 200 = 1120.", two) == 0.5
    assert score("921 + 200 = 1121. 643 + 153 = 796.", two) == 0.5  # out of order
    with pytest.raises(ValueError, match="sample\\['gt'\\]"):
        math_reward("", "42", {})


def test_math_reward_on_the_curriculum():
    """Every reference answer of the built-in curriculum earns 1, every DPO-rejected wrong one 0."""
    world, rng = World.build(0, "tiny"), random.Random(0)
    for i in range(400):
        zh, split = i % 2 == 0, ("train", "eval")[i % 4 == 1]
        qa = (arithmetic_qa if i % 3 == 0 else fact_qa)(world, rng, zh, split)  # rl.jsonl's two kinds
        sample = {"gt": qa.gt}
        assert math_reward("", qa.answer, sample) == 1.0, (qa.answer, qa.gt)
        assert math_reward("", f"{qa.reasoning}\n</think>\n\n{qa.answer}", sample) == 1.0
        assert math_reward("", qa.wrong, sample) == 0.0, (qa.wrong, qa.gt)
        task = tool_task(world, rng, zh, split)  # agent_rl.jsonl: one gt per tool call
        assert math_reward("", task.answer, {"gt": task.gt}) == 1.0, (task.answer, task.gt)
    assert math_reward("", "A dog has four legs.", {"gt": "4"}) == 1.0  # as the curriculum says it
    assert math_reward("", "狗用四条腿走路。", {"gt": "4"}) == 1.0
    assert math_reward("", "鸭子有两条腿。", {"gt": "4"}) == 0.0


def test_exact_reward():
    assert exact_reward("", "  Paris \n", {"gt": "Paris"}) == 1.0
    assert exact_reward("", "<think>hmm</think>The answer is Paris.", {"gt": "Paris"}) == 1.0
    assert exact_reward("", "paris", {"gt": "Paris"}) == 0.0
    assert exact_reward("", "Lyon", {"gt": ["Paris", "Lyon"]}) == 1.0


def test_think_format_reward():
    opened, closed = "<|im_start|>assistant\n<think>\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    plan = "First add the tens, then the ones."
    assert think_format_reward(opened, f"{plan}\n</think>\n\n42", {}) == 1.0
    assert think_format_reward(opened, "ok\n</think>\n\n42", {}) == 0.5  # too short
    assert think_format_reward(opened, "x" * 2000 + "</think>42", {}) == 0.5  # too long
    assert think_format_reward(opened, f"{plan} and on and on", {}) == 0.0  # never closed
    assert think_format_reward(opened, f"{plan}</think><think>{plan}</think>42", {}) == 0.0  # two blocks
    assert think_format_reward("", f"<think>{plan}</think>42", {}) == 1.0  # the reply opens it
    assert think_format_reward("", f"Sure. <think>{plan}</think>42", {}) == 0.0  # not at the start
    assert think_format_reward(closed, "42", {}) == 1.0  # thinking off: no tags wanted
    assert think_format_reward(closed, "<think>x</think>42", {}) == 0.0
    assert think_format_reward(opened, f"{plan}</think>42", {}, min_chars=1, max_chars=10) == 0.5


def call(name="calculate_math", **arguments):
    arguments = arguments or {"expression": "643 + 153"}
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_tool_call_reward():
    agent = {"conversations": [{"role": "system", "content": "", "tools": TOOLS_JSON},
                               {"role": "user", "content": "Two questions."}], "gt": ["796", "1121"]}
    assert tool_call_reward("", call() + "\n" + call(expression="921 + 200"), agent) == 1.0
    assert tool_call_reward("", call(), agent) == 0.5  # one of two calls
    assert tool_call_reward("", "The answer is 796.", agent) == 0.0  # no calls at all
    # A botched second call scores as no second call: trying is never worse than not calling.
    assert tool_call_reward("", call() + call(name="search"), agent) == 0.5  # 1 valid, 1 unknown tool
    assert tool_call_reward("", call() + call(expression=5), agent) == 0.5  # mistyped argument
    assert tool_call_reward("", call() + "<tool_call>\n{oops", agent) == 0.5  # unclosed tag
    assert tool_call_reward("", call(name="search") + call(name="search"), agent) == 0.0  # as no calls at all
    assert tool_call_reward("", call() + call(expression="1+1") + call(), agent) == 0.5  # one call too many
    assert tool_call_reward("", call() + call(name="search") * 3, agent) == -0.5  # more invalid than due
    assert tool_call_reward("", call(name="search") * 5, agent) == -1.0  # clipped
    plain = {"conversations": [{"role": "user", "content": "Hi"}]}
    assert tool_call_reward("", "Hello!", plain) == 1.0
    assert tool_call_reward("", call(), plain) == 0.0  # no tools on offer
    # nothing about the tools known: only the form counts
    assert tool_call_reward("", call(name="anything", x=1), {}) == 1.0
    assert tool_call_reward("", call(name="anything", x=1) + "<tool_call>{", {}) == 0.5
    # the offered tools read from the prompt's <tools> block
    prompt = "<|im_start|>system\n# Tools\n<tools>\n" + "\n".join(json.dumps(t) for t in json.loads(TOOLS_JSON)) \
        + "\n</tools>\n<|im_end|>\n"
    assert tool_call_reward(prompt, call(name="search"), {}) == 0.0
    assert tool_call_reward(prompt, call(), {}) == 1.0


def test_length_reward():
    assert length_reward("", "x" * 50, {}, min_len=10, max_len=100) == 0.0
    assert length_reward("", "x" * 5, {}, min_len=10, max_len=100) == -0.5
    assert length_reward("", "x" * 150, {}, min_len=10, max_len=100) == -0.5
    assert length_reward("", "x" * 1000, {}, min_len=10, max_len=100) == -1.0

    class Words:
        def encode(self, text):
            return text.split()
    assert length_reward("", "one two three", {}, min_len=1, max_len=2, unit="tokens", tokenizer=Words()) == -0.5
    with pytest.raises(ValueError, match="with a tokenizer"):
        length_reward("", "x", {}, unit="tokens")


def test_repetition_penalty():
    assert repetition_penalty("", "The cat sat on the mat by the door.", {}) == 0.0
    assert repeated_ngram_share("la la la la la la", n=2) == pytest.approx(1 - 1 / 5)
    assert repetition_penalty("", "我很好。" * 10, {}) < -0.8  # Chinese is counted by characters
    assert repetition_penalty("", "ok", {}) == 0.0  # shorter than one n-gram


def test_load_reward_builtin_and_user_file(tmp_path):
    assert load_reward("math") is math_reward
    length = load_reward("length(min_len=2, max_len=4)")
    assert length("", "abcdef", {}) == -0.5
    path = tmp_path / "my_rewards.py"
    path.write_text("def polite(prompt, completion, sample, word='please'):\n"
                    "    return float(word in completion.lower())\n"
                    "def broken(completion):\n    return 1.0\n", encoding="utf-8")
    polite = load_reward(f"{path}:polite")
    assert polite("", "Please sit.", {}) == 1.0 and polite("", "Sit.", {}) == 0.0
    assert load_reward(f"{path}:polite(word='thanks')")("", "thanks!", {}) == 1.0
    with pytest.raises(ValueError, match="has no function 'rude'; it defines: polite, broken"):
        load_reward(f"{path}:rude")
    with pytest.raises(TypeError, match=r"must take \(prompt, completion, sample\)"):
        load_reward(f"{path}:broken")
    with pytest.raises(FileNotFoundError, match="no such Python file"):
        load_reward(f"{tmp_path}/missing.py:polite")
    with pytest.raises(ValueError, match="unknown reward 'maths'"):
        load_reward("maths")
    with pytest.raises(ValueError, match="unknown argument max"):
        load_reward("length(max=3)")


def test_reward_set_combines_weights(tmp_path):
    (tmp_path / "user.py").write_text("def half(prompt, completion, sample):\n    return 0.5\n", encoding="utf-8")
    rewards = RewardSet.parse(f"math=2, length(min_len=1, max_len=10)=0.5, {tmp_path}/user.py:half, repetition=-1e-1")
    assert rewards.weights == {"math": 2.0, "length": 0.5, "half": 1.0, "repetition": -0.1}
    prompts, completions = ["", ""], ["It is 42.", "The answer is 41 and it is a rather long answer."]
    scores = rewards.score(prompts, completions, [{"gt": "42"}, {"gt": "42"}])
    assert scores.components["math"] == [1.0, 0.0]
    assert scores.components["half"] == [0.5, 0.5]
    expected = [sum(w * scores.components[n][i] for n, w in rewards.weights.items()) for i in range(2)]
    assert scores.total == pytest.approx(expected)
    assert scores.total[0] == pytest.approx(2.0 + 0.5)
    assert rewards("", "It is 42.", {"gt": "42"}) == pytest.approx(2.5)
    assert list(RewardSet.parse(["math", "length(max_len=3)=0.1"]).weights.items()) == [("math", 1.0),
                                                                                        ("length", 0.1)]
    with pytest.raises(ValueError, match="unique"):
        RewardSet.parse(["math", "math=2"])
    (tmp_path / "nan.py").write_text("def bad(p, c, s):\n    return float('nan')\n", encoding="utf-8")
    with pytest.raises(ValueError, match="reward 'bad' returned nan"):
        RewardSet.parse([f"{tmp_path}/nan.py:bad"]).score([""], ["x"], [{}])


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from nanomind.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("rm")
    (folder / "text.txt").write_text("\n".join(f"the answer is {i} and {i * 7}" for i in range(200)), encoding="utf-8")
    tokenizer = train_tokenizer([folder / "text.txt"], vocab_size=320, out_dir=folder / "rm")
    config = transformers.Qwen3Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_labels=1,
                                      pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    transformers.Qwen3ForSequenceClassification(config).save_pretrained(folder / "rm")
    return folder / "rm"


def test_reward_model_batches_score_like_single_items(reward_model_dir):
    rm = RewardModel(reward_model_dir, batch_size=4, chat_template=False)
    prompts = ["What is 6 * 7?", "Hi", "A much longer prompt that needs quite a lot of padding for the others", "x"]
    completions = [" The answer is 42.", " Hello!", " ok", " <think>hmm</think> 5"]
    batched = rm.score_batch(prompts, completions, [{}] * 4)
    single = [rm(p, c, {}) for p, c in zip(prompts, completions)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len({round(s, 6) for s in batched}) == 4  # a real score per text, not a constant
    # with the model's chat template, the record's conversation is rendered around the answer
    sample = {"conversations": [{"role": "user", "content": "What is 6 * 7?"}, {"role": "assistant", "content": ""}]}
    templated = RewardModel(reward_model_dir)
    text = templated.text_for("ignored", "<think>6*7</think>The answer is 42.", sample)
    assert "<|im_start|>user\nWhat is 6 * 7?<|im_end|>" in text
    assert text.rstrip().endswith("The answer is 42.<|im_end|>")
    assert "6*7" not in text
    rewards = RewardSet.parse([f"reward_model:{reward_model_dir}=0.5"])
    assert rewards.score([prompts[0]], [completions[0]], [{}]).total == pytest.approx([0.5 * single[0]], abs=1e-5)


def test_reward_model_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*nothing is downloaded"):
        RewardModel(tmp_path / "no-such-model")
