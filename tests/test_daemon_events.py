"""Real hub and antenna daemons publishing to a real, private Mosquitto ([events]): a job's whole life seen by a
separate subscriber, retained capacity and membership, and a broker that goes away while jobs flow."""

from __future__ import annotations

import asyncio
import contextlib

import aiomqtt
import orjson
import pytest

from federation import events
from federation.config import EventsConfig
from federation.model import JobSpec, JobState
from tests.conftest import FEDERATION, eventually, running_federation

pytestmark = pytest.mark.timeout(90)


class Subscriber:
    """An independent MQTT client that records every message under the federation's topics."""

    def __init__(self, endpoint: str, tls=None):
        self.endpoint, self.tls = endpoint, tls
        self.messages: list[tuple[str, dict, bool]] = []
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        host, port = self.endpoint.split(":")
        context = events.tls_context(self.tls) if self.tls else None
        async with aiomqtt.Client(host, int(port), tls_context=context, timeout=5) as client:
            await client.subscribe(f"aifed/{FEDERATION}/#", qos=1)
            self._ready.set()
            async for message in client.messages:
                self.messages.append((str(message.topic), orjson.loads(message.payload), message.retain))

    def states(self, site: str, job_id: str) -> list[str]:
        topic = f"aifed/{FEDERATION}/{site}/jobs/{job_id}/state"
        return [p["state"] for t, p, _ in self.messages if t == topic]

    def last(self, topic_tail: str) -> dict | None:
        topic = f"aifed/{FEDERATION}/{topic_tail}"
        found = [p for t, p, _ in self.messages if t == topic]
        return found[-1] if found else None


def sh(script: str) -> JobSpec:
    return JobSpec(argv=("sh", "-c", script), walltime_s=60)


async def test_a_jobs_whole_life_capacity_and_membership_reach_a_separate_subscriber(test_pki, tmp_path,
                                                                                   mqtt_broker_tls):
    broker = mqtt_broker_tls.endpoint
    on = {"events": EventsConfig(broker, tls=True, buffer=1000)}
    async with Subscriber(broker, test_pki.user("antenna-b", "carol")) as sub:
        async with running_federation(test_pki, tmp_path, {"leonardo": on}, antenna=on) as fed:
            client = fed.client("alice")
            job = await client.submit(sh("echo hi"))
            done = await client.wait(job.id)
            assert done.state is JobState.COMPLETED
            hub_states = ["QUEUED", "RUNNING", "COMPLETED"]
            await eventually(lambda: sub.states("leonardo", job.id) == hub_states, timeout=10)
            await eventually(lambda: sub.states("antenna-a", job.id)[-1:] == ["COMPLETED"], timeout=10)
            seen = sub.states("antenna-a", job.id)
            assert seen[0] == "PENDING" and seen == sorted(seen, key=lambda s: JobState[s].value)
            final = sub.last(f"antenna-a/jobs/{job.id}/state")
            assert final["site"] == "leonardo" and final["antenna"] == "antenna-a" and final["exit_code"] == 0
            capacity = sub.last("leonardo/capacity")
            assert capacity["gpus_total"] == 4 and capacity["partitions"][0]["name"] == "booster"
            up = sub.last("leonardo/membership")
            assert up["state"] == "up" and up["endpoint"] == f"127.0.0.1:{fed.hubs['leonardo'].port}"
            assert sub.last("antenna-a/membership") is None  # antennas are not members
        await eventually(lambda: sub.last("leonardo/membership")["state"] == "down", timeout=10)
        assert sub.last("leonardo/membership")["reason"] == "stopped"
    # Retained for anyone who looks later: the last capacity and that the hub is down.
    async with Subscriber(broker, test_pki.user("antenna-a", "alice")) as late:
        await eventually(lambda: late.last("leonardo/membership") and late.last("leonardo/capacity"), timeout=10)
        assert late.last("leonardo/membership")["state"] == "down"
        assert all(retained for _, _, retained in late.messages)


async def test_a_broker_that_is_down_holds_up_no_job_and_its_drops_are_counted(test_pki, tmp_path, mqtt_broker):
    on = {"events": EventsConfig(mqtt_broker.endpoint, tls=False, buffer=4)}
    async with running_federation(test_pki, tmp_path, {"leonardo": on}) as fed:
        hub = fed.hubs["leonardo"]
        await fed.start_antenna()
        await fed.wait_sites()
        await eventually(lambda: hub.events.connected and hub.events.queued == 0)
        mqtt_broker.stop()
        await eventually(lambda: not hub.events.connected)
        attempts, publish = [], hub.events.publish

        def counting(*args, **kw):
            attempts.append(args[0])
            return publish(*args, **kw)

        hub.events.publish = counting  # count what the hub tries to publish while the broker is away
        client = fed.client("alice")
        jobs = [await client.submit(sh("true")) for _ in range(5)]
        done = [await asyncio.wait_for(client.wait(j.id), 30) for j in jobs]
        assert all(d.state is JobState.COMPLETED for d in done)  # the broker's absence changed nothing
        counted = hub.core.metrics.registry.get_sample_value("aifed_dropped_events_total", {"sink": "events"})
        # 5 jobs x 3 states, plus capacity changes, into a buffer of 4: the rest is dropped, and counted as such.
        assert sum(1 for topic in attempts if topic.startswith("jobs/")) == 15
        assert hub.events.queued == 4 and hub.events.dropped == len(attempts) - 4
        assert counted == hub.events.dropped
        mqtt_broker.start()
        async with Subscriber(mqtt_broker.endpoint) as sub:
            await eventually(lambda: hub.events.connected and hub.events.queued == 0, timeout=20)
            job = await client.submit(sh("true"))
            await client.wait(job.id)
            await eventually(lambda: sub.states("leonardo", job.id) == ["QUEUED", "RUNNING", "COMPLETED"],
                             timeout=10)
            await eventually(lambda: sub.last("leonardo/membership") is not None, timeout=10)
            assert sub.last("leonardo/membership")["state"] == "up"  # retained state is put back after a restart
        assert hub.core.metrics.registry.get_sample_value("aifed_dropped_events_total",
                                                          {"sink": "events"}) == counted


async def test_aifed_events_prints_a_hubs_events(test_pki, tmp_path, mqtt_broker, capsys):
    """The command line: a user follows one site's events (plain MQTT on loopback here)."""
    from federation.cli import main

    on = {"events": EventsConfig(mqtt_broker.endpoint, tls=False)}
    async with running_federation(test_pki, tmp_path, {"leonardo": on}, antenna={}) as fed:
        user = test_pki.user("antenna-a", "alice")
        argv = ["events", "--broker", mqtt_broker.endpoint, "--site", "leonardo", "--no-tls", "--count", "2",
                "--ca", str(user.ca), "--cert", str(user.cert), "--key", str(user.key)]
        # Retained capacity and membership arrive first: two lines, then the command exits 0.
        code = await asyncio.to_thread(main, argv)
        assert code == 0
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 2 and all("leonardo" in line for line in out)
        assert any("leonardo UP 127.0.0.1:" in line for line in out)
        assert any("leonardo capacity 4/4 GPUs free, 0 running, 0 pending" in line for line in out)
        with contextlib.suppress(Exception):
            await fed.client("alice").close()
