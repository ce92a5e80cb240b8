"""The Modifier base class: llm-compressor's lifecycle with fewer moving parts.

A modifier is a pydantic model (its fields are the recipe arguments) plus a small
state machine::

    initialize -> update_event(...)* -> finalize

The rules, errors and messages follow llm-compressor 0.14
(``modifiers/modifier.py``), with these simplifications:

* The calibration events drive the same three hooks as training-style scheduling:
  ``CALIBRATION_EPOCH_START`` starts the modifier (``on_start``),
  ``SEQUENTIAL_EPOCH_END`` (one layer calibrated) calls ``on_update`` while started,
  ``CALIBRATION_EPOCH_END`` ends it (``on_end``). llm-compressor has separate
  ``on_calibration_start``/``on_sequential_epoch_end``/``on_calibration_end`` hooks.
* ``finalize`` ends a started modifier that has not ended (llm-compressor leaves
  that to each subclass's ``on_finalize``) and always removes the hooks it
  registered, so a subclass cannot leak them.
* ``on_initialize``/``on_finalize`` must return a bool; anything else (typically a
  forgotten ``return``) is a TypeError instead of a silently uninitialized modifier.

Scheduling: with ``start`` None (the usual one-shot recipe) a modifier does not
start at initialize; it starts at ``CALIBRATION_EPOCH_START`` and ends at
``CALIBRATION_EPOCH_END`` or, failing that, at finalize. With ``start <= 0`` (the
old one-shot convention ``start: -1``) it starts inside ``initialize``. Otherwise
``BATCH_START``/``BATCH_END`` events start and end it by ``event.current_index``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, PrivateAttr
from torch.utils.hooks import RemovableHandle

from service.recipes.lifecycle import Event, EventType, State

__all__ = ["Modifier"]

_HOOK_KINDS = ("forward", "forward_pre")


class Modifier(BaseModel):
    """Base for all modifiers. Subclasses add their recipe arguments as pydantic
    fields and implement ``on_initialize``; unknown arguments are rejected.

    :param index: position of the modifier in its recipe (informational)
    :param group: recipe group name, e.g. "sparsity" for ``sparsity_modifiers``
    :param start: index (step, or fractional epoch) at which to start; None = at calibration
    :param end: index at which to end; None = at calibration end / finalize
    :param update: update interval for training-style scheduling
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    index: int | None = None
    group: str | None = None
    start: float | None = None
    end: float | None = None
    update: float | None = None

    _initialized: bool = PrivateAttr(default=False)
    _finalized: bool = PrivateAttr(default=False)
    _started: bool = PrivateAttr(default=False)
    _ended: bool = PrivateAttr(default=False)
    _hooks: list[RemovableHandle] = PrivateAttr(default_factory=list)

    @property
    def initialized(self) -> bool:
        return self._initialized

    @property
    def finalized(self) -> bool:
        return self._finalized

    @property
    def started(self) -> bool:
        return self._started

    @property
    def ended(self) -> bool:
        return self._ended

    # ---- lifecycle -------------------------------------------------------------

    def initialize(self, state: State, **kwargs: Any) -> None:
        """Run ``on_initialize``; then, if ``start`` says the modifier is already
        due at step 0, ``on_start``.

        :raises RuntimeError: if already initialized or already finalized
        """
        # finalized is checked first: llm-compressor checks initialized first, which
        # makes its "already been finalized" message unreachable.
        if self._finalized:
            raise RuntimeError("Cannot initialize a modifier that has already been finalized")
        if self._initialized:
            raise RuntimeError("Cannot initialize a modifier that has already been initialized")

        self._initialized = self._checked_bool("on_initialize", self.on_initialize(state, **kwargs))
        if not self._initialized:
            return

        start_event = Event(type_=EventType.BATCH_START, global_step=0)
        if self.should_start(start_event):
            self.on_start(state, start_event, **kwargs)
            self._started = True

    def finalize(self, state: State, **kwargs: Any) -> None:
        """End the modifier if it started and has not ended, run ``on_finalize``,
        and remove every hook registered through ``register_hook``.

        :raises RuntimeError: if already finalized or never initialized
        """
        if self._finalized:
            raise RuntimeError("cannot finalize a modifier twice")
        if not self._initialized:
            raise RuntimeError("cannot finalize an uninitialized modifier")

        try:
            if self._started and not self._ended:
                self.on_end(state, Event(type_=EventType.FINALIZE), **kwargs)
                self._ended = True
            result = self.on_finalize(state, **kwargs)
        finally:
            self.remove_hooks()
        self._finalized = self._checked_bool("on_finalize", result)

    def update_event(self, state: State, event: Event, **kwargs: Any) -> None:
        """Route one event to the hooks: ``on_event`` always, then at most one of
        ``on_start`` / ``on_update`` / ``on_end`` as described in the module docstring.

        :raises RuntimeError: if not initialized or already finalized
        """
        if not self._initialized:
            raise RuntimeError("Cannot update an uninitialized modifier")
        if self._finalized:
            raise RuntimeError("Cannot update a finalized modifier")

        self.on_event(state, event, **kwargs)
        active = self._started and not self._ended

        # calibration lifecycle (one-shot)
        if event.type_ is EventType.CALIBRATION_EPOCH_START:
            if not self._started:
                self.on_start(state, event, **kwargs)
                self._started = True
            return
        if event.type_ is EventType.SEQUENTIAL_EPOCH_END:
            if active:
                self.on_update(state, event, **kwargs)
            return
        if event.type_ is EventType.CALIBRATION_EPOCH_END:
            if active:
                self.on_end(state, event, **kwargs)
                self._ended = True
            return

        # training-style lifecycle, scheduled by start/end
        if event.type_ is EventType.BATCH_START and not self._started and self.should_start(event):
            self.on_start(state, event, **kwargs)
            self._started = True
            self.on_update(state, event, **kwargs)
            return
        if event.type_ is EventType.BATCH_END and not self._ended and self.should_end(event):
            self.on_end(state, event, **kwargs)
            self._ended = True
            self.on_update(state, event, **kwargs)
            return
        if active:
            self.on_update(state, event, **kwargs)

    def should_start(self, event: Event) -> bool:
        """True when ``start`` is set and ``start <= current_index < end`` (no end: open)."""
        if self.start is None:
            return False
        current = event.current_index
        return self.start <= current and (self.end is None or current < self.end)

    def should_end(self, event: Event) -> bool:
        """True when ``end`` is set and ``current_index >= end``."""
        return self.end is not None and event.current_index >= self.end

    def _checked_bool(self, hook: str, result: Any) -> bool:
        if not isinstance(result, bool):
            raise TypeError(f"{type(self).__name__}.{hook} must return True or False, got {result!r}")
        return result

    # ---- hooks for subclasses ------------------------------------------------------

    @abstractmethod
    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        """Prepare the modifier; return True on success, False if it cannot run."""

    def on_start(self, state: State, event: Event, **kwargs: Any) -> None:
        """The modifier becomes active (e.g. register calibration hooks)."""

    def on_update(self, state: State, event: Event, **kwargs: Any) -> None:
        """An event while active (e.g. one layer's calibration is done: compress it)."""

    def on_end(self, state: State, event: Event, **kwargs: Any) -> None:
        """The modifier stops being active (e.g. remove calibration hooks)."""

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        """Called first for every event, whatever the state."""

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        """Release what ``on_initialize`` acquired; return True on success."""
        return True

    # ---- torch hooks ---------------------------------------------------------------

    def register_hook(
        self,
        module: torch.nn.Module,
        fn: Callable[..., Any],
        kind: str = "forward",
        with_kwargs: bool = False,
    ) -> RemovableHandle:
        """Register ``fn`` as a ``kind`` ("forward" or "forward_pre") hook on
        ``module`` and keep the handle so that ``remove_hooks`` (and ``finalize``)
        can remove it. ``with_kwargs`` is passed to torch: the hook then also
        receives the forward call's keyword arguments."""
        if kind == "forward":
            handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
        elif kind == "forward_pre":
            handle = module.register_forward_pre_hook(fn, with_kwargs=with_kwargs)
        else:
            raise ValueError(f"hook kind must be one of {', '.join(map(repr, _HOOK_KINDS))}; got {kind!r}")
        self._hooks.append(handle)
        return handle

    def remove_hooks(self, handles: list[RemovableHandle] | None = None) -> None:
        """Remove the given hooks (default: all registered by this modifier)."""
        targets = list(self._hooks) if handles is None else list(handles)
        for handle in targets:
            handle.remove()
        removed = {id(h) for h in targets}
        self._hooks = [h for h in self._hooks if id(h) not in removed]
