"""How much the TinyStories result of learned SpinQuant depends on the run, and where R1's cost comes from.

stories260K, W4 symmetric per-channel RTN of every decoder Linear, protocol of bench/stories_protocol.py
(calibration 128 x 256 tokens of WikiText-2 valid, in batches of 16). Each row learns R1/R2 (and the exact
per-channel scalings) with ``SpinQuantModifier(learnable=True)`` and prints the calibration KL(dense || W4 model)
on the first four batches before -> after, then the WikiText-2 / TinyStories perplexities. ``--orders`` reshuffles
the 128 calibration samples with ``torch.randperm`` seeded by each value (-1: the file order).

Row kinds (``--rows``):
    lr=<x>        R1+R2 from Hadamard, scalings, rotation learning rate x (scalings at the default 0.005)
    identity-lr=<x>  the same with r1_init "identity": R1 from the identity and the norm scalings from the norm
                  weights: R1 and the norms start as in the unrotated model (R2 from Hadamard)
    blocks1-lr=<x>   R1 from the identity (transform_block_size 1) but the scalings from 1, i.e. from the
                  folded norms (the W4 model is worse than unrotated at the start)
    scales-r1r2   Hadamard R1+R2 held fixed (learning rate 1e-9), only the scalings learned
    scales-r2     no R1 (norms stay unfused): fixed Hadamard R2 and the scalings learned

    python3 bench/learned_rotation_spread.py --rows lr=0.005 lr=0.02 lr=0.05 --orders -1 1 2 3
    python3 bench/learned_rotation_spread.py --rows scales-r1r2 scales-r2 --orders -1
"""

import argparse
import copy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from quality_rotations import W4, rtn  # noqa: E402
from service.engine.oneshot import token_batches  # noqa: E402
from service.recipes.spinquant import SpinQuantModifier, apply_spinquant  # noqa: E402
from stories_protocol import stories_protocol  # noqa: E402


def modifier(row: str) -> SpinQuantModifier:
    if row.startswith("lr="):
        return SpinQuantModifier(rotations=["R1", "R2"], learnable=True, learning_rate=float(row[3:]))
    if row.startswith("identity-lr="):  # r1_init identity: R1 and norms as unrotated
        return SpinQuantModifier(rotations=["R1", "R2"], learnable=True, learning_rate=float(row[12:]),
                                 r1_init="identity")
    if row.startswith("blocks1-lr="):  # R1 starts at the identity (Hadamard blocks of 1), scalings at 1
        return SpinQuantModifier(rotations=["R1", "R2"], learnable=True, learning_rate=float(row[11:]),
                                 transform_block_size=1)
    if row == "scales-r1r2":
        return SpinQuantModifier(rotations=["R1", "R2"], learnable=True, learning_rate=1e-9)
    if row == "scales-r2":
        return SpinQuantModifier(rotations=["R2"], learnable=True, learning_rate=1e-9)
    raise SystemExit(f"--rows: lr=<float>, scales-r1r2 or scales-r2; got {row!r}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", default=["lr=0.005"])
    ap.add_argument("--orders", nargs="+", type=int, default=[-1])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    protocol = stories_protocol(threads=a.threads)
    samples = torch.cat([b["input_ids"] for b in protocol.batches])
    print(f"{'row':<14}{'order':>6}{'KL before':>11}{'KL after':>10}{'WikiText-2':>12}{'TinyStories':>13}")
    for row in a.rows:
        for order in a.orders:
            ids = samples if order < 0 else samples[torch.randperm(len(samples),
                                                                   generator=torch.Generator().manual_seed(order))]
            model = copy.deepcopy(protocol.dense)
            started = time.perf_counter()
            report = apply_spinquant(model, modifier(row), token_batches(ids, 16), quant_args=W4)["learned"]
            rtn(model)
            wiki, tiny = protocol.perplexities(model)
            moved = report["r1_moved"]
            turn = "" if moved is None else (f"  R1 moved {moved['frobenius']:.2f} (angles mean "
                                             f"{moved['mean_angle']:.3f}, max {moved['max_angle']:.3f} rad)")
            print(f"{row:<14}{order:>6}{report['initial_loss']:>11.4f}{report['final_loss']:>10.4f}{wiki:>12.2f}"
                  f"{tiny:>13.3f}   ({time.perf_counter() - started:.0f} s){turn}", flush=True)


if __name__ == "__main__":
    main()
