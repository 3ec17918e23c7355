"""Tools a chat model can call: a safe calculator, a unit converter, and your own Python functions.

The chat template shows the model each tool's OpenAI function schema and teaches it to answer with

    <tool_call>
    {"name": "calculate_math", "arguments": {"expression": "256 * 37"}}
    </tool_call>

`extract_tool_calls(text)` finds those calls (a malformed one is kept and marked invalid, with the reason,
so rewards can count it), and `run_tool_call(call, tools)` executes one and returns the tool message the
model reads next: the function's result as JSON, or `{"error": "..."}`. Nothing the model writes raises.

The calculator walks Python's `ast` and allows only numbers, + - * / // % **, parentheses and a short list
of math functions; `eval`, `exec` and `compile` never see model text (MiniMind's tools ran through `eval`).
The two built-in tools return exactly what the built-in curriculum (`synth`) teaches, so a model trained
on it reads the same result strings during RL and at serving time.

Your own tools are plain functions with type hints and a Google-style docstring:

    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> dict:
        '''Current weather of a city.

        Args:
            city: the city name, e.g. Paris
            unit: temperature unit
        '''

`tool_from_function` turns one into a `Tool` (its schema from the hints and the docstring), and
`load_tools(path)` loads a file of them.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import json
import math
import re
import sys
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from .synth import ANIMALS, CONVERSIONS, SIZES, UNITS, World


class ToolError(Exception):
    """A tool refused its input; the message says what is not allowed and is shown to the model."""


# ---------------------------------------------------------------------------------------------------
# The calculator

MAX_EXPRESSION_CHARS = 200
MAX_PARENTHESES = 20  # levels of nested brackets
MAX_OPERATIONS_DEPTH = 100  # depth of the syntax tree: long chains of operators, "------1", ...
MAX_EXPONENT = 1000
MAX_DIGITS = 100  # every number, given or computed, stays below 10**100 in magnitude
MAX_SECONDS = 0.1  # with the limits above an expression takes microseconds; this is a last line of defence

_BINARY = {ast.Add: ("+", lambda a, b: a + b), ast.Sub: ("-", lambda a, b: a - b),
           ast.Mult: ("*", lambda a, b: a * b), ast.Div: ("/", lambda a, b: a / b),
           ast.FloorDiv: ("//", lambda a, b: a // b), ast.Mod: ("%", lambda a, b: a % b), ast.Pow: ("**", None)}
_OPERATOR_TEXT = {ast.BitXor: "^", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>",
                  ast.MatMult: "@", ast.Invert: "~", ast.Not: "not"}
CONSTANTS = {"pi": math.pi, "e": math.e}


def _power(base, exponent):
    shown = f"({base}) ** {exponent}" if base < 0 else f"{base} ** {exponent}"
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(f"the exponent of {shown} is too large: exponents must lie between -{MAX_EXPONENT} and "
                        f"{MAX_EXPONENT}")
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) >= MAX_DIGITS:
        raise ToolError(f"{shown} is too large: results must stay below 1e{MAX_DIGITS}")
    result = base ** exponent
    if isinstance(result, complex):
        raise ToolError(f"{shown} is not a real number")
    return result


def _round(x, ndigits=None):
    return round(x) if ndigits is None else round(x, ndigits)


FUNCTIONS: dict[str, Callable] = {
    "abs": abs, "round": _round, "min": min, "max": max, "pow": _power,
    "sqrt": math.sqrt, "floor": math.floor, "ceil": math.ceil, "exp": math.exp,
    "log": math.log, "log10": math.log10, "log2": math.log2,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
}
# What people type that Python spells differently. "^" means power here, as on a calculator.
_SPELLINGS = str.maketrans({"×": "*", "÷": "/", "^": "**", "−": "-", "（": "(", "）": ")", "，": ","})


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, or ToolError saying what is not allowed.

    Allowed: integer and decimal numbers, + - * / // % ** (also written ^), unary + and -, parentheses,
    the functions in FUNCTIONS and the constants pi and e. Refused: names, attribute access, indexing,
    strings, comparisons, keyword arguments, numbers of 1e100 or more, exponents above 1000, more than 20
    levels of parentheses and expressions over 200 characters.
    """
    if not isinstance(expression, str):
        raise ToolError(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is {len(expression)} characters long; at most {MAX_EXPRESSION_CHARS} "
                        "are allowed")
    text = expression.translate(_SPELLINGS).strip()
    if not text:
        raise ToolError("the expression is empty")
    depth = 0
    for char in text:
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if depth > MAX_PARENTHESES:
            raise ToolError(f"the expression is nested too deeply: at most {MAX_PARENTHESES} levels of parentheses")
    try:
        tree = ast.parse(text, mode="eval")  # parsing only builds a tree; nothing in it runs
    except SyntaxError as e:
        raise ToolError(f"{expression!r} is not a valid arithmetic expression ({e.msg})") from None
    except (RecursionError, MemoryError, ValueError):
        raise ToolError(f"{expression!r} is not a valid arithmetic expression") from None
    deadline = time.monotonic() + MAX_SECONDS

    def value_of(node: ast.AST, depth: int):
        if depth > MAX_OPERATIONS_DEPTH:
            raise ToolError(f"the expression has more than {MAX_OPERATIONS_DEPTH} nested operations")
        if time.monotonic() > deadline:
            raise ToolError(f"the expression took longer than {MAX_SECONDS} s to evaluate")
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise ToolError(f"only numbers are allowed, not {node.value!r}")
            return _bounded(node.value)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, (ast.UAdd, ast.USub)):
                operand = value_of(node.operand, depth + 1)
                return operand if isinstance(node.op, ast.UAdd) else -operand
            raise ToolError(f"the operator '{_OPERATOR_TEXT.get(type(node.op), '?')}' is not allowed; "
                            "use + - * / // % **")
        if isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise ToolError(f"the operator '{_OPERATOR_TEXT.get(type(node.op), '?')}' is not allowed; "
                                "use + - * / // % ** (^ also means power)")
            left, right = value_of(node.left, depth + 1), value_of(node.right, depth + 1)
            symbol, apply = _BINARY[type(node.op)]
            return _bounded(_power(left, right) if symbol == "**" else apply(left, right))
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                return CONSTANTS[node.id]
            if node.id in FUNCTIONS:
                raise ToolError(f"{node.id} is a function: call it as {node.id}(...)")
            raise ToolError(f"unknown name {node.id!r}: only numbers and the constants {', '.join(CONSTANTS)} "
                            "are allowed")
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in FUNCTIONS:
                shown = name or ast.unparse(node.func)
                raise ToolError(f"calling {shown!r} is not allowed; allowed functions: {', '.join(FUNCTIONS)}")
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                raise ToolError(f"{name}() takes plain positional arguments only")
            args = [value_of(a, depth + 1) for a in node.args]
            return _bounded(FUNCTIONS[name](*args))
        if isinstance(node, ast.Attribute):
            raise ToolError(f"attribute access ('.{node.attr}') is not allowed: only arithmetic")
        if isinstance(node, ast.Subscript):
            raise ToolError("indexing with [...] is not allowed: only arithmetic")
        if isinstance(node, ast.Compare):
            raise ToolError("comparisons (<, >, ==, ...) are not allowed: only arithmetic")
        if isinstance(node, ast.Tuple):
            raise ToolError("the expression is several values separated by commas; send one expression "
                            "(write numbers without thousands separators)")
        raise ToolError(f"{_describe(node)} is not allowed: only numbers, + - * / // % **, parentheses and "
                        f"the functions {', '.join(FUNCTIONS)}")

    try:
        return value_of(tree.body, 0)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError(f"the result is too large: results must stay below 1e{MAX_DIGITS}") from None
    except (ValueError, TypeError) as e:  # math domain errors, wrong argument counts
        raise ToolError(f"cannot evaluate {expression!r}: {e}") from None


