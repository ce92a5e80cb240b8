"""The pruning modifiers a recipe names: SparseGPTModifier, WandaPruningModifier, MagnitudePruningModifier.

Their fields are llm-compressor's arguments (so users' recipes load unchanged) and the math is in pure functions
(service.algorithms.sparsegpt, .wanda, .magnitude). The pipeline (service.engine.pipeline) asks each modifier
only two things: which modules of a block it targets with which sparsity, and to compress one module given its
calibration statistic. The llm-compressor event lifecycle (calibrate_module hooks, compress_modules on
SEQUENTIAL_EPOCH_END) is also implemented for callers that drive modifiers with events themselves.
"""

from __future__ import annotations

import logging
import re
import warnings
from typing import Any, ClassVar

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn

from service.algorithms.magnitude import magnitude_prune
from service.algorithms.masks import parse_mask_structure
from service.algorithms.sparsegpt import sparsegpt_prune
from service.algorithms.wanda import wanda_prune
from service.recipes.layerwise_modifier import HessianSolverModifier, LayerwiseModifier
from service.recipes.lifecycle import State
from service.recipes.recipe import register_modifier
from service.recipes.targets import as_patterns, set_weight_matrix, weight_matrix

log = logging.getLogger(__name__)

OWL_DEFAULT_M = 5.0  # OWL paper's M and llm-compressor's documented values
OWL_DEFAULT_LMBDA = 0.08


def _check_fraction(value: float, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number in [0, 1) (got {value!r})")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{field} must be in [0, 1) (got {value})")
    return float(value)


