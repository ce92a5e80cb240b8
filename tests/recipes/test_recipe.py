"""Recipe parsing: llm-compressor's YAML, the JSON list forms, round trips and errors.

The modifiers here are test-only stand-ins registered into a fresh registry per test,
so they never clash with (or leak into) the real modifiers' registrations.
"""

import json

import pytest
import yaml
from pydantic import field_validator

from service.recipes import recipe as recipe_module
from service.recipes.modifier import Modifier
from service.recipes.recipe import (
    Recipe,
    RecipeError,
    Stage,
    load_recipe,
    recipe_summary,
    register_modifier,
    registered_modifiers,
)


class _Pruning(Modifier):
    sparsity: float = 0.5
    mask_structure: str = "0:0"
    targets: list[str] = ["Linear"]
    ignore: list[str] = []

    @field_validator("sparsity")
    @classmethod
    def _sparsity_in_range(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError("must be in [0, 1)")
        return value

    def on_initialize(self, state, **kwargs):
        return True


class SparseGPTModifier(_Pruning):
    block_size: int = 128
    dampening_frac: float | None = 0.01


class MagnitudePruningModifier(_Pruning):
    pass


class WandaPruningModifier(_Pruning):
    pass


class NeedsArgModifier(Modifier):
    required: int

    def on_initialize(self, state, **kwargs):
        return True


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    # The built-in modifiers first, into the real registry: load_recipe imports them on first use, which inside
    # the stand-in registry would clash with the stand-ins' names (this file run alone used to fail so).
    recipe_module._load_builtin_modifiers()
    monkeypatch.setattr(recipe_module, "_REGISTRY", {})
    for cls in (SparseGPTModifier, MagnitudePruningModifier, WandaPruningModifier):
        register_modifier(cls)
    return recipe_module._REGISTRY


KNOWN = "known modifiers: MagnitudePruningModifier, SparseGPTModifier, WandaPruningModifier"

# llm-compressor's example recipe for SparseGPT 2:4
SPARSEGPT_YAML = """\
sparsity_stage:
  sparsity_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      targets: ["re:.*self_attn.*"]
      ignore: ["lm_head"]
"""

MULTI_STAGE_YAML = """\
z_stage:
  sparsity_modifiers:
    MagnitudePruningModifier:
      sparsity: 0.3
a_stage:
  run_type: oneshot
  pruning_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
    WandaPruningModifier:
  other_modifiers:
    MagnitudePruningModifier: {}
"""


# ---- registry --------------------------------------------------------------------------


def test_registry_is_fresh_per_test(registry):
    assert sorted(registered_modifiers()) == [
        "MagnitudePruningModifier",
        "SparseGPTModifier",
        "WandaPruningModifier",
    ]
    registered_modifiers().clear()  # a copy: the registry is untouched
    assert len(registry) == 3


def test_register_modifier_rejects_non_modifiers_and_name_clashes():
    with pytest.raises(TypeError, match="expects a Modifier subclass"):
        register_modifier(dict)
    assert register_modifier(SparseGPTModifier) is SparseGPTModifier  # idempotent

    def make_clash():
        class SparseGPTModifier(Modifier):
            def on_initialize(self, state, **kwargs):
                return True

        return SparseGPTModifier

    with pytest.raises(ValueError, match="'SparseGPTModifier' is already registered by tests.recipes.test_recipe"):
        register_modifier(make_clash())


# ---- accepted forms --------------------------------------------------------------------


def test_llm_compressor_sparsegpt_example():
    recipe = load_recipe(SPARSEGPT_YAML)
    assert [(s.name, s.group) for s in recipe.stages] == [("sparsity_stage", "sparsity_modifiers")]
    (mod,) = recipe.modifiers()
    assert type(mod) is SparseGPTModifier
    assert mod.sparsity == 0.5
    assert mod.mask_structure == "2:4"
    assert mod.targets == ["re:.*self_attn.*"]
    assert mod.ignore == ["lm_head"]
    assert mod.group == "sparsity"  # inferred from the group key, as llm-compressor does
    assert mod.block_size == 128


def test_stages_and_groups_keep_file_order():
    recipe = load_recipe(MULTI_STAGE_YAML)
    assert [(s.name, s.group) for s in recipe.stages] == [
        ("z_stage", "sparsity_modifiers"),
        ("a_stage", "pruning_modifiers"),
        ("a_stage", "other_modifiers"),
    ]
    assert [type(m).__name__ for m in recipe.modifiers()] == [
        "MagnitudePruningModifier",
        "SparseGPTModifier",
        "WandaPruningModifier",
        "MagnitudePruningModifier",
    ]
    assert [m.sparsity for m in recipe.modifiers()] == [0.3, 0.5, 0.5, 0.5]
    assert [m.group for m in recipe.modifiers()] == ["sparsity", "pruning", "pruning", "other"]


def test_top_level_group_without_stage():
    recipe = load_recipe("sparsity_modifiers:\n  SparseGPTModifier:\n    sparsity: 0.6\n")
    assert [(s.name, s.group) for s in recipe.stages] == [("default_stage", "sparsity_modifiers")]
    assert recipe.modifiers()[0].sparsity == 0.6


def test_empty_modifier_body_means_defaults():
    recipe = load_recipe("s_stage:\n  g_modifiers:\n    SparseGPTModifier:\n")
    assert recipe.modifiers()[0] == SparseGPTModifier(group="g")


def test_explicit_group_argument_wins():
    recipe = load_recipe("s_stage:\n  g_modifiers:\n    SparseGPTModifier: {group: custom}\n")
    assert recipe.modifiers()[0].group == "custom"
    assert load_recipe(recipe.to_yaml()) == recipe


def test_list_of_json_objects_in_both_forms():
    items = [
        {"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4"}},
        {"type": "WandaPruningModifier", "sparsity": 0.4},
        {"MagnitudePruningModifier": None},
    ]
    recipe = load_recipe(items)
    assert [(s.name, s.group) for s in recipe.stages] == [("default_stage", "default_modifiers")]
    a, b, c = recipe.modifiers()
    assert (type(a), a.sparsity, a.mask_structure) == (SparseGPTModifier, 0.5, "2:4")
    assert (type(b), b.sparsity) == (WandaPruningModifier, 0.4)
    assert type(c) is MagnitudePruningModifier
    # the same list as JSON text, as the job API would send it
    assert load_recipe(json.dumps(items)) == recipe