def _describe(node: ast.AST) -> str:
    names = {ast.Lambda: "a lambda", ast.BoolOp: "'and' / 'or'", ast.IfExp: "'if ... else'",
             ast.ListComp: "a comprehension", ast.GeneratorExp: "a comprehension", ast.List: "a list",
             ast.Dict: "a dict", ast.Set: "a set", ast.JoinedStr: "a string", ast.NamedExpr: "':='",
             ast.Await: "'await'", ast.Starred: "'*'", ast.Slice: "a slice"}
    return names.get(type(node), f"a {type(node).__name__} expression")


_LIMIT = 10**MAX_DIGITS


def _bounded(value):
    if isinstance(value, float) and math.isnan(value):
        raise ToolError("the result is not a number (nan)")
    if abs(value) >= _LIMIT:
        raise ToolError(f"the number is too large: numbers must stay below 1e{MAX_DIGITS}")
    return value


def format_number(x: int | float) -> str:
    """How a tool writes a number: 9472, 3.5, 0.3 (not 0.30000000000000004), 7 (not 7.0)."""
    if isinstance(x, int):
        return str(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return format(x, ".15g")


def calculate_math(expression: str) -> dict:
    """Evaluate an arithmetic expression and return the result.

    Args:
        expression: the expression, e.g. 256 * 37
    """
    return {"result": format_number(calculate(expression))}


# ---------------------------------------------------------------------------------------------------
# The unit converter, on the curriculum's table (synth.UNITS, synth.CONVERSIONS)


def _unit_sizes() -> dict[str, tuple[int, Fraction]]:
    """unit -> (group, size in the group's first unit): units linked by conversions form one group."""
    sizes: dict[str, tuple[int, Fraction]] = {}
    pending = list(CONVERSIONS)
    while pending:
        linked = next((c for c in pending if c[0] in sizes or c[1] in sizes), None)
        if linked is None:  # a new group starts at this conversion's larger unit
            linked = pending[0]
            sizes[linked[0]] = (len({group for group, _ in sizes.values()}), Fraction(1))
        big, small, factor = linked
        if big in sizes:
            sizes[small] = (sizes[big][0], sizes[big][1] / factor)
        else:
            sizes[big] = (sizes[small][0], sizes[small][1] * factor)
        pending.remove(linked)
    return sizes


UNIT_SIZES = _unit_sizes()
# Every way of writing a unit the curriculum uses: km, kilometre, kilometres, 千米.
_UNIT_NAMES = {name.casefold(): unit for unit, *names in UNITS.values() for name in (unit, *names)}


def _unit(text, which: str) -> str:
    if not isinstance(text, str):
        raise ToolError(f"{which} must be a string such as 'km'")
    unit = text.strip()
    if unit in UNIT_SIZES:
        return unit
    unit = _UNIT_NAMES.get(unit.casefold())
    if unit is None or unit not in UNIT_SIZES:
        raise ToolError(f"unknown unit {text!r} in {which}; known units: {', '.join(UNIT_SIZES)}")
    return unit


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    """`value` in `from_unit` expressed in `to_unit` (units by abbreviation, English or Chinese name)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ToolError(f"value must be a finite number, got {value!r}")
    _bounded(value)
    src, dst = _unit(from_unit, "from_unit"), _unit(to_unit, "to_unit")
    if UNIT_SIZES[src][0] != UNIT_SIZES[dst][0]:
        def group(u):
            return ", ".join(v for v in UNIT_SIZES if UNIT_SIZES[v][0] == UNIT_SIZES[u][0])
        raise ToolError(f"cannot convert {src} to {dst}: they measure different things ({src} converts only among "
                        f"{group(src)}; {dst} among {group(dst)})")
    return float(Fraction(value) * UNIT_SIZES[src][1] / UNIT_SIZES[dst][1])


def unit_converter(value: float, from_unit: str, to_unit: str) -> dict:
    """Convert a value from one unit to another.

    Args:
        value: the amount to convert
        from_unit: unit of the value, e.g. km
        to_unit: unit wanted, e.g. m
    """
    return {"result": format_number(convert_units(value, from_unit, to_unit)), "unit": _unit(to_unit, "to_unit")}


# ---------------------------------------------------------------------------------------------------
# Lookups in the built-in curriculum's world (synth.World)


def world_tools(seed: int = 0) -> list[Tool]:
    """lookup_person, lookup_town and lookup_animal: the facts of the built-in curriculum's world for `seed`.

    The largest size's world answers: the sizes nest, so anyone in any size's curriculum is found, with
    the same facts. Names are matched in English (any case) or Chinese; the answer is in the language of
    the name asked for.
    """
    world = World.build(seed, max(SIZES, key=lambda size: SIZES[size].people))
    people = {key: p for p in world.people for key in (p.name.en.casefold(), p.name.zh)}
    towns = {key: t for t in world.towns for key in (t.name.en.casefold(), t.name.zh)}
    animals = {key: a for a in ANIMALS for key in (a.name.en.casefold(), a.name.zh)}

    def find(table: dict, name, kind: str):
        if not isinstance(name, str) or name.strip().casefold() not in table:
            examples = ", ".join(list(dict.fromkeys(v.name.en for v in table.values()))[:4])
            raise ToolError(f"no {kind} named {name!r} in the built-in world (for example {examples})")
        entry = table[name.strip().casefold()]
        return entry, name.strip() == entry.name.zh

    def lookup_person(name: str) -> dict:
        """Look up a person of the world: home town, pet, favourite colour, age and job.

        Args:
            name: the person's name, e.g. Belwyn or 贝温
        """
        p, zh = find(people, name, "person")
        return {"name": p.name.pick(zh), "home": p.home.name.pick(zh), "pet": p.pet.name.pick(zh),
                "colour": p.colour.pick(zh), "age": p.age, "job": p.job.zh if zh else p.job.en.split(" ", 1)[1]}

    def lookup_town(name: str) -> dict:
        """Look up a town of the world: what it is known for, what it lies near, and who lives there.

        Args:
            name: the town's name
        """
        t, zh = find(towns, name, "town")
        return {"name": t.name.pick(zh), "known_for": t.known_for.pick(zh), "near": t.near.pick(zh),
                "residents": [p.name.pick(zh) for p in world.residents(t)]}

    def lookup_animal(name: str) -> dict:
        """Look up an animal: how many legs it has and what it eats.

        Args:
            name: the animal, e.g. dog or 狗
        """
        a, zh = find(animals, name, "animal")
        return {"name": a.name.pick(zh), "legs": a.legs, "food": a.food.pick(zh)}

    return [tool_from_function(f) for f in (lookup_person, lookup_town, lookup_animal)]


def resolve_tools(option: str | Path | None) -> list[Tool]:
    """The tools a `--tools` option names: nothing for builtin_tools(); "world" (or "world:SEED") for those
    plus world_tools(SEED); anything else is a Python file of tool functions (load_tools)."""
    if option is None:
        return builtin_tools()
    text = str(option)
    if text == "world" or text.startswith("world:"):
        seed = text.partition(":")[2] or "0"
        if not seed.isdigit():
            raise ValueError(f"--tools {text}: the world's seed must be a whole number, as in world:3")
        return builtin_tools() + world_tools(int(seed))
    return load_tools(option)


# ---------------------------------------------------------------------------------------------------
# Tools and their schemas


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments: {"type": "object", "properties": ..., "required": [...]}
    function: Callable

    @property
    def schema(self) -> dict:
        """The OpenAI function schema the chat template lists."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def tool_schemas(tools) -> list[dict]:
    """`[{"type": "function", "function": {...}}, ...]`, as `apply_chat_template(tools=...)` takes them."""
    return [t.schema for t in _tool_list(tools)]


def builtin_tools() -> list[Tool]:
    """The tools the built-in curriculum teaches: calculate_math and unit_converter."""
    return [tool_from_function(calculate_math), tool_from_function(unit_converter)]


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _type_schema(hint, where: str) -> dict:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or kinds.pop() not in _JSON_TYPES:
            raise TypeError(f"{where}: Literal values must all be str, int, float or bool")
        return {"type": _JSON_TYPES[type(args[0])], "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        if len(kept) == 1:  # Optional[X]: X, and the parameter should have a default
            return _type_schema(kept[0], where)
        raise TypeError(f"{where}: unions other than Optional[X] / X | None are not supported")
    if origin is list:
        return {"type": "array", **({"items": _type_schema(args[0], where)} if args else {})}
    if origin is dict:
        return {"type": "object"}
    raise TypeError(f"{where}: the type {hint!r} has no JSON-schema equivalent; use str, int, float, bool, list, "
                    "dict, Optional or Literal")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(summary: the first paragraph, {argument: description} from a Google-style `Args:` section)."""
    lines = (doc or "").splitlines()
    summary = []
    for line in lines:
        if not line.strip():
            break
        summary.append(line.strip())
    described, current, section_indent = {}, None, None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if section_indent is None:
            if line.strip() in ("Args:", "Arguments:", "Parameters:"):
                section_indent = indent
            continue
        if not line.strip():
            continue
        if indent <= section_indent:  # the next section (Returns:, Raises:, ...)
            break
        match = re.match(r"\s*\*{0,2}(\w+)\s*(?:\(.*?\))?\s*:\s*(.*)$", line)
        if match and (current is None or indent <= described[current][1]):
            current = match.group(1)
            described[current] = (match.group(2).strip(), indent)
        elif current is not None:  # a continuation line
            described[current] = ((described[current][0] + " " + line.strip()).strip(), described[current][1])
    return " ".join(summary), {name: text for name, (text, _) in described.items()}


def tool_from_function(fn: Callable, name: str | None = None, description: str | None = None) -> Tool:
    """A Tool whose schema comes from `fn`'s type hints and docstring.

    The description is the docstring's first paragraph; each parameter's description comes from its line
    in the `Args:` section. Parameters without a default are required. Hints may be str, int, float, bool,
    list[...], dict, Optional[...] and Literal[...]; every parameter needs one (it is what the model is told
    to send).
    """
    name = name or fn.__name__
    where = f"tool {name!r}"
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise TypeError(f"{where}: cannot read the type hints of {fn!r}: {e}") from None
    summary, arg_docs = _docstring_parts(inspect.getdoc(fn) or "")
    properties, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"{where}: parameter {p.name!r} must be an ordinary named parameter")
        if p.name not in hints:
            raise TypeError(f"{where}: parameter {p.name!r} has no type hint; add one (e.g. {p.name}: str) so the "
                            "model is told what to send")
        prop = _type_schema(hints[p.name], f"{where}, parameter {p.name!r}")
        if arg_docs.get(p.name):
            prop["description"] = arg_docs[p.name]
        properties[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return Tool(name, description if description is not None else summary, parameters, fn)


def import_file(path: str | Path) -> types.ModuleType:
    """Run a Python file as a fresh module (how user tools and user rewards are loaded)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Python file")
    module_name = f"nanomind_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def load_tools(path: str | Path) -> list[Tool]:
    """The tools a Python file defines.

    If the file has a `TOOLS` list (of functions or Tool objects), exactly those, in that order; otherwise
    every public function (name not starting with "_") defined in the file itself, in the order written.
    Imported functions are not tools unless listed in TOOLS.
    """
    module = import_file(path)
    if hasattr(module, "TOOLS"):
        entries = list(module.TOOLS)
    else:
        entries = [obj for name, obj in vars(module).items()
                   if inspect.isfunction(obj) and not name.startswith("_") and obj.__module__ == module.__name__]
    tools = []
    for entry in entries:
        if isinstance(entry, Tool):
            tools.append(entry)
        elif callable(entry):
            tools.append(tool_from_function(entry))
        else:
            raise TypeError(f"{path}: TOOLS holds {entry!r}, which is neither a function nor a Tool")
    if not tools:
        raise ValueError(f"{path} defines no tools: write public functions, or list them in TOOLS")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: tool names must be unique, got {names}")
    return tools


def _tool_list(tools) -> list[Tool]:
    return list(tools.values()) if isinstance(tools, dict) else list(tools)


def _schemas_by_name(tools) -> dict[str, dict]:
    """{name: parameters schema} from Tools, OpenAI schemas, or their JSON text (as datasets store them)."""
    if isinstance(tools, str):
        tools = json.loads(tools)
    by_name = {}
    for tool in _tool_list(tools):
        if isinstance(tool, Tool):
            by_name[tool.name] = tool.parameters
        else:
            function = tool.get("function", tool)
            by_name[function["name"]] = function.get("parameters") or {"type": "object", "properties": {}}
    return by_name


# ---------------------------------------------------------------------------------------------------
# Argument checking against a JSON schema (the subset tool schemas use)


def _type_ok(value, kind: str) -> bool:
    return {"string": lambda: isinstance(value, str),
            "integer": lambda: isinstance(value, int) and not isinstance(value, bool),
            "number": lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
            "boolean": lambda: isinstance(value, bool), "array": lambda: isinstance(value, list),
            "object": lambda: isinstance(value, dict), "null": lambda: value is None}.get(kind, lambda: True)()


def _check_value(value, schema: dict, path: str, tool_name: str):
    where = f"argument {path} of {tool_name}"
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds:
        if "integer" in kinds and isinstance(value, float) and value.is_integer() and "number" not in kinds:
            value = int(value)  # 3.0 for an integer parameter
        if not any(_type_ok(value, k) for k in kinds):
            raise ToolError(f"{where} must be {' or '.join(_A.get(k, k) for k in kinds)}, "
                            f"got {json.dumps(value, ensure_ascii=False)}")
    if "enum" in schema and value not in schema["enum"]:
        raise ToolError(f"{where} must be one of {json.dumps(schema['enum'], ensure_ascii=False)}, "
                        f"got {json.dumps(value, ensure_ascii=False)}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [_check_value(v, schema["items"], f"{path}[{i}]", tool_name) for i, v in enumerate(value)]
    return value


_A = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
      "array": "a list", "object": "an object", "null": "null"}


def check_arguments(tool_name: str, arguments: dict, parameters: dict) -> dict:
    """The arguments, checked against the tool's parameter schema (ToolError naming what is wrong)."""
    properties = parameters.get("properties", {})
    unknown = [k for k in arguments if k not in properties]
    if unknown:
        raise ToolError(f"{tool_name} got unexpected argument {', '.join(map(repr, unknown))}; it takes: "
                        f"{', '.join(properties) or 'no arguments'}")
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        raise ToolError(f"{tool_name} is missing required argument {', '.join(map(repr, missing))}")
    checked = {}
    for key, value in arguments.items():
        optional = key not in parameters.get("required", [])
        checked[key] = value if value is None and optional else \
            _check_value(value, properties[key], repr(key), tool_name)
    return checked


# ---------------------------------------------------------------------------------------------------
# Finding and running calls

TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
THINK_START, THINK_END = "<think>", "</think>"


@dataclass
class ToolCall:
    """One `<tool_call>` of a reply: valid (name and checked arguments) or not (`error` says why)."""

    name: str | None
    arguments: dict | None
    error: str | None = None
    text: str = ""  # what the model wrote between the tags

    @property
    def valid(self) -> bool:
        return self.error is None


def remove_thinking(text: str) -> str:
    """`text` without its reasoning: `<think>...</think>` blocks, the part before a `</think>` whose
    `<think>` was in the prompt, and everything after a `<think>` that is never closed."""
    end, start = text.find(THINK_END), text.find(THINK_START)
    if end >= 0 and (start < 0 or end < start):
        text = text[end + len(THINK_END):]
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    start = text.find(THINK_START)
    return text[:start] if start >= 0 else text


def parse_tool_call(body, tools=None) -> ToolCall:
    """A ToolCall from the JSON text between the tags, or from a dict {"name", "arguments"} (arguments
    as an object or a JSON string; an OpenAI {"function": {...}} wrapper is unwrapped). With `tools`
    (Tools, OpenAI schemas or their JSON text) the name and arguments are checked against them too."""
    text = body if isinstance(body, str) else ""
    if isinstance(body, str):
        stripped = body.strip()
        if stripped.startswith(TOOL_START) and stripped.endswith(TOOL_END):
            stripped = stripped[len(TOOL_START):-len(TOOL_END)]
        try:
            body = json.loads(stripped)
        except json.JSONDecodeError as e:
            return ToolCall(None, None, f"the tool call is not valid JSON ({e.msg} at line {e.lineno} column "
                                        f"{e.colno}); write {{\"name\": ..., \"arguments\": {{...}}}}", text)
    if isinstance(body, dict) and isinstance(body.get("function"), dict) and "name" not in body:
        body = body["function"]
    if not isinstance(body, dict):
        return ToolCall(None, None, "the tool call must be a JSON object: {\"name\": ..., \"arguments\": {...}}",
                        text)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(None, None, "the tool call has no \"name\" (a string)", text)
    arguments = body.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCall(name, None, f"the arguments of {name} are not valid JSON ({e.msg})", text)
    if not isinstance(arguments, dict):
        return ToolCall(name, None, f"the arguments of {name} must be a JSON object", text)
    if tools is not None:
        schemas = _schemas_by_name(tools)
        if name not in schemas:
            return ToolCall(name, arguments, f"unknown tool {name!r}; available tools: "
                                             f"{', '.join(schemas) or 'none'}", text)
        try:
            arguments = check_arguments(name, arguments, schemas[name])
        except ToolError as e:
            return ToolCall(name, arguments, str(e), text)
    return ToolCall(name, arguments, None, text)


def extract_tool_calls(completion: str, tools=None) -> list[ToolCall]:
    """Every tool call of a reply, in order, reasoning excluded; malformed ones are kept as invalid.

    Invalid entries: a body that is not `{"name": ..., "arguments": {...}}`, an unknown tool or bad
    arguments (when `tools` is given), a `<tool_call>` that is never closed (or is followed by another
    `<tool_call>` first), and a `</tool_call>` with no opening tag.
    """
    text = remove_thinking(completion)
    calls, position = [], 0
    while True:
        start, end = text.find(TOOL_START, position), text.find(TOOL_END, position)
        if start < 0 and end < 0:
            break
        if end >= 0 and (start < 0 or end < start):
            calls.append(ToolCall(None, None, "</tool_call> without a <tool_call> before it", ""))
            position = end + len(TOOL_END)
            continue
        body_start = start + len(TOOL_START)
        next_start = text.find(TOOL_START, body_start)
        if end < 0 or (0 <= next_start < end):
            stop = next_start if next_start >= 0 else len(text)
            calls.append(ToolCall(None, None, "<tool_call> is never closed with </tool_call>",
                                  text[body_start:stop]))
            position = stop
            continue
        calls.append(parse_tool_call(text[body_start:end], tools))
        position = end + len(TOOL_END)
    return calls


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def format_tool_result(result) -> str:
    """The tool message for a function's return value: a string as is, anything else as JSON."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps({"result": str(result)}, ensure_ascii=False)


def run_tool_call(call, tools) -> str:
    """Execute one call and return the tool message content. Never raises for anything the model wrote:
    malformed JSON, an unknown tool, missing, extra or mistyped arguments, a ToolError or a crash of the
    function all come back as `{"error": "..."}` for the model to read.

    `call` is a ToolCall, a dict {"name", "arguments"} or the JSON text inside <tool_call>; `tools` is a
    list of Tool (or a dict name -> Tool).
    """
    by_name = {t.name: t for t in _tool_list(tools) if isinstance(t, Tool)}
    if len(by_name) != len(_tool_list(tools)):
        raise TypeError("run_tool_call needs Tool objects (a schema alone cannot run): use builtin_tools(), "
                        "tool_from_function() or load_tools()")
    parsed = call if isinstance(call, ToolCall) else parse_tool_call(call)
    if not parsed.valid:
        return _error(parsed.error)
    tool = by_name.get(parsed.name)
    if tool is None:
        return _error(f"unknown tool {parsed.name!r}; available tools: {', '.join(by_name) or 'none'}")
    try:
        arguments = check_arguments(tool.name, parsed.arguments, tool.parameters)
        return format_tool_result(tool.function(**arguments))
    except ToolError as e:
        return _error(str(e))
    except Exception as e:  # the function's own bug or refusal: the model sees it, the run goes on
        return _error(f"{tool.name} failed: {type(e).__name__}: {e}")
