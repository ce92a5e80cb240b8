"""Events and state that drive a Modifier, in llm-compressor's vocabulary.

The names and arithmetic follow llm-compressor 0.14 (``core/events/event.py`` and
``core/state.py``) so that a modifier written against its API reads the same here.
What is left out on purpose: the logging framework, the session/lifecycle manager,
and the optimizer wrapping. Only what a one-shot, layer-streaming pipeline needs
remains, plus the step/epoch arithmetic that ``start``/``end``/``update`` use.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = ["EventType", "Event", "Data", "Hardware", "State"]


class EventType(Enum):
    """What just happened in the pipeline; the values are llm-compressor's strings."""

    # whole-run lifecycle
    INITIALIZE = "initialize"
    FINALIZE = "finalize"

    # batch lifecycle (training-style scheduling through start/end/update)
    BATCH_START = "batch_start"
    LOSS_CALCULATED = "loss_calculated"
    BATCH_END = "batch_end"

    # calibration lifecycle. llm-compressor 0.14 calls the first and last of these
    # CALIBRATION_START / CALIBRATION_END (older releases used the EPOCH names);
    # both spellings are accepted and name the same member.
    CALIBRATION_EPOCH_START = "calibration_start"
    SEQUENTIAL_EPOCH_END = "sequential_epoch_end"
    CALIBRATION_EPOCH_END = "calibration_end"
    CALIBRATION_START = "calibration_start"
    CALIBRATION_END = "calibration_end"

    # optimizer step lifecycle
    OPTIM_PRE_STEP = "optim_pre_step"
    OPTIM_POST_STEP = "optim_post_step"


@dataclass
class Event:
    """A point in the run, located by step (and, if epoch based, by epoch).

    ``steps_per_epoch`` set -> the event is epoch based and ``current_index`` is a
    fractional epoch (``global_step / steps_per_epoch``); unset -> ``current_index``
    is the global step. ``batches_per_step`` is the number of batches per optimizer
    step (gradient accumulation); ``invocations_per_step`` is carried for
    compatibility and used by nothing here.
    """

    type_: EventType | None = None
    steps_per_epoch: int | None = None
    batches_per_step: int | None = None
    invocations_per_step: int = 1
    global_step: int = 0
    global_batch: int = 0

    @property
    def epoch_based(self) -> bool:
        return self.steps_per_epoch is not None

    def _require_epoch_based(self) -> None:
        if not self.epoch_based:
            raise ValueError("Event is not epoch based")

    @property
    def epoch(self) -> int:
        """Whole epochs completed: ``global_step // steps_per_epoch``."""
        self._require_epoch_based()
        return self.global_step // self.steps_per_epoch

    @property
    def epoch_full(self) -> float:
        """Fractional epoch: ``global_step / steps_per_epoch``."""
        self._require_epoch_based()
        return self.global_step / float(self.steps_per_epoch)

    @property
    def epoch_step(self) -> int:
        """Step inside the current epoch: ``global_step % steps_per_epoch``."""
        self._require_epoch_based()
        return self.global_step % self.steps_per_epoch

    @property
    def epoch_batch(self) -> int:
        """Batch inside the current epoch; an epoch holds
        ``steps_per_epoch * batches_per_step`` batches (``steps_per_epoch`` when
        ``batches_per_step`` is unset or 0)."""
        self._require_epoch_based()
        per_epoch = self.steps_per_epoch * (self.batches_per_step or 1)
        return self.global_batch % per_epoch

    @property
    def current_index(self) -> float:
        """The position that ``start``/``end``/``update`` are compared with: the
        fractional epoch if epoch based, else the global step.

        (llm-compressor also raises "Too many steps per epoch" when
        ``epoch_full - epoch > 1``; that difference is always < 1, so the check
        cannot fire and is left out.)
        """
        return self.epoch_full if self.epoch_based else self.global_step

    @current_index.setter
    def current_index(self, value: float) -> None:
        """Move to ``value`` (an epoch if epoch based, else a step); the global
        batch follows as ``global_step * batches_per_step`` when that is >= 2."""
        if self.epoch_based:
            self.global_step = int(value * self.steps_per_epoch)
        else:
            self.global_step = int(value)
        if self.batches_per_step is None or self.batches_per_step < 2:
            self.global_batch = self.global_step
        else:
            self.global_batch = self.global_step * self.batches_per_step

    def should_update(self, start: float | None, end: float | None, update: float | None) -> bool:
        """True when ``start <= current_index <= end`` (a None bound is open) and
        ``current_index`` falls on the ``update`` interval (None or <= 0: every index).
        The interval test is ``current % update < 1e-10``, as in llm-compressor."""
        current = self.current_index
        if start is not None and current < start:
            return False
        if end is not None and current > end:
            return False
        return update is None or update <= 0.0 or current % update < 1e-10

    def new_instance(self, **kwargs: Any) -> Event:
        """A copy with the given fields replaced. Unlike llm-compressor, an unknown
        field name raises TypeError instead of becoming a stray attribute."""
        return dataclasses.replace(self, **kwargs)


