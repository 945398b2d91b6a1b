"""Federation events on an MQTT broker: job state changes, hub capacity and membership, for dashboards and
`aifed events`. Publishing never blocks or fails a daemon: events go to a bounded buffer that a background task
sends at QoS 1 (at least once), reconnecting with backoff while the broker is away.

Topic tree (payloads are JSON objects; `at` is Unix time in seconds):

    aifed/<federation>/<site>/jobs/<job_id>/state   a job's state changed (not retained)
        {"job": "antenna-a-3f2a9c0d1e2b", "state": "RUNNING", "site": "leonardo", "antenna": "antenna-a",
         "at": 1767225600.5, "reason": "", ...}
    aifed/<federation>/<site>/capacity              a hub's latest capacity summary (retained); the fields are
        {"site": "leonardo", "at": ..., ...}         the caller's, plus site and at
    aifed/<federation>/<site>/membership            the site's membership state (retained)
        {"site": "leonardo", "state": "up" | "down" | "draining", "endpoint": "hub.example:7443", "at": ...}

Every publisher registers an MQTT Last Will on its membership topic: {"site", "state": "down", "endpoint",
"at", "reason": "connection to the broker lost", "last_will": true}, retained. The broker publishes it when the
publisher's connection dies without a clean disconnect (a crash, a kill, a network cut); in it, `at` is when
that connection was opened, not when it died. A clean `close()` does not fire the will: a daemon that stops on
purpose publishes `membership("down")` first.

On every (re)connection the publisher sends its buffered events in order, then re-publishes the latest value of
each retained topic it owns. That puts back "up" after the broker published this publisher's own will for an
earlier connection, and restores retained state a restarted broker forgot. Retained topics carry state: when
events are dropped, their latest value still reaches the broker.

Subscribers: `aifed/<federation>/+/#` is everything in a federation, `aifed/<federation>/<site>/jobs/+/state`
one site's jobs, `aifed/<federation>/+/membership` who is up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import math
import secrets
import ssl
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, TextIO

import aiomqtt
import orjson

from federation.errors import Unavailable
from federation.identity import check_federation_name, check_site_name
from federation.tls import TlsFiles
from federation.watch import wait_event

log = logging.getLogger(__name__)

ROOT = "aifed"
QOS = 1
MEMBERSHIP_STATES = ("up", "down", "draining")
DEFAULT_PORT, DEFAULT_TLS_PORT = 1883, 8883
BACKOFF_START_S, BACKOFF_MAX_S = 0.2, 5.0
IN_FLIGHT = 50  # QoS 1 publishes awaiting their PUBACK at once (one at a time is ~4,000/s on loopback)
KEEPALIVE_S = 30  # the broker fires the will about 1.5 keepalives after a silent network cut
TIMEOUT_S = 10.0  # a CONNACK or PUBACK later than this counts as a lost connection
_FORBIDDEN = frozenset("+#\0")


class EventBrokerUnreachable(Unavailable):
    """The event broker cannot be reached or refused the connection."""


def parse_broker(broker: str, tls: bool = False) -> tuple[str, int]:
    """Split "host:port" ("[::1]:1883" for IPv6); without a port, MQTT's default (1883, or 8883 with TLS)."""
    text = broker.strip()
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        host = ""  # an IPv6 address needs brackets: [::1]:1883
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"event broker {broker!r} is not host:port (e.g. mqtt.example.org:8883)")
    return host, int(port) if port else (DEFAULT_TLS_PORT if tls else DEFAULT_PORT)


