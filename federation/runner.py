"""Run a daemon in the foreground: logging, uvloop, signals, and exit codes."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

import orjson

from federation.cli import EXIT_CONFIG, EXIT_UNREACHABLE as EXIT_START
from federation.errors import ConfigError

log = logging.getLogger("aifed")


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
        try:
            await daemon.start()
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("%s failed to start: %s", kind, exc)
            return EXIT_START
        log.info("%s ready", kind)
        await stop.wait()
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
