"""Quality of SpinQuant rotations on stories260K: perplexity with and without rotations under quantization.

Protocol as tests/engine/test_quality_stories.py: WikiText-2 test (first 40,960 tokens) and the whole TinyStories
subset, non-overlapping 512-token windows; calibration (for learned rotations) is 128 x 256 tokens from the start of
wikitext-2 valid. Rows:

    dense                     the model as shipped
    R1+R2                     Hadamard rotations alone (must equal dense)
    W4 RTN                    4-bit symmetric per-channel round-to-nearest of every decoder Linear
    R1+R2 + W4 RTN            the same after Hadamard R1+R2
    learned R1+R2 (CE) + W4   R1/R2 learned with Cayley SGD on the W4 next-token loss, from the Hadamard start,
                              no scalings (the modifier before scalings: learn_scales false, objective ce)
    learned R1+R2 + scales    R1/R2 and the exact per-channel scalings (service/recipes/spinquant.py) learned together
      (KL) + W4 RTN           on KL(dense || W4 model), the modifier's defaults (150 steps, lr 0.005)
    ... from identity         the same with r1_init "identity": R1 and the norms start as unrotated
    W4A8 / W4A4               + dynamic per-token 8/4-bit activations on every decoder Linear's input,
                              without rotations vs with R1-R4 (R4 rotates down_proj's input before quantizing)
    learned R1-R4 + scales    as above with R3/R4 online (R4 fixed, in the learning loop), W4 RTN + A8
      (KL) + W4A8

RTN is ``service.algorithms.quantization.fake_quantize`` applied to each weight (lm_head and embeddings stay in float);
activation quantization is ``service.recipes.quantization_modifiers.attach_activation_quantization``.
Reference (llm-compressor 0.14, WikiText-2 / TinyStories): W4 RTN 243.4 / 6.368; its R1+R2 + W4 219.0 / 6.908.

    python3 bench/quality_rotations.py [--steps 150 --ce-steps 40 --lr 0.005 --threads 2 --json out.json]
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from service.algorithms.quantization import QuantArgs, fake_quantize  # noqa: E402
from service.recipes.quantization_modifiers import attach_activation_quantization  # noqa: E402
from service.recipes.spinquant import SpinQuantModifier, apply_spinquant  # noqa: E402
from stories_protocol import stories_protocol  # noqa: E402

W4 = QuantArgs(num_bits=4, symmetric=True, strategy="channel")


@torch.no_grad()
def rtn(model, args: QuantArgs = W4) -> None:
    """Round-to-nearest fake quantization of every decoder-layer Linear, in place."""
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(fake_quantize(module.weight, args))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="learning steps with scales (KL)")
    ap.add_argument("--ce-steps", type=int, default=40, help="learning steps without scales (CE)")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    protocol = stories_protocol(threads=a.threads)
    dense, batches = protocol.dense, protocol.batches
    rows: dict[str, dict] = {}

    def score(name: str, model, extra=None) -> None:
        started = time.perf_counter()
        wikitext, tinystories = protocol.perplexities(model)
        rows[name] = {"wikitext": wikitext, "tinystories": tinystories} | (extra or {})
        print(f"{name:<38}{rows[name]['wikitext']:>10.2f}{rows[name]['tinystories']:>12.3f}"
              f"   ({time.perf_counter() - started:.1f} s eval)", flush=True)

    print(f"{'model':<38}{'WikiText-2':>10}{'TinyStories':>12}")
    score("dense", dense)

    def rotated(**kw):
        model = copy.deepcopy(dense)
        report = apply_spinquant(model, SpinQuantModifier(**kw), batches if kw.get("learnable") else None,
                                 quant_args=W4 if kw.get("learnable") else None)
        return model, report

    model, _ = rotated(rotations=["R1", "R2"])
    score("R1+R2 (hadamard)", model)

    model = copy.deepcopy(dense)
    rtn(model)
    score("W4 RTN", model)

    model, _ = rotated(rotations=["R1", "R2"])
    rtn(model)
    score("R1+R2 + W4 RTN", model)

    model, _ = rotated(rotations=["R1", "R2"], transform_type="random-hadamard")
    rtn(model)
    score("R1+R2 (rand-had) + W4 RTN", model)

    def learned(name, steps, act=None, **kw):
        model, report = rotated(learnable=True, steps=steps, learning_rate=a.lr, scale_learning_rate=a.lr, **kw)
        got = report["learned"]
        print(f"  learned: {steps} steps, lr {a.lr}, {got['seconds']:.1f} s; calibration {got['objective']} "
              f"{got['initial_loss']:.4f} -> {got['final_loss']:.4f} (W4 model, first 4 batches)")
        rtn(model)
        if act is not None:
            attach_activation_quantization(model, act)
        score(name, model, {"learn_seconds": got["seconds"]})

    learned("learned R1+R2 (CE) + W4 RTN", a.ce_steps, rotations=["R1", "R2"], learn_scales=False, objective="ce")
    learned("learned R1+R2 + scales (KL) + W4 RTN", a.steps, rotations=["R1", "R2"])
    learned("learned R1+R2 from identity + scales", a.steps, rotations=["R1", "R2"], r1_init="identity")

    for bits in (8, 4):
        act = QuantArgs(num_bits=bits, symmetric=True, strategy="token", dynamic=True)
        model = copy.deepcopy(dense)
        rtn(model)
        handles = attach_activation_quantization(model, act)
        score(f"W4A{bits}", model)
        for h in handles:
            h.remove()
        model, _ = rotated(rotations=["R1", "R2", "R3", "R4"])
        rtn(model)
        attach_activation_quantization(model, act)
        score(f"R1-R4 + W4A{bits}", model)
        if bits == 8:
            learned("learned R1-R4 + scales (KL) + W4A8", a.steps, act, rotations=["R1", "R2", "R3", "R4"])

    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
