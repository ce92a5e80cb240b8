"""How much a recipe may be before it is parsed: text size, nesting depth, YAML aliases, expanded nodes, modifiers.

A few hundred bytes of YAML can otherwise cost minutes and gigabytes: aliases nested in aliases expand
exponentially ("billion laughs"; the constructor shares the nodes, but every walk after it -- expression checks,
pydantic, an error's repr -- pays the expansion), and deep nesting overflows PyYAML's recursive composer and
constructor (a RecursionError). So the checks here run on the text, the event stream or an already parsed
structure, before any Python value of the recipe is built, stop at the first limit passed, and are linear in the
input: the YAML check counts events as an iterative parser (libyaml's, else PyYAML's) emits them, an anchor's
expanded size once, when its node ends, and an alias adds that size. The RecipeLimitError names the limit,
never the input.

``DEFAULT_LIMITS`` holds every real recipe many times over (the bundled ones are under 1 KB, 7 levels deep and
50 nodes, llm-compressor's examples alike; one listing every linear of a 32-layer model in ``ignore`` is 9 KB
and 230 nodes) and is what the API applies; ``TRUSTED_LIMITS`` is for a recipe file the user vouches for
(``llmpress compress --trusted-recipe``). ``shown``/``clipped``/``listed`` cut the user values an error message quotes.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, Event, ScalarEvent

__all__ = [
    "RecipeLimits",
    "DEFAULT_LIMITS",
    "TRUSTED_LIMITS",
    "check_size",
    "check_json_nesting",
    "checked_events",
    "yaml_events",
    "LIBYAML",
    "check_yaml",
    "check_structure",
    "clipped",
    "shown",
    "listed",
]


@dataclass(frozen=True)
class RecipeLimits:
    """The most a recipe may be. ``max_nodes`` counts scalars, lists and mappings (keys too) after YAML aliases
    are expanded; depth counts open lists and mappings (a recipe's arguments sit at depth 4)."""

    max_bytes: int = 65_536  # UTF-8 bytes of text (a file's, or a JSON body's strings as characters)
    max_depth: int = 32
    max_aliases: int = 100  # YAML alias references (``*name``, merges included)
    # PyYAML's composer and constructor (Python) cost 5-10 us a node on a busy 2-core machine: 5,000 keeps the
    # worst recipe within the limits near 40 ms of the API's CPU (bench/recipe_limits.py), 10,000 did not
    max_nodes: int = 5_000
    max_modifiers: int = 64


DEFAULT_LIMITS = RecipeLimits()
# Trusted local files: larger, but still bounded. The depth stays well under Python's recursion limit, which
# PyYAML's composer and constructor and pydantic spend a few frames of per level.
TRUSTED_LIMITS = RecipeLimits(max_bytes=16 * 2**20, max_depth=100, max_aliases=10_000, max_nodes=1_000_000,
                              max_modifiers=1_000)

MAX_SHOWN = 100  # characters of a user value an error message quotes
MAX_LISTED = 10  # user values an error message lists


def _refuse(message: str) -> Exception:
    # recipe.py imports this module, so its error classes are looked up when one is raised, not at import
    from service.recipes.recipe import RecipeLimitError

    return RecipeLimitError(message)


def _too_deep(limits: RecipeLimits) -> Exception:
    return _refuse(f"recipe: nests deeper than {limits.max_depth} levels (the limit)")


def _too_many_nodes(limits: RecipeLimits) -> Exception:
    return _refuse(f"recipe: has more than {limits.max_nodes} nodes (the limit), counting every value, list and "
                   "mapping")


# ---- text -------------------------------------------------------------------------------


def check_size(text: str, limits: RecipeLimits = DEFAULT_LIMITS) -> None:
    """RecipeLimitError when ``text`` is longer than ``limits.max_bytes`` in UTF-8."""
    # a character is at least one byte, so a long text is refused without encoding it
    size = len(text) if len(text) > limits.max_bytes else len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise _refuse(f"recipe: is larger than {limits.max_bytes} bytes (the limit): {size} bytes")


_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?')  # possessive: linear even on an unterminated string
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_BRACKET_STEPS = str.maketrans("[{]}", "\x02\x02\x00\x00")  # a step of +1 / -1, as 1 + step in a byte


def check_json_nesting(text: str, limits: RecipeLimits = DEFAULT_LIMITS) -> None:
    """RecipeLimitError when the brackets of JSON ``text`` (outside its strings) nest deeper than
    ``limits.max_depth``: json's decoder is recursive, so this runs before it."""
    brackets = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text))
    if brackets.count("[") + brackets.count("{") <= limits.max_depth:
        return  # every real recipe: it cannot nest deeper than it has brackets
    # the depth after each bracket is the running sum of (byte - 1); all in C iterators, 9 ms for 64 K brackets
    steps = brackets.translate(_BRACKET_STEPS).encode("latin-1")
    if max(map(operator.sub, accumulate(steps), range(1, len(steps) + 1))) > limits.max_depth:
        raise _too_deep(limits)


# ---- YAML events ------------------------------------------------------------------------


