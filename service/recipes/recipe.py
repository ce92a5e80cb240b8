"""Recipes: llm-compressor's YAML (and a JSON list form) in, a list of Modifiers out.

llm-compressor's layout, which ``load_recipe`` reads and ``Recipe.to_yaml`` writes::

    sparsity_stage:                 # <name>_stage, applied in file order
      sparsity_modifiers:           # <group>_modifiers
        SparseGPTModifier:          # a registered Modifier class name
          sparsity: 0.5             # its arguments (an empty body means defaults)
          mask_structure: "2:4"

A ``<group>_modifiers`` mapping may also sit at the top level, without a stage; it
then belongs to ``default_stage``. The job API sends a list instead, each item
``{"SparseGPTModifier": {...}}`` or ``{"type": "SparseGPTModifier", ...}``; such a
list (or a list of Modifier instances) becomes ``default_stage.default_modifiers``.

llm-compressor features handled explicitly rather than ignored:
  * ``run_type`` inside a stage: ``oneshot`` is accepted (it is how every stage
    runs here); any other value (``train``) is a RecipeError.
  * recipe variables: a non-empty top-level ``args`` mapping, or any argument
    string starting with ``$`` or containing ``eval(``, is a RecipeError.
  * any other key is a RecipeError naming the allowed forms, and a key repeated
    in one YAML mapping is a RecipeError (PyYAML would keep the last one silently).
  * Markdown recipe cards and HF Hub stubs are not read; they fail as missing
    files or malformed YAML.

Every error is a RecipeError whose message starts with the field path. Before anything is built, a recipe is
held to ``recipe_limits`` (size, depth, YAML aliases and the nodes they expand to, modifiers): past one, a
RecipeLimitError starting ``recipe:`` names the limit. Messages quote user values clipped to 100
characters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from service.recipes.modifier import Modifier
from service.recipes.recipe_limits import (
    DEFAULT_LIMITS, RecipeLimits, check_json_nesting, check_size, check_structure, checked_events, clipped, listed,
    shown, yaml_events,
)

__all__ = [
    "RecipeError",
    "RecipeLimitError",
    "Stage",
    "Recipe",
    "register_modifier",
    "registered_modifiers",
    "load_recipe",
    "recipe_summary",
]

DEFAULT_STAGE = "default_stage"
DEFAULT_GROUP = "default_modifiers"
_STAGE_SUFFIX = "_stage"
_GROUP_SUFFIX = "_modifiers"
_LIST_ITEM_FORMS = '{"ClassName": {args}} or {"type": "ClassName", ...args}'

# Modifier classes by class name. Filled by @register_modifier at import time of the
# module that defines each class; load_recipe imports the built-in ones first.
_REGISTRY: dict[str, type[Modifier]] = {}
# The modules that define llmpress's own modifiers: imported on first use, so that every caller (CLI, API, a
# Ray worker) knows every modifier whatever it happened to import before.
BUILTIN_MODIFIER_MODULES = ("service.recipes.pruning_modifiers", "service.recipes.quantization_modifiers",
                            "service.recipes.spinquant")


def _load_builtin_modifiers() -> None:
    import importlib

    for module in BUILTIN_MODIFIER_MODULES:
        importlib.import_module(module)


class RecipeError(ValueError):
    """A recipe that cannot be loaded or laid out; the message names the field path."""


class RecipeLimitError(RecipeError):
    """A recipe past one of its ``RecipeLimits``; the message starts ``recipe:`` and names the limit."""


def register_modifier(cls: type[Modifier]) -> type[Modifier]:
    """Class decorator: make ``cls`` loadable from recipes under its class name."""
    if not (isinstance(cls, type) and issubclass(cls, Modifier)):
        raise TypeError(f"register_modifier expects a Modifier subclass, got {cls!r}")
    name = cls.__name__
    existing = _REGISTRY.get(name)
    # the same class re-executed (module reload) may replace itself; another class may not
    same_origin = existing is not None and (existing.__module__, existing.__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    if existing is not None and not same_origin:
        raise ValueError(
            f"modifier name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def registered_modifiers() -> dict[str, type[Modifier]]:
    """A copy of the registry: class name -> class."""
    _load_builtin_modifiers()
    return dict(_REGISTRY)


# ---- the recipe value ------------------------------------------------------------------


@dataclass
class Stage:
    """One ``<group>_modifiers`` mapping of one ``<name>_stage``.

    A YAML stage holding several groups becomes several adjacent Stage values with
    the same ``name``; ``Recipe.to_yaml`` writes them back under one key.
    """

    name: str  # e.g. "sparsity_stage"
    group: str  # e.g. "sparsity_modifiers"
    modifiers: list[Modifier]


@dataclass
class Recipe:
    """Stages in the order they run. The constructor checks that the layout can be
    written as llm-compressor YAML (adjacent stage names, unique group per stage,
    one modifier of each class per group) and raises RecipeError otherwise."""

    stages: list[Stage]

    def __post_init__(self) -> None:
        _check_layout(self.stages)

    def modifiers(self) -> list[Modifier]:
        """All modifiers, in the order they run."""
        return [m for stage in self.stages for m in stage.modifiers]

    def to_dict(self) -> dict[str, Any]:
        """``{stage: {group: {ClassName: {args}}}}`` with JSON-safe values; ``load_recipe``
        reads it back to an equal recipe. Arguments that are None by default and
        still None are left out, and so is ``group`` where the layout implies it."""
        out: dict[str, Any] = {}
        for stage in self.stages:
            group_body = out.setdefault(stage.name, {}).setdefault(stage.group, {})
            implied_group = stage.group[: -len(_GROUP_SUFFIX)]
            for modifier in stage.modifiers:
                group_body[type(modifier).__name__] = _modifier_arguments(modifier, implied_group)
        return out

    def to_yaml(self) -> str:
        """llm-compressor's recipe YAML for this recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=88)


