"""federation.watch: bounded stops, and telling a task's own cancellation from a call cancelled under it."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from federation.watch import Signal, bounded, stop_tasks, stopping, wait_event


async def test_stop_tasks_is_bounded_even_if_a_task_swallows_its_cancellation(caplog):
    async def stubborn():
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass  # a badly behaved library

    async def polite():
        await asyncio.sleep(10)

    async def failed():
        raise ValueError("boom")

    tasks = [asyncio.create_task(stubborn(), name="stubborn"), asyncio.create_task(polite(), name="polite"),
             asyncio.create_task(failed(), name="failed")]
    await asyncio.sleep(0)
    for t in tasks:
        t.cancel()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        await stop_tasks(tasks, timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 2
    assert "1 task(s) did not stop within 0.3 s: stubborn" in caplog.text
    assert tasks[1].cancelled() and tasks[2].done()
    tasks[0].cancel()  # leave nothing running behind the test
    tasks[0].get_coro().close()


async def test_stopping_is_true_only_while_the_task_itself_is_cancelled():
    seen = []

    async def loop():
        for _ in range(2):
            try:
                raise asyncio.CancelledError  # what grpc raises when it cancels a call on a closed channel
            except asyncio.CancelledError:
                seen.append(stopping())
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append(stopping())
            raise

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert seen == [False, False, True]


async def test_a_failing_tap_does_not_stop_a_change_from_being_published(caplog):
    from federation.watch import Topics

    topics: Topics[int] = Topics()
    seen = []
    topics.taps.append(lambda key, value: 1 / 0)
    topics.taps.append(lambda key, value: seen.append((key, value)))
    async with topics.subscribe("job-1") as updates:
        with caplog.at_level(logging.ERROR):
            topics.publish("job-1", 7)
        assert updates.get_nowait() == 7
    assert seen == [("job-1", 7)] and "a tap on job-1 failed" in caplog.text


async def test_a_value_is_wanted_while_someone_subscribes_to_its_key_or_taps_every_key():
    from federation.watch import Topics

    topics: Topics[int] = Topics()
    assert not topics.wanted("job-1")
    async with topics.subscribe("job-1"):
        assert topics.wanted("job-1") and not topics.wanted("job-2")
    assert not topics.wanted("job-1")
    topics.taps.append(lambda key, value: None)
    assert topics.wanted("job-2")


async def test_bounded_gives_up_on_a_hanging_step_and_says_so(caplog):
    never = asyncio.get_running_loop().create_future()  # a step waiting for what never comes
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        assert await bounded(never, 0.2, "stopping the gRPC server") is False
    assert 0.15 <= time.monotonic() - started < 2
    assert "stopping the gRPC server did not finish within 0.2 s; stopping without it" in caplog.text


async def test_bounded_returns_at_once_for_a_step_that_ends_and_raises_its_error():
    async def quick():
        await asyncio.sleep(0)

    async def broken():
        raise OSError("journal gone")

    assert await bounded(quick(), 5, "x") is True
    try:
        await bounded(broken(), 5, "x")
    except OSError as exc:
        assert str(exc) == "journal gone"
    else:
        raise AssertionError("the step's error was swallowed")


async def test_a_loop_on_a_signal_stops_even_when_cancelled_as_the_signal_fires():
    """The race that hung a hub's stop: cancelled while the signal fires, the wait must still end the loop (on
    Python 3.11, asyncio.wait_for returned normally then, and a `while True` around it never stopped)."""
    signal = Signal()
    rounds = 0

    async def follow():
        nonlocal rounds
        while True:
            rounds += 1
            await signal.wait_past(signal.version, 30)

    for _ in range(50):
        task = asyncio.create_task(follow())
        await asyncio.sleep(0)
        signal.notify()  # the waiter is woken...
        task.cancel()  # ...and cancelled in the same turn of the loop
        done, _ = await asyncio.wait([task], timeout=1)
        assert done and task.cancelled(), "the cancellation was swallowed: the loop runs on"


async def test_wait_event_times_out_or_sees_the_event():
    event = asyncio.Event()
    assert await wait_event(event, 0.05) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5) is True


async def test_every_runs_a_step_again_after_it_failed_and_stops_when_cancelled():
    from federation.watch import every
    calls = []

    async def step():
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("one bad turn")

    task = asyncio.ensure_future(every(0.01, step, "a test duty"))
    while len(calls) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls[:3] == [0, 1, 2]
