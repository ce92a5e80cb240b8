"""Event arithmetic, State updates and the Modifier state machine."""

import pytest
import torch
from pydantic import ValidationError

from service.recipes.lifecycle import Data, Event, EventType, Hardware, State
from service.recipes.modifier import Modifier

# ---- EventType / Event -----------------------------------------------------------------


def test_event_type_values_match_llm_compressor():
    assert EventType.INITIALIZE.value == "initialize"
    assert EventType.BATCH_START.value == "batch_start"
    assert EventType.SEQUENTIAL_EPOCH_END.value == "sequential_epoch_end"
    assert EventType.OPTIM_POST_STEP.value == "optim_post_step"
    # 0.14 spells these CALIBRATION_START/END; both names are the same member
    assert EventType.CALIBRATION_EPOCH_START is EventType.CALIBRATION_START
    assert EventType("calibration_start") is EventType.CALIBRATION_EPOCH_START
    assert EventType("calibration_end") is EventType.CALIBRATION_EPOCH_END
    assert len(EventType) == 10


def test_epoch_properties_hand_computed():
    # 10 steps per epoch, 4 batches per step -> 40 batches per epoch
    event = Event(steps_per_epoch=10, batches_per_step=4, global_step=23, global_batch=95)
    assert event.epoch_based
    assert event.epoch == 2
    assert event.epoch_full == pytest.approx(2.3)
    assert event.epoch_step == 3
    assert event.epoch_batch == 15  # 95 % 40
    assert event.current_index == pytest.approx(2.3)


def test_epoch_batch_without_batches_per_step_uses_steps():
    assert Event(steps_per_epoch=10, global_batch=23).epoch_batch == 3


@pytest.mark.parametrize("prop", ["epoch", "epoch_full", "epoch_step", "epoch_batch"])
def test_epoch_properties_require_epoch_based_event(prop):
    event = Event(global_step=7)
    assert not event.epoch_based
    assert event.current_index == 7
    with pytest.raises(ValueError, match="Event is not epoch based"):
        getattr(event, prop)


def test_current_index_setter():
    epoch_based = Event(steps_per_epoch=10, batches_per_step=4)
    epoch_based.current_index = 1.5
    assert (epoch_based.global_step, epoch_based.global_batch) == (15, 60)

    by_step = Event()
    by_step.current_index = 7.9
    assert (by_step.global_step, by_step.global_batch) == (7, 7)

    one_batch = Event(batches_per_step=1)
    one_batch.current_index = 3
    assert (one_batch.global_step, one_batch.global_batch) == (3, 3)


@pytest.mark.parametrize(
    "step, start, end, update, expected",
    [
        (1, 2, 5, None, False),  # before start
        (2, 2, 5, None, True),  # start is inclusive
        (5, 2, 5, None, True),  # end is inclusive
        (6, 2, 5, None, False),  # after end
        (4, 2, None, 2, True),  # 4 % 2 == 0
        (3, 2, None, 2, False),  # off the interval
        (3, None, None, 0.0, True),  # update <= 0: always
        (100, None, None, None, True),
    ],
)
def test_should_update_by_step(step, start, end, update, expected):
    assert Event(global_step=step).should_update(start, end, update) is expected


def test_should_update_by_epoch():
    event = Event(steps_per_epoch=4, global_step=6)  # epoch 1.5
    assert event.should_update(1.0, 2.0, 0.5)  # 1.5 % 0.5 == 0
    assert not event.should_update(1.0, 2.0, 1.0)  # 1.5 % 1.0 == 0.5
    assert not event.should_update(1.6, None, None)


def test_new_instance_copies_and_replaces():
    event = Event(type_=EventType.BATCH_START, steps_per_epoch=10, global_step=3)
    other = event.new_instance(global_step=4, type_=EventType.BATCH_END)
    assert (other.global_step, other.type_, other.steps_per_epoch) == (4, EventType.BATCH_END, 10)
    assert (event.global_step, event.type_) == (3, EventType.BATCH_START)
    with pytest.raises(TypeError):
        event.new_instance(not_a_field=1)


# ---- State -----------------------------------------------------------------------------


def test_state_defaults_are_independent():
    a, b = State(), State()
    assert a.data == Data() and a.hardware == Hardware()
    a.data.calib = [1]
    assert b.data.calib is None
    assert a.loggers == [] and a.compressed is False


