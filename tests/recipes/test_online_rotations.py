"""service/recipes/online_rotations.py: R3 and R4 run as hooks, cancel their fused parts exactly, and come back
from their description."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from service.algorithms import rotations as rot
from service.recipes import online_rotations as online

@pytest.mark.parametrize("kind,size,block", [("hadamard", 64, 64), ("random-hadamard", 172, 172),
                                             ("random-matrix", 48, 16)])
def test_r4_hook_rotates_input_and_fused_weight_cancels_it(kind, size, block):
    torch.manual_seed(0)
    down = nn.Linear(size, 16, bias=False)
    x = torch.randn(3, 7, size)
    y = down(x)
    w = down.weight.detach().clone()
    spec = rot.RotationSpec(kind, size, block, seed=5)
    online.attach_r4(down, spec)
    seen = []
    down.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))  # runs after the R4 hook
    torch.testing.assert_close(down(x), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[0], (x.double() @ spec.matrix()).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(down.weight, (w.double() @ spec.matrix()).float(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="already attached"):
        online.attach_r4(down, spec)
    model = nn.Module()
    model.down = down
    model.config = type("C", (), {"_attn_implementation": "sdpa"})()
    online.remove_online_transforms(model, unfuse=True)
    torch.testing.assert_close(down.weight, w, atol=1e-6, rtol=1e-6)
    seen.clear()
    down(x)
    torch.testing.assert_close(seen[0], x)  # hook gone


def test_r3_rotates_queries_and_keys_after_rope_and_is_removable():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    from tests.tiny_models import make_model

    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        recorded.append((query.detach().clone(), key.detach().clone()))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    # A recording implementation registered the public way, so we can see what R3 hands to it.
    AttentionInterface.register("test_recording", recording_attention)
    AttentionMaskInterface.register("test_recording", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model = make_model("llama")
    model.config._attn_implementation = "test_recording"
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    plain = list(recorded)
    recorded.clear()

    attn = [layer.self_attn for layer in model.model.layers]
    spec = rot.RotationSpec("random-hadamard", attn[0].head_dim, attn[0].head_dim, seed=1)
    online.attach_r3(model, attn, spec)
    assert model.config._attn_implementation == "llmpress_r3:test_recording"
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    m = spec.matrix().float()
    for (q0, k0), (q1, k1) in zip(plain, recorded):
        torch.testing.assert_close(q1, q0 @ m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k1, k0 @ m, atol=1e-5, rtol=1e-5)

    desc = json.loads(json.dumps(online.online_transforms_description(model)))
    assert set(desc) == {"R3"} and len(desc["R3"]) == len(attn)
    online.remove_online_transforms(model)
    assert model.config._attn_implementation == "test_recording"
    assert online.online_transforms_description(model) == {}
    recorded.clear()
    with torch.no_grad():
        model(ids)
    torch.testing.assert_close(recorded[0][0], plain[0][0])

    online.attach_online_transforms(model, desc)  # back from the description
    recorded.clear()
    with torch.no_grad():
        model(ids)
    torch.testing.assert_close(recorded[0][0], plain[0][0] @ m, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown"):
        online.attach_online_transforms(model, {"R5": {}})
