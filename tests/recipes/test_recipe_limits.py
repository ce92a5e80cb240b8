"""Recipe limits: hostile recipes (alias bombs, deep nesting, oversized text) are refused quickly with a message
naming the limit and quoting nothing; real recipes, and recipes just under every limit, load as before."""

from __future__ import annotations

import json
import time
import tracemalloc
from typing import Any

import pytest
import yaml

from service.recipes import recipe as recipe_module
from service.recipes import recipe_limits
from service.recipes.modifier import Modifier
from service.recipes.recipe import RecipeError, RecipeLimitError, load_recipe
from service.recipes.recipe_limits import (
    DEFAULT_LIMITS, TRUSTED_LIMITS, RecipeLimits, check_json_nesting, check_structure, check_yaml, checked_events,
    clipped, listed, shown,
)
from tests.fixture_paths import REPO

LIMITS = DEFAULT_LIMITS
REAL_RECIPES = sorted([*(REPO / "service" / "recipes").glob("*.yaml"), *(REPO / "bench" / "recipes").glob("*.yaml")])
HEAD = "s_stage:\n  g_modifiers:\n    PayloadModifier:\n"  # a modifier's arguments sit at depth 4


class PayloadModifier(Modifier):
    """Takes any value, so that a recipe can be exactly as deep or as large as a limit and still load."""

    payload: Any = None

    def on_initialize(self, state, **kwargs):
        return True


@pytest.fixture(autouse=True)
def payload_modifier(monkeypatch):
    recipe_module._load_builtin_modifiers()
    monkeypatch.setitem(recipe_module._REGISTRY, "PayloadModifier", PayloadModifier)


@pytest.fixture(params=["libyaml", "pure-python"])
def parser(request, monkeypatch):
    """Both event parsers: libyaml's where PyYAML has it (the default), and PyYAML's own as the fallback."""
    if request.param == "libyaml":
        if not recipe_limits.LIBYAML:
            pytest.skip("PyYAML is built without libyaml")
    else:
        monkeypatch.setattr(recipe_limits, "LIBYAML", False)
    return request.param


def refused(source, *fragments, limits=LIMITS, within: float = 0.5) -> str:
    started = time.perf_counter()
    with pytest.raises(RecipeLimitError) as info:
        load_recipe(source, limits=limits)
    seconds = time.perf_counter() - started
    message = str(info.value)
    assert message.startswith("recipe: ") and ("(the limit)" in message or "recursive" in message), message
    for fragment in fragments:
        assert fragment in message, message
    assert len(message) < 200, message  # names the limit, never quotes the input
    assert seconds < within, f"{seconds:.2f} s to refuse"
    return message


def payload(value: str) -> str:
    return f"{HEAD}      payload: {value}\n"


