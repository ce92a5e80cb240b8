"""Peak memory of scoring a quantized output streamed stays flat with depth; loading it whole grows with it.

Makes random-init fp32 Llamas that differ only in depth (hidden 1024, intermediate 2816: one block is 50 MiB),
quantizes each to W4 (RTN, int4 symmetric per output channel, lm_head kept dense) with the streaming engine
(`llmpress compress`, a child process), then scores the quantized output's perplexity twice, each in a child
process of its own so that each peak RSS belongs to one run:

- streamed: `service.engine.perplexity.perplexity_streamed(out_dir, ids, device="cpu")`, one block decompressed
  at a time;
- whole: `service.engine.perplexity.perplexity(service.engine.model_source.load_output(out_dir), ids)`, the whole
  model decompressed.

Both score the same token ids (the first --tokens tokens of a WikiText-2 valid prefix, stories260K tokenizer, in
windows of 512, one batch of 8 windows) and must agree on the perplexity (1e-4 relative). Prints, per depth, the
quantized checkpoint's size on disk, the dense model's size, both peak RSS figures (median over --repeats children,
order alternating: a single peak varies by tens of MiB from run to run) and both perplexities, plus the peak RSS
of a child that only imports the libraries (the fixed cost under both figures).

    python3 bench/memory_quantized_eval.py [--layers 2 8 16] [--work bench/work] [--tokens 4096] [--repeats 3]

Results also go to WORK/memory_quantized_eval.json; each child's log is WORK/w4-*.log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))  # service.engine.text_data, to tokenize the evaluation text once here

from compare_sparsegpt import calibration_text, run_child  # noqa: E402
from make_random_llama import write_model  # noqa: E402

RECIPE = """\
quantization_stage:
  quantization_modifiers:
    QuantizationModifier:
      targets: [Linear]
      ignore: [lm_head]
      config_groups:
        group_0: {targets: [Linear], weights: {num_bits: 4, type: int, symmetric: true, strategy: channel}}
