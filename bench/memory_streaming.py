"""Peak memory of `llmpress compress` does not grow with the model: it holds one block plus activations.

Makes random-init fp32 Llamas that differ only in depth (hidden 1024, intermediate 2816: one block is 50 MiB),
compresses each with SparseGPT 2:4 as a whole child process, and prints each run's peak RSS next to the model's
size, and next to what loading the same model whole with transformers takes.

    python3 bench/memory_streaming.py [--layers 2 8 16] [--work bench/work]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from compare_sparsegpt import calibration_text, run_child  # noqa: E402
from make_random_llama import write_model  # noqa: E402

LOAD_WHOLE = (
    "import sys, torch; from transformers import AutoModelForCausalLM; "
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
    "print(sum(float(p.float().sum()) for p in m.parameters()))"  # touch every weight: mmap pages become resident
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 16])
    ap.add_argument("--work", type=Path, default=BENCH / "work")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--pipeline", default="two_pass")
    a = ap.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    a.work.mkdir(parents=True, exist_ok=True)
    text = calibration_text(a.work, a.num_samples, a.seq_len, REPO / "tests/fixtures/models/stories260K/tokenizer.json")
    rows = []
    for layers in a.layers:
        model = a.work / f"random-llama-{layers}l"
        if not (model / "config.json").exists():
            write_model(model, layers=layers)
        size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**20
        whole = run_child([sys.executable, "-c", LOAD_WHOLE, str(model)], env, a.work / f"load-{layers}l.log")
        out = a.work / f"out-{layers}l"
        ours = run_child([sys.executable, "-m", "service.engine.cli", "compress", "--model", str(model), "--recipe",
                          str(REPO / "service/recipes/sparsegpt_2of4.yaml"), "--dataset", str(text),
                          "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len), "--output", str(out),
                          "--overwrite", "--device", "cpu", "--pipeline", a.pipeline], env, a.work / f"compress-{layers}l.log")
        if ours["returncode"] or whole["returncode"]:
            print(f"a child failed; see {ours['log']} / {whole['log']}")
            return 1
        rows.append({"layers": layers, "model_mib": size, "load_whole_peak_mib": whole["peak_rss_mib"],
                     "compress_peak_mib": ours["peak_rss_mib"], "compress_wall_s": ours["wall_s"]})
    print(f"\nSparseGPT 2:4, {a.num_samples} x {a.seq_len} calibration tokens, pipeline {a.pipeline}, 2 threads")
    print(f"{'layers':>6} {'model MiB':>10} {'load whole: peak MiB':>21} {'llmpress compress: peak MiB':>28} {'wall s':>7}")
    for r in rows:
        print(f"{r['layers']:>6} {r['model_mib']:>10.0f} {r['load_whole_peak_mib']:>21.0f} "
              f"{r['compress_peak_mib']:>28.0f} {r['compress_wall_s']:>7.1f}")
    (a.work / "memory_streaming.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
