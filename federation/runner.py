"""Run a daemon in the foreground: logging, uvloop, signals, and exit codes."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time

import orjson

from federation.cli import EXIT_CONFIG, EXIT_UNREACHABLE as EXIT_START
from federation.errors import ConfigError

log = logging.getLogger("aifed")

# Python's cyclic garbage collector runs its youngest generation every 700 net allocations of container objects by
# default. A daemon handling thousands of jobs a second allocates that many in well under a millisecond, and most of
# them are freed by reference counting anyway; with the default, the collector took 9% of the antenna's CPU and 5% of
# the hub's in a batched forwarding run (docs/benchmarks.md). Cyclic garbage waits for at most this many allocations.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    """For a daemon that has started: collect once, keep what exists now (modules, configuration, the daemon's own
    long-lived state) out of every later collection, and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def run_daemon(kind: str, config_path: str, level: str = "info", fmt: str = "human") -> int:
    """Load the config, serve until SIGINT/SIGTERM, stop gracefully. Non-zero exit on any startup failure."""
    setup_logging(level, fmt)
    try:
        if kind == "hub":
            from federation.config import load_hub
            from hub.daemon import HubDaemon
            daemon = HubDaemon(load_hub(config_path))
        else:
            from federation.config import load_antenna
            from antenna.daemon import AntennaDaemon
            daemon = AntennaDaemon(load_antenna(config_path))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return EXIT_CONFIG

    async def serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        starting = asyncio.create_task(daemon.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # a standby hub waits for its turn to lead; a signal ends the wait
            starting.cancel()
            await asyncio.wait((starting,), timeout=10)
            if not starting.done():
                log.warning("%s: giving up waiting for the start to end after 10 s; stopping anyway", kind)
            await daemon.stop(grace=0)
            log.info("%s stopped before it started serving", kind)
            return 0
        try:
            starting.result()
        except (OSError, ValueError, RuntimeError) as exc:
            stopping.cancel()
            log.error("%s failed to start: %s", kind, exc)
            return EXIT_START
        tune_gc()
        log.info("%s ready", kind)
        ended = asyncio.create_task(daemon.ended.wait())
        await asyncio.wait((stopping, ended), return_when=asyncio.FIRST_COMPLETED)
        if daemon.ended.is_set():
            stopping.cancel()
            log.error("%s stopped: %s", kind, daemon.end_reason)
            return EXIT_START
        ended.cancel()
        started = time.monotonic()
        log.info("%s stopping", kind)
        await daemon.stop(grace=5.0)
        log.info("%s stopped in %.1fs", kind, time.monotonic() - started)
        return 0

    try:
        import uvloop
        return uvloop.run(serve())
    except ImportError:
        return asyncio.run(serve())