def _check_layout(stages: list[Stage]) -> None:
    if not stages:
        raise RecipeError("recipe is empty: it has no modifiers")
    closed_names: set[str] = set()
    seen_groups: set[tuple[str, str]] = set()
    previous: str | None = None
    for stage in stages:
        if not isinstance(stage, Stage):
            raise RecipeError(f"recipe stages must be Stage values, got {type(stage).__name__}")
        if not (isinstance(stage.name, str) and stage.name.endswith(_STAGE_SUFFIX)):
            raise RecipeError(f"stage name {shown(stage.name)} must end with '{_STAGE_SUFFIX}'")
        if not (isinstance(stage.group, str) and stage.group.endswith(_GROUP_SUFFIX)):
            raise RecipeError(f"{clipped(stage.name)}: group name {shown(stage.group)} must end with "
                              f"'{_GROUP_SUFFIX}'")
        path = f"{clipped(stage.name)}.{clipped(stage.group)}"
        if stage.name != previous:
            if stage.name in closed_names:
                raise RecipeError(
                    f"{clipped(stage.name)}: stage appears twice with another stage in between; "
                    "give the later one its own name"
                )
            if previous is not None:
                closed_names.add(previous)
            previous = stage.name
        if (stage.name, stage.group) in seen_groups:
            raise RecipeError(f"{path}: group appears twice in the stage; merge the two or rename one")
        seen_groups.add((stage.name, stage.group))
        if not stage.modifiers:
            raise RecipeError(f"{path}: group has no modifiers")
        classes: set[str] = set()
        for modifier in stage.modifiers:
            if not isinstance(modifier, Modifier):
                raise RecipeError(f"{path}: expected Modifier instances, got {type(modifier).__name__}")
            name = type(modifier).__name__
            if name in classes:
                raise RecipeError(
                    f"{path}: {name} appears twice; a group holds one modifier of each class "
                    "(as a YAML mapping does), so put the second one in a stage of its own"
                )
            classes.add(name)


def _modifier_arguments(modifier: Modifier, implied_group: str) -> dict[str, Any]:
    fields = type(modifier).model_fields
    out = {}
    for name, value in modifier.model_dump(mode="json").items():
        if name == "group" and value in (None, implied_group):
            continue
        if value is None and name in fields and fields[name].default is None:
            continue
        out[name] = value
    return out


# ---- loading ---------------------------------------------------------------------------


