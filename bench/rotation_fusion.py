"""SpinQuant R1+R2 (Hadamard) fusion time and exactness: llmpress vs llm-compressor, side by side in one run.

A random-init Llama (hidden 1024, 8 layers, 16 heads of 64, intermediate 2816; bench/make_random_llama.py) is
rotated by each engine; each reports the wall time of the rotation alone (model already loaded) and the max
|logit difference| against the unrotated model on 256 tokens of TinyStories. llm-compressor runs in a
subprocess with its own interpreter (/tmp/lcenv/bin/python), through its public ``oneshot`` with a
``SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard")`` and no dataset (data-free pipeline).

    python3 bench/rotation_fusion.py [--model DIR] [--threads 2] [--lc-python /tmp/lcenv/bin/python]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT = REPO / "tests/fixtures/data/tinystories/valid-subset.txt"


def eval_ids(tokenizer, n: int = 256):
    import torch

    ids = tokenizer(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:n]
    return torch.tensor(ids)[None]


def llmcompressor_side(model_dir: str, threads: int) -> dict:
    """Runs under llm-compressor's interpreter: load, reference logits, oneshot(SpinQuant R1+R2), logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcompressor import oneshot
    from llmcompressor.modifiers.transform import SpinQuantModifier

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = eval_ids(AutoTokenizer.from_pretrained(model_dir))
    with torch.no_grad():
        ref = model(ids).logits
    started = time.perf_counter()
    oneshot(model=model, recipe=[SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard")])
    seconds = time.perf_counter() - started
    with torch.no_grad():
        out = model(ids).logits
    return {"seconds": seconds, "max_logit_diff": float((out - ref).abs().max())}


def llmpress_side(model_dir: str, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from service.engine.text_data import load_tokenizer
    from service.recipes.spinquant import SpinQuantModifier, apply_spinquant

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = eval_ids(load_tokenizer(Path(model_dir)))
    with torch.no_grad():
        ref = model(ids).logits
    started = time.perf_counter()
    apply_spinquant(model, SpinQuantModifier(rotations=["R1", "R2"], transform_type="hadamard"))
    seconds = time.perf_counter() - started
    with torch.no_grad():
        out = model(ids).logits
    return {"seconds": seconds, "max_logit_diff": float((out - ref).abs().max())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="default: make one in a temp dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lc-python", default="/tmp/lcenv/bin/python")
    ap.add_argument("--side", choices=["llmcompressor"], default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side == "llmcompressor":  # the subprocess
        print(json.dumps(llmcompressor_side(str(a.model), a.threads)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = a.model
        if model_dir is None:
            sys.path.insert(0, str(REPO / "bench"))
            from make_random_llama import write_model

            model_dir = write_model(Path(tmp) / "llama", layers=8, hidden=1024, intermediate=2816)
        ours = llmpress_side(str(model_dir), a.threads)
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
        proc = subprocess.run(
            [a.lc_python, __file__, "--side", "llmcompressor", "--model", str(model_dir), "--threads", str(a.threads)],
            capture_output=True, text=True, env=env, check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"llm-compressor side failed:\n{proc.stderr[-4000:]}")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'engine':<16}{'seconds':>10}{'max |dlogit|':>16}")
    for name, r in (("llmpress", ours), ("llm-compressor", theirs)):
        print(f"{name:<16}{r['seconds']:>10.2f}{r['max_logit_diff']:>16.3g}")
    print(f"wall-time ratio llm-compressor / llmpress: {theirs['seconds'] / ours['seconds']:.2f}")
    print(json.dumps({"llmpress": ours, "llm-compressor": theirs}))


if __name__ == "__main__":
    main()
