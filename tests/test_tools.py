"""Tools: the calculator is exact and refuses everything but arithmetic, the built-in tools return what the
curriculum teaches, schemas come from hints and docstrings, and nothing the model writes raises."""

import json
import math
from typing import Literal, Optional

import pytest

from nanomind.synth import TOOLS_JSON, World, synthesize
from nanomind.tools import (Tool, ToolError, builtin_tools, calculate, calculate_math, extract_tool_calls, load_tools,
                            remove_thinking, resolve_tools, run_tool_call, tool_from_function, tool_schemas,
                            unit_converter, world_tools)


@pytest.mark.parametrize("expression, value", [
    ("256 * 37", 9472), ("802 * 91", 72982), ("1234 - 567", 667), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2),
    ("2 ** 10", 1024), ("2^10", 1024), ("3 × 4 ÷ 2", 6), ("-(2 + 3) * +4", -20), ("((1 + 2) * (3 + 4))", 21),
    ("sqrt(16) + abs(-3)", 7), ("round(2.567, 2)", 2.57), ("min(4, 2, 9) + max(1, 5)", 7),
    ("floor(2.7) + ceil(2.1)", 5),
    ("log(e) + exp(0)", 2), ("sin(0) + cos(0) + tan(0)", 1), ("2 * pi", 2 * math.pi), ("2 ** -2", 0.25),
    ("10 ** 99", 10**99), ("1.5e3", 1500),
])
def test_calculator_values(expression, value):
    assert calculate(expression) == pytest.approx(value, rel=1e-12)


def test_calculator_result_strings():
    assert calculate_math("256 * 37") == {"result": "9472"}
    assert calculate_math("0.1 + 0.2") == {"result": "0.3"}  # no binary noise
    assert calculate_math("6 / 2") == {"result": "3"}  # not "3.0"
    assert calculate_math("1 / 3") == {"result": "0.333333333333333"}


@pytest.mark.parametrize("expression, message", [
    ("().__class__", "attribute access"), ("(1).real", "attribute access"),
    ("__import__('os').system('ls')", "is not allowed"), ("__import__('os')", "'__import__' is not allowed"),
    ("open('x')", "'open' is not allowed"),
    ("x + 1", "unknown name 'x'"), ("os", "unknown name 'os'"), ("sqrt", "is a function"),
    ("[1, 2][0]", "indexing"), ("lambda: 1", "a lambda is not allowed"), ("'a' * 3", "only numbers"),
    ("True + 1", "only numbers"), ("1 < 2", "comparisons"), ("1 if 1 else 2", "'if ... else' is not allowed"),
    ("2 ** 100000", "exponents must lie between"), ("9 ** 999", "too large"), ("10 ** 99 * 10", "too large"),
    ("9" * 101, "too large"), ("exp(1000)", "too large"), ("(-8) ** (1 / 3)", "not a real number"),
    ("(" * 30 + "1" + ")" * 30, "nested too deeply"), ("-" * 150 + "1", "nested operations"),
    ("1 + " * 60 + "1", "characters long"), ("1 / 0", "division by zero"), ("5 % 0", "division by zero"),
    ("sqrt(-1)", "math domain error"), ("round(x=1)", "positional arguments only"), ("1,000", "commas"),
    ("1 +", "not a valid arithmetic expression"), ("", "empty"), ("3 << 2", "'<<' is not allowed"),
])
def test_calculator_refusals(expression, message):
    with pytest.raises(ToolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        calculate(expression)


def test_unit_converter():
    assert unit_converter(6, "L", "mL") == {"result": "6000", "unit": "mL"}
    assert unit_converter(3.5, "m", "cm") == {"result": "350", "unit": "cm"}
    assert unit_converter(30, "s", "min") == {"result": "0.5", "unit": "min"}
    assert unit_converter(1, "km", "cm") == {"result": "100000", "unit": "cm"}  # chained through m
    assert unit_converter(0.1, "km", "m") == {"result": "100", "unit": "m"}
    assert unit_converter(2, "小时", "minutes") == {"result": "120", "unit": "min"}  # names in either language
    with pytest.raises(ToolError, match="different things"):
        unit_converter(1, "km", "kg")
    with pytest.raises(ToolError, match="unknown unit 'mi'.*known units: km"):
        unit_converter(1, "mi", "km")


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, size="tiny", seed=0)
    return out