def load_recipe(source: Any, limits: RecipeLimits = DEFAULT_LIMITS) -> Recipe:
    """Build a Recipe from any of: a Recipe (returned as is); a Modifier or a list of
    Modifiers and/or JSON modifier objects; a dict parsed from YAML/JSON; a path
    (str or Path) to a YAML or JSON file; YAML or JSON text.

    ``limits`` bound text, files and structures before anything is built (the
    defaults are the API's; ``recipe_limits.TRUSTED_LIMITS`` is for trusted files).

    :raises RecipeError: with the field path and what is allowed; RecipeLimitError past a limit
    """
    _load_builtin_modifiers()
    if isinstance(source, Recipe):
        return source
    if isinstance(source, Modifier):
        return _from_list([source], limits)
    if isinstance(source, (list, tuple)):
        check_structure(source, limits)
        return _from_list(list(source), limits)
    if isinstance(source, dict):
        check_structure(source, limits)
        return _from_mapping(source, limits)
    if isinstance(source, Path):
        return _from_file(source, limits)
    if isinstance(source, str):
        if os.path.isfile(source) or os.path.isdir(source):
            return _from_file(Path(source), limits)
        return _from_text(source, None, limits)
    raise RecipeError(
        f"cannot load a recipe from {type(source).__name__}; pass a file path, YAML/JSON text, "
        "a dict, a Modifier, or a list of modifiers"
    )


def _from_file(path: Path, limits: RecipeLimits) -> Recipe:
    if path.is_dir():
        raise RecipeError(f"recipe path {str(path)!r} is a directory, not a recipe file")
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {str(path)!r}")
    size = path.stat().st_size
    if size > limits.max_bytes:  # refused before it is read
        raise RecipeLimitError(f"recipe: file {shown(str(path))} is larger than {limits.max_bytes} bytes "
                               f"(the limit): {size} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"recipe file {str(path)!r} is not UTF-8 text: {err}") from err
    return _from_text(text, str(path), limits)


def _from_text(text: str, origin: str | None, limits: RecipeLimits) -> Recipe:
    """``origin`` is the file the text came from, or None for text passed directly
    (which may then have been meant as a path)."""
    check_size(text, limits)
    one_line = "\n" not in text.strip()
    try:
        data = _parse_text(text, origin, limits)
    except RecipeLimitError:
        raise
    except RecipeError as err:
        if origin is None and one_line:
            raise RecipeError(f"recipe file not found: {shown(text.strip())} (nor is it a recipe: {err})") from err
        raise
    if data is None:
        raise RecipeError(f"recipe is empty{f' ({origin})' if origin else ''}: it has no modifiers")
    if isinstance(data, dict):
        return _from_mapping(data, limits)
    if isinstance(data, list):
        return _from_list(data, limits)
    if origin is None and one_line:
        raise RecipeError(f"recipe file not found: {shown(text.strip())}")
    raise RecipeError(
        f"recipe{f' {origin}' if origin else ''} must be a mapping of '<name>_stage' keys "
        f"or a list of modifiers; got {type(data).__name__}"
    )


def _parse_text(text: str, origin: str | None, limits: RecipeLimits) -> Any:
    where = f" of {origin}" if origin else ""
    stripped = text.lstrip()
    # JSON first, as llm-compressor does: YAML rejects some valid JSON (tab indentation)
    if (origin or "").lower().endswith(".json") or stripped[:1] in ("{", "["):
        check_json_nesting(text, limits)  # json's decoder recurses once per level
        try:
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        except json.JSONDecodeError as err:
            if (origin or "").lower().endswith(".json"):
                raise RecipeError(f"malformed JSON at line {err.lineno}, column {err.colno}{where}: {err.msg}") from err
        except _DuplicateKey as err:
            raise RecipeError(f"malformed JSON{where}: duplicate key {shown(err.args[0])}") from err
        except ValueError as err:  # a number past Python's 4300 digits
            raise RecipeError(f"malformed JSON{where}: {err}") from err
        else:
            check_structure(data, limits)
            return data
    try:
        return _load_yaml(text, limits)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        if mark is None:
            raise RecipeError(f"malformed YAML{where}: {problem}") from err
        raise RecipeError(
            f"malformed YAML at line {mark.line + 1}, column {mark.column + 1}{where}: {problem}"
        ) from err
    except yaml.YAMLError as err:
        raise RecipeError(f"malformed YAML{where}: {err}") from err
    except RecipeError:
        raise
    except ValueError as err:  # a constructor's: a number past Python's 4300 digits, a date like 2024-13-01
        raise RecipeError(f"malformed YAML{where}: {err}") from err


def _load_yaml(text: str, limits: RecipeLimits) -> Any:
    """``yaml.load`` with the SafeLoader in one pass, on events checked against ``limits`` as they are parsed:
    the whole document is composed (its nodes are shared, not expanded) and checked before it is constructed."""
    loader = _UniqueKeyLoader(checked_events(yaml_events(text, limits), limits))
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _DuplicateKey(Exception):
    pass


def _unique_json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _EventFeed:
    """The parser side of a PyYAML loader (check_event, peek_event, get_event) over an iterator of events."""

    def __init__(self, events):
        self._events = events
        self._next = None

    def peek_event(self):
        if self._next is None:
            self._next = next(self._events, None)
        return self._next

    def check_event(self, *choices) -> bool:
        event = self.peek_event()
        return event is not None and (not choices or isinstance(event, choices))

    def get_event(self):
        event = self.peek_event()
        self._next = None
        return event

    def dispose(self) -> None:
        self._events.close()


class _UniqueKeyLoader(_EventFeed, Composer, SafeConstructor, Resolver):
    """SafeLoader's composer, constructor and resolver on checked events, rejecting a key repeated in one
    mapping instead of keeping the last."""

    def __init__(self, events):
        _EventFeed.__init__(self, events)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)


