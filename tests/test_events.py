"""Federation events on a real, private Mosquitto: what subscribers see, what happens when the broker is down,
frozen or restarted, the last will of a publisher that dies, mutual TLS, and `aifed events` output."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiomqtt
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from federation import events
from federation.events import EventBrokerUnreachable, EventPublisher, format_event, run_events
from federation.identity import Role
from federation.model import JobState
from federation.net import free_port
from tests.conftest import FEDERATION, eventually
from tests.mqtt_broker import MosquittoBroker

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
JOBS = f"aifed/{FEDERATION}/leonardo/jobs/+/state"
MEMBERSHIP = f"aifed/{FEDERATION}/leonardo/membership"
CAPACITY = f"aifed/{FEDERATION}/leonardo/capacity"


@contextlib.asynccontextmanager
async def subscriber(endpoint: str, topic: str, tls=None):
    """An independent aiomqtt client subscribed to `topic` at QoS 1."""
    host, port = endpoint.split(":")
    context = events.tls_context(tls) if tls else None
    async with aiomqtt.Client(host, int(port), tls_context=context, timeout=5) as client:
        await client.subscribe(topic, qos=1)
        yield client


async def take(client: aiomqtt.Client, n: int, timeout: float = 5) -> list[tuple[str, dict, bool]]:
    """The next `n` messages as (topic, payload, retain)."""
    out = []

    async def collect():
        async for message in client.messages:
            out.append((str(message.topic), orjson.loads(message.payload), message.retain))
            if len(out) == n:
                return

    try:
        await asyncio.wait_for(collect(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"got {len(out)} of {n} messages in {timeout} s: {out}") from None
    return out


async def nothing_more(client: aiomqtt.Client, wait: float = 0.3) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        message = await asyncio.wait_for(client.messages.__anext__(), wait)
        raise AssertionError(f"unexpected message on {message.topic}: {message.payload!r}")


class BlockingSubscriber:
    """A paho client that connects and subscribes while blocking the event loop: started right after a broker
    (re)starts, it is subscribed before an EventPublisher on that loop can reconnect and send anything."""

    def __init__(self, endpoint: str, topic: str):
        host, port = endpoint.split(":")
        self.messages: queue.Queue = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        connected, subscribed = threading.Event(), threading.Event()
        self.client.on_connect = lambda *a: connected.set()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, orjson.loads(m.payload)))
        self.client.connect(host, int(port))
        self.client.loop_start()
        if not connected.wait(5):
            raise AssertionError(f"subscriber could not connect to {endpoint}")
        self.client.subscribe(topic, qos=1)
        if not subscribed.wait(5):
            raise AssertionError(f"subscriber could not subscribe on {endpoint}")

    async def take(self, n: int, timeout: float = 10) -> list[tuple[str, dict]]:
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(await asyncio.to_thread(self.messages.get, True, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"got {len(out)} of {n} messages in {timeout} s: {out}") from None
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publisher(broker: str, site: str = "leonardo", **kw) -> EventPublisher:
    return EventPublisher(broker, FEDERATION, site, **kw)


# -- what subscribers see ------------------------------------------------------------------------------------

async def test_a_job_life_arrives_in_order(mqtt_broker):
    async with subscriber(mqtt_broker.endpoint, JOBS) as sub:
        pub = publisher(mqtt_broker.endpoint)
        before = time.time()
        async with pub:  # published before the connection is even up: the buffer holds them
            for state in (JobState.QUEUED, JobState.RUNNING, "COMPLETED"):
                assert pub.job_state("antenna-a-3f2a9c0d1e2b", {"state": state, "antenna": "antenna-a",
                                                                "reason": "exit 0" if state == "COMPLETED" else ""})
            for i, state in enumerate(("QUEUED", "RUNNING", "FAILED")):  # a second job, interleaved with a third
                pub.job_state("antenna-b-000000000001", {"state": state, "antenna": "antenna-b"})
                pub.job_state("antenna-b-000000000002", {"state": state, "antenna": "antenna-b", "n": i})
            got = await take(sub, 9)
            await eventually(lambda: pub.queued == 0, timeout=5)
            assert (pub.published, pub.dropped, pub.connected) == (9, 0, True)
    first = [(t, p) for t, p, _ in got if p["job"] == "antenna-a-3f2a9c0d1e2b"]
    assert [p["state"] for _, p in first] == ["QUEUED", "RUNNING", "COMPLETED"]
    topic, last = first[-1]
    assert topic == f"aifed/{FEDERATION}/leonardo/jobs/antenna-a-3f2a9c0d1e2b/state"
    assert (last["site"], last["antenna"], last["reason"]) == ("leonardo", "antenna-a", "exit 0")
    assert before <= last["at"] <= time.time()
    for job in ("antenna-b-000000000001", "antenna-b-000000000002"):
        assert [p["state"] for _, p, _ in got if p["job"] == job] == ["QUEUED", "RUNNING", "FAILED"]
    assert not any(retained for _, _, retained in got)


async def test_late_subscriber_gets_latest_capacity_and_membership(mqtt_broker):
    async with publisher(mqtt_broker.endpoint, will={"endpoint": "leonardo.example:7443"}) as pub:
        pub.membership("up")
        pub.capacity({"free_gpus": 8, "partitions": {"booster": 8}})
        pub.capacity({"free_gpus": 3, "partitions": {"booster": 3}})
        await eventually(lambda: pub.published == 3, timeout=5)
        async with subscriber(mqtt_broker.endpoint, f"aifed/{FEDERATION}/+/#") as late:
            got = {topic: (payload, retained) for topic, payload, retained in await take(late, 2)}
            await nothing_more(late)
    capacity, retained = got[CAPACITY]
    assert retained and (capacity["free_gpus"], capacity["partitions"], capacity["site"]) == (3, {"booster": 3},
                                                                                                "leonardo")
    membership, retained = got[MEMBERSHIP]
    assert retained and membership["state"] == "up" and membership["endpoint"] == "leonardo.example:7443"


CHILD = r"""
import asyncio, sys
from federation.events import EventPublisher

