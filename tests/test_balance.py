"""Hub-to-hub load balancing through real daemons: a crowded hub hands a waiting job to an idle peer its antenna
allowed; the antenna follows the job there; it runs once, at the peer; a peer that does not answer leaves the job
MOVING (never run here meanwhile, not after a restart either) until it answers; refusals, one hop, the circuit
breaker, and who may call the hub-to-hub RPC."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace

import grpc
import pytest

from federation import convert
from federation.balance import Breaker, Move, Waiting, plan
from federation.config import BalanceConfig, HubEndpoint, PartitionConfig
from federation.identity import Role, parse_identity
from federation.model import JobSpec, JobState
from federation.pb import hub_pb2, hub_pb2_grpc, jobs_pb2
from federation.placement import Candidate, Placer
from federation.rpc import secure_channel
from tests.conftest import FEDERATION, Federation, eventually

ONE_BOOSTER = (PartitionConfig("booster", "A100", 4, 7200),)
HOUR = 3600


def balance(port: int, **kw) -> BalanceConfig:
    settings = dict(enabled=True, threshold_s=60, min_gain_s=60, interval_s=3600,
                    peers=(HubEndpoint("lumi", f"127.0.0.1:{port}"),))
    settings.update(kw)
    return BalanceConfig(**settings)


def operator(site: str):
    return parse_identity(f"spiffe://{FEDERATION}/operator/{site}/olga")


@pytest.fixture
async def crowded(test_pki, tmp_path):
    """lumi (draining at first, so that the antenna places everything on leonardo), leonardo balancing towards
    lumi (rounds run by the test), and antenna-a following both."""
    f = Federation(test_pki, tmp_path)
    try:
        await f.start_hub("lumi", partitions=ONE_BOOSTER)
        f.hubs["lumi"].core.set_drain(operator("lumi"), True, "not yet")
        await f.start_hub("leonardo", partitions=ONE_BOOSTER, balance=balance(f.hubs["lumi"].port))
        await f.start_antenna("antenna-a")
        await f.wait_sites()
        await eventually(lambda: f.antennas["antenna-a"].core.sites["lumi"].advert.draining)
        yield f
    finally:
        await f.close()


async def fill_leonardo(f: Federation, n: int = 3) -> list:
    """`n` jobs of 4 GPUs for up to an hour on leonardo: the first runs, the others wait an hour each."""
    alice = f.client("alice")
    jobs = [await alice.submit(JobSpec(argv=("sh", "-c", "echo ran at $AIFED_SITE; sleep 30"), gpus=4,
                                       walltime_s=HOUR)) for _ in range(n)]
    leonardo = f.hubs["leonardo"].core
    await eventually(lambda: all(leonardo.journal.state(j.id) in (JobState.QUEUED, JobState.RUNNING) for j in jobs))
    assert {(await alice.get(j.id)).site for j in jobs} == {"leonardo"}
    return jobs


async def test_a_waiting_job_moves_to_the_idle_peer_and_the_antenna_follows_it(crowded):
    f = crowded
    jobs = await fill_leonardo(f)
    leonardo, lumi = f.hubs["leonardo"].core, f.hubs["lumi"].core
    # The antenna allowed lumi for these jobs (it passed its filters; a drain is only for now).
    assert leonardo.journal.get(jobs[2].id).alternatives == ("lumi",)
    # lumi draining: nothing moves (it gives no estimate to a balancer while draining).
    assert await leonardo.balancer.round() == []
    lumi.set_drain(operator("lumi"), False)
    await eventually(lambda: not leonardo.balancer.peers["lumi"].advert.draining)

    moves = await leonardo.balancer.round()
    # One job moves (the one that would wait longest); the next would wait as long at lumi behind it.
    assert [(m.job.key, m.peer) for m in moves] == [(jobs[2].id, "lumi")]
    here = leonardo.journal.get(jobs[2].id)
    assert (here.state, here.moved_to) == (JobState.MOVED, "lumi")
    assert [t.state for t in here.history][-2:] == [JobState.MOVING, JobState.MOVED]
    there = lumi.journal.get(jobs[2].id)
    assert (there.moved_from, there.antenna, there.site) == ("leonardo", "antenna-a", "lumi")
    assert there.alternatives == ()  # one hop: lumi never offers it on

    alice = f.client("alice")
    moved = await eventually(lambda: _at(alice, jobs[2].id, "lumi", JobState.RUNNING))
    # The owner sees where it waited, and why it moved.
    assert any(t.state is JobState.MOVING and "moving to hub lumi" in t.reason for t in moved.history)
    assert any(t.reason == "moved here from hub leonardo" for t in moved.history)
    chunks = [c async for c in alice.logs(jobs[2].id)]
    assert b"ran at" in b"".join(c.data for c in chunks)
    # It runs once, at lumi: leonardo's scheduler no longer has it.
    assert jobs[2].id not in dict(await f.hubs["leonardo"].core.backend.waiting())
    assert (await alice.get(jobs[1].id)).site == "leonardo"

    # A cancel sent to the hub the job left (an antenna that has not heard of the move yet) reaches lumi.
    cancelled = await leonardo.cancel(parse_identity(f"spiffe://{FEDERATION}/antenna/antenna-a"), jobs[2].id)
    assert cancelled.site == "lumi"  # lumi's record: the cancel is on its way there (SIGTERM, then CANCELLED)
    await eventually(lambda: _at(alice, jobs[2].id, "lumi", JobState.CANCELLED))
    for job in jobs[:2]:
        await alice.cancel(job.id)


async def test_a_job_with_inputs_moves_with_them(crowded, tmp_path):
    from federation.blobs import describe_inputs
    f = crowded
    alice = f.client("alice")
    data = b"weights " * 100_000
    (tmp_path / "w.bin").write_bytes(data)
    inputs, _ = describe_inputs([("w.bin", tmp_path / "w.bin")])
    assert (await alice.upload(tmp_path / "w.bin", inputs[0].sha256, inputs[0].size)).complete
    jobs = [await alice.submit(JobSpec(argv=("sh", "-c", "sha256sum w.bin; sleep 30"), gpus=4, walltime_s=HOUR,
                                       inputs=inputs)) for _ in range(3)]
    leonardo, lumi = f.hubs["leonardo"].core, f.hubs["lumi"].core
    await eventually(lambda: all(leonardo.journal.state(j.id) in (JobState.QUEUED, JobState.RUNNING) for j in jobs))
    lumi.set_drain(operator("lumi"), False)
    await eventually(lambda: not leonardo.balancer.peers["lumi"].advert.draining)
    moves = await leonardo.balancer.round()
    assert [(m.job.key, m.peer) for m in moves] == [(jobs[2].id, "lumi")]
    # The inputs go first, from leonardo (not from the antenna), in the background; the job waits here for them.
    assert leonardo.journal.state(jobs[2].id) is JobState.QUEUED
    await leonardo.balancer.transfers_done()
    assert lumi.blobs.owns("hub/leonardo", inputs[0].sha256) and not lumi.blobs.owns("antenna-a", inputs[0].sha256)
    # The next round finds them there and moves the job; the job finds them at lumi.
    assert [m.job.key for m in await leonardo.balancer.round()] == [jobs[2].id]
    assert leonardo.journal.state(jobs[2].id) is JobState.MOVED
    await eventually(lambda: _at(alice, jobs[2].id, "lumi", JobState.RUNNING))
    out = await eventually(lambda: _stdout(alice, jobs[2].id))
    assert inputs[0].sha256.encode() in out
    for job in jobs:
        await alice.cancel(job.id)


async def test_a_job_whose_inputs_cannot_reach_the_peer_stays(crowded, tmp_path):
    from federation.blobs import describe_inputs
    f = crowded
    lumi = f.hubs["lumi"].core
    lumi.blobs.quota_bytes = 1000  # too small for the input: lumi refuses the upload
    alice = f.client("alice")
    (tmp_path / "w.bin").write_bytes(b"x" * 50_000)
    inputs, _ = describe_inputs([("w.bin", tmp_path / "w.bin")])
    assert (await alice.upload(tmp_path / "w.bin", inputs[0].sha256, inputs[0].size)).complete
    jobs = [await alice.submit(JobSpec(argv=("sleep", "30"), gpus=4, walltime_s=HOUR, inputs=inputs))
            for _ in range(3)]
    leonardo = f.hubs["leonardo"].core
    await eventually(lambda: all(leonardo.journal.state(j.id) in (JobState.QUEUED, JobState.RUNNING) for j in jobs))
    lumi.set_drain(operator("lumi"), False)
    await eventually(lambda: not leonardo.balancer.peers["lumi"].advert.draining)
    moves = await leonardo.balancer.round()
    assert [m.job.key for m in moves] == [jobs[2].id]  # planned, but its input could not be sent
    await leonardo.balancer.transfers_done()
    registry = leonardo.metrics.registry
    assert registry.get_sample_value("aifed_balance_input_transfers_failed_total", {"peer": "lumi"}) == 1
    await leonardo.balancer.round()  # tried again (and refused again): the job never leaves without its input
    await leonardo.balancer.transfers_done()
    assert registry.get_sample_value("aifed_balance_input_transfers_failed_total", {"peer": "lumi"}) == 2
    assert leonardo.journal.state(jobs[2].id) is JobState.QUEUED  # not withdrawn: it still waits here
    assert not lumi.blobs.owns("hub/leonardo", inputs[0].sha256)
    assert jobs[2].id in dict(await leonardo.backend.waiting())
    assert lumi.journal.get(jobs[2].id) is None
    for job in jobs:
        await alice.cancel(job.id)


async def test_a_long_input_transfer_holds_up_neither_the_round_nor_other_moves(crowded, tmp_path, monkeypatch):
    """A job whose inputs are still on their way to the peer stays here, in line and cancellable; the jobs beside
    it move in the same round; the next round after the transfer moves it."""
    f = crowded
    gate, sending, calls = held_transfers(monkeypatch)
    alice = f.client("alice")
    inputs = await uploaded_input(alice, tmp_path)
    first = await alice.submit(JobSpec(argv=("sleep", "30"), gpus=4, walltime_s=2 * HOUR))  # both wait 2 h here
    with_input = await alice.submit(JobSpec(argv=("sh", "-c", "sha256sum w.bin; sleep 30"), gpus=2,
                                            walltime_s=HOUR, inputs=inputs))
    plain = await alice.submit(JobSpec(argv=("sleep", "30"), gpus=2, walltime_s=HOUR))
    jobs = [first, with_input, plain]
    leonardo, lumi = f.hubs["leonardo"].core, f.hubs["lumi"].core
    await eventually(lambda: all(leonardo.journal.state(j.id) in (JobState.QUEUED, JobState.RUNNING) for j in jobs))
    lumi.set_drain(operator("lumi"), False)
    await eventually(lambda: not leonardo.balancer.peers["lumi"].advert.draining)

    moves = await asyncio.wait_for(leonardo.balancer.round(), 10)  # returns while the input is on its way
    assert sorted(m.job.key for m in moves) == sorted([with_input.id, plain.id])
    await asyncio.wait_for(sending.wait(), 5)
    assert leonardo.journal.state(plain.id) is JobState.MOVED
    assert leonardo.journal.state(with_input.id) is JobState.QUEUED and with_input.id not in leonardo.balancer.handing
    assert with_input.id in dict(await leonardo.backend.waiting())
    assert registry_value(leonardo, "aifed_balance_input_transfers") == 1
    # A round meanwhile does not send it twice, and does not move the job without it.
    await asyncio.wait_for(leonardo.balancer.round(), 10)
    assert leonardo.journal.state(with_input.id) is JobState.QUEUED and calls == [inputs[0].sha256]

    gate.set()
    await leonardo.balancer.transfers_done()
    assert [m.job.key for m in await leonardo.balancer.round()] == [with_input.id]
    assert leonardo.journal.state(with_input.id) is JobState.MOVED
    await eventually(lambda: _at(alice, with_input.id, "lumi", JobState.RUNNING))
    assert inputs[0].sha256.encode() in await eventually(lambda: _stdout(alice, with_input.id))
    for job in jobs:
        await alice.cancel(job.id)


async def test_a_job_waiting_for_its_inputs_takes_no_place_from_other_moves(crowded, tmp_path, monkeypatch):
    """With room for one move per round, the job whose input is on its way does not take that place again in
    the rounds before its input arrives: the job behind it moves meanwhile."""
    f = crowded
    gate, sending, calls = held_transfers(monkeypatch)
    alice = f.client("alice")
    inputs = await uploaded_input(alice, tmp_path)
    first = await alice.submit(JobSpec(argv=("sleep", "30"), gpus=4, walltime_s=2 * HOUR))  # runs
    filler = await alice.submit(JobSpec(argv=("sleep", "30"), gpus=4, walltime_s=2 * HOUR))  # waits 2 h
    plain = await alice.submit(JobSpec(argv=("sleep", "30"), gpus=4, walltime_s=HOUR))  # waits 4 h
    with_input = await alice.submit(JobSpec(argv=("sleep", "30"), gpus=4, walltime_s=HOUR,
                                            inputs=inputs))  # waits 5 h: the first to be offered
    jobs = [first, filler, plain, with_input]
    leonardo, lumi = f.hubs["leonardo"].core, f.hubs["lumi"].core
    leonardo.balancer.settings = replace(leonardo.balancer.settings, max_per_peer=1, gain=0.9)
    await eventually(lambda: all(leonardo.journal.state(j.id) in (JobState.QUEUED, JobState.RUNNING) for j in jobs))
    lumi.set_drain(operator("lumi"), False)
    await eventually(lambda: not leonardo.balancer.peers["lumi"].advert.draining)

    moves = await asyncio.wait_for(leonardo.balancer.round(), 10)  # its one place: the job with the input
    assert [m.job.key for m in moves] == [with_input.id]
    await asyncio.wait_for(sending.wait(), 5)
    assert leonardo.journal.state(with_input.id) is JobState.QUEUED
    moves = await asyncio.wait_for(leonardo.balancer.round(), 10)  # meanwhile, the place goes to the next job
    assert [m.job.key for m in moves] == [plain.id] and leonardo.journal.state(plain.id) is JobState.MOVED
    assert leonardo.journal.state(with_input.id) is JobState.QUEUED and calls == [inputs[0].sha256]

    gate.set()
    await leonardo.balancer.transfers_done()
    assert [m.job.key for m in await leonardo.balancer.round()] == [with_input.id]
    assert leonardo.journal.state(with_input.id) is JobState.MOVED
    for job in jobs:
        await alice.cancel(job.id)


async def test_an_input_transfer_stops_once_no_waiting_job_needs_it(crowded, tmp_path, monkeypatch):
    f = crowded
    held_transfers(monkeypatch)  # never let go: the transfer can only be stopped
    alice = f.client("alice")
    inputs = await uploaded_input(alice, tmp_path)
    jobs = [await alice.submit(JobSpec(argv=("sleep", "30"), gpus=4, walltime_s=HOUR, inputs=inputs))
            for _ in range(3)]
    leonardo, lumi = f.hubs["leonardo"].core, f.hubs["lumi"].core
    await eventually(lambda: all(leonardo.journal.state(j.id) in (JobState.QUEUED, JobState.RUNNING) for j in jobs))
    lumi.set_drain(operator("lumi"), False)
    await eventually(lambda: not leonardo.balancer.peers["lumi"].advert.draining)
    await leonardo.balancer.round()
    [transfer] = leonardo.balancer.transfers.values()
    await alice.cancel(jobs[2].id)  # the job it was for: cancelled at once, while its input is on its way
    await eventually(lambda: leonardo.journal.state(jobs[2].id) is JobState.CANCELLED)
    await leonardo.balancer.round()  # the next job in line wants it there now: it goes on
    await asyncio.sleep(0.1)
    assert not transfer.done() and leonardo.journal.state(jobs[1].id) is JobState.QUEUED
    await alice.cancel(jobs[1].id)  # no job waiting here needs it any more
    await eventually(lambda: leonardo.journal.state(jobs[1].id) is JobState.CANCELLED)
    await leonardo.balancer.round()
    await asyncio.wait_for(leonardo.balancer.transfers_done(), 5)
    assert transfer.cancelled() and not lumi.blobs.owns("hub/leonardo", inputs[0].sha256)
    await alice.cancel(jobs[0].id)


def held_transfers(monkeypatch) -> tuple[asyncio.Event, asyncio.Event, list[str]]:
    """Input transfers to peers held until the test sets the first event (then the real transfer runs); the
    second is set when one begins; the list has the SHA-256 of each one begun."""
    import hub.balance
    gate, sending, calls = asyncio.Event(), asyncio.Event(), []
    real_send = hub.balance.send

    async def held_send(*args, **kw):
        calls.append(args[2])
        sending.set()
        await gate.wait()
        return await real_send(*args, **kw)

    monkeypatch.setattr(hub.balance, "send", held_send)
    return gate, sending, calls


async def uploaded_input(client, tmp_path):
    """A 300 kB input the client uploaded to its antenna; its InputFile descriptions."""
    from federation.blobs import describe_inputs
    (tmp_path / "w.bin").write_bytes(b"w" * 300_000)
    inputs, _ = describe_inputs([("w.bin", tmp_path / "w.bin")])
    assert (await client.upload(tmp_path / "w.bin", inputs[0].sha256, inputs[0].size)).complete
    return inputs


def registry_value(core, name: str) -> float | None:
    return core.metrics.registry.get_sample_value(name, {})


async def _stdout(client, job_id):
    return b"".join([c.data async for c in client.logs(job_id, jobs_pb2.LOG_STREAM_STDOUT)])


async def _at(client, job_id, site, state):
    job = await client.get(job_id)
    return job if (job.site, job.state) == (site, state) else None


async def test_a_peer_that_does_not_answer_leaves_the_job_moving_until_it_does(crowded):
    f = crowded
    jobs = await fill_leonardo(f, 2)
    leonardo = f.hubs["leonardo"].core
    job = leonardo.journal.get(jobs[1].id)
    lumi_port = f.hubs["lumi"].port
    await f.hubs["lumi"].stop(grace=0)
    # The decision was made (lumi looked idle); lumi dies before the hand-off reaches it.
    await leonardo.balancer._move("lumi", [(job, Move(Waiting(job.id, 4, HOUR, HOUR, ("lumi",)), "lumi", 0.0))])
    assert leonardo.journal.get(job.id).state is JobState.MOVING
    assert job.id not in dict(await leonardo.backend.waiting())  # withdrawn: it cannot start here meanwhile
    with pytest.raises(Exception, match="being moved to hub lumi"):
        await leonardo.cancel(parse_identity(f"spiffe://{FEDERATION}/antenna/antenna-a"), job.id)

    # leonardo restarts: the job is still MOVING and is not given back to its scheduler.
    await f.hubs["leonardo"].stop(grace=0)
    await f.start_hub("leonardo", partitions=ONE_BOOSTER, balance=balance(lumi_port))
    leonardo = f.hubs["leonardo"].core
    assert leonardo.journal.get(job.id).state is JobState.MOVING
    assert job.id not in dict(await leonardo.backend.waiting())
    await f.start_hub("lumi", partitions=ONE_BOOSTER)
    f.hubs["lumi"].core.set_drain(operator("lumi"), False)  # its drain was journaled, kept across the restart
    await eventually(lambda: leonardo.balancer.peers["lumi"].fresh)
    await leonardo.balancer.settle_unknown()  # offered again with the same key: lumi takes it
    assert leonardo.journal.get(job.id).state is JobState.MOVED
    alice = f.client("alice")
    await eventually(lambda: _at(alice, job.id, "lumi", JobState.RUNNING))
    # Offered yet again (a lost answer): the same job, not a second copy.
    again = await leonardo.balancer._call_hand_off("lumi", [leonardo.journal.get(job.id)])
    assert again.results[0].duplicate
    assert len([j for j in f.hubs["lumi"].core.journal.list(limit=100) if j.id == job.id]) == 1
    await alice.cancel(job.id)
    await alice.cancel(jobs[0].id)


async def test_a_refused_hand_off_queues_the_job_here_again(crowded):
    f = crowded
    jobs = await fill_leonardo(f, 2)
    leonardo, lumi = f.hubs["leonardo"].core, f.hubs["lumi"].core
    lumi.set_drain(operator("lumi"), True, "still not")  # refuses per job (UNAVAILABLE): a definite no
    job = leonardo.journal.get(jobs[1].id)
    await leonardo.balancer._move("lumi", [(job, Move(Waiting(job.id, 4, HOUR, HOUR, ("lumi",)), "lumi", 0.0))])
    back = leonardo.journal.get(job.id)
    assert back.state is JobState.QUEUED and "did not take it" in back.reason and "draining" in back.reason
    assert job.id in dict(await leonardo.backend.waiting())  # in its scheduler again
    assert lumi.journal.get(job.id) is None
    for j in jobs:
        await f.client("alice").cancel(j.id)


async def test_hand_offs_are_for_peer_hubs_only_and_move_one_hop(crowded, test_pki):
    f = crowded
    jobs = await fill_leonardo(f, 2)
    job = f.hubs["leonardo"].core.journal.get(jobs[1].id)
    lumi = f"127.0.0.1:{f.hubs['lumi'].port}"
    f.hubs["lumi"].core.set_drain(operator("lumi"), False)

    def request(j) -> hub_pb2.ForwardJobsRequest:
        return hub_pb2.ForwardJobsRequest(jobs=[hub_pb2.ForwardJobRequest(idempotency_key=j.id,
                                                                           job=convert.job_to_pb(j))])

    async def call(tls, req):
        async with secure_channel(lumi, tls) as channel:
            return await hub_pb2_grpc.HubStub(channel).HandOffJobs(req, timeout=10)

    for role, site in ((Role.ANTENNA, "antenna-a"), (Role.USER, "antenna-a")):
        tls = test_pki.tls(role, site, "alice" if role is Role.USER else "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(tls, request(job))
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    hub = test_pki.tls(Role.HUB, "leonardo")
    # Content the antenna staged at lumi is the antenna's: a peer handing a job over must send its inputs itself.
    from federation.blobs import Chunk
    from federation.model import InputFile
    content = b"the antenna's upload"
    digest = hashlib.sha256(content).hexdigest()

    async def one_chunk():
        yield Chunk(digest, len(content), 0, content)

    assert (await f.hubs["lumi"].core.blobs.put("antenna-a", one_chunk())).complete
    refused = {
        "not allowed by its antenna": replace(job, alternatives=("somewhere",)),
        "already moved once": replace(job, moved_from="elsewhere"),
        "another antenna's user": replace(job, antenna="antenna-b"),
        "inputs it did not send": replace(job, spec=replace(job.spec, inputs=(
            InputFile("x", digest, len(content)),))),
    }
    for what, bad in refused.items():
        result = (await call(hub, request(bad))).results[0]
        assert result.HasField("error"), what
    codes = [(await call(hub, request(bad))).results[0].error.code for bad in refused.values()]
    assert codes == [grpc.StatusCode.PERMISSION_DENIED.value[0], grpc.StatusCode.FAILED_PRECONDITION.value[0],
                     grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.FAILED_PRECONDITION.value[0]]
    assert "was not staged at hub lumi by hub leonardo" in (await call(hub, request(
        refused["inputs it did not send"]))).results[0].error.message
    assert f.hubs["lumi"].core.journal.get(job.id) is None  # nothing stored
    for j in jobs:
        await f.client("alice").cancel(j.id)


def test_plan_moves_the_longest_waits_first_caps_per_peer_and_counts_what_it_sent():
    settings = BalanceConfig(enabled=True, threshold_s=600, gain=0.5, min_gain_s=300, max_per_peer=2)
    waiting = [Waiting(f"j{i}", 4, HOUR, wait, ("b", "c")) for i, wait in enumerate((300, 7200, 3600, 10800, 5000))]
    idle = {"b": Candidate("b", 0.0, free_gpus=8, total_gpus=8), "c": Candidate("c", 0.0, free_gpus=4, total_gpus=4)}
    moves = plan(waiting, lambda peer, w: idle[peer], settings, Placer(), Breaker(3, 60), now=1000.0, clock=0.0)
    # Longest wait first; each peer at most 2 jobs; the correction for what was sent makes b and c alternate.
    assert [(m.job.key, m.peer) for m in moves] == [("j3", "b"), ("j1", "c"), ("j4", "b")]
    assert moves[2].wait_there_s == HOUR * 4 / 8  # behind the job sent to b just before
    # j0 waits less than the threshold; j2 would gain too little at c (an hour behind j1).

    breaker = Breaker(2, 60)
    breaker.failed("b", now=0.0)
    assert breaker.allows("b", 0.0) == -1
    assert breaker.failed("b", now=0.0)  # the second failure in a row opens it
    only_c = plan(waiting, lambda peer, w: idle[peer], settings, Placer(), breaker, now=1000.0, clock=30.0)
    assert {m.peer for m in only_c} == {"c"}
    assert breaker.allows("b", 61.0) == 1  # half-open after the cool-down: one job may try
    assert not breaker.failed("c", now=0.0)
    breaker.succeeded("b")
    assert breaker.allows("b", 61.0) == -1
