"""service/algorithms/rotations.py: every helper against its definition (slow, direct references in float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from service.algorithms import rotations as rot
from service.algorithms.hadamard import hadamard_matrix

F64 = torch.float64


def orthonormal_error(m: torch.Tensor) -> float:
    return float((m.T @ m - torch.eye(m.shape[0], dtype=m.dtype)).abs().max())


class RMSNorm(nn.Module):
    """Reference RMSNorm (Llama's definition), written out here."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


# ------------------------------------------------------------------------------------------------ norms


@pytest.mark.parametrize("kind", ["rms", "layernorm"])
def test_fuse_norm_linears_keeps_linear_of_norm(kind):
    torch.manual_seed(0)
    norm = RMSNorm(16) if kind == "rms" else nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        if kind == "layernorm":
            norm.bias.normal_()
    linears = [nn.Linear(16, 8, bias=False), nn.Linear(16, 4, bias=True)]
    x = torch.randn(5, 16)
    before = [lin(norm(x)) for lin in linears]
    rot.fuse_norm_linears(norm, linears)
    assert torch.equal(norm.weight, torch.ones(16))
    if kind == "layernorm":
        assert torch.equal(norm.bias, torch.zeros(16))
        assert linears[0].bias is not None  # the norm's bias moved into a new bias
    for lin, ref in zip(linears, before):
        torch.testing.assert_close(lin(norm(x)), ref, atol=1e-5, rtol=1e-5)


def test_center_embeddings_only_before_layernorm():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 16)
    with torch.no_grad():
        emb.weight.add_(0.5)  # rows with a clear mean
    ln = nn.LayerNorm(16)
    before = ln(emb.weight)
    rot.center_embeddings(emb, ln)
    assert emb.weight.mean(-1).abs().max() < 1e-6
    torch.testing.assert_close(ln(emb.weight), before, atol=1e-5, rtol=1e-5)  # LayerNorm removes the mean anyway

    # Why it is refused for RMSNorm: the RMS includes the mean, so the normalised rows change.
    rms = RMSNorm(16)
    raw = torch.randn(10, 16) + 0.5
    centred = raw - raw.mean(-1, keepdim=True)
    assert (rms(centred) - rms(raw)).abs().max() > 0.1
    with pytest.raises(ValueError, match="RMSNorm.*change the model's function"):
        rot.center_embeddings(nn.Embedding(10, 16), rms)


def test_untie_word_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.fixture_paths import STORIES

    model = AutoModelForCausalLM.from_pretrained(str(STORIES))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert rot.untie_word_embeddings(model) is True
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert again.lm_head.weight is not again.model.embed_tokens.weight
    torch.testing.assert_close(again.lm_head.weight, 2 * again.model.embed_tokens.weight)
    assert rot.untie_word_embeddings(again) is False


# ------------------------------------------------------------------------------------------- matrices