def _construct_unique_mapping(loader: SafeConstructor, node: yaml.MappingNode) -> dict[Any, Any]:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<" merges may legitimately be overridden by explicit keys
        key = loader.construct_object(key_node, deep=True)
        try:
            repeated = key in first_line
        except TypeError:
            continue  # unhashable key: construct_mapping below reports it
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {shown(key)} (first at line {first_line[key]})", key_node.start_mark
            )
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _within_modifier_limit(stages: list[Stage], limits: RecipeLimits) -> None:
    if sum(len(stage.modifiers) for stage in stages) > limits.max_modifiers:
        raise RecipeLimitError(f"recipe: has more than {limits.max_modifiers} modifiers (the limit)")


def _from_mapping(data: dict[Any, Any], limits: RecipeLimits) -> Recipe:
    stages: list[Stage] = []
    for key, value in data.items():
        if key == "args":
            if value:
                raise RecipeError(
                    "args: recipe variables are not supported; write each value inline in its modifier"
                )
            continue
        if isinstance(key, str) and key.endswith(_STAGE_SUFFIX):
            stages.extend(_parse_stage(key, value))
        elif isinstance(key, str) and key.endswith(_GROUP_SUFFIX):
            stages.append(_parse_group(DEFAULT_STAGE, key, value))
        else:
            hint = ""
            if key in _REGISTRY:
                hint = f"; a modifier goes under '<name>_stage: <group>_modifiers: {key}: ...'"
            raise RecipeError(
                f"{clipped(str(key))}: unknown top-level key; allowed: '<name>_stage' mappings, "
                f"'<group>_modifiers' mappings, and an empty 'args'{hint}"
            )
        # checked as the stages are built: a group holds at most one modifier of each registered class
        _within_modifier_limit(stages, limits)
    if not stages:
        raise RecipeError("recipe is empty: it has no modifiers")
    return Recipe(stages)


def _parse_stage(name: str, body: Any) -> list[Stage]:
    label = clipped(name)
    if not body:
        raise RecipeError(f"{label}: stage is empty; expected '<group>_modifiers: {{ClassName: {{args}}}}'")
    if not isinstance(body, dict):
        raise RecipeError(f"{label}: expected a mapping of '<group>_modifiers' keys, got {type(body).__name__}")
    stages = []
    for key, value in body.items():
        if key == "run_type":
            if value != "oneshot":
                raise RecipeError(f"{label}.run_type: only 'oneshot' is supported; got {shown(value)}")
            continue  # every stage runs one-shot here, so it needs no recording
        if not (isinstance(key, str) and key.endswith(_GROUP_SUFFIX)):
            raise RecipeError(
                f"{label}.{clipped(str(key))}: unknown key in stage; allowed: '<group>_modifiers' mappings and "
                "run_type: oneshot"
            )
        stages.append(_parse_group(name, key, value))
    if not stages:
        raise RecipeError(f"{label}: stage has no '<group>_modifiers' mapping")
    return stages


def _parse_group(stage: str, group: str, body: Any) -> Stage:
    path = f"{clipped(stage)}.{clipped(group)}"
    if not body:
        raise RecipeError(f"{path}: group is empty; expected 'ClassName: {{args}}' entries")
    if not isinstance(body, dict):
        raise RecipeError(f"{path}: expected a mapping of 'ClassName: {{args}}' entries, got {type(body).__name__}")
    implied_group = group[: -len(_GROUP_SUFFIX)]
    modifiers = [_build_modifier(name, args, path, implied_group) for name, args in body.items()]
    return Stage(stage, group, modifiers)


