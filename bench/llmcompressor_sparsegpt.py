"""The llm-compressor side of the SparseGPT benchmark, as one whole process: import, load, calibrate, oneshot, save.

Run with the interpreter that has llm-compressor installed (not the engine's):

    /tmp/lcenv/bin/python bench/llmcompressor_sparsegpt.py --model MODEL_DIR --recipe RECIPE_YAML \
        --dataset TEXT_FILE --num-samples 32 --seq-len 512 --output OUT_DIR \
        --losses-out LOSSES_JSON [--stats-out STATS_JSON] [--threads 2] [--save-compressed]

Calibration is the first num_samples * seq_len tokens of TEXT_FILE (whole file tokenized with the model's
tokenizer, no special tokens), cut into num_samples rows of seq_len: the same rule the engine's CLI uses.

Per-module losses: llm-compressor logs them only rounded to 2 decimals ("error 1.23" METRIC lines), so
`sparsify_weight` is wrapped at the name SparseGPTModifier calls it by, to record the full float it returns.
The wrapper does not touch arguments or results; the logged values are parsed too and checked against it.
"""

import time

T_START = time.perf_counter()  # before the heavy imports, so import time is measured

import argparse
import json
import os
import re
import sys
from pathlib import Path


def calibration_ids(tokenizer, text_file: Path, num_samples: int, seq_len: int):
    """(num_samples, seq_len) int64 tensor: the first num_samples*seq_len tokens, without BOS/EOS."""
    import torch

    ids = tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    need = num_samples * seq_len
    if len(ids) < need:
        raise ValueError(f"{text_file} has {len(ids)} tokens, need {need}")
    return torch.tensor(ids[:need], dtype=torch.long).view(num_samples, seq_len)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--recipe", type=Path, required=True, help="llm-compressor recipe YAML")
    ap.add_argument("--dataset", type=Path, required=True, help="plain text file")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("--losses-out", type=Path, required=True, help="JSON {module_name: loss}")
    ap.add_argument("--stats-out", type=Path, default=None, help="JSON of phase times and per-module details")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-compressed", action="store_true",
                    help="save_compressed=True (llm-compressor's default). With 0.14 and a sparsity-only recipe it "
                         "writes the same dense safetensors either way (no sparsity compressor is inferred)")
    a = ap.parse_args(argv)

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(a.threads))

    import torch
    from datasets import Dataset
    from loguru import logger
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import base as sgpt_base

    torch.set_num_threads(a.threads)
    t_imported = time.perf_counter()

    # Capture every log line (the INFO "Sparsifying NAME using N samples" and METRIC "time"/"error" ones).
    log_records: list[tuple[str, str]] = []  # (level, message)
    logger.add(lambda m: log_records.append((m.record["level"].name, m.record["message"])), level="INFO")

    model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(a.model))
    t_loaded = time.perf_counter()

    ids = calibration_ids(tokenizer, a.dataset, a.num_samples, a.seq_len)
    calib = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t_data = time.perf_counter()

    names = {id(m): n for n, m in model.named_modules()}
    losses: dict[str, float] = {}
    seconds: dict[str, float] = {}
    original = sgpt_base.sparsify_weight

    def recording_sparsify_weight(module, *args, **kwargs):
        t = time.perf_counter()
        loss, weight = original(module, *args, **kwargs)
        name = names[id(module)]
        losses[name] = float(loss)
        seconds[name] = time.perf_counter() - t
        return loss, weight

    sgpt_base.sparsify_weight = recording_sparsify_weight
    try:
        oneshot(
            model=model,
            tokenizer=tokenizer,
            recipe=str(a.recipe),
            dataset=calib,
            num_calibration_samples=a.num_samples,
            max_seq_length=a.seq_len,
            shuffle_calibration_samples=False,  # same rows, same order as the engine
        )
    finally:
        sgpt_base.sparsify_weight = original
    t_oneshot = time.perf_counter()

    model.save_pretrained(str(a.output), save_compressed=a.save_compressed)
    tokenizer.save_pretrained(str(a.output))
    t_saved = time.perf_counter()

    log_lines = [msg for _, msg in log_records]
    logged = parse_logged_losses(log_lines)
    check_logged(losses, logged)
    a.losses_out.parent.mkdir(parents=True, exist_ok=True)
    a.losses_out.write_text(json.dumps(losses, indent=2))

    sparsity = {n: float((m.weight == 0).float().mean()) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)}
    stats = {
        "llmcompressor_version": llmcompressor.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "calibration_shape": list(ids.shape),
        "phase_s": {
            "import": t_imported - T_START,
            "load": t_loaded - t_imported,
            "calibration_data": t_data - t_loaded,
            "oneshot": t_oneshot - t_data,
            "save": t_saved - t_oneshot,
            "total_in_process": t_saved - T_START,
        },
        "sparsify_weight_s": seconds,
        "logged_names": {n: v["logged_name"] for n, v in logged.items()},
        "logged_num_samples": {n: v["num_samples"] for n, v in logged.items()},
        "linear_sparsity": sparsity,
        "warnings": sorted({msg for level, msg in log_records if level == "WARNING"}),
    }
    if a.stats_out:
        a.stats_out.parent.mkdir(parents=True, exist_ok=True)
        a.stats_out.write_text(json.dumps(stats, indent=2))
    print(json.dumps({"phase_s": stats["phase_s"], "losses": losses}, indent=2))


def parse_logged_losses(lines: list[str]) -> dict[str, dict]:
    """Pair each "Sparsifying NAME using N samples" with the next "error E" line.

    Keys are normalized module names: with `targets: [Linear]` llm-compressor names each module
    f"{target_layer}.{''}", i.e. with a trailing dot, which is stripped here.
    """
    out, current = {}, None
    for line in lines:
        m = re.match(r"Sparsifying (\S+) using (\d+) samples", line)
        if m:
            current = {"logged_name": m.group(1), "num_samples": int(m.group(2))}
            continue
        m = re.match(r"error ([-+0-9.eE]+|nan|inf)", line)
        if m and current is not None:
            current["error"] = float(m.group(1))
            out[current["logged_name"].rstrip(".")] = current
            current = None
    return out


def check_logged(losses: dict[str, float], logged: dict[str, dict]) -> None:
    """The wrapped values must be the ones llm-compressor logged (to its 2 decimals)."""
    if set(losses) != set(logged):
        print(f"warning: hooked modules {sorted(losses)} != logged modules {sorted(logged)}", file=sys.stderr)
    for name, v in logged.items():
        if name in losses and abs(round(losses[name], 2) - v["error"]) > 0.011:
            print(f"warning: {name}: hooked loss {losses[name]} vs logged {v['error']}", file=sys.stderr)


if __name__ == "__main__":
    main()