def _records(folder, *names):
    return [json.loads(line) for name in names for line in (folder / name).read_text(encoding="utf-8").splitlines()]


def test_builtin_tools_reproduce_every_tool_message_of_the_curriculum(curriculum):
    tools, checked = builtin_tools(), 0
    for record in _records(curriculum, "sft.jsonl", "eval_sft.jsonl"):
        messages = record["conversations"]
        for i, message in enumerate(messages):
            if not message.get("tool_calls"):
                continue
            calls = json.loads(message["tool_calls"])
            results = [m["content"] for m in messages[i + 1:i + 1 + len(calls)]]
            assert [m["role"] for m in messages[i + 1:i + 1 + len(calls)]] == ["tool"] * len(calls)
            assert [run_tool_call(call, tools) for call in calls] == results
            # the same call as the model writes it, inside the tags of the chat template
            text = "".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls)
            assert [run_tool_call(c, tools) for c in extract_tool_calls(text, tools)] == results
            checked += len(calls)
    assert checked > 50


def test_builtin_schemas_are_the_ones_the_curriculum_shows(curriculum):
    # byte for byte: the chat template renders the schema text, so training and RL prompts agree
    assert json.dumps(tool_schemas(builtin_tools()), ensure_ascii=False) == TOOLS_JSON
    for record in _records(curriculum, "agent_rl.jsonl"):
        assert record["conversations"][0]["tools"] == TOOLS_JSON


@pytest.mark.parametrize("completion, error", [
    ('<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "1+1"}\n</tool_call>', "not valid JSON"),
    ('<tool_call>\n{"arguments": {"expression": "1+1"}}\n</tool_call>', 'no "name"'),
    ('<tool_call>\n["calculate_math"]\n</tool_call>', "must be a JSON object"),
    ('<tool_call>\n{"name": "search_web", "arguments": {}}\n</tool_call>', "unknown tool 'search_web'"),
    (('<tool_call>\n{"name": "unit_converter", "arguments": {"value": "5", "from_unit": "km", "to_unit": "m"}}'
      '\n</tool_call>'), "'value' of unit_converter must be a number"),
    ('<tool_call>\n{"name": "calculate_math", "arguments": {}}\n</tool_call>', "missing required argument"),
    ('<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "1", "x": 2}}\n</tool_call>',
     "unexpected argument 'x'"),
    ('<tool_call>\n{"name": "calculate_math", "arguments": "{bad"}\n</tool_call>', "arguments of calculate_math"),
    ('<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "1+1"}}', "never closed"),
    ('{"name": "calculate_math"}\n</tool_call>', "without a <tool_call>"),
])
def test_malformed_calls_are_invalid_entries_and_error_messages(completion, error):
    tools = builtin_tools()
    calls = extract_tool_calls(completion, tools)
    assert len(calls) == 1 and not calls[0].valid and error in calls[0].error
    message = json.loads(run_tool_call(calls[0], tools))
    assert error in message["error"]
    if "<tool_call>" in completion and "</tool_call>" in completion:  # the body alone is just as wrong
        body = completion.replace("<tool_call>", "").replace("</tool_call>", "")
        assert error in json.loads(run_tool_call(body, tools))["error"]