@dataclass
class Data:
    """Data sets available to modifiers; ``calib`` is the one a one-shot run uses."""

    train: Any | None = None
    val: Any | None = None
    test: Any | None = None
    calib: Any | None = None


@dataclass
class Hardware:
    """Where the run executes. ``device`` is a torch device string such as "cuda:0"."""

    device: str | None = None
    devices: list[str] | None = None
    rank: int | None = None
    world_size: int | None = None
    local_rank: int | None = None
    local_world_size: int | None = None
    distributed: bool | None = None
    distributed_strategy: str | None = None


_HARDWARE_FIELDS = tuple(f.name for f in dataclasses.fields(Hardware))


@dataclass
class State:
    """Everything a modifier may look at while it runs.

    ``optim_wrapped`` is llm-compressor's name (some callers spell it
    ``optim_wrapper``); it records whether optimizer callbacks were attached.
    ``loggers`` is a plain list: no logger framework here.
    """

    model: Any = None
    teacher_model: Any = None
    optimizer: Any = None
    optim_wrapped: bool | None = None
    loss: Any = None
    batch_data: Any = None
    data: Data = field(default_factory=Data)
    hardware: Hardware = field(default_factory=Hardware)
    loggers: list[Any] = field(default_factory=list)
    model_log_cadence: float | None = None
    compressed: bool = False

    @property
    def compression_ready(self) -> bool:
        return self.model is not None and self.optimizer is not None

    def update(
        self,
        model: Any = None,
        teacher_model: Any = None,
        optimizer: Any = None,
        attach_optim_callbacks: bool = True,
        train_data: Any = None,
        val_data: Any = None,
        test_data: Any = None,
        calib_data: Any = None,
        copy_data: bool = False,
        loggers: list[Any] | None = None,
        model_log_cadence: float | None = None,
        **hardware: Any,
    ) -> dict[str, Any]:
        """Set every argument that is not None; return ``{attribute path: new value}``
        for what was set, e.g. ``{"model": m, "data.calib": d, "hardware.device": "cuda:0"}``.

        ``hardware`` takes the ``Hardware`` field names (device, devices, rank,
        world_size, ...); any other keyword raises TypeError.
        ``copy_data`` deep-copies the data sets. It defaults to False, unlike
        llm-compressor, because nothing here mutates them and a copy of a
        calibration set only costs memory.
        """
        unknown = sorted(set(hardware) - set(_HARDWARE_FIELDS))
        if unknown:
            raise TypeError(
                f"State.update got unknown argument(s) {', '.join(map(repr, unknown))}; "
                f"hardware arguments allowed: {', '.join(_HARDWARE_FIELDS)}"
            )

        changed: dict[str, Any] = {}
        if model is not None:
            self.model = changed["model"] = model
        if teacher_model is not None:
            self.teacher_model = changed["teacher_model"] = teacher_model
        if optimizer is not None:
            self.optimizer = changed["optimizer"] = optimizer
            self.optim_wrapped = changed["optim_wrapped"] = attach_optim_callbacks
        for name, value in (("train", train_data), ("val", val_data), ("test", test_data), ("calib", calib_data)):
            if value is not None:
                value = copy.deepcopy(value) if copy_data else value
                setattr(self.data, name, value)
                changed[f"data.{name}"] = value
        if loggers is not None:
            self.loggers = changed["loggers"] = list(loggers)
        if model_log_cadence is not None:
            self.model_log_cadence = changed["model_log_cadence"] = model_log_cadence
        for name, value in hardware.items():
            # unlike the other arguments, None is a real value here (e.g. rank=None
            # on a single device), so an explicitly passed hardware field is always set
            setattr(self.hardware, name, value)
            changed[f"hardware.{name}"] = value
        return changed
