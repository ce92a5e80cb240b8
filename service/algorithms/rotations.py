"""Rotations that leave a transformer's function unchanged: the building blocks of SpinQuant (R1-R4).

Convention: activations are row vectors and a rotation R ([n, n], orthonormal: R^T R = I) acts on the right,
``x' = x @ R``. A Linear computes ``y = x @ W^T + b`` with ``W`` [out, in]; so

* a Linear that *reads* a rotated space keeps its output when ``W <- W @ R``             (``rotate_input``);
* a Linear that *writes* into a rotated space produces ``y @ R`` when ``W <- R^T @ W``,
  ``b <- b @ R``                                                                         (``rotate_output``);
* an embedding table writes the residual stream: ``E <- E @ R``                          (``rotate_embedding``).

RMSNorm commutes with an orthogonal R only once its scale is 1 (``rms(x R) = rms(x)``, but
``(x R) * g != (x * g) R``), hence ``fuse_norm_linears`` first. LayerNorm also needs the residual stream to have
zero mean along the hidden dim (``center_embeddings``); RMSNorm must not be centred.

All weight arithmetic is done in float64 and cast back to each tensor's own dtype once, so a float32 model is
rotated to within float32 rounding of the exact result (the reason llm-compressor's fusion drifts further is
listed in ``service/recipes/spinquant.py``).

Online rotations (R3, R4), which run as hooks at inference instead of being fused, are
``service.recipes.online_rotations``; this module only changes weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "TRANSFORM_TYPES",
    "fuse_norm_linears",
    "center_embeddings",
    "untie_word_embeddings",
    "orthogonal_matrix",
    "RotationSpec",
    "Rotation",
    "dense",
    "rotate_input",
    "rotate_output",
    "rotate_embedding",
    "head_rotation",
    "rotate_heads_output",
    "rotate_heads_input",
]

TRANSFORM_TYPES = ("hadamard", "random-hadamard", "random-matrix")
_F64 = torch.float64


# ---------------------------------------------------------------------------------------------- norms, embeddings


@torch.no_grad()
def fuse_norm_linears(norm: nn.Module, linears: list[nn.Linear], *, precision: torch.dtype = _F64) -> None:
    """Fold ``norm``'s elementwise scale (and bias) into every Linear that reads its output; the norm's weight
    becomes ones (its bias zeros), so ``linear(norm(x))`` is unchanged for each linear.

    ``linear(n(x) * g + c) = n(x) @ (W diag(g))^T + (W c + b)``: W [out, in] is scaled column-wise by g [in], and
    the norm's bias c [in] moves into the Linear's bias. Math in float64.
    """
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise ValueError(f"fuse_norm_linears: {type(norm).__name__} has no weight to fuse")
    scale = weight.detach().to(precision)
    shift = getattr(norm, "bias", None)
    shift = None if shift is None else shift.detach().to(precision)
    for linear in linears:
        if linear.in_features != scale.numel():
            raise ValueError(
                f"fuse_norm_linears: {type(norm).__name__} has {scale.numel()} features but the Linear reads "
                f"{linear.in_features}"
            )
        w = linear.weight.detach().to(precision)
        if shift is not None and bool(shift.any()):
            extra = w @ shift
            if linear.bias is None:
                linear.bias = nn.Parameter(extra.to(linear.weight.dtype).to(linear.weight.device))
            else:
                linear.bias.copy_((linear.bias.to(precision) + extra).to(linear.bias.dtype))
        linear.weight.copy_((w * scale).to(linear.weight.dtype))
    norm.weight.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()


@torch.no_grad()
def center_embeddings(embedding: nn.Embedding, following_norm: nn.Module) -> None:
    """Subtract each embedding row's mean (over the hidden dim), in place.

    Valid only when the norm that reads the residual stream subtracts the mean itself (LayerNorm): then the
    rows' means never reach the output, and centring lets a rotation commute with the norm. An RMSNorm divides
    by the root mean square *including* the mean, so centring changes the model's function: refused.
    """
    if not isinstance(following_norm, nn.LayerNorm):
        raise ValueError(
            f"center_embeddings: the following norm is {type(following_norm).__name__}, which does not subtract "
            "the mean; centring the embeddings would change the model's function (only LayerNorm models)"
        )
    w = embedding.weight.detach().to(_F64)
    embedding.weight.copy_((w - w.mean(dim=-1, keepdim=True)).to(embedding.weight.dtype))


@torch.no_grad()
def untie_word_embeddings(model: nn.Module) -> bool:
    """Give ``lm_head`` its own copy of the embedding table and mark the config (and a text sub-config) untied.

    A tied model uses one table twice, as ``E @ R1`` for the embedding and ``g * E @ R1`` (final norm fused) for
    the head; they differ, so rotation needs two tensors. Returns True if the model was tied.
    """
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    configs = [model.config]
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None:
        configs.append(text_config)
    for config in configs:
        if hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    # transformers 5 re-ties at load/save time from this mapping; an untied model must not carry it
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        model._tied_weights_keys = {}
    return tied


# ------------------------------------------------------------------------------------------- rotation matrices


def _hadamard():
    from service.algorithms import hadamard  # the sibling module with the Hadamard constructions and the fast transform

    return hadamard


def _check_block(size: int, block: int, field: str = "transform_block_size") -> None:
    if block <= 0 or size % block:
        raise ValueError(f"{field}: {block} must divide the size {size} it is applied to")


def _fwht_matrix(block: int, signs: torch.Tensor | None) -> torch.Tensor:
    """The matrix M [block, block] (float64) with ``fwht(x, signs=signs) == x @ M``, read off the transform
    itself (it is linear: the identity's rows map to M's rows), so fusing M into a weight cancels the online
    transform exactly whatever fwht's sign/normalisation convention is."""
    eye = torch.eye(block, dtype=_F64)
    return _hadamard().fwht(eye, signs=signs)