def test_extract_tool_calls_counts_and_order():
    text = ('<think>\nmaybe <tool_call>{"name": "x"}</tool_call>\n</think>\n\nSure.\n'
            '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "2*3"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "calculate_math", "arguments": {"expression": "oops"\n'
            '<tool_call>\n{"name": "unit_converter", "arguments": {"value": 1, "from_unit": "km", "to_unit": "m"}}'
            '\n</tool_call>')
    calls = extract_tool_calls(text, builtin_tools())
    assert [c.valid for c in calls] == [True, False, True]  # the call inside the reasoning is not a call
    assert calls[0].name == "calculate_math" and calls[0].arguments == {"expression": "2*3"}
    assert "never closed" in calls[1].error
    assert [run_tool_call(c, builtin_tools()) for c in (calls[0], calls[2])] == [
        '{"result": "6"}', '{"result": "1000", "unit": "m"}']
    assert extract_tool_calls("no calls here") == []
    # without tools only the form is checked; OpenAI-style string arguments are accepted
    assert extract_tool_calls('<tool_call>{"name": "any", "arguments": "{\\"a\\": 1}"}</tool_call>')[0].arguments \
        == {"a": 1}


def test_run_tool_call_accepts_dicts_text_and_openai_calls():
    tools = builtin_tools()
    assert run_tool_call({"name": "calculate_math", "arguments": {"expression": "2+2"}}, tools) == '{"result": "4"}'
    assert run_tool_call({"name": "calculate_math", "arguments": '{"expression": "2+2"}'}, tools) == '{"result": "4"}'
    assert run_tool_call({"type": "function", "function": {"name": "calculate_math", "arguments": '{"expression": '
                                                           '"3*3"}'}}, tools) == '{"result": "9"}'
    assert run_tool_call('{"name": "calculate_math", "arguments": {"expression": "1/0"}}', tools) == \
        '{"error": "division by zero"}'
    assert "unknown tool" in run_tool_call({"name": "nope", "arguments": {}}, tools)
    assert "must be a JSON object" in run_tool_call(42, tools)


def test_remove_thinking():
    assert remove_thinking("<think>\nplan\n</think>\n\nAnswer") == "\n\nAnswer"
    assert remove_thinking("plan\n</think>\n\nAnswer") == "\n\nAnswer"  # the prompt opened the block
    assert remove_thinking("Answer <think>never closed") == "Answer "
    assert remove_thinking("a<think>x</think>b<think>y</think>c") == "abc"


def get_weather(city: str, days: int, unit: Literal["C", "F"] = "C", detailed: bool = False,
                tags: list[str] | None = None, ratio: Optional[float] = None) -> dict:
    """Weather forecast for a city,
    day by day.

    Longer notes that are not part of the description.

    Args:
        city: the city name,
            e.g. Paris
        days (int): how many days ahead
        unit: temperature unit
        detailed: include wind and humidity
        tags: labels to attach

    Returns:
        the forecast
    """
    return {"city": city, "days": days, "unit": unit}


def test_schema_from_hints_and_docstring():
    tool = tool_from_function(get_weather)
    assert tool.schema == {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for a city, day by day.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "the city name, e.g. Paris"},
            "days": {"type": "integer", "description": "how many days ahead"},
            "unit": {"type": "string", "enum": ["C", "F"], "description": "temperature unit"},
            "detailed": {"type": "boolean", "description": "include wind and humidity"},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "labels to attach"},
            "ratio": {"type": "number"}},
            "required": ["city", "days"]}}}
    assert run_tool_call({"name": "get_weather", "arguments": {"city": "Oslo", "days": 2.0}}, [tool]) == \
        '{"city": "Oslo", "days": 2, "unit": "C"}'
    assert "must be one of" in run_tool_call({"name": "get_weather", "arguments": {"city": "Oslo", "days": 2,
                                                                                   "unit": "K"}}, [tool])
    assert "'tags'[1] of get_weather must be a string" in run_tool_call(
        {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2, "tags": ["a", 3]}}, [tool])

    def untyped(x):
        """No hints."""
    with pytest.raises(TypeError, match="parameter 'x' has no type hint"):
        tool_from_function(untyped)


