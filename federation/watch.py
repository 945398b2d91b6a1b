"""Small asyncio helpers for following changes: per-key subscriptions and a versioned signal."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class Topics(Generic[T]):
    """Publish values under a key to every current subscriber of that key. Never blocks the publisher."""

    def __init__(self, maxsize: int = 1024):
        self._subs: dict[str, set[asyncio.Queue[T]]] = defaultdict(set)
        self._maxsize = maxsize
        self.taps: list[Callable[[str, T], None]] = []  # see every value published, whatever its key

    def publish(self, key: str, value: T) -> None:
        for tap in self.taps:
            try:
                tap(key, value)
            except Exception:  # an observer (events, accounting) must never stop a change from being published
                logging.getLogger(__name__).exception("a tap on %s failed", key)
        for q in list(self._subs.get(key, ())):
            if q.full():  # a stalled reader loses the oldest update, never the newest
                q.get_nowait()
            q.put_nowait(value)

    def wanted(self, key: str) -> bool:
        """Whether a value published under `key` now would reach anyone: a publisher with a value that is costly
        to build may skip building it."""
        return bool(self.taps) or key in self._subs

    @asynccontextmanager
    async def subscribe(self, key: str) -> AsyncIterator[asyncio.Queue[T]]:
        q: asyncio.Queue[T] = asyncio.Queue(self._maxsize)
        self._subs[key].add(q)
        try:
            yield q
        finally:
            self._subs[key].discard(q)
            if not self._subs[key]:
                del self._subs[key]


class Signal:
    """A change counter that waiters can follow without missing a change."""

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait_past(self, version: int, timeout: float) -> int:
        """Wait until the version moves past `version` or `timeout` passes; return the version now."""
        if self.version <= version:
            await wait_event(self._event, timeout)
        return self.version


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait at most `timeout` seconds for `event`; True if it is set. Not `asyncio.wait_for`: on Python 3.11 that
    swallows a cancellation that arrives as the event is set, and a loop around it then never stops (a daemon's
    stop hung on exactly that). `asyncio.timeout` tells its own timeout from a cancellation."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


async def follow(topics: Topics, key: str, current) -> AsyncIterator:
    """A job now, then each change published under its id, until it is final (for Watch RPCs)."""
    async with topics.subscribe(key) as updates:  # subscribe first: no change is missed
        job = current()
        yield job
        while not job.final:
            job = await updates.get()
            yield job


def stopping() -> bool:
    """Whether the current task is being cancelled. grpc also raises CancelledError in a task whose call it
    cancelled (its channel was closed): a loop that must outlive its calls asks this before giving up."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def stop_tasks(tasks, timeout: float = 5.0) -> None:
    """Wait for cancelled tasks to end, at most `timeout` seconds: a stop is bounded even if a task (or a library
    under it) swallowed its cancellation. Those still running are named in a warning and left behind."""
    tasks = [t for t in tasks if t is not None]
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in done:  # retrieved, so that asyncio does not report them as never retrieved
        if not task.cancelled():
            task.exception()
    if pending:
        logging.getLogger(__name__).warning("%d task(s) did not stop within %g s: %s", len(pending), timeout,
                                            ", ".join(sorted(t.get_name() for t in pending)))


async def bounded(awaitable, timeout: float, what: str) -> bool:
    """Await a step of a stop for at most `timeout` seconds; if it takes longer, say so and go on (a stop that
    hangs helps nobody: systemd would kill the daemon anyway, without the steps after this one). True if done."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([task], timeout=timeout)
    if done:
        task.result()
        return True
    task.cancel()
    logging.getLogger(__name__).warning("%s did not finish within %g s; stopping without it", what, timeout)
    return False


async def every(interval_s: float, step: Callable, what: str) -> None:
    """Run `await step()` now and then every `interval_s` seconds, until cancelled. A step that fails is logged
    and runs again at the next turn: one bad turn does not end a background duty."""
    while True:
        try:
            await step()
        except Exception:  # noqa: BLE001 - logged; the next turn tries again
            logging.getLogger(__name__).exception("%s failed; trying again in %g s", what, interval_s)
        await asyncio.sleep(interval_s)