@pytest.mark.parametrize("kind", rot.TRANSFORM_TYPES)
@pytest.mark.parametrize("size,block", [(64, 64), (64, 16), (172, 172), (48, 12)])
def test_rotation_matrices_are_orthonormal_and_apply_matches(kind, size, block):
    spec = rot.RotationSpec(kind, size, block, seed=3)
    m = spec.matrix()
    assert m.dtype == F64 and m.shape == (size, size)
    assert orthonormal_error(m) < 1e-12
    # block-diagonal: identical blocks, zeros elsewhere
    b = spec.block_matrix()
    assert torch.equal(m, torch.block_diag(*[b] * (size // block)))
    x = torch.randn(3, 5, size, dtype=F64)
    torch.testing.assert_close(spec.apply(x), x @ m, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(spec.apply(x.float()), (x @ m).float(), atol=1e-5, rtol=1e-5)


def test_hadamard_kind_is_the_normalised_hadamard_matrix():
    h = hadamard_matrix(16, dtype=F64) / 4.0
    m = rot.orthogonal_matrix("hadamard", 16)
    # fwht's orientation (H or H^T) is the hadamard module's convention; either way the same entries up to transpose
    assert torch.equal(m, h) or torch.equal(m, h.T)


def test_random_kinds_are_deterministic_by_seed():
    for kind in ("random-hadamard", "random-matrix"):
        a = rot.orthogonal_matrix(kind, 32, seed=1)
        assert torch.equal(a, rot.orthogonal_matrix(kind, 32, seed=1))
        assert not torch.allclose(a, rot.orthogonal_matrix(kind, 32, seed=2))


def test_rotation_spec_errors_name_the_field():
    with pytest.raises(ValueError, match="transform_block_size: 24 must divide the size 64"):
        rot.RotationSpec("hadamard", 64, 24)
    with pytest.raises(ValueError, match="transform_type: no Hadamard matrix of order 6"):
        rot.RotationSpec("hadamard", 6, 6)
    with pytest.raises(ValueError, match="transform_type: must be one of hadamard, random-hadamard, random-matrix"):
        rot.RotationSpec("givens", 8, 8)
    assert orthonormal_error(rot.orthogonal_matrix("random-matrix", 6)) < 1e-12  # any size for random-matrix


# -------------------------------------------------------------------------------------------- weight fusion


def test_rotate_input_output_embedding_against_definition():
    torch.manual_seed(0)
    r = rot.orthogonal_matrix("random-matrix", 16, seed=0)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    y = lin(x)
    rot.rotate_input(lin, r)
    torch.testing.assert_close(lin((x.double() @ r).float()), y, atol=1e-5, rtol=1e-5)  # reads x R, same output

    writer = nn.Linear(8, 16)
    z = torch.randn(4, 8)
    out = writer(z)
    rot.rotate_output(writer, r)
    torch.testing.assert_close(writer(z), (out.double() @ r).float(), atol=1e-5, rtol=1e-5)  # writes out R

    emb = nn.Embedding(5, 16)
    table = emb.weight.detach().clone()
    rot.rotate_embedding(emb, r)
    torch.testing.assert_close(emb.weight, (table.double() @ r).float(), atol=1e-6, rtol=1e-6)


def test_rotate_input_with_norm_scale_is_fuse_then_rotate():
    torch.manual_seed(0)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    spec = rot.RotationSpec("random-hadamard", 16, 16, seed=2)
    one, two = nn.Linear(16, 8), nn.Linear(16, 8)
    two.load_state_dict(one.state_dict())
    x = torch.randn(4, 16)
    y = one(norm(x))
    rot.rotate_input(one, spec, input_scale=norm.weight)  # both in one pass
    rot.fuse_norm_linears(norm, [two])
    rot.rotate_input(two, spec.matrix())  # the definition, in two steps, with the dense matrix
    torch.testing.assert_close(one.weight, two.weight, atol=1e-6, rtol=1e-6)
    # the norm now has unit scale, and the rotated stream gives the original output
    torch.testing.assert_close(one(norm((x.double() @ spec.matrix()).float())), y, atol=1e-5, rtol=1e-5)


def grouped_attention_output(v, probs, num_kv):
    """Slow reference: query head i mixes the values of KV head i // (num_heads / num_kv) with its own probs.
    v [seq, num_kv * d], probs [num_heads, seq, seq] -> [seq, num_heads * d]."""
    num_heads = probs.shape[0]
    d = v.shape[1] // num_kv
    heads = []
    for i in range(num_heads):
        kv = i // (num_heads // num_kv)
        heads.append(probs[i] @ v[:, kv * d : (kv + 1) * d])
    return torch.cat(heads, dim=1)


@pytest.mark.parametrize("per_head", [False, True])
def test_r2_per_head_gqa_keeps_attention_block_output(per_head):
    torch.manual_seed(0)
    hidden, d, num_heads, num_kv, seq = 32, 8, 4, 2, 6
    v_proj = nn.Linear(hidden, num_kv * d, bias=True)  # bias too (Qwen2)
    o_proj = nn.Linear(num_heads * d, hidden, bias=False)
    x = torch.randn(seq, hidden)
    probs = torch.softmax(torch.randn(num_heads, seq, seq), dim=-1)
    before = o_proj(grouped_attention_output(v_proj(x), probs, num_kv))
    if per_head:  # a distinct rotation per KV head: o_proj must use each query head's KV head's rotation
        r2 = torch.stack([rot.orthogonal_matrix("random-matrix", d, seed=s) for s in range(num_kv)])
    else:
        r2 = rot.orthogonal_matrix("random-hadamard", d, seed=0)
    v_ref = v_proj(x)
    rot.rotate_heads_output(v_proj, r2, d)
    big = rot.head_rotation(r2, num_kv)
    torch.testing.assert_close(v_proj(x), (v_ref.double() @ big).float(), atol=1e-5, rtol=1e-5)
    rot.rotate_heads_input(o_proj, r2, d, num_kv)
    after = o_proj(grouped_attention_output(v_proj(x), probs, num_kv))
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- online rotations