def checked_events(events: Iterable[Event], limits: RecipeLimits = DEFAULT_LIMITS) -> Iterator[Event]:
    """``events`` passed through unchanged, or a RecipeLimitError at the first one past a limit: depth, alias
    references, nodes after alias expansion, or an alias inside its own anchor's node (a recursive structure,
    which every walk of the recipe would follow forever)."""
    nodes = aliases = 0
    sizes: dict[str, int] = {}  # anchor -> expanded nodes of its node, once the node has ended
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, nodes before it) of each open list or mapping
    open_anchors: set[str] = set()
    for event in events:
        if isinstance(event, AliasEvent):
            aliases += 1
            if aliases > limits.max_aliases:
                raise _refuse(f"recipe: has more than {limits.max_aliases} YAML alias references (the limit)")
            if event.anchor in open_anchors:
                raise _refuse("recipe: a YAML alias refers to a node that contains it (a recursive structure)")
            nodes += sizes.get(event.anchor, 0)  # an undefined one is the composer's to report
        elif isinstance(event, ScalarEvent):
            nodes += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, CollectionStartEvent):
            open_nodes.append((event.anchor, nodes))
            nodes += 1
            if len(open_nodes) > limits.max_depth:
                raise _too_deep(limits)
            if event.anchor is not None:
                open_anchors.add(event.anchor)
        elif isinstance(event, CollectionEndEvent):
            anchor, before = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = nodes - before
                open_anchors.discard(anchor)
        if nodes > limits.max_nodes:
            if aliases:
                raise _refuse(f"recipe: expands to more than {limits.max_nodes} nodes through YAML aliases "
                              "(the limit)")
            raise _too_many_nodes(limits)
        yield event


# libyaml's event parser where PyYAML was built with it: the pure-Python one costs about 40 us of CPU per node
# (385 ms for a flow list of 9,000 items, 100 ms for 64 KB of block YAML), libyaml's 2 us (16 ms and 4 ms);
# the composer and constructor on its events stay PyYAML's Python ones, so the values and the composer's
# errors are the same. Malformed YAML is reported in libyaml's words, at the same line and column.
try:
    from yaml.cyaml import CParser as _CParser
except ImportError:  # PyYAML built without libyaml
    _CParser = None
LIBYAML = _CParser is not None
_LIBYAML_MAX_DEPTH = 1000  # libyaml refuses deeper nesting itself, while scanning ahead of its events


class _FlowCappedParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    """PyYAML's pure-Python parser (iterative, unlike its composer), refusing a flow collection deeper than
    ``max_depth`` as the scanner meets its bracket. Without the cap the scanner's look-ahead for a simple key
    costs (open brackets) x (1024 characters): 0.3 s CPU for a line of 64 K ``[``."""

    def __init__(self, text: str, limits: RecipeLimits):
        yaml.reader.Reader.__init__(self, text)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        self.limits = limits

    def fetch_flow_collection_start(self, TokenClass):  # noqa: N803 (PyYAML's name)
        if self.flow_level >= self.limits.max_depth:
            raise _too_deep(self.limits)
        super().fetch_flow_collection_start(TokenClass)


def yaml_events(text: str, limits: RecipeLimits = DEFAULT_LIMITS) -> Iterator[Event]:
    """The parsing events of YAML ``text``, as ``yaml.parse`` gives them, from an iterative parser (libyaml's, or
    PyYAML's pure-Python one) that cannot nest past ``limits.max_depth`` unnoticed. Unchecked otherwise: pass
    them through ``checked_events``. Raises yaml.YAMLError for malformed YAML."""
    parser = _CParser(text) if LIBYAML else _FlowCappedParser(text, limits)
    try:
        while parser.check_event():
            yield parser.get_event()
    except yaml.MarkedYAMLError as err:
        if err.problem == "exceeded maximum nesting depth" and limits.max_depth < _LIBYAML_MAX_DEPTH:
            raise _too_deep(limits) from None
        raise
    finally:
        parser.dispose()


def check_yaml(text: str, limits: RecipeLimits = DEFAULT_LIMITS) -> None:
    """RecipeLimitError when YAML ``text`` passes one of ``limits`` (size first); malformed YAML raises
    yaml.YAMLError as far as it was read."""
    check_size(text, limits)
    for _ in checked_events(yaml_events(text, limits), limits):
        pass


# ---- parsed structures ------------------------------------------------------------------


def check_structure(value: Any, limits: RecipeLimits = DEFAULT_LIMITS) -> None:
    """RecipeLimitError when ``value`` (lists, tuples, mappings and scalars, as parsed from JSON) nests deeper
    than ``limits.max_depth``, has more than ``limits.max_nodes`` nodes (keys count, as in YAML), or holds more
    than ``limits.max_bytes`` characters of strings. Iterative, and stops at the limit, so a cycle or a deep
    structure costs no more than the limit; anything else (a Modifier instance) is one node."""
    nodes = chars = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if isinstance(item, str):
            chars += len(item)
            if chars > limits.max_bytes:
                raise _refuse(f"recipe: holds more than {limits.max_bytes} characters of text (the limit)")
        elif isinstance(item, (list, tuple, Mapping)):
            if depth > limits.max_depth:
                raise _too_deep(limits)
            # each child is a node at least, so the stack never holds more than the nodes still allowed
            if nodes + len(stack) + len(item) * (2 if isinstance(item, Mapping) else 1) > limits.max_nodes:
                raise _too_many_nodes(limits)
            children = [x for pair in item.items() for x in pair] if isinstance(item, Mapping) else item
            stack.extend((child, depth + 1) for child in children)
        if nodes > limits.max_nodes:
            raise _too_many_nodes(limits)


# ---- quoting user values in messages ----------------------------------------------------


def clipped(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` itself when short, else its first ``limit`` characters, an ellipsis and its length."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)``, clipped: how an error message quotes a value from the recipe."""
    return clipped(repr(value), limit)


def listed(values: Iterable[Any], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` of ``values``, each ``shown``, comma separated; how many there are when more."""
    values = list(values)
    text = ", ".join(shown(v) for v in values[:limit])
    return text if len(values) <= limit else f"{text}, ... ({len(values)} in all)"