def _random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal [n, n] float64 matrix: QR of a Gaussian with R's diagonal signs folded into Q."""
    g = torch.randn(n, n, dtype=_F64, generator=generator)
    q, r = torch.linalg.qr(g)
    signs = torch.diagonal(r).sign()
    signs[signs == 0] = 1.0
    return q * signs


@dataclass(frozen=True)
class RotationSpec:
    """One rotation, as a recipe describes it: ``kind`` in TRANSFORM_TYPES, acting on ``size`` features as
    ``size // block`` identical diagonal blocks of ``block`` x ``block``; ``seed`` draws the random kinds.

    ``matrix()`` is the dense float64 orthonormal [size, size] matrix; ``apply(x)`` computes ``x @ matrix()``
    along x's last dim, with the O(n log n) ``fwht`` for the Hadamard kinds.
    """

    kind: str
    size: int
    block: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TRANSFORM_TYPES:
            raise ValueError(f"transform_type: must be one of {', '.join(TRANSFORM_TYPES)}; got {self.kind!r}")
        _check_block(self.size, self.block)
        if self.kind != "random-matrix" and not _hadamard().is_hadamard_order(self.block):
            raise ValueError(
                f"transform_type: no Hadamard matrix of order {self.block} is available "
                f"({_hadamard().hadamard_sizes_note()}); use transform_type: random-matrix or a "
                "transform_block_size that is a Hadamard order"
            )

    def signs(self) -> torch.Tensor | None:
        if self.kind != "random-hadamard":
            return None
        return _hadamard().random_signs(self.block, self.seed).to(_F64)

    def block_matrix(self) -> torch.Tensor:
        """[block, block] float64, orthonormal."""
        if self.kind == "random-matrix":
            return _random_orthogonal(self.block, torch.Generator().manual_seed(self.seed))
        return _fwht_matrix(self.block, self.signs())

    def matrix(self) -> torch.Tensor:
        """[size, size] float64, block-diagonal."""
        return torch.block_diag(*([self.block_matrix()] * (self.size // self.block)))

    def apply(self, x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ matrix()`` over the last dim of x ([..., size]), in x's dtype. Hadamard kinds use fwht;
        ``matrix`` (a cached ``block_matrix()`` for random-matrix) avoids rebuilding it per call."""
        shape = x.shape
        xb = x.reshape(*shape[:-1], self.size // self.block, self.block)
        if self.kind == "random-matrix":
            m = self.block_matrix() if matrix is None else matrix
            out = xb @ m.to(dtype=x.dtype, device=x.device)
        else:
            signs = self.signs()
            out = _hadamard().fwht(xb, signs=None if signs is None else signs.to(dtype=x.dtype, device=x.device))
        return out.reshape(shape)


def orthogonal_matrix(kind: str, size: int, *, block: int | None = None, seed: int = 0) -> torch.Tensor:
    """Dense [size, size] float64 orthonormal matrix of ``kind`` ("hadamard" | "random-hadamard" |
    "random-matrix"), block-diagonal with ``block`` x ``block`` blocks (default: one block)."""
    return RotationSpec(kind, size, block or size, seed).matrix()


# --------------------------------------------------------------------------------------------- weight fusion


Rotation = torch.Tensor | RotationSpec  # a dense matrix, or a spec applied without building one


def _times(x: torch.Tensor, rotation) -> torch.Tensor:
    """``x @ R`` along x's last dim, x already in the working precision. A ``RotationSpec`` of a Hadamard kind is
    applied with fwht, O(n log n) per row instead of a dense O(n^2) product: on a 1024-hidden, 8-layer Llama that
    cuts R1+R2 fusion from ~19 s of float64 matmuls to under a second (bench/rotation_fusion.py)."""
    if isinstance(rotation, RotationSpec):
        return rotation.apply(x)
    return x @ rotation.to(dtype=x.dtype, device=x.device)


def dense(rotation: Rotation) -> torch.Tensor:
    """The rotation as a dense float64 matrix."""
    return rotation.matrix() if isinstance(rotation, RotationSpec) else rotation.to(_F64)


@torch.no_grad()
def rotate_input(
    linear: nn.Module, rotation: Rotation | None, *, precision: torch.dtype = _F64,
    input_scale: torch.Tensor | None = None,
) -> None:
    """The Linear now reads ``x @ R`` and still computes the same output: ``W <- W @ R`` (W [out, in]).
    ``rotation`` is a [in, in] matrix or a ``RotationSpec`` (None: no rotation). ``input_scale`` [in] is a
    preceding norm's scale fused in the same pass, ``W <- (W diag(s)) @ R``: one conversion and one rounding
    instead of two (``fuse_norm_linears`` then rotate), which is most of the time of fusing a large model."""
    w = linear.weight
    work = w.detach().to(precision)
    if input_scale is not None:
        work = work * input_scale.to(device=work.device, dtype=precision)
    w.copy_(work if rotation is None else _times(work, rotation))  # copy_ casts back to w's dtype


@torch.no_grad()
def rotate_output(linear: nn.Module, rotation: Rotation, *, precision: torch.dtype = _F64) -> None:
    """The Linear now outputs ``y @ R``: ``W <- R^T @ W`` (computed as ``(W^T @ R)^T``), ``b <- b @ R``."""
    w = linear.weight
    work = torch.empty(w.shape[1], w.shape[0], dtype=precision, device=w.device).copy_(w.detach().T)  # one pass
    w.copy_(_times(work, rotation).T)
    if getattr(linear, "bias", None) is not None:
        linear.bias.copy_(_times(linear.bias.detach().to(precision), rotation))


@torch.no_grad()
def rotate_embedding(embedding: nn.Embedding, rotation: Rotation, *, precision: torch.dtype = _F64) -> None:
    """Every embedding row e [hidden] becomes ``e @ R``."""
    w = embedding.weight
    w.copy_(_times(w.detach().to(precision), rotation))


def head_rotation(rotation: Rotation, num_heads: int) -> Rotation:
    """Per-head rotations as one block-diagonal rotation of num_heads * d features. ``rotation`` is one [d, d]
    matrix shared by all heads, [num_heads, d, d] (one per head), or a ``RotationSpec`` of size d (returned as
    the spec of size num_heads * d whose blocks are its blocks)."""
    if isinstance(rotation, RotationSpec):
        return RotationSpec(rotation.kind, rotation.size * num_heads, rotation.block, rotation.seed)
    if rotation.dim() == 2:
        return torch.block_diag(*([rotation] * num_heads))
    if rotation.shape[0] != num_heads:
        raise ValueError(f"head rotations: {rotation.shape[0]} matrices for {num_heads} heads")
    return torch.block_diag(*rotation)


def rotate_heads_output(v_proj: nn.Module, rotation: Rotation, head_dim: int, *, precision: torch.dtype = _F64) -> None:
    """R2 on v_proj: each KV head's output slice [head_dim] becomes ``v_h @ R2_h`` (weight rows, bias too).
    ``rotation`` is [head_dim, head_dim], [num_kv_heads, head_dim, head_dim] or a RotationSpec of size head_dim."""
    num_kv = v_proj.weight.shape[0] // head_dim
    rotate_output(v_proj, head_rotation(rotation, num_kv), precision=precision)


def rotate_heads_input(
    o_proj: nn.Module, rotation: Rotation, head_dim: int, num_kv_heads: int, *, precision: torch.dtype = _F64
) -> None:
    """R2 on o_proj: the attention output of query head i is a mix of the values of KV head
    ``i // (num_heads / num_kv_heads)`` (GQA), so it arrives rotated by that KV head's R2; o_proj's input
    columns of head i absorb it (``W <- W @ blockdiag(R2_kv(i))``)."""
    num_heads = o_proj.weight.shape[1] // head_dim
    if num_heads % num_kv_heads:
        raise ValueError(f"R2: {num_heads} query heads do not group into {num_kv_heads} KV heads")
    if isinstance(rotation, torch.Tensor) and rotation.dim() == 3:
        rotation = rotation.repeat_interleave(num_heads // num_kv_heads, dim=0)
    rotate_input(o_proj, head_rotation(rotation, num_heads), precision=precision)
