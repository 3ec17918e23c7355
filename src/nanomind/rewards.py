"""Rewards for RL: checked answers, formats and lengths, your own functions, and a reward model.

A reward is any callable `reward(prompt, completion, sample) -> float`: `prompt` is the text the policy
continued, `completion` what it wrote, and `sample` the dataset record (with `gt`, `conversations`, ...).
Higher is better. The built-in ones, by the name `load_reward` knows them:

    math          1 if the final answer equals sample["gt"] (numbers within a tolerance), else 0;
                  a list gt scores the share of its items found in order
    exact         1 if the answer (or its boxed / "the answer is" part) equals a gt, whitespace normalised
    think_format  1 for one closed <think> block of a sensible length (or none when thinking is off)
    tool_calls    1 when every tool call is well formed and, for agent records, as many as gt has items
    length        0 inside [min_len, max_len] characters (or tokens), down to -1 outside
    repetition    minus the share of repeated n-grams: 0 for none, towards -1 for a loop

`RewardSet.parse(["math=1", "think_format=0.2"])` weighs several of them and scores a batch, keeping
each component for logging. `load_reward("my_rewards.py:brevity")` loads your own function the same way,
and `RewardModel(folder)` scores with a local transformers sequence classifier.
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from .data import without_reply_placeholder
from .tools import TOOL_END, TOOL_START, extract_tool_calls, import_file, remove_thinking

# ---------------------------------------------------------------------------------------------------
# Reading answers

# An integer or decimal, with thousands separators or as a simple fraction: 42, -3, 1,234.5, 3/4. A minus
# sign counts only where it cannot be subtraction ("= -3", not "10-3"); digits glued to Latin letters
# ("H2O", "x2") are not numbers, digits next to Chinese text ("45岁") are.
NUMBER = re.compile(r"(?:(?<![A-Za-z0-9_.)\]])-)?(?<![A-Za-z0-9_.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
                    r"(?:/\d+)?(?![A-Za-z0-9_])")
# Small numbers in words, as the curriculum says them ("four legs", "四条腿"); a Chinese numeral counts only
# before a measure word, since 一 and 十 are also parts of ordinary words.
NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
CHINESE_DIGITS = {c: i for i, c in enumerate("零一二三四五六七八九十")} | {"两": 2}
_NUMBER_WORD = re.compile(rf"(?<![A-Za-z])(?:{'|'.join(NUMBER_WORDS)})(?![A-Za-z])|"
                          rf"[{''.join(CHINESE_DIGITS)}](?=[条个只匹头岁颗位本次天年])", re.IGNORECASE)
ANSWER_MARKERS = re.compile(r"最终答案是|最终答案为|答案是|答案为|答案[:：]|final answer is|final answer:|"
                            r"the answer is|answer is|answer:", re.IGNORECASE)
_END_OF_ANSWER = re.compile(r"[，。；;！!？?\n]|,\s|\.(?!\d)")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_CHAT_TURN = "<|im_start|>assistant"


def answer_text(completion: str) -> str:
    """What a reply answers: its last assistant turn (when given a whole trajectory), without reasoning,
    tool calls, tool responses and end-of-turn tokens."""
    if _CHAT_TURN in completion:
        completion = completion.rsplit(_CHAT_TURN, 1)[1]
    text = remove_thinking(completion)
    text = re.sub(rf"{re.escape(TOOL_START)}.*?(?:{re.escape(TOOL_END)}|$)", "", text, flags=re.S)
    text = re.sub(r"<tool_response>.*?(?:</tool_response>|$)", "", text, flags=re.S)
    return re.sub(r"<\|im_end\|>|<\|endoftext\|>", "", text).strip()


def _boxed(text: str) -> str | None:
    """The content of the last complete \\boxed{...}, nested braces included."""
    found = None
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[match.end():i - 1].strip()
    return found


def _marked_answer(answer: str) -> str | None:
    """The answer the text points at: the last \\boxed{}, else what follows the last "答案是" / "the answer is"
    up to the end of that clause."""
    boxed = _boxed(answer)
    if boxed is not None:
        return boxed
    markers = list(ANSWER_MARKERS.finditer(answer))
    if not markers:
        return None
    rest = answer[markers[-1].end():].lstrip(" \t\n:：*$")
    end = _END_OF_ANSWER.search(rest)
    found = (rest[:end.start()] if end else rest).strip(" *$")
    return found or None


def extract_final_answer(text: str) -> str | None:
    """The final answer of a reply: the content of its last \\boxed{...}, else the words after its last
    answer marker (答案是, 答案：, The answer is, answer:) up to the end of that clause, else its last number
    (in digits; failing that, a number word: "four", "四条"); None when there is none. Reasoning inside
    <think>...</think> and tool calls are ignored."""
    answer = answer_text(text)
    marked = _marked_answer(answer)
    if marked is not None:
        return marked
    numbers = NUMBER.findall(_normalise_number_text(answer)) or _NUMBER_WORD.findall(answer)
    return numbers[-1] if numbers else None


def _normalise_number_text(text: str) -> str:
    text = text.replace("−", "-").replace("{,}", ",")
    return _LATEX_FRACTION.sub(r"\1/\2", text)


def parse_number(text) -> Fraction | None:
    """The first number in `text` as an exact Fraction ("1,234.5 km" -> 2469/2, "3/4", "\\frac{3}{4}",
    "-12"; failing digits, a number word: "four", "四"), or None."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return Fraction(text) if math.isfinite(text) else None
    if not isinstance(text, str):
        return None
    match = NUMBER.search(_normalise_number_text(text))
    if not match:
        word = text.strip().lower()
        if word in NUMBER_WORDS or word in CHINESE_DIGITS:
            return Fraction(NUMBER_WORDS.get(word, CHINESE_DIGITS.get(word)))
        word = _NUMBER_WORD.search(text)
        return Fraction(NUMBER_WORDS.get(word.group().lower(), CHINESE_DIGITS.get(word.group()))) if word else None
    number = match.group().replace(",", "")
    numerator, _, denominator = number.partition("/")
    if denominator and int(denominator) == 0:
        return None
    return Fraction(numerator) / (Fraction(denominator) if denominator else 1)