async def main():
    pub = EventPublisher(sys.argv[1], sys.argv[2], "leonardo", will={"endpoint": "leonardo.example:7443"})
    pub.start()
    pub.membership("up")
    while pub.published < 1:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_last_will_reports_a_killed_publisher_down(mqtt_broker):
    async with subscriber(mqtt_broker.endpoint, MEMBERSHIP) as sub:
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, mqtt_broker.endpoint, FEDERATION,
                                                     cwd=ROOT, stdout=subprocess.PIPE)
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 15)
            assert line == b"ready\n", line
            [(_, up, _)] = await take(sub, 1)
            assert up["state"] == "up"
            child.kill()  # SIGKILL: no DISCONNECT, the kernel just closes the socket
            await child.wait()
            [(_, down, _)] = await take(sub, 1)
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
    assert (down["state"], down["site"], down["endpoint"], down["last_will"]) == \
           ("down", "leonardo", "leonardo.example:7443", True)
    async with subscriber(mqtt_broker.endpoint, MEMBERSHIP) as late:  # and it stays, retained
        [(_, retained, was_retained)] = await take(late, 1)
    assert was_retained and retained["state"] == "down"


async def test_clean_close_does_not_fire_the_will(mqtt_broker):
    async with publisher(mqtt_broker.endpoint) as pub:
        pub.membership("draining")
    assert (pub.published, pub.queued) == (1, 0)
    await asyncio.sleep(0.2)
    async with subscriber(mqtt_broker.endpoint, MEMBERSHIP) as late:
        [(_, membership, _)] = await take(late, 1)
        await nothing_more(late)
    assert membership["state"] == "draining" and "last_will" not in membership


# -- a broker that is down, frozen or restarted --------------------------------------------------------------