def test_user_tools_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text('''
from math import gcd  # imported: not a tool

def greet(name: str, times: int = 1) -> str:
    """Say hello.

    Args:
        name: who to greet
    """
    return " ".join(["hello " + name] * times)

def divide(a: float, b: float) -> float:
    """Divide a by b."""
    return a / b

def _helper():
    pass
''', encoding="utf-8")
    tools = load_tools(path)
    assert [t.name for t in tools] == ["greet", "divide"]
    assert tools[0].parameters["properties"]["name"] == {"type": "string", "description": "who to greet"}
    assert run_tool_call('{"name": "greet", "arguments": {"name": "Ada", "times": 2}}', tools) == "hello Ada hello Ada"
    assert run_tool_call({"name": "divide", "arguments": {"a": 1, "b": 4}}, tools) == "0.25"
    assert json.loads(run_tool_call({"name": "divide", "arguments": {"a": 1, "b": 0}}, tools)) == {
        "error": "divide failed: ZeroDivisionError: division by zero"}

    listed = tmp_path / "listed.py"
    listed.write_text("from nanomind.tools import calculate_math\n"
                      "def shout(text: str) -> str:\n    return text.upper()\n"
                      "def unused(x: int) -> int:\n    return x\n"
                      "TOOLS = [shout, calculate_math]\n", encoding="utf-8")
    assert [t.name for t in load_tools(listed)] == ["shout", "calculate_math"]
    with pytest.raises(FileNotFoundError, match="no such Python file"):
        load_tools(tmp_path / "missing.py")
    assert isinstance(load_tools(listed)[0], Tool)


def lookup(tools, tool, **arguments):
    return json.loads(run_tool_call({"name": tool, "arguments": arguments}, tools))


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_world_lookups_state_the_curriculum_facts(size):
    """Every person and town of each size's curriculum is found with the facts its texts state, in the
    language of the name asked for; unknown names are an error message for the model, not a crash."""
    tools, world = world_tools(seed=0), World.build(0, size)
    for p in world.people:
        assert lookup(tools, "lookup_person", name=p.name.en.upper()) == {
            "name": p.name.en, "home": p.home.name.en, "pet": p.pet.name.en, "colour": p.colour.en, "age": p.age,
            "job": p.job.en.split(" ", 1)[1]}
        assert lookup(tools, "lookup_person", name=p.name.zh)["home"] == p.home.name.zh
    for t in world.towns:
        town = lookup(tools, "lookup_town", name=t.name.en)
        assert (town["known_for"], town["near"]) == (t.known_for.en, t.near.en)
        # residents of the largest world: the smaller world's ones come first, in the same order
        assert town["residents"][:len(world.residents(t))] == [p.name.en for p in world.residents(t)]
    dog = lookup(tools, "lookup_animal", name="狗")
    assert dog["legs"] == 4 and dog["name"] == "狗"
    assert "no person named 'Nobody'" in lookup(tools, "lookup_person", name="Nobody")["error"]
    assert "error" in lookup(tools, "lookup_town", name=3)


def test_tools_option_names_builtin_world_or_a_file(tmp_path):
    assert [t.name for t in resolve_tools(None)] == [t.name for t in builtin_tools()]
    assert [t.name for t in resolve_tools("world")][2:] == ["lookup_person", "lookup_town", "lookup_animal"]
    someone = World.build(3, "tiny").people[0].name.en
    assert "error" not in lookup(resolve_tools("world:3"), "lookup_person", name=someone)
    with pytest.raises(ValueError, match="whole number"):
        resolve_tools("world:x")
    path = tmp_path / "mine.py"
    path.write_text("def ping() -> str:\n    return 'pong'\n", encoding="utf-8")
    assert [t.name for t in resolve_tools(path)] == ["ping"]