class SparsityModifierBase(LayerwiseModifier):
    """Arguments shared by the one-shot pruning modifiers.

    sparsity: a fraction in [0, 1), a list with one fraction per block, or a mapping from block name (or
    "re:" pattern, or block index as a string) to fraction. With an N:M mask_structure it may be omitted
    (it is N/M). sparsity_profile "owl" spreads a float target over the blocks by their outlier ratios.
    """

    statistic: ClassVar[str | None] = "hessian"

    sparsity: float | list[float] | dict[str, float] | None = None
    sparsity_profile: str | None = None
    owl_m: float | None = None
    owl_lmbda: float | None = None
    mask_structure: str = "0:0"
    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    sequential_targets: str | list[str] | None = None
    preserve_sparsity_mask: bool = False
    sequential_update: bool | None = None  # llm-compressor deprecated it; always true here

    _layer_sparsities: list[float] | None = PrivateAttr(default=None)
    _keep_masks: bool = PrivateAttr(default=False)
    _masks: dict[str, torch.Tensor] = PrivateAttr(default_factory=dict)

    @field_validator("sparsity")
    @classmethod
    def _sparsity_in_range(cls, value):
        if value is None:
            return value
        if isinstance(value, list):
            return [_check_fraction(v, f"sparsity[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {str(k): _check_fraction(v, f"sparsity[{k!r}]") for k, v in value.items()}
        return _check_fraction(value, "sparsity")

    @field_validator("mask_structure")
    @classmethod
    def _mask_is_n_of_m(cls, value: str) -> str:
        parse_mask_structure(value)
        return value

    @field_validator("sparsity_profile")
    @classmethod
    def _known_profile(cls, value):
        if value is None:
            return value
        if str(value).lower() != "owl":
            raise ValueError(f"sparsity_profile must be null or 'owl' (got {value!r})")
        return "owl"

    @field_validator("sequential_update")
    @classmethod
    def _sequential_always(cls, value):
        if value is False:
            warnings.warn("sequential_update=False is not supported; blocks are always calibrated sequentially",
                          DeprecationWarning, stacklevel=2)
        return value

    @model_validator(mode="after")
    def _consistent(self):
        n, m = parse_mask_structure(self.mask_structure)
        if n:
            if isinstance(self.sparsity, float) and abs(self.sparsity - n / m) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} contradicts mask_structure '{self.mask_structure}', which prunes "
                    f"exactly {n / m:g}; omit sparsity or set it to {n / m:g}"
                )
            if isinstance(self.sparsity, (list, dict)):
                raise ValueError(f"a per-layer sparsity cannot be combined with mask_structure '{self.mask_structure}'")
        elif self.sparsity is None:
            raise ValueError("sparsity is required with an unstructured mask_structure '0:0'")
        if self.sparsity_profile == "owl":
            if n:
                raise ValueError("sparsity_profile 'owl' varies sparsity per layer and needs mask_structure '0:0'")
            if not isinstance(self.sparsity, float):
                raise ValueError("sparsity_profile 'owl' needs one target sparsity (a number), not a per-layer list")
            if self.owl_m is None:
                self.owl_m = OWL_DEFAULT_M
            if self.owl_lmbda is None:
                self.owl_lmbda = OWL_DEFAULT_LMBDA
            if self.owl_m <= 0:
                raise ValueError(f"owl_m must be > 0 (got {self.owl_m})")
            if not 0 <= self.owl_lmbda < 1:
                raise ValueError(f"owl_lmbda must be in [0, 1) (got {self.owl_lmbda})")
        elif self.owl_m is not None or self.owl_lmbda is not None:
            raise ValueError("owl_m and owl_lmbda need sparsity_profile: owl")
        return self

    # --- what the pipeline asks ------------------------------------------------------------------------------

    @property
    def target_patterns(self) -> list[str]:
        return as_patterns(self.targets)

    @property
    def ignore_patterns(self) -> list[str]:
        return as_patterns(self.ignore)

    @property
    def nm(self) -> tuple[int, int]:
        return parse_mask_structure(self.mask_structure)

    @property
    def target_sparsity(self) -> float:
        n, m = self.nm
        return n / m if n else float(self.sparsity)

    def check_layers(self, block_names: list[str]) -> None:
        """Validate per-layer sparsities against the model's blocks (a list must have one entry per block)."""
        if isinstance(self.sparsity, list) and len(self.sparsity) != len(block_names):
            raise ValueError(
                f"{type(self).__name__}.sparsity lists {len(self.sparsity)} values but the model has "
                f"{len(block_names)} blocks"
            )
        if isinstance(self.sparsity, dict):
            for key in self.sparsity:
                if not any(self._key_matches(key, i, name) for i, name in enumerate(block_names)):
                    raise ValueError(
                        f"{type(self).__name__}.sparsity key {key!r} matches no block; blocks are "
                        f"{block_names[0]} ... {block_names[-1]} (or their indices)"
                    )

    def set_layer_sparsities(self, values: list[float]) -> None:
        self._layer_sparsities = [float(v) for v in values]

    @staticmethod
    def _key_matches(key: str, index: int, name: str) -> bool:
        if key.startswith("re:"):
            return re.match(key[3:], name) is not None
        return key == name or key == str(index)

    def layer_sparsity(self, index: int, block_name: str) -> float:
        if self._layer_sparsities is not None:
            return self._layer_sparsities[index]
        n, m = self.nm
        if n:
            return n / m
        if isinstance(self.sparsity, list):
            return self.sparsity[index]
        if isinstance(self.sparsity, dict):
            for key, value in self.sparsity.items():
                if self._key_matches(key, index, block_name):
                    return value
            return 0.0  # a block the mapping does not name stays dense
        return float(self.sparsity)

    def keep_masks(self, enabled: bool = True) -> None:
        """Record each pruned module's keep-mask (for save/restore and re-applying masks during fine-tuning)."""
        self._keep_masks = enabled

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self._masks

    def compress_module(self, name: str, module: nn.Module, statistic: Any, sparsity: float) -> dict:
        """Prune one module in place with its calibration statistic; returns its report entry."""
        weight = weight_matrix(module).detach()
        new_weight, mask, extra = self._prune(weight, statistic, sparsity)
        self.warn_if_damped(name, extra)
        set_weight_matrix(module, new_weight)
        if self._keep_masks:
            self._masks[name] = mask.cpu()
        report = {
            "modifier": type(self).__name__,
            "shape": list(weight.shape),
            "sparsity_target": sparsity,
            "sparsity": float((new_weight == 0).sum().item() / new_weight.numel()),
            **extra,
        }
        self._reports[name] = report
        return report

    def _prune(self, weight: torch.Tensor, statistic: Any, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
        raise NotImplementedError

    # --- llm-compressor's event lifecycle (service.recipes.layerwise_modifier), plus OWL's precondition -----

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        if self.sparsity_profile == "owl" and self._layer_sparsities is None:
            raise ValueError(
                "sparsity_profile 'owl' needs a dense calibration pass over all blocks before pruning; "
                "run it through service.engine.oneshot / the CLI, which do that pass"
            )
        return super().on_initialize(state, **kwargs)


@register_modifier
class SparseGPTModifier(HessianSolverModifier, SparsityModifierBase):
    """SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with error compensation from the input Hessian."""

    statistic: ClassVar[str | None] = "hessian"

    def _prune(self, weight, statistic, sparsity):
        result = sparsegpt_prune(
            weight, statistic.hessian, sparsity,
            mask_structure=self.nm, block_size=self.block_size,
            dampening_frac=self.dampening_frac, preserve_sparsity_mask=self.preserve_sparsity_mask,
        )
        extra = {"loss": result.loss}
        if result.dampening_frac != self.dampening_frac:
            extra["dampening_frac"] = result.dampening_frac
        return result.weight, result.mask, extra


@register_modifier
class WandaPruningModifier(SparsityModifierBase):
    """Wanda (Sun et al. 2023): prune the smallest |W| * ||x|| in each output row; no weight update."""

    statistic: ClassVar[str | None] = "input_norm"

    def _prune(self, weight, statistic, sparsity):
        new_weight, mask = wanda_prune(
            weight, statistic.squared_norm, sparsity,
            mask_structure=self.nm, preserve_sparsity_mask=self.preserve_sparsity_mask,
        )
        return new_weight, mask, {}


@register_modifier
class MagnitudePruningModifier(SparsityModifierBase):
    """Magnitude pruning (ModelOpt's "sparse_magnitude"): the smallest |W| per matrix; needs no data.

    llm-compressor's training-time arguments are accepted so its recipes load: one-shot, the schedule
    collapses to final_sparsity (used when sparsity is not given); init_sparsity and leave_enabled have no
    one-shot meaning and are refused when they would change the result.
    """

    statistic: ClassVar[str | None] = None

    init_sparsity: float | None = None
    final_sparsity: float | None = None
    leave_enabled: bool = True

    @model_validator(mode="before")
    @classmethod
    def _final_is_sparsity(cls, data):
        if isinstance(data, dict) and data.get("sparsity") is None and data.get("final_sparsity") is not None:
            data = {**data, "sparsity": data["final_sparsity"]}
        return data

    def _prune(self, weight, statistic, sparsity):
        new_weight, mask = magnitude_prune(
            weight, sparsity, mask_structure=self.nm, preserve_sparsity_mask=self.preserve_sparsity_mask
        )
        return new_weight, mask, {}


class OutlierProbe:
    """A pipeline compressor that prunes nothing: it records each module's |W| and input norms so OWL can
    rank blocks by outlier ratio on the dense model."""

    statistic = "input_norm"

    def __init__(self, modifier: SparsityModifierBase):
        self.modifier = modifier
        self.target_patterns = modifier.target_patterns
        self.ignore_patterns = modifier.ignore_patterns
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def layer_sparsity(self, index: int, block_name: str) -> float:
        return 0.0

    def compress_module(self, name: str, module: nn.Module, statistic: Any, sparsity: float) -> dict:
        self.seen.append((weight_matrix(module).detach().float().abs(), statistic.squared_norm.clone()))
        return {"probe": True}

    def take_block_ratio(self) -> float:
        from service.algorithms.owl import outlier_ratio

        weights, norms = zip(*self.seen) if self.seen else ((), ())
        self.seen = []
        return outlier_ratio(list(weights), list(norms), self.modifier.owl_m) if weights else 0.0