def numbers_equal(a, b, tolerance: float = 1e-6) -> bool:
    """Whether two answers are the same number, within `tolerance` relative to the larger one (and
    absolute below 1). Either being no number at all -> False."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return abs(x - y) <= tolerance * max(1, abs(x), abs(y))


def _is_number(text: str) -> bool:
    return NUMBER.fullmatch(_normalise_number_text(str(text).strip())) is not None


def _text_pattern(expected: str) -> re.Pattern:
    """`expected` as a case-insensitive pattern, whitespace-tolerant, whole words for Latin script."""
    words = r"\s+".join(re.escape(w) for w in expected.split())
    return re.compile(rf"(?<![A-Za-z0-9]){words}(?![A-Za-z0-9])", re.IGNORECASE)


def _find_after(answer: str, expected: str, start: int, tolerance: float) -> int | None:
    """Where `expected` (a number or a text) ends at its first occurrence at or after `start`."""
    if _is_number(expected):
        text = _normalise_number_text(answer)
        for match in NUMBER.finditer(text, start):
            if numbers_equal(match.group(), expected, tolerance):
                return match.end()
        return None
    match = _text_pattern(expected).search(answer, start)
    return match.end() if match else None


def _ground_truth(sample: dict, reward: str) -> list[str]:
    if not isinstance(sample, dict) or sample.get("gt") is None:
        raise ValueError(f"the {reward!r} reward needs the record's ground truth in sample['gt'], and this sample "
                         f"has none: {str(sample)[:200]}")
    gt = sample["gt"]
    return [str(g) for g in gt] if isinstance(gt, (list, tuple)) else [str(gt)]


# ---------------------------------------------------------------------------------------------------
# Built-in rewards


def math_reward(prompt: str, completion: str, sample: dict, *, tolerance: float = 1e-6) -> float:
    """Whether the reply's answer is sample["gt"].

    One value (a string, or a list of one): 1.0 if the final answer (`extract_final_answer`) is that
    number within `tolerance`, else 0.0. A gt that is not a number ("duck", "苔桥镇") counts when it appears,
    as a whole word and ignoring case, in the boxed / marked answer or else anywhere in the answer text.
    A list of several values (an agent record: one per expected tool call): the share of them found in
    the answer text in the given order, so 1.0 needs all of them.
    """
    expected = _ground_truth(sample, "math")
    answer = answer_text(completion)
    if not expected:
        return 0.0
    if len(expected) == 1:
        gt = expected[0]
        if _is_number(gt):
            return float(numbers_equal(extract_final_answer(answer), gt, tolerance))
        return float(_find_after(_marked_answer(answer) or answer, gt, 0, tolerance) is not None)
    found, position = 0, 0
    for gt in expected:
        end = _find_after(answer, gt, position, tolerance)
        if end is not None:
            found, position = found + 1, end
    return found / len(expected)


def exact_reward(prompt: str, completion: str, sample: dict) -> float:
    """1.0 if the answer text, or its boxed / marked part, equals sample["gt"] (or one of a list of
    accepted answers) with whitespace normalised; else 0.0. Case and punctuation count."""
    accepted = {" ".join(g.split()) for g in _ground_truth(sample, "exact")}
    answer = answer_text(completion)
    marked = _marked_answer(answer)
    candidates = {" ".join(answer.split())} | ({" ".join(marked.split())} if marked is not None else set())
    return float(bool(accepted & candidates))


def _thinking_mode(prompt: str) -> str:
    """'open' when the prompt opened a <think> block for the reply, 'off' when it holds a closed (empty)
    one, else 'reply' (the reply must open its own)."""
    tail = prompt.rstrip()
    if tail.endswith("<think>"):
        return "open"
    if tail.endswith("</think>"):
        return "off"
    return "reply"


def think_format_reward(prompt: str, completion: str, sample: dict, *, min_chars: int = 10,
                        max_chars: int = 1000) -> float:
    """The reasoning block's form.

    Thinking on (the prompt ends with "<think>", as the chat template writes it when thinking is on, or
    ends with neither tag, so the reply must open the block itself): exactly one <think> ... </think>
    block, at the start of the reply -> 0.5, plus 0.5 when its text is min_chars..max_chars characters
    long; anything else (unclosed, two blocks, text before it) -> 0.0.
    Thinking off (the prompt ends with the closed empty block): 1.0 if the reply has no think tags, else 0.0.
    It judges one assistant turn: score an agent trajectory turn by turn (each turn has its own block).
    """
    mode = _thinking_mode(prompt)
    opens, closes = completion.count("<think>"), completion.count("</think>")
    if mode == "off":
        return float(opens == 0 and closes == 0)
    text = completion if mode == "reply" else "<think>" + completion
    text = text.lstrip()
    if not text.startswith("<think>") or text.count("<think>") != 1 or closes != 1:
        return 0.0
    reasoning = text[len("<think>"):text.index("</think>")].strip()
    return 0.5 + 0.5 * (min_chars <= len(reasoning) <= max_chars)


def _offered_tools(prompt: str, sample: dict) -> list | None:
    """The tool schemas the model was offered: from the record, else from the prompt's <tools> block;
    [] when the record is a conversation without tools, None when nothing says."""
    def as_list(tools):
        return json.loads(tools) if isinstance(tools, str) else list(tools)

    if isinstance(sample, dict):
        if sample.get("tools"):
            return as_list(sample["tools"])
        for message in sample.get("conversations") or []:
            if isinstance(message, dict) and message.get("tools"):
                return as_list(message["tools"])
    block = re.search(r"<tools>\n(.*?)\n</tools>", prompt, flags=re.S)
    if block:
        return [json.loads(line) for line in block.group(1).splitlines() if line.strip()]
    if isinstance(sample, dict) and sample.get("conversations"):
        return []
    return None


def tool_call_reward(prompt: str, completion: str, sample: dict) -> float:
    """Whether the reply's tool calls are right in form and number (reasoning is ignored).

    A call is invalid when its JSON is malformed, it names no tool or one not offered, its arguments do
    not fit the tool's schema, or its tags are unbalanced. With the offered tools known (the record or
    the prompt lists them) and a list gt (an agent record: one item per expected call) the expected
    number of calls is len(gt); a conversation without tools expects none. The errors are the expected
    calls not made validly or the invalid calls, whichever are more, plus the valid calls beyond those
    expected; the reward is 1 - errors / max(1, expected), clipped at -1. An invalid call where a call was
    due thus scores as no call, never below: a penalty for trying would teach a policy that
    still fumbles the format to stop calling tools (agent RL did, on a weak start). With no expected count,
    only the invalid calls count, relative to all calls. No calls where none are expected -> 1.0.
    """
    offered = _offered_tools(prompt, sample)
    calls = extract_tool_calls(completion, offered)
    valid = sum(call.valid for call in calls)
    invalid = len(calls) - valid
    expected = None
    if offered == []:
        expected = 0
    elif offered and isinstance(sample, dict) and isinstance(sample.get("gt"), (list, tuple)):
        expected = len(sample["gt"])
    if expected is None:
        errors = invalid
    else:
        errors = max(expected - valid, invalid, 0) + max(valid - expected, 0)
    scale = max(1, expected if expected is not None else len(calls))
    return max(-1.0, 1.0 - errors / scale)


def length_reward(prompt: str, completion: str, sample: dict, *, min_len: int = 1, max_len: int = 1000,
                  unit: str = "chars", tokenizer=None) -> float:
    """0.0 when the completion's length is within [min_len, max_len], else minus how far outside it is
    relative to the bound (capped at -1). `unit` "chars", or "tokens" with a tokenizer (anything with
    `encode(text) -> ids`)."""
    if unit == "chars":
        n = len(completion)
    elif unit == "tokens":
        if tokenizer is None:
            raise ValueError("the length reward counts tokens only with a tokenizer: pass tokenizer=..., or use "
                             "unit='chars'")
        n = len(tokenizer.encode(completion))
    else:
        raise ValueError(f"length reward: unit must be 'chars' or 'tokens', got {unit!r}")
    if n < min_len:
        return -min(1.0, (min_len - n) / min_len)
    if n > max_len:
        return -min(1.0, (n - max_len) / max(max_len, 1))
    return 0.0


_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_UNITS = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")  # a Chinese character, a word, or a punctuation mark


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of the text's n-grams (of words, Chinese characters and punctuation marks) that repeat an
    earlier one: 0.0 for none, close to 1.0 for a phrase said over and over."""
    units = _UNITS.findall(text)
    grams = [tuple(units[i:i + n]) for i in range(len(units) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_penalty(prompt: str, completion: str, sample: dict, *, n: int = 3) -> float:
    """Minus the share of repeated n-grams in the completion (reasoning included): 0.0 .. -1.0."""
    return -repeated_ngram_share(completion, n)


BUILTIN_REWARDS: dict[str, Callable] = {
    "math": math_reward, "exact": exact_reward, "think_format": think_format_reward,
    "tool_calls": tool_call_reward, "length": length_reward, "repetition": repetition_penalty,
}

# ---------------------------------------------------------------------------------------------------
# Loading and combining


def _split_arguments(spec: str) -> tuple[str, dict]:
    """"length(min_len=5, max_len=200)" -> ("length", {"min_len": 5, "max_len": 200})."""
    match = re.fullmatch(r"\s*(.*?)\s*\((.*)\)\s*", spec, flags=re.S)
    if not match:
        return spec.strip(), {}
    head, inside = match.groups()
    try:
        call = ast.parse(f"f({inside})", mode="eval").body
        if call.args:
            raise ValueError("only keyword arguments (name=value) are allowed")
        return head, {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"reward {spec!r}: cannot read the arguments ({e}); write e.g. "
                         "length(min_len=5, max_len=200)") from None


def _check_signature(fn: Callable, where: str) -> None:
    try:
        inspect.signature(fn).bind("prompt", "completion", {})
    except TypeError:
        raise TypeError(f"{where} must take (prompt, completion, sample) and return a number") from None
    except ValueError:  # a builtin without a signature: trust it
        pass


def load_reward(spec: str, tokenizer=None) -> Callable:
    """A reward from its spec.

    - a built-in name, optionally with keyword arguments: "math", "length(min_len=20, max_len=800)";
    - "path/to/file.py:function", optionally with keyword arguments passed to it: your own reward;
    - "reward_model:path/to/folder": a RewardModel on a local sequence-classification model.
    `tokenizer` is handed to rewards that take one (the length reward with unit="tokens").
    """
    head, kwargs = _split_arguments(spec)
    if head.startswith("reward_model:"):
        return RewardModel(head[len("reward_model:"):], **kwargs)
    if head in BUILTIN_REWARDS:
        fn = BUILTIN_REWARDS[head]
    elif re.search(r"\.py:[A-Za-z_]\w*$", head):
        path, name = head.rsplit(":", 1)
        module = import_file(path)
        fn = getattr(module, name, None)
        if not callable(fn):
            available = [n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_")]
            raise ValueError(f"{path} has no function {name!r}; it defines: {', '.join(available) or 'no functions'}")
    else:
        raise ValueError(f"unknown reward {spec!r}: use one of {', '.join(BUILTIN_REWARDS)}, "
                         "path/to/file.py:function, or reward_model:path/to/folder")
    parameters = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    unknown = [k for k in kwargs if k not in parameters and not takes_any]
    if unknown:
        raise ValueError(f"reward {spec!r}: unknown argument {', '.join(unknown)}; it takes "
                         f"{', '.join(list(parameters)[3:]) or 'none'}")
    if tokenizer is not None and "tokenizer" in parameters and "tokenizer" not in kwargs:
        kwargs["tokenizer"] = tokenizer
    if kwargs:
        fn = functools.partial(fn, **kwargs)
    _check_signature(fn, f"reward {spec!r}")
    return fn


def _reward_name(spec: str) -> str:
    head, _ = _split_arguments(spec)
    if head.startswith("reward_model:"):
        return "reward_model"
    return head.rsplit(":", 1)[1] if re.search(r"\.py:\w+$", head) else head


def _split_specs(text: str) -> list[str]:
    """Split "math=1, length(min_len=5, max_len=9)=0.1" at the commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


_WEIGHT = re.compile(r"(.*?)\s*=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", flags=re.S)


@dataclass
class RewardScores:
    total: list[float]  # the weighted sum, one per completion
    components: dict[str, list[float]]  # each reward's own (unweighted) values, for logging


class RewardSet:
    """Named rewards with weights; scores a batch into totals and per-reward values.

    A reward object with a `score_batch(prompts, completions, samples) -> list[float]` method (such as
    RewardModel) is called once per batch; plain functions once per completion.
    """

    def __init__(self, rewards: Sequence[tuple[str, Callable, float]]):
        names = [name for name, _, _ in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        if not rewards:
            raise ValueError("a RewardSet needs at least one reward")
        self.rewards = [(name, fn, float(weight)) for name, fn, weight in rewards]

    @classmethod
    def parse(cls, specs: str | Sequence[str], tokenizer=None) -> RewardSet:
        """From "spec=weight" strings (a list, or one comma-separated string); the weight defaults to 1.
        Example: ["math=1", "think_format=0.2", "length(max_len=400)=0.1", "my.py:polite=0.5"]."""
        if isinstance(specs, str):
            specs = _split_specs(specs)
        rewards = []
        for text in specs:
            match = _WEIGHT.fullmatch(text)
            if match and match.group(1).count("(") == match.group(1).count(")"):
                spec, weight = match.group(1), float(match.group(2))
            else:
                spec, weight = text, 1.0
            rewards.append((_reward_name(spec), load_reward(spec, tokenizer), weight))
        return cls(rewards)

    @property
    def weights(self) -> dict[str, float]:
        return {name: weight for name, _, weight in self.rewards}

    def score(self, prompts: Sequence[str], completions: Sequence[str], samples: Sequence[dict]) -> RewardScores:
        if not len(prompts) == len(completions) == len(samples):
            raise ValueError(f"got {len(prompts)} prompts, {len(completions)} completions and {len(samples)} samples; "
                             "they must pair up")
        components = {}
        for name, fn, _ in self.rewards:
            if hasattr(fn, "score_batch"):
                values = list(fn.score_batch(prompts, completions, samples))
            else:
                values = [fn(p, c, s) for p, c, s in zip(prompts, completions, samples)]
            components[name] = [_as_float(v, name, i) for i, v in enumerate(values)]
        total = [sum(weight * components[name][i] for name, _, weight in self.rewards)
                 for i in range(len(completions))]
        return RewardScores(total, components)

    def __call__(self, prompt: str, completion: str, sample: dict) -> float:
        return self.score([prompt], [completion], [sample]).total[0]


def _as_float(value, name: str, index: int) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"reward {name!r} returned {value!r} for completion {index}; a reward returns a number") \
            from None
    if not math.isfinite(number):
        raise ValueError(f"reward {name!r} returned {number} for completion {index}; rewards must be finite")
    return number


# ---------------------------------------------------------------------------------------------------
# A learned reward model


class RewardModel:
    """Scores (prompt, completion) pairs with a local transformers AutoModelForSequenceClassification
    folder (one output, num_labels=1). Nothing is downloaded.

    The scored text is the prompt followed by the completion, as the policy saw and wrote it. With
    `chat_template=True` (or None, the default, when the model's tokenizer has a chat template and the
    sample carries `conversations`), the record's conversation plus the reply's answer (reasoning and tool
    calls removed) are rendered with the reward model's own template instead. Scores may be clamped to
    [-clamp, clamp] (MiniMind clamps to 3).
    """

    def __init__(self, directory: str | Path, *, device: str = "cpu", dtype=None, batch_size: int = 16,
                 max_length: int = 2048, chat_template: bool | None = None, clamp: float | None = None):
        directory = Path(directory).expanduser()
        if not (directory / "config.json").is_file():
            problem = "has no config.json" if directory.is_dir() else "does not exist"
            raise FileNotFoundError(f"reward model folder {directory} {problem}: give a local folder holding a "
                                    "transformers sequence-classification model (config.json, weights, tokenizer); "
                                    "nothing is downloaded")
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError:
            raise ImportError("RewardModel needs transformers: pip install 'nanomind[interop]'") from None
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # an over-long text keeps its end: the reply being judged
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            directory, local_files_only=True, **({"dtype": dtype} if dtype is not None else {})).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{directory}: a reward model has one output (num_labels=1), this one has "
                             f"{self.model.config.num_labels}")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        # Without a padding token, texts of different lengths cannot share a batch.
        self.batch_size = batch_size if self.tokenizer.pad_token_id is not None else 1
        self.device, self.max_length, self.clamp = device, max_length, clamp
        self.chat_template = chat_template

    def text_for(self, prompt: str, completion: str, sample: dict | None = None) -> str:
        conversation = sample.get("conversations") if isinstance(sample, dict) else None
        use_template = self.chat_template
        if use_template is None:
            use_template = bool(getattr(self.tokenizer, "chat_template", None)) and bool(conversation)
        if not use_template:
            return prompt + completion
        if not conversation:
            raise ValueError("RewardModel(chat_template=True) needs sample['conversations'] to render")
        messages = [{"role": m["role"], "content": m.get("content") or ""}
                    for m in without_reply_placeholder(conversation)]
        messages.append({"role": "assistant", "content": answer_text(completion)})
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        import torch

        scores = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt",
                                       padding=True, truncation=True, max_length=self.max_length,
                                       add_special_tokens=False).to(self.device)
                logits = self.model(**batch).logits.float()[:, 0]
                if self.clamp is not None:
                    logits = logits.clamp(-self.clamp, self.clamp)
                scores += logits.tolist()
        return scores

    def score_batch(self, prompts: Sequence[str], completions: Sequence[str],
                    samples: Sequence[dict] | None = None) -> list[float]:
        samples = samples if samples is not None else [None] * len(prompts)
        return self.score_texts([self.text_for(p, c, s) for p, c, s in zip(prompts, completions, samples)])

    def __call__(self, prompt: str, completion: str, sample: dict | None = None) -> float:
        return self.score_batch([prompt], [completion], [sample])[0]