async def test_broker_outage_buffers_drops_exactly_and_resends_after_restart(mqtt_broker, caplog):
    caplog.set_level(logging.INFO, logger="federation.events")
    drops: list[int] = []
    pub = publisher(mqtt_broker.endpoint, buffer=10, on_drop=drops.append)
    pub.start()
    try:
        pub.membership("up")
        await eventually(lambda: pub.published == 1, timeout=5)
        mqtt_broker.stop()
        await eventually(lambda: not pub.connected, timeout=5)
        accepted = [pub.job_state(f"antenna-a-{i:012x}", {"state": "QUEUED", "n": i}) for i in range(25)]
        assert accepted == [True] * 10 + [False] * 15
        assert (pub.dropped, sum(drops), pub.queued) == (15, 15, 10)
        await asyncio.sleep(1.0)  # several reconnect attempts fail meanwhile

        mqtt_broker.start()  # blocks the loop, and so does the subscriber: it is there before the publisher is back
        sub = BlockingSubscriber(mqtt_broker.endpoint, JOBS)
        try:
            got = await sub.take(10)
        finally:
            sub.close()
        assert [payload["n"] for _, payload in got] == list(range(10))
        await eventually(lambda: pub.queued == 0, timeout=5)
        assert (pub.published, pub.dropped) == (11, 15)
        # the restarted broker forgot the retained membership: the publisher put it back
        async with subscriber(mqtt_broker.endpoint, MEMBERSHIP) as late:
            [(_, membership, retained)] = await take(late, 1)
        assert retained and membership["state"] == "up"
    finally:
        await pub.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("lost the event broker")]) == 1, messages
    assert len([m for m in messages if "is back" in m]) == 1, messages
    assert len([m for m in messages if m.startswith("event buffer full")]) == 1, messages
    assert not [m for m in messages if m.startswith("cannot reach")], messages


async def test_publish_never_waits_for_an_absent_broker(tmp_path):
    broker = MosquittoBroker(tmp_path / "late", port=free_port())  # not started yet
    pub = publisher(broker.endpoint)
    pub.start()
    try:
        started = time.perf_counter()
        accepted = [pub.job_state(f"antenna-a-{i:012x}", {"state": "RUNNING", "n": i}) for i in range(1000)]
        assert time.perf_counter() - started < 0.5
        assert all(accepted) and (pub.queued, pub.dropped, pub.connected) == (1000, 0, False)
        await asyncio.sleep(0.5)
        assert (pub.queued, pub.published) == (1000, 0)

        broker.start()
        sub = BlockingSubscriber(broker.endpoint, JOBS)
        try:
            got = await sub.take(1000)
        finally:
            sub.close()
        assert [payload["n"] for _, payload in got] == list(range(1000))
        await eventually(lambda: pub.published == 1000, timeout=5)
    finally:
        await pub.close()
        broker.stop()


async def test_publish_never_waits_for_a_frozen_broker(mqtt_broker):
    async with subscriber(mqtt_broker.endpoint, JOBS) as sub:
        async with publisher(mqtt_broker.endpoint) as pub:
            await eventually(lambda: pub.connected, timeout=5)
            mqtt_broker.pause()  # SIGSTOP: the TCP connection stays, nothing is acknowledged
            try:
                started = time.perf_counter()
                for i in range(1000):
                    pub.job_state(f"antenna-a-{i:012x}", {"state": "RUNNING", "n": i})
                assert time.perf_counter() - started < 0.5
                await asyncio.sleep(0.3)
                assert pub.queued > 0 and pub.dropped == 0
            finally:
                mqtt_broker.resume()
            got = await take(sub, 1000, timeout=10)
            await eventually(lambda: pub.queued == 0, timeout=5)
    assert [payload["n"] for _, payload, _ in got] == list(range(1000))
    assert (pub.published, pub.dropped) == (1000, 0)


async def test_events_sent_but_not_acknowledged_are_sent_again(mqtt_broker, caplog):
    caplog.set_level(logging.DEBUG, logger="federation.events")
    pub = publisher(mqtt_broker.endpoint)
    pub.start()
    try:
        await eventually(lambda: pub.connected, timeout=5)
        mqtt_broker.pause()
        for i in range(5):
            pub.job_state(f"antenna-a-{i:012x}", {"state": "RUNNING", "n": i})
        await asyncio.sleep(0.3)  # written to the socket, never acknowledged
        assert (pub.queued, pub.published) == (5, 0)
        mqtt_broker.kill()  # dies frozen: what it had received is gone
        await eventually(lambda: not pub.connected, timeout=5)
        mqtt_broker.start()
        sub = BlockingSubscriber(mqtt_broker.endpoint, JOBS)
        try:
            got = await sub.take(5)
        finally:
            sub.close()
        assert [payload["n"] for _, payload in got] == list(range(5))
        await eventually(lambda: pub.published == 5, timeout=5)
    finally:
        await pub.close()
    noisy = [r for r in caplog.records if r.name.startswith("federation.events.mqtt") and r.levelno > logging.DEBUG]
    assert not noisy, [r.getMessage() for r in noisy]


