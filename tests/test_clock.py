"""The clock alone: windows, the period schedule, warm-up, landing and resuming, from counters."""

from __future__ import annotations

import pytest

from local_sgd_optim.clock import Clock


def _run(clock: Clock, calls: int) -> list[tuple[int, str]]:
    """Drive ``calls`` step() calls as the optimizer does; (optimizer step, event) for each
    optimizer step that rounds, lands or rounds locally."""
    events = []
    in_flight = False
    for _ in range(calls):
        if not clock.count_micro_step():
            continue
        clock.count_optimizer_step()
        if in_flight and clock.landing_due():
            events.append((clock.optimizer_steps, "land"))
            in_flight = False
        if clock.round_due():
            events.append((clock.optimizer_steps, "round"))
            clock.record_round()
            clock.schedule_next_round()
            in_flight = clock.overlap_steps > 0
        elif clock.local_round_due():
            events.append((clock.optimizer_steps, "local"))
            clock.local_rounds += 1
    return events


def _clock(period: object = 4, **kwargs: int | None) -> Clock:
    settings: dict[str, object] = {"accumulation_steps": 1, "overlap_steps": 0, "warmup_steps": 0}
    settings.update(kwargs)
    clock = Clock(period, **settings)  # type: ignore[arg-type]
    clock.schedule_first_round()
    return clock


def test_windows_of_micro_steps_end_every_accumulation_steps_calls() -> None:
    clock = _clock(accumulation_steps=3)
    ends = [clock.count_micro_step() for _ in range(7)]
    assert ends == [False, False, True, False, False, True, False]
    assert clock.next_call_ends_window() is False
    clock.count_micro_step()
    assert clock.next_call_ends_window() is True


def test_rounds_every_period_after_warmup_and_local_rounds_between() -> None:
    clock = _clock(8, warmup_steps=3, local_period=2)
    events = _run(clock, 20)
    assert [s for s, e in events if e == "round"] == [11, 19]
    assert [s for s, e in events if e == "local"] == [5, 7, 9, 13, 15, 17]
    assert clock.in_warmup is False
    assert (clock.averaging_rounds, clock.last_round_step, clock.next_round_step) == (2, 19, 27)


def test_overlapped_rounds_land_overlap_steps_later() -> None:
    clock = _clock(4, overlap_steps=2, accumulation_steps=2)
    assert _run(clock, 24) == [(4, "round"), (6, "land"), (8, "round"), (10, "land"), (12, "round")]


def test_a_schedule_gives_each_period_and_bad_periods_are_refused() -> None:
    clock = _clock(lambda step: 2 if step < 6 else 5)
    assert [s for s, _ in _run(clock, 20)] == [2, 4, 6, 11, 16]
    with pytest.raises(ValueError, match="returned 0 at optimizer step 0; it must return"):
        _clock(lambda step: 0)
    with pytest.raises(ValueError, match="returned True at optimizer step 0"):
        _clock(lambda step: True)
    with pytest.raises(ValueError, match="not more than overlap_steps=3"):
        _clock(lambda step: 3, overlap_steps=3)


def test_resume_with_another_period_rounds_a_new_period_after_the_last() -> None:
    saved = _clock(8)
    _run(saved, 13)  # a round at 8; the next at 16
    counters = saved.counters()
    clock = _clock(3)
    clock.load(counters, window_start=0, reschedule=True)
    assert clock.next_round_step == 11
    unchanged = _clock(8)
    unchanged.load(counters, window_start=0, reschedule=False)
    assert unchanged.counters() == counters


def test_resume_moves_the_window_grid_only_at_a_window_boundary() -> None:
    saved = _clock(accumulation_steps=2)
    _run(saved, 6)
    counters = saved.counters()
    assert Clock.window_start_after_resume(counters, False, 2) == 0
    assert Clock.window_start_after_resume(counters, True, 2) == 6
    _run(saved, 1)  # in the middle of a window
    with pytest.raises(ValueError, match="middle of an accumulation window"):
        Clock.window_start_after_resume(saved.counters(), True, 2)


def test_fragments_fall_at_their_offsets_after_warmup_and_close_knows_which_are_behind() -> None:
    clock = _clock(8, warmup_steps=2, fragments=4)
    due, behind = [], []
    for _ in range(20):
        clock.count_micro_step()
        clock.count_optimizer_step()
        if clock.round_due():
            fragment = clock.fragment_due()
            clock.record_round(whole=False)
            clock.schedule_next_round()
        elif (fragment := clock.fragment_due()) is not None:
            clock.record_round(whole=False)
        if fragment is not None:
            due.append((clock.optimizer_steps, fragment))
        behind.append(clock.fragments_behind())
    # Offsets 2, 4, 6 and 8 into each period; the first period starts after warm-up.
    assert due == [(4, 0), (6, 1), (8, 2), (10, 3), (12, 0), (14, 1), (16, 2), (18, 3), (20, 0)]
    assert behind[9] == [0, 1, 2]  # step 10: the period's last fragment was just averaged
    assert behind[10] == [0, 1, 2, 3]  # step 11: every fragment moved since its round
    assert behind[11] == [1, 2, 3]  # step 12: fragment 0 was just averaged
    clock.record_round(whole=True)  # close() or average() of every fragment at step 20
    assert clock.fragments_behind() == []
    assert _clock(8, fragments=1).fragments_behind() is None