def laughs(levels: int, width: int, indent: str = "", item: str = "lol") -> list[str]:
    """YAML lines ``l0: &l0 [lol x width]``, ``l1: &l1 [*l0 x width]``, ...: width ** levels nodes once expanded."""
    lines = [f"{indent}l0: &l0 [{', '.join([item] * width)}]"]
    lines += [f"{indent}l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return lines


# ---- real recipes -----------------------------------------------------------------------


@pytest.mark.parametrize("path", REAL_RECIPES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_each_real_recipe_loads_unchanged(path, parser):
    text = path.read_text()
    # the checked one-pass loader builds what PyYAML's SafeLoader builds, and the recipe is the same either way
    assert recipe_module._load_yaml(text, LIMITS) == yaml.safe_load(text)
    # compared as dicts: a GPTQModifier's private state makes two loads of one file unequal
    assert load_recipe(path).to_dict() == load_recipe(yaml.safe_load(text), limits=TRUSTED_LIMITS).to_dict()
    assert load_recipe(text).to_yaml() == load_recipe(path).to_yaml()


# ---- alias bombs ------------------------------------------------------------------------

BOMBS = {
    # the report's shape: nested inside a modifier's arguments
    "in the arguments": "\n".join([*laughs(9, 9, "      "), "      payload: *l8"]).replace(
        "      l0:", HEAD + "      l0:", 1) + "\n",
    "in a list recipe": "\n".join(["- PayloadModifier:", *laughs(9, 9, "    ")]) + "\n",
    "in a mapping key": "\n".join([*laughs(9, 9), "s_stage:", "  g_modifiers:", "    PayloadModifier:",
                                   "      payload: {? *l8 : 1}"]) + "\n",
    "through merge keys": "\n".join(
        ["a0: &a0 {x0: 1, x1: 2, x2: 3, x3: 4}"]
        + [f"a{i}: &a{i} {{<<: [*a{i - 1}], k{i}: [*a{i - 1}, *a{i - 1}, *a{i - 1}]}}" for i in range(1, 12)]
        + ["s_stage:", "  g_modifiers:", "    PayloadModifier:", "      payload: {<<: *a11}"]) + "\n",
    "many small aliases": payload("&x [1, 2, 3]") + "      more: [" + ", ".join(["*x"] * 200) + "]\n",
}


@pytest.mark.parametrize("name", BOMBS)
def test_alias_bombs_are_refused_before_they_expand(name, parser):
    expected = "YAML alias references" if name == "many small aliases" else "through YAML aliases"
    refused(BOMBS[name], expected)


def test_a_long_string_behind_aliases_is_shared_not_copied():
    text = payload("[&s '" + "x" * 60_000 + "', " + ", ".join(["*s"] * 99) + "]")
    started = time.perf_counter()
    values = load_recipe(text).modifiers()[0].payload
    assert len(values) == 100 and all(v is values[0] for v in values) and time.perf_counter() - started < 1.0


def test_a_recursive_alias_is_refused(parser):
    refused("s_stage: &a\n  g_modifiers:\n    PayloadModifier:\n      payload: *a\n", "recursive structure")
    refused(payload("&b [1, [2, *b]]"), "recursive structure")


def test_the_bomb_from_the_report_costs_no_time_or_memory():
    """About 650 bytes that took 59 s and 4.2 GB: refused after a few thousand events."""
    text = BOMBS["in the arguments"]
    assert len(text) < 700
    tracemalloc.start()
    try:
        refused(text, f"expands to more than {LIMITS.max_nodes} nodes", within=0.2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5e6, peak


# ---- deep nesting -----------------------------------------------------------------------

DEEP = {
    "[ x 1000 (JSON)": "[" * 1000 + "]" * 1000,
    "[ x 64 K (JSON)": "[" * 65_000,
    "{a: x 1000 (JSON-looking)": "{a: " * 1000 + "1" + "}" * 1000,
    "[ x 1000 in YAML": payload("[" * 1000 + "]" * 1000),
    "[ x 64 K in YAML": "s_stage: " + "[" * 65_000,
    "{a: x 1000 in YAML": payload("{a: " * 1000 + "1" + "}" * 1000),
    "- x 200, block": payload("\n" + "".join("  " * (i + 4) + "-\n" for i in range(200))),
    "- - - on one line": "- " * 30_000 + "x\n",
    "a: x 200, block mappings": "".join("  " * i + "a:\n" for i in range(200)),
}


@pytest.mark.parametrize("name", DEEP)
def test_deep_nesting_is_refused_without_recursing(name, parser):
    refused(DEEP[name], "nests deeper than 32 levels")


def test_a_deep_json_list_body_is_refused():
    deep: list = []
    for _ in range(1000):  # built without recursion, as json.loads would give it
        deep = [deep]
    refused([{"PayloadModifier": {"payload": deep}}], "nests deeper than 32 levels")
    nested: dict = {}
    for _ in range(100_000):
        nested = {"a": nested}
    refused({"s_stage": nested}, "nests deeper than 32 levels")  # far past Python's recursion limit


# ---- size -------------------------------------------------------------------------------


def test_text_and_files_over_the_size_limit(tmp_path):
    text = payload("1") + "# padding\n" * 7000
    assert len(text) > LIMITS.max_bytes
    refused(text, "larger than 65536 bytes", f"{len(text)} bytes")
    refused("é" * 40_000, "larger than 65536 bytes", "80000 bytes")  # bytes, not characters
    path = tmp_path / "big.yaml"
    path.write_text(text)
    refused(path, "larger than 65536 bytes")
    refused(str(path), "larger than 65536 bytes")
    assert load_recipe(path, limits=TRUSTED_LIMITS).modifiers()[0].payload == 1
    refused([{"PayloadModifier": {"payload": "x" * 70_000}}], "more than 65536 characters of text")


# ---- just under every limit -------------------------------------------------------------


def nested_lists(depth: int) -> str:
    return "[" * depth + "]" * depth


ALIASES = LIMITS.max_nodes // 100 - 2
UNDER = {
    # (text at the limit, the same one past it)
    "depth": (payload(nested_lists(LIMITS.max_depth - 4)), payload(nested_lists(LIMITS.max_depth - 3))),
    "aliases": (payload("[&x 1, " + ", ".join(["*x"] * LIMITS.max_aliases) + "]"),
                payload("[&x 1, " + ", ".join(["*x"] * (LIMITS.max_aliases + 1)) + "]")),
    # 9 nodes around the list: the document's mapping and keys, the stage, group and arguments mappings
    "nodes": (payload("[" + ",".join(["1"] * (LIMITS.max_nodes - 9)) + "]"),
              payload("[" + ",".join(["1"] * (LIMITS.max_nodes - 8)) + "]")),
    # an anchored list of 100 nodes, ALIASES aliases of it, and a last list filling up to the limit
    "expanded nodes": (payload("[&x [" + ",".join(["1"] * 99) + "], " + ", ".join(["*x"] * ALIASES)
                               + ", [" + ",".join(["1"] * (LIMITS.max_nodes - 9 - 100 - 100 * ALIASES - 1)) + "]]"),
                       payload("[&x [" + ",".join(["1"] * 99) + "], " + ", ".join(["*x"] * ALIASES)
                               + ", [" + ",".join(["1"] * (LIMITS.max_nodes - 9 - 100 - 100 * ALIASES)) + "]]")),
    "bytes": (payload("1").ljust(LIMITS.max_bytes - 1, "#") + "\n", payload("1").ljust(LIMITS.max_bytes, "#") + "\n"),
    "modifiers": ("".join(f"s{i}_stage:\n  g_modifiers:\n    PayloadModifier:\n" for i in range(LIMITS.max_modifiers)),
                  "".join(f"s{i}_stage:\n  g_modifiers:\n    PayloadModifier:\n"
                          for i in range(LIMITS.max_modifiers + 1))),
}
PAST = {"depth": "nests deeper than 32", "aliases": "more than 100 YAML alias",
        "nodes": f"more than {LIMITS.max_nodes} nodes",
        "expanded nodes": f"expands to more than {LIMITS.max_nodes} nodes",
        "bytes": "larger than 65536 bytes",
        "modifiers": "more than 64 modifiers"}


@pytest.mark.parametrize("limit", UNDER)
def test_a_recipe_at_each_limit_loads_and_one_past_it_does_not(limit, parser):
    at, past = UNDER[limit]
    started = time.perf_counter()
    recipe = load_recipe(at)
    seconds = time.perf_counter() - started
    assert recipe.modifiers() and isinstance(recipe.modifiers()[0], PayloadModifier)
    if parser == "libyaml":
        assert seconds < 1.0, f"{seconds:.2f} s to load the largest {limit} within the limits"  # bench: ~40 ms
    refused(past, PAST[limit], within=2.0)


def test_the_list_form_at_the_modifier_limit():
    items = [{"type": "PayloadModifier"}] * LIMITS.max_modifiers
    with pytest.raises(RecipeError, match="appears twice"):  # past the limit check: the layout's own rule
        load_recipe(items)
    refused(items + items[:1], "more than 64 modifiers")


def test_the_worst_alias_expansion_within_the_limits_is_cheap():
    text = UNDER["expanded nodes"][0]
    tracemalloc.start()
    try:
        started = time.perf_counter()
        (modifier,) = load_recipe(text).modifiers()
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(modifier.payload) == ALIASES + 2 and seconds < 1.0 and peak < 50e6, (seconds, peak)


def test_trusted_limits_are_higher_but_bounded():
    deep = payload(nested_lists(90))
    refused(deep, "nests deeper than 32")
    assert load_recipe(deep, limits=TRUSTED_LIMITS).modifiers()[0].payload == json.loads(nested_lists(90))
    refused(payload(nested_lists(200)), "nests deeper than 100", limits=TRUSTED_LIMITS)
    refused(BOMBS["in the arguments"], "through YAML aliases", limits=TRUSTED_LIMITS)  # 9 ** 9 nodes


# ---- the checks on their own ------------------------------------------------------------


def test_checked_events_passes_every_event_through():
    text = BOMBS["in the arguments"]
    small = "a: &a [1, 2]\nb: [*a, *a]\n"
    assert list(map(repr, checked_events(yaml.parse(small)))) == list(map(repr, yaml.parse(small)))
    check_yaml(small)
    with pytest.raises(RecipeLimitError, match="through YAML aliases"):
        check_yaml(text)
    with pytest.raises(RecipeLimitError, match="nests deeper than 2 levels"):
        check_yaml("a: [[1]]\n", RecipeLimits(max_depth=2))
    check_yaml("a: [[1]]\n", RecipeLimits(max_depth=3))  # the mapping and two lists


def test_check_structure():
    check_structure([{"a": [1, "x", None]}])
    check_structure({"a": [1, 2]}, RecipeLimits(max_nodes=5))  # the mapping, the key, the list, 2 items
    with pytest.raises(RecipeLimitError, match="more than 4 nodes"):
        check_structure({"a": [1, 2]}, RecipeLimits(max_nodes=4))
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(RecipeLimitError, match="nests deeper"):
        check_structure(cycle)
    wide = [0] * 10_000_000
    started = time.perf_counter()
    with pytest.raises(RecipeLimitError, match=f"more than {LIMITS.max_nodes} nodes"):
        check_structure(wide)  # refused before its items are walked
    assert time.perf_counter() - started < 0.1


def test_json_nesting_ignores_brackets_inside_strings():
    check_json_nesting('["' + "[" * 100 + '", "\\"' + "{" * 100 + '"]')
    with pytest.raises(RecipeLimitError):
        check_json_nesting('["\\\\"' + ", [" * 40 + "]")  # an escaped backslash ends the string
    check_json_nesting('"' + "\\" * 1000 + "[" * 1000)  # an unterminated string, linear


def test_messages_quote_user_values_clipped():
    assert shown("abc") == "'abc'" and clipped("x" * 100) == "x" * 100
    assert clipped("x" * 1000) == "x" * 100 + "... (1000 characters)"
    assert listed(range(3)) == "0, 1, 2" and listed(range(50)).endswith("9, ... (50 in all)")
    long = "k" * 5000
    cases = [
        payload("1").replace("payload", long),  # an unknown argument's name
        "s_stage:\n  g_modifiers:\n    " + long + ":\n",  # an unknown modifier
        f"{long}_stage:\n  g_modifiers:\n    NopeModifier:\n",  # a stage name in the path
        f"{long}:\n",  # an unknown top-level key
        "s_stage:\n  run_type: " + long + "\n  g_modifiers:\n    PayloadModifier:\n",
        "s_stage:\n  g_modifiers:\n    SparseGPTModifier:\n      sparsity: " + long + "\n",
        "s_stage:\n  g_modifiers:\n    SparseGPTModifier:\n      targets: ['$" + long + "']\n",
        "s_stage:\n  g_modifiers:\n    SparseGPTModifier:\n      targets: [" + ", ".join(["1"] * 1000) + "]\n",
        "- {" + ", ".join(f"k{i}: 1" for i in range(1000)) + "}\n",  # many keys
        "s_stage:\n  g_modifiers:\n    SparseGPTModifier: {" + ", ".join(f"a{i}: 1" for i in range(1000)) + "}\n",
        long,  # one line: "recipe file not found"
    ]
    for text in cases:
        with pytest.raises(RecipeError) as info:
            load_recipe(text)
        assert len(str(info.value)) < 1200, (text[:40], len(str(info.value)))
        assert long not in str(info.value)
