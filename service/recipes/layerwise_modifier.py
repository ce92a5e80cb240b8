"""llm-compressor's event lifecycle for modifiers that compress target modules one at a time.

SparseGPT, Wanda, magnitude, RTN and GPTQ all work the same way under the event lifecycle: find the target modules
in the blocks, accumulate each one's calibration statistic from a forward hook while calibration runs, and
compress a module (``compress_module``, which the block pipeline calls directly) once its block has been
calibrated (``SEQUENTIAL_EPOCH_END``) or at the end. What differs is ``statistic`` ("hessian", "input_norm" or
None for data-free methods), ``layer_sparsity`` and ``compress_module``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import torch
from pydantic import PrivateAttr, field_validator
from torch import nn

from service.algorithms.hessian import HessianAccumulator, InputNormAccumulator
from service.recipes.lifecycle import Event, State
from service.recipes.modifier import Modifier
from service.recipes.targets import compressible_modules, find_blocks

log = logging.getLogger(__name__)


def memory_mb(device: torch.device) -> float:
    """Peak allocated device memory on CUDA, else the process's resident memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return float("nan")


class LayerwiseModifier(Modifier):
    """Base of the modifiers that compress modules one by one from a per-module calibration statistic."""

    statistic: ClassVar[str | None] = None

    sequential_targets: str | list[str] | None = None

    _module_names: dict[nn.Module, tuple[str, int, str]] = PrivateAttr(default_factory=dict)  # name, block, block name
    _statistics: dict[nn.Module, Any] = PrivateAttr(default_factory=dict)
    _reports: dict[str, dict] = PrivateAttr(default_factory=dict)

    # what subclasses provide (target_patterns / ignore_patterns too)
    def check_layers(self, block_names: list[str]) -> None:
        return None

    def layer_sparsity(self, index: int, block_name: str) -> float:
        return 0.0

    def compress_module(self, name: str, module: nn.Module, statistic: Any, sparsity: float) -> dict:
        raise NotImplementedError

    @property
    def reports(self) -> dict[str, dict]:
        return self._reports

    def warn_if_damped(self, name: str, extra: dict) -> None:
        """A Hessian solver retries with ten times the dampening when the Hessian cannot be inverted, silently
        (it is a pure function); the modifier, which knows the module, says so."""
        if "dampening_frac" in extra:
            log.warning("%s: the Hessian could not be inverted with dampening_frac=%g; solved with %g", name,
                        getattr(self, "dampening_frac", float("nan")), extra["dampening_frac"])

    # --- the event lifecycle ----------------------------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        blocks = find_blocks(state.model, kwargs.get("sequential_targets") or self.sequential_targets)
        self.check_layers([name for name, _ in blocks])
        self._module_names = {}
        for index, (block_name, block) in enumerate(blocks):
            for name, module in compressible_modules(block, block_name, self.target_patterns, self.ignore_patterns):
                self._module_names[module] = (name, index, block_name)
        return True

    def on_start(self, state: State, event: Event, **kwargs: Any) -> None:
        if self.statistic is not None:
            for module in self._module_names:
                self.register_hook(module, self.calibrate_module, "forward")

    def calibrate_module(self, module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        """Forward hook: add this call's input to the module's statistic (one accumulator per module)."""
        x = args[0]
        acc = self._statistics.get(module)
        if acc is None:
            cls = HessianAccumulator if self.statistic == "hessian" else InputNormAccumulator
            acc = self._statistics[module] = cls(x.shape[-1], x.device)
        elif getattr(self, "offload_hessians", False):
            acc.to(x.device)
        acc.add(x)
        if getattr(self, "offload_hessians", False):
            acc.to("cpu")

    def compress_modules(self) -> None:
        """Compress every module that has calibration data (or every target, for data-free methods)."""
        pending = list(self._module_names) if self.statistic is None else list(self._statistics)
        for module in pending:
            name, index, block_name = self._module_names[module]
            if name in self._reports:
                continue
            statistic = self._statistics.pop(module, None)
            if statistic is not None:
                statistic.to(module.weight.device)
            start = time.perf_counter()
            report = self.compress_module(name, module, statistic, self.layer_sparsity(index, block_name))
            report["seconds"] = time.perf_counter() - start
            report["samples"] = getattr(statistic, "num_samples", getattr(statistic, "num_tokens", 0))
            report["memory_mb"] = memory_mb(module.weight.device)
            log.info("%s: %s samples, loss %s, %.2f s, %.0f MB", name, report["samples"], report.get("loss", "-"),
                     report["seconds"], report["memory_mb"])

    def on_update(self, state: State, event: Event, **kwargs: Any) -> None:
        self.compress_modules()  # SEQUENTIAL_EPOCH_END: one block's calibration is complete

    def on_end(self, state: State, event: Event, **kwargs: Any) -> None:
        self.compress_modules()
        self.remove_hooks()

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        self._statistics.clear()
        return True


class HessianSolverModifier(LayerwiseModifier):
    """The arguments SparseGPT and GPTQ share: both solve with the input Hessian, in column blocks.

    :param block_size: columns solved together (lazy batch updates)
    :param dampening_frac: fraction of the mean Hessian diagonal added to it before inverting
    :param offload_hessians: keep each Hessian on the CPU except while it is updated or used
    """

    statistic: ClassVar[str | None] = "hessian"

    block_size: int = 128
    dampening_frac: float = 0.01
    offload_hessians: bool = False

    @field_validator("block_size")
    @classmethod
    def _positive_block(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"block_size must be an integer >= 1 (got {value})")
        return value

    @field_validator("dampening_frac")
    @classmethod
    def _non_negative_damp(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"dampening_frac must be >= 0 (got {value})")
        return value