def tls_context(tls: TlsFiles, client_certificate: bool = True) -> ssl.SSLContext:
    """A client TLS context that trusts only the federation CA, checks the broker's host name and, unless
    `client_certificate` is False, presents this party's certificate (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_certificate:
        context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


def topic_prefix(federation: str, site: str) -> str:
    check_federation_name(federation)
    check_site_name(site)
    return f"{ROOT}/{federation}/{site}"


def _check_subtopic(subtopic: str) -> str:
    levels = subtopic.split("/")
    if not subtopic or any(not level for level in levels) or _FORBIDDEN & set(subtopic):
        raise ValueError(f"event topic {subtopic!r} is not valid: use non-empty levels separated by '/', "
                         "without '+', '#' or NUL")
    return subtopic


def _check_level(what: str, value: str) -> str:
    if not value or "/" in value or _FORBIDDEN & set(value):
        raise ValueError(f"{what} {value!r} cannot be a topic level: it must be non-empty, without '/', '+', '#'")
    return value


class _PahoLog(logging.LoggerAdapter):
    """paho-mqtt and aiomqtt report every failed connection and socket error; this module logs a lost and a
    returning broker once each, so theirs go to DEBUG (logger federation.events.mqtt)."""

    def log(self, level, msg, *args, **kwargs):
        kwargs.pop("exc_info", None)
        super().log(logging.DEBUG, msg, *args, **kwargs)

    def exception(self, msg, *args, **kwargs):
        self.log(logging.DEBUG, msg, *args, **kwargs)


_paho_log = _PahoLog(logging.getLogger(f"{__name__}.mqtt"), {})


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)  # paths, datetimes are handled by orjson, anything else is shown as text


def encode(payload: dict) -> bytes:
    if not isinstance(payload, dict):
        raise TypeError(f"an event payload is a dict, not {type(payload).__name__}")
    return orjson.dumps(payload, default=_json_default)


def decode(data: bytes | bytearray | str | None) -> dict:
    """An event payload as a dict; anything that is not a JSON object comes back as {"raw": text}."""
    raw = data.encode() if isinstance(data, str) else bytes(data or b"")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"raw": raw.decode("utf-8", errors="replace")}


def _state_name(state: Any) -> Any:
    return state.name if isinstance(state, enum.Enum) else state


@dataclass(frozen=True)
class _Event:
    seq: int
    topic: str
    payload: bytes
    retain: bool


class EventPublisher:
    """Publishes this site's events to an MQTT broker from a bounded buffer, in the background.

    `publish()` and its shortcuts never wait: they return False, and count the event in `dropped`, when the buffer
    is full. `on_drop(n)` is called with the number of events just dropped (for a metrics counter). Call them from
    the event loop's thread. `start()` and `close()` run on that loop; `async with` does both.
    """

    def __init__(self, broker: str, federation: str, site: str, tls: TlsFiles | None = None, buffer: int = 10_000,
                 will: dict | None = None, on_drop: Callable[[int], None] | None = None, *,
                 last_will: bool = True, keepalive: int = KEEPALIVE_S, timeout: float = TIMEOUT_S):
        if buffer < 1:
            raise ValueError(f"the event buffer must hold at least 1 event, not {buffer}")
        self.broker = broker
        self.host, self.port = parse_broker(broker, tls is not None)
        self.federation, self.site = federation, site
        self.prefix = topic_prefix(federation, site)
        self.tls = tls
        if tls is not None:
            tls.read()  # a missing or unreadable file is a configuration error: say so now, not in the log later
        self.buffer_size = buffer
        self.will_fields = dict(will or {})
        self.last_will = last_will
        self.on_drop = on_drop
        self.keepalive, self.timeout = keepalive, timeout
        self.client_id = f"aifed-{site}-{secrets.token_hex(4)}"
        self._buffer: collections.deque[_Event] = collections.deque()
        self._latest: dict[str, tuple[int, bytes]] = {}  # retained topic -> (seq, payload) of its last value
        self._sent: dict[str, int] = {}  # retained topic -> seq of the value the broker has, this connection
        self._seq = itertools.count(1)
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._connected = False
        self._broker_up: bool | None = None  # None until the first attempt: logs say "lost" and "back" once each
        self._dropping = 0  # events dropped since the buffer last had room
        self._published = 0
        self._dropped = 0

    # -- state -------------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def published(self) -> int:
        """Events the broker acknowledged (re-sends of retained state not counted)."""
        return self._published

    @property
    def dropped(self) -> int:
        """Events that will never reach the broker: buffer full, published after `close()`, or unsent at close."""
        return self._dropped

    @property
    def queued(self) -> int:
        """Events in the buffer, including those sent but not yet acknowledged."""
        return len(self._buffer)

    def topic(self, subtopic: str) -> str:
        return f"{self.prefix}/{_check_subtopic(subtopic)}"

    # -- publishing --------------------------------------------------------------------------------------------

    def publish(self, subtopic: str, payload: dict, retain: bool = False) -> bool:
        """Queue an event for `aifed/<federation>/<site>/<subtopic>`; False if it was dropped."""
        topic, data = self.topic(subtopic), encode(payload)
        seq = next(self._seq)
        if retain:
            self._latest[topic] = (seq, data)  # sent even if this event is dropped: it is the current state
        if self._closed or len(self._buffer) >= self.buffer_size:
            self._drop(1, "closed" if self._closed else "full")
            return False
        self._buffer.append(_Event(seq, topic, data, retain))
        self._wake.set()
        return True

    def job_state(self, job_id: str, payload: dict) -> bool:
        """A job's state change: `payload` has "state" (a name or a JobState) and may have "antenna", "reason"..."""
        if "state" not in payload:
            raise ValueError(f"the state event of job {job_id} has no state")
        event = {"job": _check_level("job id", job_id), "site": self.site, "at": time.time(), **payload}
        event["state"] = _state_name(event.get("state"))
        return self.publish(f"jobs/{job_id}/state", event)

    def capacity(self, payload: dict) -> bool:
        """This hub's latest capacity summary (retained)."""
        return self.publish("capacity", {"site": self.site, "at": time.time(), **payload}, retain=True)

    def membership(self, state: str, payload: dict | None = None) -> bool:
        """This site's membership state, "up", "down" or "draining" (retained)."""
        state = str(_state_name(state)).lower()
        if state not in MEMBERSHIP_STATES:
            raise ValueError(f"membership state {state!r} is not one of {', '.join(MEMBERSHIP_STATES)}")
        event = {"site": self.site, **self.will_fields, "at": time.time(), **(payload or {}), "state": state}
        return self.publish("membership", event, retain=True)

    def _drop(self, n: int, why: str) -> None:
        self._dropped += n
        if why == "full" and not self._dropping:
            log.warning("event buffer full (%d events, broker %s %s): dropping new events until it has room",
                        self.buffer_size, self.broker, "connected" if self._connected else "unreachable")
        self._dropping += n if why == "full" else 0
        if self.on_drop is not None:
            try:
                self.on_drop(n)
            except Exception:
                log.exception("event on_drop callback failed")

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> EventPublisher:
        """Start the background sender on the running loop and return at once; the broker may be down."""
        if self._closed:
            raise RuntimeError("this EventPublisher was closed; make a new one")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"events to {self.broker}")
        return self

    async def close(self, timeout: float = 2.0) -> None:
        """Send what the buffer holds for up to `timeout` seconds, disconnect cleanly (the will is not fired), and
        count what is left as dropped. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            _, pending = await asyncio.wait({task}, timeout=timeout)
            for _ in range(3):  # a cancelled task still disconnects; a frozen broker can hold that up too
                if not pending:
                    break
                task.cancel()
                _, pending = await asyncio.wait(pending, timeout=0.5)
            if pending:
                log.warning("event publisher for %s did not stop in time", self.broker)
        if self._buffer:
            log.warning("%d event(s) not delivered to the event broker %s before closing", len(self._buffer),
                        self.broker)
            self._drop(len(self._buffer), "closed")
            self._buffer.clear()
        self._connected = False

    async def __aenter__(self) -> EventPublisher:
        return self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- the background sender ---------------------------------------------------------------------------------

    def _will(self) -> aiomqtt.Will | None:
        if not self.last_will:
            return None
        payload = {"site": self.site, **self.will_fields, "at": time.time(), "state": "down",
                   "reason": "connection to the broker lost", "last_will": True}
        return aiomqtt.Will(self.topic("membership"), encode(payload), qos=QOS, retain=True)

    def _client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(self.host, self.port, identifier=self.client_id, will=self._will(),
                                keepalive=self.keepalive, timeout=self.timeout, max_inflight_messages=IN_FLIGHT,
                                tls_context=tls_context(self.tls) if self.tls else None, logger=_paho_log)
        client.pending_calls_threshold = IN_FLIGHT + 10  # aiomqtt warns above 10 publishes awaiting their PUBACK
        return client

    async def _run(self) -> None:
        delay = BACKOFF_START_S
        while not self._finished():
            try:
                async with self._client() as client:
                    self._connected = True
                    self._up()
                    delay = BACKOFF_START_S
                    await self._session(client)
            except aiomqtt.MqttError as exc:
                self._down(exc)
            except (OSError, ValueError) as exc:  # TLS files unreadable or replaced by a bad set
                self._down(exc)
            except Exception as exc:  # a bug must not end event publishing for the daemon's lifetime
                self._down(exc, unexpected=True)
            finally:
                self._connected = False
            if self._finished():
                break
            if self._stop.is_set():  # closing with events left: keep trying until close() gives up
                await asyncio.sleep(delay)
            else:
                await wait_event(self._stop, delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _finished(self) -> bool:
        return self._stop.is_set() and not self._buffer

    def _up(self) -> None:
        if self._broker_up is False:
            log.info("event broker %s is back: sending %d buffered event(s)%s", self.broker, len(self._buffer),
                     f" ({self._dropping} dropped while it was away)" if self._dropping else "")
        else:
            log.info("connected to the event broker %s", self.broker)
        self._broker_up = True

    def _down(self, exc: BaseException, unexpected: bool = False) -> None:
        if self._stop.is_set() and not unexpected:
            return
        if self._broker_up is False and not unexpected:
            log.debug("event broker %s still unreachable: %s", self.broker, exc)
            return
        what = "lost the event broker" if self._broker_up else "cannot reach the event broker"
        log.warning("%s %s (%s): buffering events (up to %d) and retrying", what, self.broker,
                    str(exc) or type(exc).__name__,
                    self.buffer_size, exc_info=exc if unexpected else None)
        self._broker_up = False

    async def _session(self, client: aiomqtt.Client) -> None:
        """Send until closing (returns) or until the connection fails (raises MqttError)."""
        self._sent = {}
        sender = asyncio.create_task(self._send(client))
        watcher = asyncio.create_task(self._watch(client))
        try:
            done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sender.cancel()
            watcher.cancel()
            await asyncio.gather(sender, watcher, return_exceptions=True)
        if sender in done:
            sender.result()
        else:
            watcher.result()
            raise aiomqtt.MqttError("disconnected")

    async def _watch(self, client: aiomqtt.Client) -> None:
        # Nothing is subscribed: the message iterator only ends, with MqttError, when the connection is lost. A
        # publish would otherwise wait for its PUBACK until the timeout.
        async for _ in client.messages:
            pass

    async def _send(self, client: aiomqtt.Client) -> None:
        while True:
            if self._buffer:
                await self._send_batch(client, list(itertools.islice(self._buffer, IN_FLIGHT)))
                continue
            stale = [(topic, seq, data) for topic, (seq, data) in self._latest.items() if self._sent.get(topic) != seq]
            if stale:
                topic, seq, data = stale[0]
                await client.publish(topic, data, qos=QOS, retain=True)
                self._sent[topic] = seq
                continue
            if self._stop.is_set():
                return
            self._wake.clear()
            await self._wake.wait()

    async def _send_batch(self, client: aiomqtt.Client, batch: list[_Event]) -> None:
        """Publish `batch` (the head of the buffer) and take off the buffer the acknowledged prefix; a failed
        event and those after it stay at the head, to be sent again after reconnecting (at least once)."""
        results = await asyncio.gather(*(client.publish(e.topic, e.payload, qos=QOS, retain=e.retain)
                                         for e in batch), return_exceptions=True)
        for event, result in zip(batch, results):
            if isinstance(result, BaseException):
                raise result
            self._buffer.popleft()
            self._published += 1
            if event.retain:
                self._sent[event.topic] = event.seq
        if self._dropping:
            log.info("event buffer has room again after dropping %d event(s)", self._dropping)
            self._dropping = 0


# -- following events ----------------------------------------------------------------------------------------

async def follow(broker: str, tls: TlsFiles | None, topic_filter: str, *, reconnect: bool = True,
                 timeout: float = TIMEOUT_S) -> AsyncIterator[tuple[str, dict]]:
    """Subscribe to `topic_filter` at QoS 1 and yield (topic, payload) as events arrive, retained ones first.
    Raise EventBrokerUnreachable if the first connection fails; after that, reconnect with backoff unless
    `reconnect` is False. Payloads that are not JSON objects are yielded as {"raw": text}."""
    host, port = parse_broker(broker, tls is not None)
    context = tls_context(tls) if tls else None
    delay, was_connected, lost = BACKOFF_START_S, False, False
    while True:
        try:
            async with aiomqtt.Client(host, port, identifier=f"aifed-follow-{secrets.token_hex(4)}",
                                      tls_context=context, timeout=timeout, keepalive=KEEPALIVE_S,
                                      logger=_paho_log) as client:
                await client.subscribe(topic_filter, qos=QOS)
                if lost:
                    log.info("event broker %s is back", broker)
                was_connected, lost, delay = True, False, BACKOFF_START_S
                async for message in client.messages:
                    yield str(message.topic), decode(message.payload)
        except aiomqtt.MqttError as exc:
            if not was_connected or not reconnect:
                raise EventBrokerUnreachable(f"cannot follow events on {broker}: {exc or 'connection failed'}") \
                    from None
            if not lost:
                log.warning("lost the event broker %s (%s): reconnecting", broker, exc)
            lost = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, BACKOFF_MAX_S)


def _clock(at: Any) -> str:
    t = at if isinstance(at, (int, float)) and not isinstance(at, bool) and math.isfinite(at) else time.time()
    return time.strftime("%H:%M:%S", time.localtime(t))


def _short(job: str, width: int = 24) -> str:
    return job if len(job) <= width else job[:width - 1] + "…"


def _summary(fields: dict, width: int = 160) -> str:
    parts = []
    for key, value in fields.items():
        if isinstance(value, str):
            parts.append(f"{key}={value}")
        else:
            parts.append(f"{key}={orjson.dumps(value, default=_json_default).decode()}")
    text = " ".join(parts)
    return text if len(text) <= width else text[:width - 1] + "…"


def format_event(topic: str, payload: dict) -> str:
    """One line for a terminal, e.g. `12:01:02 leonardo job antenna-a-3f2a9c0d1e2b RUNNING (antenna-a)`."""
    levels = topic.split("/")
    if len(levels) < 4 or levels[0] != ROOT:
        return f"{_clock(None)} {topic} {_summary(payload)}"
    site, rest = levels[2], levels[3:]
    # a will's "at" is when the lost connection was opened: show when it arrived instead
    clock = _clock(None if payload.get("last_will") else payload.get("at"))
    if "raw" in payload and len(payload) == 1:
        return f"{clock} {site} {'/'.join(rest)} {payload['raw']!r}"
    if len(rest) == 3 and rest[0] == "jobs" and rest[2] == "state":
        line = f"{clock} {site} job {_short(rest[1])} {payload.get('state', '?')}"
        if payload.get("antenna"):
            line += f" ({payload['antenna']})"
        return line + (f": {payload['reason']}" if payload.get("reason") else "")
    if rest == ["membership"]:
        line = f"{clock} {site} {str(payload.get('state', '?')).upper()}"
        if payload.get("endpoint"):
            line += f" {payload['endpoint']}"
        return line + (f" ({payload['reason']})" if payload.get("reason") else "")
    if rest == ["capacity"] and "gpus_total" in payload:  # a hub's summary (hub.core.HubCore.summary)
        line = (f"{clock} {site} capacity {payload.get('gpus_free', '?')}/{payload['gpus_total']} GPUs free, "
                f"{payload.get('running_jobs', '?')} running, {payload.get('pending_jobs', '?')} pending")
        return line + (" (draining)" if payload.get("draining") else "")
    fields = {k: v for k, v in payload.items() if k not in ("site", "at")}
    return f"{clock} {site} {'/'.join(rest)} {_summary(fields)}"


async def run_events(broker: str, tls: TlsFiles | None, federation: str, site: str | None = None,
                     json_lines: bool = False, out: TextIO | None = None, count: int | None = None) -> int:
    """Print a federation's events (or one site's) as they arrive, one line each: `format_event` lines, or with
    `json_lines` one {"topic", "payload"} object per line. Runs until cancelled, or until `count` events were
    printed; returns how many were. `out` defaults to sys.stdout."""
    out = out if out is not None else sys.stdout
    topic_filter = f"{topic_prefix(federation, site) if site else f'{ROOT}/{check_federation_name(federation)}/+'}/#"
    printed = 0
    if count is not None and count <= 0:
        return 0
    async with contextlib.aclosing(follow(broker, tls, topic_filter)) as events:
        async for topic, payload in events:
            if json_lines:
                line = orjson.dumps({"topic": topic, "payload": payload}, default=_json_default).decode()
            else:
                line = format_event(topic, payload)
            out.write(line + "\n")
            out.flush()
            printed += 1
            if count is not None and printed >= count:
                break
    return printed