def _from_list(items: list[Any], limits: RecipeLimits) -> Recipe:
    if not items:
        raise RecipeError("recipe is empty: it has no modifiers")
    if len(items) > limits.max_modifiers:
        raise RecipeLimitError(f"recipe: has more than {limits.max_modifiers} modifiers (the limit)")
    modifiers = []
    for i, item in enumerate(items):
        path = f"modifiers[{i}]"
        if isinstance(item, Modifier):
            modifiers.append(item)
        elif isinstance(item, dict):
            modifiers.append(_modifier_from_object(item, path))
        else:
            raise RecipeError(f"{path}: expected a Modifier or {_LIST_ITEM_FORMS}; got {type(item).__name__}")
    return Recipe([Stage(DEFAULT_STAGE, DEFAULT_GROUP, modifiers)])


def _modifier_from_object(obj: dict[Any, Any], path: str) -> Modifier:
    implied_group = DEFAULT_GROUP[: -len(_GROUP_SUFFIX)]
    if "type" in obj:
        args = dict(obj)
        name = args.pop("type")
        if not isinstance(name, str):
            raise RecipeError(f"{path}.type: expected a modifier class name, got {shown(name)}")
        return _build_modifier(name, args, path, implied_group)
    if len(obj) != 1:
        keys = listed(obj) or "none"
        raise RecipeError(f"{path}: expected {_LIST_ITEM_FORMS}; got keys {keys}")
    ((name, args),) = obj.items()
    return _build_modifier(name, args, path, implied_group)


def _build_modifier(name: Any, args: Any, where: str, implied_group: str) -> Modifier:
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        known = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise RecipeError(f"unknown modifier {shown(name)} in {where}; known modifiers: {known}")
    path = f"{where}.{name}"
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise RecipeError(f"{path}: expected a mapping of arguments, got {type(args).__name__}")

    allowed = _argument_names(cls)
    unknown = [k for k in args if k not in allowed]
    if unknown:
        noun = "argument" if len(unknown) == 1 else "arguments"
        raise RecipeError(f"{path}: unknown {noun} {listed(unknown)}; allowed: {', '.join(sorted(allowed))}")
    for key, value in args.items():
        _reject_expressions(value, f"{path}.{key}")

    if "group" not in args:
        args = {**args, "group": implied_group}
    try:
        return cls(**args)
    except ValidationError as err:
        raise RecipeError(_describe_validation_error(err, path)) from err


def _argument_names(cls: type[Modifier]) -> set[str]:
    names = set()
    for name, info in cls.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return names


def _reject_expressions(value: Any, path: str) -> None:
    if isinstance(value, str):
        if value.lstrip().startswith("$") or "eval(" in value:
            raise RecipeError(
                f"{path}: recipe variables and expressions such as {shown(value)} are not supported; "
                "write the value inline"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_expressions(item, f"{path}.{clipped(str(key))}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _reject_expressions(item, f"{path}[{i}]")


_MAX_ERRORS = 10  # of one modifier's validation errors, told in full
_MAX_ERROR_CHARS = 300  # of one validator's message, which may quote the value it refused


def _describe_validation_error(err: ValidationError, path: str) -> str:
    errors = err.errors(include_url=False)
    parts = []
    for error in errors[:_MAX_ERRORS]:
        message = error["msg"]
        # pydantic prefixes messages raised by validators; the field path says enough
        for prefix in ("Value error, ", "Assertion failed, "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
        loc = ".".join(clipped(str(part)) for part in error["loc"])
        message = clipped(message, _MAX_ERROR_CHARS)
        text = f"{path}.{loc}: {message}" if loc else f"{path}: {message}"
        if loc and error["type"] != "missing" and "input" in error:
            text += f" (got {shown(error['input'])})"
        parts.append(text)
    if len(errors) > _MAX_ERRORS:
        parts.append(f"... ({len(errors)} errors in all)")
    return "; ".join(parts)


# ---- one-line description --------------------------------------------------------------


def recipe_summary(recipe: Recipe) -> str:
    """One line for logs, e.g. ``SparseGPTModifier(sparsity=0.5, mask_structure='2:4')``:
    each modifier with the arguments that were given explicitly (``group`` left out),
    joined by `` -> `` in run order."""
    parts = []
    for modifier in recipe.modifiers():
        values = modifier.model_dump(mode="json")
        given = [
            f"{name}={values[name]!r}"
            for name in type(modifier).model_fields
            if name in modifier.model_fields_set and name != "group" and name in values
        ]
        parts.append(f"{type(modifier).__name__}({', '.join(given)})")
    return " -> ".join(parts)