def test_modifier_instances_and_recipe_pass_through():
    mod = SparseGPTModifier(sparsity=0.7)
    single = load_recipe(mod)
    assert single.modifiers()[0] is mod
    assert [(s.name, s.group) for s in single.stages] == [("default_stage", "default_modifiers")]
    mixed = load_recipe([mod, {"WandaPruningModifier": {}}])
    assert [type(m) for m in mixed.modifiers()] == [SparseGPTModifier, WandaPruningModifier]
    assert load_recipe(mixed) is mixed


def test_dict_file_and_path_sources(tmp_path):
    expected = load_recipe(SPARSEGPT_YAML)
    assert load_recipe(yaml.safe_load(SPARSEGPT_YAML)) == expected
    path = tmp_path / "recipe.yaml"
    path.write_text(SPARSEGPT_YAML)
    assert load_recipe(path) == expected
    assert load_recipe(str(path)) == expected
    json_path = tmp_path / "recipe.json"
    json_path.write_text(json.dumps(yaml.safe_load(SPARSEGPT_YAML), indent="\t"))  # tabs: JSON, not YAML
    assert load_recipe(json_path) == expected


# ---- serialisation ---------------------------------------------------------------------


@pytest.mark.parametrize("text", [SPARSEGPT_YAML, MULTI_STAGE_YAML])
def test_yaml_and_dict_round_trip(text):
    recipe = load_recipe(text)
    assert load_recipe(recipe.to_yaml()) == recipe
    assert load_recipe(json.loads(json.dumps(recipe.to_dict()))) == recipe


def test_to_yaml_is_llm_compressor_layout():
    recipe = load_recipe(MULTI_STAGE_YAML)
    out = recipe.to_yaml()
    # one key per stage even when it holds several groups; stages in run order
    assert out.index("z_stage:") < out.index("a_stage:")
    assert out.count("a_stage:") == 1
    assert "group:" not in out  # implied by the layout
    sgpt = load_recipe(SPARSEGPT_YAML).to_dict()
    assert sgpt == {
        "sparsity_stage": {
            "sparsity_modifiers": {
                "SparseGPTModifier": {
                    "sparsity": 0.5,
                    "mask_structure": "2:4",
                    "targets": ["re:.*self_attn.*"],
                    "ignore": ["lm_head"],
                    "block_size": 128,
                    "dampening_frac": 0.01,
                }
            }
        }
    }
    # "2:4" must stay a string: unquoted, YAML 1.1 reads 2:4 as the base-60 integer 124
    assert "'2:4'" in load_recipe(SPARSEGPT_YAML).to_yaml()


