"""Speed of the online Hadamard transform vs a dense rotation matmul, on the CPU.

Issue 4's acceptance: "the online FWHT is at least 5x faster than a dense matmul rotation at size 4096 on
the CPU". For x of shape [tokens, n] float32 this times, with --threads torch threads over --repeats
interleaved rounds:

* dense:     x @ R.T with R = random_hadamard_matrix(n) precomputed (what a rotation without a fast transform costs);
* fwht:      service.algorithms.hadamard.fwht(x, signs=s) as shipped (Kronecker chain of small BLAS matmuls);
* fwht/cN:   the same with the Sylvester chunks capped at 2^N instead of the shipped cap (to justify the cap);
* fwht/bN:   the same with row blocks of 2^N elements instead of the shipped size; "unblocked": one block;
* butterfly: a plain radix-2 add/sub butterfly over the 2^k factor (log2 passes over memory) + the K x K base matmul.

    python3 bench/fwht_speed.py [--tokens 2048] [--threads 2] [--repeats 7] [--sizes 4096 11008 14336]

Every variant is checked against the dense result before it is timed. Printed per variant: median and min wall
ms, median CPU ms (user + sys of this process over all threads), and dense / variant for each of the three.
"""

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from service.algorithms import hadamard  # noqa: E402
from service.algorithms.hadamard import fwht, random_hadamard_matrix, random_signs  # noqa: E402


def butterfly(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """x @ (H_n diag(s) / sqrt n).T with an in-Python radix-2 butterfly over the 2^k factor: one add and one
    sub per stage on [.., 2, h] views, log2(2^k) stages; the base K (if any) as one small matmul."""
    n = x.shape[-1]
    base, power = hadamard._split_order(n)
    y = (x * signs).reshape(-1, base, power)
    h = 1
    while h < power:
        v = y.reshape(y.shape[0], base, power // (2 * h), 2, h)
        a, b = v[:, :, :, 0], v[:, :, :, 1]
        y = torch.stack((a + b, a - b), dim=3).reshape(y.shape)
        h *= 2
    if base > 1:
        y = torch.matmul(hadamard._base_matrix(base).to(x.dtype), y)
    return y.reshape(x.shape) / math.sqrt(n)


def with_setting(name: str, value: int):
    """fwht with one of service.algorithms.hadamard's tuning constants temporarily changed."""

    def run(x, s):
        old = getattr(hadamard, name)
        setattr(hadamard, name, value)
        try:
            return fwht(x, signs=s)
        finally:
            setattr(hadamard, name, old)

    return run


def measure(variants: dict, rounds: int) -> dict[str, tuple[float, float, float]]:
    """name -> (median wall s, min wall s, median process CPU s). Variants run round-robin, one call each per
    round, so load from other processes on a shared machine hits all of them alike; CPU time (user + sys of
    this process, all threads) is the least load-sensitive figure."""
    for fn in variants.values():
        fn()  # warm-up (caches, allocator)
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), min(wall[name]), statistics.median(cpu[name])) for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 172 * 64, 14336])
    parser.add_argument("--caps", type=int, nargs="*", default=[3, 4, 5, 7, 8], help="log2 chunk caps to compare")
    parser.add_argument(
        "--blocks", type=int, nargs="*", default=[16, 18, 20, 22, 40], help="log2 row-block sizes (40: unblocked)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, tokens {args.tokens}, float32, "
        f"{args.repeats} interleaved rounds; shipped chunk cap 2^{hadamard._MAX_CHUNK_LOG2}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'n':>6} {'base':>5} {'variant':>10} {'wall med':>10} {'wall min':>8} {'cpu med':>8} "
        f"{'x med':>7} {'x min':>7} {'x cpu':>7}   (ms; x = dense / variant)"
    )
    gen = torch.Generator().manual_seed(0)
    for n in args.sizes:
        base, power = hadamard._split_order(n)
        x = torch.randn(args.tokens, n, generator=gen)
        s = random_signs(n, 0, dtype=torch.float32)
        r = random_hadamard_matrix(n, 0, dtype=torch.float32)
        reference = x @ r.T
        variants = {"dense": lambda: x @ r.T, "fwht": lambda: fwht(x, signs=s)}
        for cap in args.caps:
            if cap != hadamard._MAX_CHUNK_LOG2 and (1 << cap) < power:
                variants[f"fwht/c{cap}"] = (lambda f: lambda: f(x, s))(with_setting("_MAX_CHUNK_LOG2", cap))
        for block in args.blocks:
            if block != hadamard._BLOCK_ELEMENTS.bit_length() - 1:
                name = "unblocked" if block >= 40 else f"fwht/b{block}"
                variants[name] = (lambda f: lambda: f(x, s))(with_setting("_BLOCK_ELEMENTS", 1 << block))
        variants["butterfly"] = lambda: butterfly(x, s)
        for name, fn in variants.items():
            err = (fn() - reference).abs().max().item()
            assert err < 1e-3, (n, name, err)
        results = measure(variants, args.repeats)
        dense = results["dense"]
        for name, (med, low, cpu) in results.items():
            print(
                f"{n:>6} {base:>5} {name:>10} {med * 1e3:>10.1f} {low * 1e3:>8.1f} {cpu * 1e3:>8.1f} "
                f"{dense[0] / med:>7.1f} {dense[1] / low:>7.1f} {dense[2] / cpu:>7.1f}",
                flush=True,
            )
        del r, reference


if __name__ == "__main__":
    main()