def test_state_update_reports_what_changed():
    state = State()
    model = torch.nn.Linear(2, 2)
    calib = [torch.zeros(1, 2)]
    changed = state.update(model=model, calib_data=calib, device="cpu")
    assert changed == {"model": model, "data.calib": calib, "hardware.device": "cpu"}
    assert state.model is model
    assert state.data.calib is calib  # not copied by default
    assert state.hardware.device == "cpu"
    assert state.update() == {}


def test_state_update_optimizer_copy_and_unknown():
    state = State()
    optimizer = object()
    changed = state.update(optimizer=optimizer, attach_optim_callbacks=False)
    assert changed == {"optimizer": optimizer, "optim_wrapped": False}
    calib = [[1, 2]]
    state.update(calib_data=calib, copy_data=True)
    assert state.data.calib == calib and state.data.calib is not calib
    with pytest.raises(TypeError, match="unknown argument.*'devic'.*allowed: device, devices"):
        state.update(devic="cuda:0")


# ---- Modifier lifecycle ----------------------------------------------------------------


class Recording(Modifier):
    """Records every hook call as (hook name, event type or None, current index or None)."""

    init_result: bool = True
    calls: list = []

    def _record(self, name, event=None):
        kind = event.type_ if event is not None else None
        index = event.current_index if event is not None else None
        self.calls.append((name, kind, index))

    def on_initialize(self, state, **kwargs):
        self._record("initialize")
        return self.init_result

    def on_start(self, state, event, **kwargs):
        self._record("start", event)

    def on_update(self, state, event, **kwargs):
        self._record("update", event)

    def on_end(self, state, event, **kwargs):
        self._record("end", event)

    def on_event(self, state, event, **kwargs):
        self._record("event", event)

    def on_finalize(self, state, **kwargs):
        self._record("finalize")
        return True


def hooks_only(calls):
    return [(name, kind) for name, kind, _ in calls if name != "event"]


def test_base_modifier_is_abstract_and_rejects_unknown_arguments():
    with pytest.raises(TypeError, match="abstract"):
        Modifier()
    with pytest.raises(ValidationError, match="sparsty"):
        Recording(sparsty=0.5)


def test_lifecycle_errors_and_messages():
    state = State()
    mod = Recording()
    with pytest.raises(RuntimeError, match="^Cannot update an uninitialized modifier$"):
        mod.update_event(state, Event(type_=EventType.BATCH_START))
    with pytest.raises(RuntimeError, match="^cannot finalize an uninitialized modifier$"):
        mod.finalize(state)

    mod.initialize(state)
    assert mod.initialized and not mod.finalized
    with pytest.raises(RuntimeError, match="^Cannot initialize a modifier that has already been initialized$"):
        mod.initialize(state)

    mod.finalize(state)
    assert mod.finalized
    with pytest.raises(RuntimeError, match="^cannot finalize a modifier twice$"):
        mod.finalize(state)
    with pytest.raises(RuntimeError, match="^Cannot initialize a modifier that has already been finalized$"):
        mod.initialize(state)
    with pytest.raises(RuntimeError, match="^Cannot update a finalized modifier$"):
        mod.update_event(state, Event(type_=EventType.BATCH_START))


def test_one_shot_hook_order():
    state = State()
    mod = Recording()  # start/end None: the usual one-shot recipe
    mod.initialize(state)
    assert not mod.started  # start None: not started by initialize
    for event_type in (
        EventType.CALIBRATION_EPOCH_START,
        EventType.SEQUENTIAL_EPOCH_END,
        EventType.SEQUENTIAL_EPOCH_END,
        EventType.CALIBRATION_EPOCH_END,
    ):
        mod.update_event(state, Event(type_=event_type))
    assert mod.started and mod.ended
    mod.finalize(state)
    assert mod.calls == [
        ("initialize", None, None),
        ("event", EventType.CALIBRATION_EPOCH_START, 0),
        ("start", EventType.CALIBRATION_EPOCH_START, 0),
        ("event", EventType.SEQUENTIAL_EPOCH_END, 0),
        ("update", EventType.SEQUENTIAL_EPOCH_END, 0),
        ("event", EventType.SEQUENTIAL_EPOCH_END, 0),
        ("update", EventType.SEQUENTIAL_EPOCH_END, 0),
        ("event", EventType.CALIBRATION_EPOCH_END, 0),
        ("end", EventType.CALIBRATION_EPOCH_END, 0),
        ("finalize", None, None),
    ]


def test_finalize_ends_a_started_modifier():
    state = State()
    mod = Recording()
    mod.initialize(state)
    mod.update_event(state, Event(type_=EventType.CALIBRATION_EPOCH_START))
    mod.finalize(state)
    assert mod.ended
    assert hooks_only(mod.calls)[-2:] == [("end", EventType.FINALIZE), ("finalize", None)]