def test_none_is_kept_when_it_is_not_the_default():
    recipe = load_recipe([{"SparseGPTModifier": {"dampening_frac": None}}])
    assert recipe.to_dict()["default_stage"]["default_modifiers"]["SparseGPTModifier"]["dampening_frac"] is None
    assert load_recipe(recipe.to_yaml()) == recipe


def test_recipe_summary():
    assert recipe_summary(load_recipe([{"SparseGPTModifier": {"sparsity": 0.5, "mask_structure": "2:4"}}])) == (
        "SparseGPTModifier(sparsity=0.5, mask_structure='2:4')"
    )
    assert recipe_summary(load_recipe(MULTI_STAGE_YAML)) == (
        "MagnitudePruningModifier(sparsity=0.3) -> SparseGPTModifier(sparsity=0.5) "
        "-> WandaPruningModifier() -> MagnitudePruningModifier()"
    )


# ---- errors ----------------------------------------------------------------------------


def assert_error(source, *fragments):
    with pytest.raises(RecipeError) as info:
        load_recipe(source)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    return str(info.value)


def test_unknown_modifier():
    message = assert_error(SPARSEGPT_YAML.replace("SparseGPTModifier", "SparseGPT"))
    assert message == f"unknown modifier 'SparseGPT' in sparsity_stage.sparsity_modifiers; {KNOWN}"
    assert_error([{"type": "Nope"}], f"unknown modifier 'Nope' in modifiers[0]; {KNOWN}")


def test_unknown_argument():
    message = assert_error(SPARSEGPT_YAML.replace("sparsity: 0.5", "sparsty: 0.5"))
    assert message == (
        "sparsity_stage.sparsity_modifiers.SparseGPTModifier: unknown argument 'sparsty'; allowed: "
        "block_size, dampening_frac, end, group, ignore, index, mask_structure, sparsity, start, targets, update"
    )
    assert_error([{"WandaPruningModifier": {"a": 1, "b": 2}}], "unknown arguments 'a', 'b'; allowed: ")


def test_validation_error_names_field_and_value():
    message = assert_error(SPARSEGPT_YAML.replace("sparsity: 0.5", "sparsity: 1.5"))
    assert message == "sparsity_stage.sparsity_modifiers.SparseGPTModifier.sparsity: must be in [0, 1) (got 1.5)"
    assert_error(
        [{"SparseGPTModifier": {"block_size": "big", "targets": ["a", 3]}}],
        "modifiers[0].SparseGPTModifier.block_size: Input should be a valid integer",
        "(got 'big')",
        "modifiers[0].SparseGPTModifier.targets.1: Input should be a valid string",
    )


def test_missing_required_argument(registry):
    register_modifier(NeedsArgModifier)
    assert_error([{"NeedsArgModifier": {}}], "modifiers[0].NeedsArgModifier.required: Field required")


def test_malformed_yaml_reports_line(tmp_path):
    bad = "sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier:\n      sparsity: [0.5\n"
    assert_error(bad, "malformed YAML at line 5")
    path = tmp_path / "bad.yaml"
    path.write_text("a_stage:\n  g_modifiers:\n   - x\n  bad: : :\n")
    assert_error(path, "malformed YAML at line 4", f"of {path}")
    json_path = tmp_path / "bad.json"
    json_path.write_text('{\n  "a_stage": ,\n}')
    assert_error(json_path, "malformed JSON at line 2, column 14")


def test_duplicate_keys_are_rejected_not_overwritten():
    text = "s_stage:\n  g_modifiers:\n    SparseGPTModifier: {sparsity: 0.5}\n    SparseGPTModifier: {sparsity: 0.6}\n"
    assert_error(text, "line 4", "duplicate key 'SparseGPTModifier' (first at line 3)")
    assert_error('{"s_stage": {}, "s_stage": {}}', "duplicate key 's_stage'")


def test_missing_file(tmp_path):
    assert_error("recipes/nope.yaml", "recipe file not found: 'recipes/nope.yaml'")
    assert_error(tmp_path / "nope.yaml", "recipe file not found:", "nope.yaml")
    assert_error(str(tmp_path), "is a directory")