"""

# Each child: argv = output dir, token ids (.pt), result file (.json). Run from the repository root (run_child).
_RESULT = ("open(sys.argv[3], 'w').write(json.dumps({'ppl': r.ppl, 'nll': r.nll, 'tokens': r.tokens, "
           "'windows': r.windows})); print('ppl', r.ppl)")
SCORE_STREAMED = (
    "import sys, json, torch; from service.engine.perplexity import perplexity_streamed; "
    "ids = torch.load(sys.argv[2]); "
    "r = perplexity_streamed(sys.argv[1], ids, device='cpu'); " + _RESULT
)
SCORE_WHOLE = (
    "import sys, json, torch; from service.engine.model_source import load_output; "
    "from service.engine.perplexity import perplexity; "
    "ids = torch.load(sys.argv[2]); "
    "r = perplexity(load_output(sys.argv[1]), ids); " + _RESULT
)
# The fixed cost both children pay before touching a weight: interpreter, torch, transformers, compressed-tensors.
IMPORTS_ONLY = ("import torch, transformers, compressed_tensors; "
                "from service.engine.perplexity import perplexity_streamed; "
                "from service.engine.model_source import load_output; "
                "from service.engine.quantized_export import load_quantized")
PPL_RTOL = 1e-4


def dir_mib(directory: Path, pattern: str = "*") -> float:
    return sum(p.stat().st_size for p in directory.glob(pattern) if p.is_file()) / 2**20


def eval_ids(work: Path, model_dir: Path, tokens: int) -> Path:
    """The first `tokens` ids of a WikiText-2 valid prefix, saved once so that every child scores the same ids."""
    import torch

    from service.engine.text_data import load_tokenizer, read_texts, tokenize

    text = calibration_text(work, 1, tokens, model_dir / "tokenizer.json")
    ids = tokenize(load_tokenizer(model_dir), read_texts(text), max_tokens=tokens)
    if len(ids) < tokens:
        raise ValueError(f"{text} gives {len(ids)} tokens, need {tokens}")
    path = work / f"eval-ids-{tokens}.pt"
    torch.save(ids.clone(), path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 16])
    ap.add_argument("--work", type=Path, default=BENCH / "work")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (windows of 512)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="evaluation children per depth and path (order alternating); the table shows the median peak")
    a = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    recipe = a.work / "rtn_w4_channel.yaml"
    recipe.write_text(RECIPE)

    base = run_child([sys.executable, "-c", IMPORTS_ONLY], env, a.work / "w4-imports-only.log")["peak_rss_mib"]
    rows, ids = [], None
    for layers in a.layers:
        model = a.work / f"random-llama-{layers}l"
        if not (model / "config.json").exists():
            write_model(model, layers=layers)
        if ids is None:
            ids = eval_ids(a.work, model, a.tokens)
        out = a.work / f"w4-{layers}l"
        comp = run_child([sys.executable, "-m", "service.engine.cli", "compress", "--model", str(model), "--recipe",
                          str(recipe), "--output", str(out), "--overwrite", "--device", "cpu"],
                         env, a.work / f"w4-compress-{layers}l.log")
        if comp["returncode"]:
            print(f"compress failed; see {comp['log']}")
            return 1
        peaks: dict[str, list[float]] = {"streamed": [], "whole": []}
        walls: dict[str, list[float]] = {"streamed": [], "whole": []}
        ppls: dict[str, list[float]] = {"streamed": [], "whole": []}
        for rep in range(a.repeats):
            order = (("streamed", SCORE_STREAMED), ("whole", SCORE_WHOLE))
            for kind, code in (order if rep % 2 == 0 else order[::-1]):
                result = a.work / f"w4-eval-{kind}-{layers}l.json"
                result.unlink(missing_ok=True)
                run = run_child([sys.executable, "-c", code, str(out), str(ids), str(result)], env,
                                a.work / f"w4-eval-{kind}-{layers}l-{rep}.log")
                if run["returncode"] or not result.exists():
                    print(f"{kind} evaluation failed; see {run['log']}")
                    return 1
                peaks[kind].append(run["peak_rss_mib"])
                walls[kind].append(run["wall_s"])
                ppls[kind].append(json.loads(result.read_text())["ppl"])
        ppl = {k: v[0] for k, v in ppls.items()}
        every = ppls["streamed"] + ppls["whole"]
        rel = (max(every) - min(every)) / ppl["whole"]  # streamed vs whole, and every repeat against the others
        rows.append({"layers": layers, "quantized_mib": dir_mib(out, "*.safetensors"),
                     "dense_mib": dir_mib(model, "*.safetensors"), "compress_peak_mib": comp["peak_rss_mib"],
                     "compress_wall_s": comp["wall_s"],
                     **{f"{k}_peak_mib": statistics.median(v) for k, v in peaks.items()},
                     **{f"{k}_peak_runs_mib": v for k, v in peaks.items()},
                     **{f"{k}_wall_s": statistics.median(v) for k, v in walls.items()},
                     "ppl_streamed": ppl["streamed"], "ppl_whole": ppl["whole"], "ppl_rel_diff": rel})
        print(f"{layers} blocks: peak MiB streamed {[round(x) for x in peaks['streamed']]}, whole "
              f"{[round(x) for x in peaks['whole']]}; ppl {ppl['streamed']:.6f} / {ppl['whole']:.6f}", flush=True)

    rng = lambda v: f"{min(v):.0f}-{max(v):.0f}"  # noqa: E731
    print(f"\nW4 RTN (int4 symmetric, per channel, lm_head dense) scored on {a.tokens} tokens in windows of 512, "
          f"2 threads; peak RSS per child process, median of {a.repeats} [range]; imports alone: {base:.0f} MiB")
    print(f"{'blocks':>6} {'W4 MiB':>7} {'dense MiB':>10} {'streamed peak MiB':>20} {'whole peak MiB':>20} "
          f"{'ppl streamed':>13} {'ppl whole':>13} {'rel diff':>9} {'wall s str/whole':>17}")
    for r in rows:
        streamed = f"{r['streamed_peak_mib']:.0f} [{rng(r['streamed_peak_runs_mib'])}]"
        whole = f"{r['whole_peak_mib']:.0f} [{rng(r['whole_peak_runs_mib'])}]"
        wall = f"{r['streamed_wall_s']:.1f}/{r['whole_wall_s']:.1f}"
        print(f"{r['layers']:>6} {r['quantized_mib']:>7.0f} {r['dense_mib']:>10.0f} {streamed:>20} {whole:>20} "
              f"{r['ppl_streamed']:>13.6f} {r['ppl_whole']:>13.6f} {r['ppl_rel_diff']:>9.1e} {wall:>17}")
    bad = [r["layers"] for r in rows if r["ppl_rel_diff"] > PPL_RTOL]
    print(f"perplexities agree within {PPL_RTOL:g} relative: " + ("yes" if not bad else f"NO for {bad} blocks"))
    (a.work / "memory_quantized_eval.json").write_text(json.dumps(rows, indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