def test_never_started_modifier_is_not_ended_at_finalize():
    mod = Recording()
    mod.initialize(State())
    mod.finalize(State())
    assert hooks_only(mod.calls) == [("initialize", None), ("finalize", None)]
    assert not mod.started and not mod.ended


def test_start_at_or_before_zero_starts_inside_initialize():
    mod = Recording(start=-1)  # llm-compressor's old one-shot convention
    mod.initialize(State())
    assert mod.started
    assert mod.calls == [("initialize", None, None), ("start", EventType.BATCH_START, 0)]


def test_scheduled_start_and_end_by_step():
    state = State()
    mod = Recording(start=2, end=4)
    mod.initialize(state)
    assert not mod.started
    for step in range(6):
        mod.update_event(state, Event(type_=EventType.BATCH_START, global_step=step))
        mod.update_event(state, Event(type_=EventType.BATCH_END, global_step=step))
    active = [(name, kind, index) for name, kind, index in mod.calls if name in ("start", "update", "end")]
    bs, be = EventType.BATCH_START, EventType.BATCH_END
    assert active == [
        ("start", bs, 2),
        ("update", bs, 2),
        ("update", be, 2),
        ("update", bs, 3),
        ("update", be, 3),
        ("update", bs, 4),
        ("end", be, 4),
        ("update", be, 4),
    ]
    assert mod.started and mod.ended


def test_scheduled_start_by_epoch():
    # 10 steps per epoch: start=0.5 is step 5, end=1.0 is step 10
    mod = Recording(start=0.5, end=1.0)
    assert not mod.should_start(Event(steps_per_epoch=10, global_step=4))
    assert mod.should_start(Event(steps_per_epoch=10, global_step=5))
    assert not mod.should_start(Event(steps_per_epoch=10, global_step=10))  # end is exclusive for start
    assert not mod.should_end(Event(steps_per_epoch=10, global_step=9))
    assert mod.should_end(Event(steps_per_epoch=10, global_step=10))
    assert not Recording().should_start(Event(global_step=0))
    assert not Recording().should_end(Event(global_step=10**6))


def test_failed_initialize_leaves_modifier_uninitialized():
    mod = Recording(init_result=False, start=0)
    mod.initialize(State())
    assert not mod.initialized and not mod.started
    with pytest.raises(RuntimeError, match="uninitialized"):
        mod.update_event(State(), Event())


def test_hook_must_return_bool():
    class Forgetful(Modifier):
        def on_initialize(self, state, **kwargs):
            pass  # forgot "return True"

    with pytest.raises(TypeError, match="Forgetful.on_initialize must return True or False, got None"):
        Forgetful().initialize(State())


# ---- torch hooks -----------------------------------------------------------------------


def test_registered_hooks_stop_firing_after_remove_hooks():
    module = torch.nn.Linear(3, 3)
    mod = Recording()
    seen = []
    mod.register_hook(module, lambda m, args, out: seen.append("forward"), "forward")
    mod.register_hook(module, lambda m, args, kwargs: seen.append(("pre", sorted(kwargs))), "forward_pre", with_kwargs=True)
    module(torch.zeros(1, 3))
    assert seen == [("pre", []), "forward"]
    mod.remove_hooks()
    module(torch.zeros(1, 3))
    assert len(seen) == 2
    assert not module._forward_hooks and not module._forward_pre_hooks


def test_remove_a_subset_of_hooks():
    module = torch.nn.Linear(3, 3)
    mod = Recording()
    seen = []
    first = mod.register_hook(module, lambda *a: seen.append(1))
    mod.register_hook(module, lambda *a: seen.append(2))
    mod.remove_hooks([first])
    module(torch.zeros(1, 3))
    assert seen == [2]
    mod.remove_hooks()
    module(torch.zeros(1, 3))
    assert seen == [2]


def test_finalize_removes_hooks_even_when_on_finalize_fails():
    class Failing(Recording):
        def on_finalize(self, state, **kwargs):
            raise RuntimeError("boom")

    module = torch.nn.Linear(3, 3)
    mod = Failing()
    mod.initialize(State())
    mod.register_hook(module, lambda *a: None)
    with pytest.raises(RuntimeError, match="boom"):
        mod.finalize(State())
    assert not module._forward_hooks


def test_register_hook_rejects_unknown_kind():
    with pytest.raises(ValueError, match="hook kind must be one of 'forward', 'forward_pre'; got 'backward'"):
        Recording().register_hook(torch.nn.Linear(1, 1), lambda *a: None, "backward")