async def test_close_with_a_frozen_broker_is_bounded(mqtt_broker):
    pub = publisher(mqtt_broker.endpoint)
    pub.start()
    await eventually(lambda: pub.connected, timeout=5)
    mqtt_broker.pause()
    try:
        pub.job_state("antenna-a-000000000001", {"state": "RUNNING"})
        started = time.monotonic()
        await pub.close(timeout=0.5)
        assert time.monotonic() - started < 3
        assert (pub.dropped, pub.queued, pub.connected) == (1, 0, False)
    finally:
        mqtt_broker.resume()


async def test_close_with_the_broker_down_is_bounded_and_counts_what_is_lost(tmp_path):
    pub = publisher(f"127.0.0.1:{free_port()}", buffer=100)
    pub.start()
    for i in range(5):
        pub.job_state(f"j{i}", {"state": "QUEUED"})
    started = time.monotonic()
    await pub.close(timeout=0.5)
    assert time.monotonic() - started < 2
    assert (pub.dropped, pub.queued) == (5, 0)
    assert pub.job_state("late", {"state": "QUEUED"}) is False and pub.dropped == 6
    await pub.close()  # twice is fine


# -- mutual TLS ----------------------------------------------------------------------------------------------

async def test_mutual_tls_broker(mqtt_broker_tls, test_pki):
    antenna = test_pki.tls(Role.ANTENNA, "antenna-a")
    async with subscriber(mqtt_broker_tls.endpoint, JOBS, tls=antenna) as sub:
        async with publisher(mqtt_broker_tls.endpoint, tls=test_pki.tls(Role.HUB, "leonardo")) as pub:
            pub.job_state("antenna-a-000000000001", {"state": "RUNNING", "antenna": "antenna-a"})
            [(_, event, _)] = await take(sub, 1)
            assert pub.connected
    assert event["state"] == "RUNNING"

    host, port = mqtt_broker_tls.endpoint.split(":")
    no_cert = events.tls_context(antenna, client_certificate=False)
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(host, int(port), tls_context=no_cert, timeout=1):
            pass
    await eventually(lambda: "peer did not return a certificate" in mqtt_broker_tls.log.read_text(), timeout=5)

    foreign = events.tls_context(test_pki.tls(Role.HUB, "leonardo"))  # trusts our CA, presents a foreign cert
    other_cert = test_pki.other_ca_root / "hubs"
    foreign.load_cert_chain(str(other_cert / "leonardo.pem"), str(other_cert / "leonardo.key"))
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(host, int(port), tls_context=foreign, timeout=1):
            pass
    await eventually(lambda: "certificate verify failed" in mqtt_broker_tls.log.read_text(), timeout=5)

    with pytest.raises(EventBrokerUnreachable, match="cannot follow events"):
        async for _ in events.follow(mqtt_broker_tls.endpoint, None, "#", timeout=1):
            pass


# -- following and printing ----------------------------------------------------------------------------------

async def test_run_events_prints_one_line_per_event(mqtt_broker):
    at = 1767225600.0
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    lines = io.StringIO()
    async with publisher(mqtt_broker.endpoint, will={"endpoint": "leonardo.example:7443"}) as pub, \
            publisher(mqtt_broker.endpoint, site="lumi") as other:
        pub.membership("up", {"at": at})
        pub.capacity({"at": at, "free_gpus": 3})
        other.membership("up")  # another site: not printed with site="leonardo"
        await eventually(lambda: pub.published == 2 and other.published == 1, timeout=5)
        task = asyncio.create_task(run_events(mqtt_broker.endpoint, None, FEDERATION, site="leonardo", out=lines,
                                              count=3))
        await eventually(lambda: lines.getvalue().count("\n") == 2, timeout=5)  # the retained ones: subscribed
        pub.job_state("antenna-a-3f2a9c0d1e2b", {"state": JobState.RUNNING, "antenna": "antenna-a", "at": at})
        assert await asyncio.wait_for(task, 5) == 3
    printed = lines.getvalue().splitlines()
    assert sorted(printed[:2]) == sorted([f"{clock} leonardo UP leonardo.example:7443",
                                          f"{clock} leonardo capacity free_gpus=3"])
    assert printed[2] == f"{clock} leonardo job antenna-a-3f2a9c0d1e2b RUNNING (antenna-a)"

    json_lines = io.StringIO()
    assert await asyncio.wait_for(run_events(mqtt_broker.endpoint, None, FEDERATION, json_lines=True,
                                             out=json_lines, count=3), 5) == 3
    got = {(e["topic"], e["payload"]["state"]) for e in map(orjson.loads, json_lines.getvalue().splitlines())
           if e["topic"].endswith("membership")}
    assert got == {(MEMBERSHIP, "up"), (f"aifed/{FEDERATION}/lumi/membership", "up")}