@pytest.mark.parametrize("source", ["", "   \n", "# only a comment\n", {}, [], "{}", "args: {}\n"])
def test_empty_recipe(source):
    assert_error(source, "recipe is empty")


def test_empty_stage_and_group():
    assert_error("s_stage:\n", "s_stage: stage is empty")
    assert_error("s_stage:\n  g_modifiers: {}\n", "s_stage.g_modifiers: group is empty")
    assert_error("s_stage:\n  run_type: oneshot\n", "s_stage: stage has no '<group>_modifiers' mapping")


def test_structure_errors():
    assert_error("version: 1.0\n", "version: unknown top-level key; allowed: '<name>_stage'")
    assert_error(
        "SparseGPTModifier: {sparsity: 0.5}\n",
        "SparseGPTModifier: unknown top-level key",
        "a modifier goes under '<name>_stage: <group>_modifiers: SparseGPTModifier: ...'",
    )
    assert_error("s_stage:\n  foo: 1\n", "s_stage.foo: unknown key in stage; allowed: '<group>_modifiers'")
    assert_error("s_stage: [1]\n", "s_stage: expected a mapping of '<group>_modifiers' keys, got list")
    assert_error(
        "s_stage:\n  g_modifiers:\n    - SparseGPTModifier\n",
        "s_stage.g_modifiers: expected a mapping of 'ClassName: {args}' entries, got list",
    )
    assert_error(
        "s_stage:\n  g_modifiers:\n    SparseGPTModifier: 0.5\n",
        "s_stage.g_modifiers.SparseGPTModifier: expected a mapping of arguments, got float",
    )
    assert_error("- 3\n", "modifiers[0]: expected a Modifier or")
    assert_error([{"A": {}, "B": {}}], "modifiers[0]: expected", "got keys 'A', 'B'")
    assert_error([{"type": 3}], "modifiers[0].type: expected a modifier class name")
    assert_error(42, "cannot load a recipe from int")
    assert_error("just some words\nover two lines\n", "must be a mapping of '<name>_stage' keys")


def test_unsupported_llm_compressor_features_are_rejected():
    assert_error("s_stage:\n  run_type: train\n  g_modifiers:\n    SparseGPTModifier:\n",
                 "s_stage.run_type: only 'oneshot' is supported; got 'train'")
    assert_error("args:\n  s: 0.5\n" + SPARSEGPT_YAML, "args: recipe variables are not supported")
    assert_error(
        SPARSEGPT_YAML.replace('"2:4"', '"$structure"'),
        "sparsity_stage.sparsity_modifiers.SparseGPTModifier.mask_structure: recipe variables and expressions",
    )
    assert_error([{"SparseGPTModifier": {"targets": ["ok", "eval(x)"]}}], "SparseGPTModifier.targets[1]: recipe variables")


def test_duplicate_class_in_list_form_needs_its_own_stage():
    assert_error(
        [{"SparseGPTModifier": {}}, {"SparseGPTModifier": {"sparsity": 0.2}}],
        "default_stage.default_modifiers: SparseGPTModifier appears twice",
        "put the second one in a stage of its own",
    )


def test_recipe_layout_is_checked_on_construction():
    mod = SparseGPTModifier()
    with pytest.raises(RecipeError, match="recipe is empty"):
        Recipe([])
    with pytest.raises(RecipeError, match="stage name 'sparsity' must end with '_stage'"):
        Recipe([Stage("sparsity", "g_modifiers", [mod])])
    with pytest.raises(RecipeError, match="group name 'g' must end with '_modifiers'"):
        Recipe([Stage("s_stage", "g", [mod])])
    with pytest.raises(RecipeError, match="s_stage: stage appears twice with another stage in between"):
        Recipe([Stage("s_stage", "g_modifiers", [mod]), Stage("t_stage", "g_modifiers", [mod]), Stage("s_stage", "h_modifiers", [mod])])
    with pytest.raises(RecipeError, match="s_stage.g_modifiers: group appears twice"):
        Recipe([Stage("s_stage", "g_modifiers", [mod]), Stage("s_stage", "g_modifiers", [WandaPruningModifier()])])
    with pytest.raises(RecipeError, match="s_stage.g_modifiers: group has no modifiers"):
        Recipe([Stage("s_stage", "g_modifiers", [])])
