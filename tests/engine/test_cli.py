"""The `llmpress` command line as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixture_paths import FIXTURES, WIKI_VALID

from tests.tiny_models import write_model

RECIPES = FIXTURES.parents[1] / "service" / "recipes"


def llmpress(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "service.engine.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=FIXTURES.parents[1])
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_compress_then_eval(tmp_path):
    src = FIXTURES / "models" / "stories260K"
    out = tmp_path / "out"
    proc = llmpress("compress", "--model", src, "--recipe", RECIPES / "sparsegpt_2of4.yaml", "--dataset", WIKI_VALID,
                    "--num-samples", 8, "--seq-len", 64, "--output", out, "--device", "cpu", "--seed", 3,
                    "--report-json", tmp_path / "report.json", "--eval", WIKI_VALID, "--eval-max-tokens", 2048)
    assert "total: sparsity 0.5000" in proc.stdout and f"output: {out}" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["calibration"]["num_samples"] == 8 and report["calibration"]["seed"] == 3
    assert report["perplexity"]["valid"]["after"] > report["perplexity"]["valid"]["before"] > 1
    result = json.loads(llmpress("eval", "--model", out, "--dataset", WIKI_VALID, "--max-tokens", 2048, "--json",
                                 "--device", "cpu").stdout)
    assert result["ppl"] == pytest.approx(report["perplexity"]["valid"]["after"], rel=1e-6)
    assert result["tokens"] == 2048 - 4  # four 512-token windows, each predicting 511 tokens


def test_eval_scores_a_quantized_output_streamed(tmp_path):
    """`llmpress eval` reads a compressed-tensors output block by block, as the compress report scored it."""
    out = tmp_path / "out"
    llmpress("compress", "--model", FIXTURES / "models" / "stories260K", "--recipe",
             RECIPES / "sparsegpt_2of4_gptq_w4.yaml", "--dataset", WIKI_VALID, "--num-samples", 8, "--seq-len", 64,
             "--output", out, "--device", "cpu", "--report-json", tmp_path / "report.json", "--eval", WIKI_VALID,
             "--eval-max-tokens", 2048)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    after = json.loads((tmp_path / "report.json").read_text())["perplexity"]["valid"]["after"]
    result = json.loads(llmpress("eval", "--model", out, "--dataset", WIKI_VALID, "--max-tokens", 2048, "--json",
                                 "--device", "cpu").stdout)
    assert result["ppl"] == pytest.approx(after, rel=1e-6) and result["tokens"] == 2048 - 4


@pytest.mark.parametrize("change,field", [
    ("sparsity: 0.5", "sparsity: 1.5"),
    ('mask_structure: "2:4"', 'mask_structure: "a:b"'),
    ("block_size: 128", "block_size: 0"),
    ("SparseGPTModifier:", "SparseGPTModifer:"),
    ("dampening_frac: 0.01", "dampening: 0.01"),
])
def test_bad_recipes_name_the_field(tmp_path, change, field):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((RECIPES / "sparsegpt_2of4.yaml").read_text().replace(*((change, field))))
    proc = llmpress("compress", "--model", FIXTURES / "models" / "stories260K", "--recipe", recipe, "--dataset",
                    WIKI_VALID, "--output", tmp_path / "out", check=False)
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("llmpress compress: error:")
    name = field.split(":")[0].strip()
    assert name.split("_")[0] in message or "unknown modifier" in message, message
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_remote_code_is_refused_by_default(tmp_path):
    src = write_model("llama", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="my_custom_llm", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (src / "config.json").write_text(json.dumps(config))
    proc = llmpress("compress", "--model", src, "--recipe", RECIPES / "magnitude_2of4.yaml", "--output",
                    tmp_path / "out", check=False)
    assert proc.returncode == 2 and "--trust-remote-code" in proc.stderr, proc.stderr


def test_demo_recipes_all_load():
    from service.recipes import pruning_modifiers  # noqa: F401
    from service.recipes.recipe import load_recipe

    for path in RECIPES.glob("*.yaml"):
        assert load_recipe(path).modifiers(), path



def test_a_recipe_file_past_the_limits_exits_2_unless_trusted(tmp_path, capsys):
    """In this process (a real compress costs the transformers import; test_compress_then_eval runs one): with
    --trusted-recipe the padded recipe passes and the next check, the model's, speaks."""
    from service.engine.cli import main

    recipe = tmp_path / "padded.yaml"
    recipe.write_text((RECIPES / "magnitude_2of4.yaml").read_text() + "# a long comment, as padding\n" * 2500)
    command = ["compress", "--model", str(tmp_path / "no-model"), "--recipe", str(recipe), "--output",
               str(tmp_path / "out")]
    assert main(command) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("llmpress compress: error: recipe: file"), message
    assert "larger than 65536 bytes (the limit)" in message and "--trusted-recipe" in message
    assert main([*command, "--trusted-recipe"]) == 2
    assert capsys.readouterr().err.startswith("llmpress compress: error: model: directory")


def test_an_alias_bomb_is_refused_even_when_trusted(tmp_path, capsys):
    from service.engine.cli import main

    recipe = tmp_path / "bomb.yaml"
    lines = ["      l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"      l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    recipe.write_text("s_stage:\n  g_modifiers:\n    MagnitudePruningModifier:\n" + "\n".join(lines) + "\n")
    for trusted in ((), ("--trusted-recipe",)):
        assert main(["compress", "--model", str(tmp_path), "--recipe", str(recipe), "--output",
                     str(tmp_path / "out"), *trusted]) == 2
        message = capsys.readouterr().err.strip()
        assert message.startswith("llmpress compress: error: recipe: expands to more than"), message
        assert len(message) < 300 and "lol" not in message