async def test_follow_yields_undecodable_payloads_as_raw(mqtt_broker):
    host, port = mqtt_broker.endpoint.split(":")
    async with aiomqtt.Client(host, int(port)) as client:
        await client.publish(CAPACITY, b"\xffnot json", qos=1, retain=True)
        await client.publish(MEMBERSHIP, b"[1, 2]", qos=1, retain=True)
    seen = {}
    async with contextlib.aclosing(events.follow(mqtt_broker.endpoint, None, f"aifed/{FEDERATION}/#")) as follow:
        async for topic, payload in follow:
            seen[topic] = payload
            if len(seen) == 2:
                break
    assert seen == {CAPACITY: {"raw": "\ufffdnot json"}, MEMBERSHIP: {"raw": "[1, 2]"}}
    assert format_event(CAPACITY, seen[CAPACITY]).endswith(" leonardo capacity '\ufffdnot json'")


async def test_following_an_unreachable_broker_fails_clearly():
    endpoint = f"127.0.0.1:{free_port()}"
    with pytest.raises(EventBrokerUnreachable, match=f"cannot follow events on {endpoint}"):
        await asyncio.wait_for(run_events(endpoint, None, FEDERATION, out=io.StringIO(), count=1), 5)


def test_format_event_lines():
    at = 1767225600.0
    clock = time.strftime("%H:%M:%S", time.localtime(at))
    job = f"aifed/{FEDERATION}/lumi/jobs/antenna-b-00000000000a/state"
    assert format_event(job, {"state": "FAILED", "antenna": "antenna-b", "reason": "exit code 2", "at": at}) == \
        f"{clock} lumi job antenna-b-00000000000a FAILED (antenna-b): exit code 2"
    long_id = "x" * 40
    assert f" job {'x' * 23}… QUEUED" in format_event(f"aifed/{FEDERATION}/lumi/jobs/{long_id}/state",
                                                      {"state": "QUEUED", "at": at})
    will = format_event(MEMBERSHIP, {"state": "down", "endpoint": "h:1", "at": 0, "reason": "connection to the "
                                     "broker lost", "last_will": True})
    assert will.endswith(" leonardo DOWN h:1 (connection to the broker lost)") and not will.startswith(time.strftime("%H:%M:%S", time.localtime(0)))
    assert format_event(f"aifed/{FEDERATION}/lumi/custom/thing", {"at": at, "site": "lumi", "x": [1, 2]}) == \
        f"{clock} lumi custom/thing x=[1,2]"
    assert "elsewhere/topic" in format_event("elsewhere/topic", {"a": 1})


def test_bad_names_and_values_are_refused():
    for broker in ("", "host:notaport", "host:0", "host:70000", "a:b:c"):
        with pytest.raises(ValueError, match="host:port"):
            publisher(broker)
    assert events.parse_broker("[::1]:1884") == ("::1", 1884)
    assert events.parse_broker("mqtt.example.org") == ("mqtt.example.org", 1883)
    pub = publisher("127.0.0.1:1883")
    with pytest.raises(ValueError, match="membership state"):
        pub.membership("gone")
    with pytest.raises(ValueError, match="topic level"):
        pub.job_state("a/b", {"state": "QUEUED"})
    with pytest.raises(ValueError, match="no state"):
        pub.job_state("a", {})
    for subtopic in ("a/#", "+", "a//b", "/a", ""):
        with pytest.raises(ValueError, match="event topic"):
            pub.publish(subtopic, {})
    with pytest.raises(ValueError, match="site name"):
        publisher("127.0.0.1:1883", site="Leonardo/x")
    with pytest.raises(FileNotFoundError):
        publisher("127.0.0.1:1883", tls=events.TlsFiles(Path("/nonexistent/ca.pem"), Path("c"), Path("k")))
