"""Hub-to-hub load balancing in the hub daemon: offer long-waiting jobs to peer hubs and hand them over safely.

The decisions are federation/balance.py's (shared with the simulator). This module does the moving, so that a
job is never lost and never runs twice:

0. the peer holds the job's inputs (sent beforehand in the background, never inside a round: until they are
   there the job stays in line here);
1. the job is withdrawn from this hub's scheduler (`Backend.withdraw`: true only if it had not started, and now
   never will here);
2. it is journaled MOVING, with the peer in `moved_to`;
3. the peer is called (`HandOffJobs`, the job's id as idempotency key, scoped by its antenna there as it would
   be for a forward from that antenna: the job can exist only once at the peer);
4. the answer is journaled: accepted, the job is MOVED here (final here; the antenna follows it to the peer);
   refused, it is QUEUED here again and goes back to the scheduler. An unknown outcome (the peer did not
   answer) leaves it MOVING: it is offered to the same peer again, with the same key, every round, until the
   peer answers; after a restart too. It never goes back to the scheduler while the peer may have it.

A job moves one hop at most (a peer never offers a job handed to it), and only to the hubs its antenna allowed
(`Job.alternatives`), which are the hubs that antenna follows. Cancels of a MOVED job are passed on to the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

import grpc
from prometheus_client import Counter

from federation import convert
from federation.balance import Breaker, Move, Waiting, plan
from federation.blobs import send
from federation.config import HubEndpoint
from federation.discovery import Change, ChangeKind, Discovery, Member
from federation.errors import AifedError, Unavailable, error_from_status
from federation.identity import Identity
from federation.journal import Tx
from federation.model import Job, JobState
from federation.pb import hub_pb2, jobs_pb2
from federation.placement import Candidate, Placer, maintenance_in_the_way, why_not
from federation.sites import HubSite
from federation.timefmt import format_duration
from federation.watch import Signal, stop_tasks, wait_event

log = logging.getLogger(__name__)

HAND_OFF_TIMEOUT_S = 30.0
ESTIMATE_TIMEOUT_S = 3.0
MAX_SHAPES = 64  # per GetAdvert call (the peer's limit)
PEER_LINK_RATE = 100e6  # bytes/s to a peer hub, for the transfer time of a job's inputs, until transfers measure it
LINK_SAMPLE_BYTES = 8 << 20  # a transfer of at least this much measures the link to a peer
TRANSFERS_PER_PEER = 2  # inputs sent to one peer at once; more wait for a slot


class Balancer:
    """Moves this hub's long-waiting jobs to peers. With balancing disabled it only settles the hand-offs left
    unfinished (MOVING jobs, after a restart with a changed configuration)."""

    def __init__(self, core, discovery: Discovery | None = None):
        self.core = core
        self.config = core.config
        self.settings = core.config.balance
        self.discovery = discovery
        self.peers: dict[str, HubSite] = {}
        self.placer = Placer("earliest-start")
        self.breaker = Breaker(self.settings.breaker_failures, self.settings.breaker_cooldown_s)
        self.link_rates: dict[str, float] = {}  # per peer: bytes/s measured by transfers of inputs (moving average)
        self.changed = Signal()
        self.handing: dict[str, asyncio.Event] = {}  # job id -> set when its hand-off call has an answer
        self.transfers: dict[tuple[str, str], asyncio.Task] = {}  # (peer, sha256) -> the input being sent there
        self._wanted: dict[tuple[str, str], set[str]] = {}  # (peer, sha256) -> the jobs waiting for that transfer
        self._sending: dict[str, int] = defaultdict(int)  # per peer: transfers running now, and started so far
        self._started: dict[str, int] = defaultdict(int)
        self._transfer_slots: dict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(TRANSFERS_PER_PEER))
        self._task: asyncio.Task | None = None
        m = core.metrics
        self.moved = Counter("aifed_balance_jobs", "jobs this hub offered to peer hubs, by peer and outcome "
                             "(moved, refused, unknown: the peer did not answer)", ("peer", "outcome"),
                             registry=m.registry)
        m.gauge("aifed_balance_breaker_open", "1 while a peer's circuit breaker keeps jobs away from it", ("peer",),
                lambda: [((p,), float(self.breaker.is_open(p))) for p in self.peers])
        self.transfers_failed = Counter("aifed_balance_input_transfers_failed", "inputs of jobs to move that could "
                                        "not be sent to a peer hub", ("peer",), registry=m.registry)
        m.gauge("aifed_balance_input_transfers", "inputs being sent to a peer hub (or waiting for a slot) for jobs "
                "to move there", (), lambda: [((), float(len(self.transfers)))])
        m.gauge("aifed_balance_moving_jobs", "jobs being handed to a peer hub now", (),
                lambda: [((), float(len(self.handing)))])

    # -- peers -----------------------------------------------------------------------------------------

    def start(self) -> None:
        for peer in self.settings.peers:
            self._add(peer)
        if self.discovery is not None:
            for member in self.discovery.members().values():
                self._membership(Change(ChangeKind.JOIN, member))
            self.discovery.on_change(self._membership)
        self._task = asyncio.create_task(self._run(), name="balance")

    def _add(self, endpoint: HubEndpoint) -> None:
        site = HubSite(endpoint, self.config.tls, self.changed, federation=self.config.federation)
        self.peers[site.site] = site
        site.start()

    def _membership(self, change: Change) -> None:
        member: Member = change.member
        if member.site == self.config.site:
            return
        site = self.peers.get(member.site)
        if change.kind is ChangeKind.LEAVE:
            if site is not None:
                site.leave("left the federation")
        elif site is None:
            self._add(HubEndpoint(member.site, member.endpoint))
        else:
            if not site.member:
                site.rejoin()
            if site.endpoint != member.endpoint:
                site.move(member.endpoint)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await stop_tasks([self._task])
        for task in self.transfers.values():  # a cut transfer resumes where it stopped, next time
            task.cancel()
        await stop_tasks(list(self.transfers.values()))
        for site in self.peers.values():
            await site.close()

    async def renew_channels(self) -> None:
        for site in self.peers.values():
            site.renew_channel(self.config.tls)

    # -- rounds ----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self.settle_unknown()
                if self.settings.enabled:
                    await self.round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("load balancing round failed; trying again in %ds", self.settings.interval_s)
            await asyncio.sleep(self.settings.interval_s)

    async def round(self) -> list[Move]:
        """Offer the jobs that wait too long here to the peers that would start them sooner; the moves made."""
        try:
            return await self._round()
        finally:
            self._drop_unwanted_transfers()

    async def _round(self) -> list[Move]:
        core = self.core
        waits = await core.backend.waiting()
        over = {job_id: wait for job_id, wait in waits if wait > self.settings.threshold_s}
        if not over:
            return []
        # A job whose inputs are on their way to a peer is not planned again until they are there: it would take
        # one of that peer's `max_per_peer` places in every round meanwhile, and move nowhere.
        awaiting = set().union(*self._wanted.values())
        jobs = {job_id: job for job_id, job in core.journal.get_many(list(over)).items()
                if job.state is JobState.QUEUED and not job.moved_from and job.alternatives and not job.spec.site
                and job_id not in self.handing and job_id not in awaiting}
        if not jobs:
            return []
        estimates = await self._estimates(jobs.values())
        waiting = [Waiting(j.id, j.spec.gpus, j.spec.walltime_s, over[j.id], j.alternatives) for j in jobs.values()]
        moves = plan(waiting, lambda peer, w: estimates.get((peer, w.key)), self.settings, self.placer,
                     self.breaker, time.time())
        by_peer: dict[str, list[Move]] = defaultdict(list)
        for move in moves:
            by_peer[move.peer].append(move)
        await asyncio.gather(*(self._move(peer, [(jobs[m.job.key], m) for m in group])
                               for peer, group in by_peer.items()))
        return moves

    async def _estimates(self, jobs) -> dict[tuple[str, str], Candidate]:
        """For each (peer, job) the peer could take now: the peer as a candidate, with its estimate for the
        job's shape (one GetAdvert per peer, for all shapes)."""
        wanted: dict[str, dict[tuple, list[Job]]] = defaultdict(lambda: defaultdict(list))
        for job in jobs:
            for name in job.alternatives:
                site = self.peers.get(name)
                if site is None or not site.fresh or site.advert.draining or self.breaker.is_open(name):
                    continue
                if why_not(job.spec, site.advert, job.country) or \
                        maintenance_in_the_way(site.advert, job.spec.walltime_s):
                    continue
                s = job.spec
                wanted[name][(s.gpus, s.walltime_s, s.partition)].append(job)
        out: dict[tuple[str, str], Candidate] = {}

        async def ask(name: str, shapes: dict[tuple, list[Job]]) -> None:
            site = self.peers[name]
            keys = list(shapes)[:MAX_SHAPES]
            try:
                advert = await site.stub.GetAdvert(hub_pb2.AdvertRequest(shapes=[
                    jobs_pb2.JobShape(gpus=g, walltime_s=w, partition=p) for g, w, p in keys]),
                    timeout=ESTIMATE_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                log.info("peer %s gave no estimates (%s); not offering it jobs this round", name, exc.code().name)
                return
            waits: dict[tuple, float] = {}
            for e in advert.estimates:
                key = (e.shape.gpus, e.shape.walltime_s, e.shape.partition)
                waits[key] = min(waits.get(key, float("inf")), float(e.wait_s))
            total = sum(p.gpus_total for p in advert.partitions)
            free = sum(p.gpus_free for p in advert.partitions)
            pending = sum(p.pending_jobs for p in advert.partitions)
            for key in keys:
                if key not in waits:
                    continue
                for job in shapes[key]:
                    out[(name, job.id)] = Candidate(
                        name, waits[key], free, total, pending,
                        specialised=bool(job.spec.sector) and job.spec.sector in advert.sectors,
                        transfer_s=sum(f.size for f in job.spec.inputs) / self.link_rates.get(name, PEER_LINK_RATE))

        await asyncio.gather(*(ask(name, shapes) for name, shapes in wanted.items()))
        return out

    # -- handing over ------------------------------------------------------------------------------------

    async def _move(self, peer: str, moves: list[tuple[Job, Move]]) -> None:
        """Withdraw the jobs from the scheduler, journal them MOVING, hand them over, journal the answer."""
        planned, marked = [job.id for job, _ in moves], []
        try:
            with self._handing(planned):
                marked = await self._mark_moving(peer, await self._inputs_there(peer, moves))
                if marked:
                    await self._hand_off(peer, marked, {job.id: move.job.wait_s for job, move in moves})
        finally:  # what did not go counts no more against the peer's estimates
            going = {job.id for job in marked}
            self.placer.landed(peer, [job_id for job_id in planned if job_id not in going])

    async def _mark_moving(self, peer: str, moves: list[tuple[Job, Move]]) -> list[Job]:
        """Withdraw the jobs from the scheduler and journal them MOVING; the jobs journaled."""
        core = self.core
        withdrawn: list[tuple[Job, Move]] = []
        try:
            for job, move in moves:
                if await core.backend.withdraw(job.id):
                    withdrawn.append((job, move))
        except BaseException:
            for job, _ in withdrawn:  # not journaled: the jobs stay here
                await core.backend.submit(job)
            raise
        if not withdrawn:
            return []

        def mark(tx: Tx) -> list[Job]:
            out = []
            for job, move in withdrawn:
                current = tx.get(job.id)
                if current is not None and current.state is JobState.QUEUED:
                    moving = current.moved(
                        JobState.MOVING, f"moving to hub {peer}, expected to start it in "
                        f"{format_duration(int(move.wait_there_s))} (here: "
                        f"{format_duration(int(move.job.wait_s))})", moved_to=peer)
                    tx.update(moving)
                    out.append(moving)
            return out

        try:
            marked = await core.journal.commit(mark)
        except BaseException:
            for job, _ in withdrawn:  # not journaled: the jobs stay here
                await core.backend.submit(job)
            raise
        core._publish(marked)
        return marked

    async def _inputs_there(self, peer: str, moves: list[tuple[Job, Move]]) -> list[tuple[Job, Move]]:
        """The moves whose inputs the peer already holds. The inputs it lacks are sent in the background (each
        content once, resumed if a transfer was cut), never in the round: a long transfer must not hold up the
        other moves, the next rounds or a cancel. The jobs waiting for them stay here, in line, until a later
        round finds their inputs there (or they start here first)."""
        site = self.peers[peer]
        needed: dict[str, int] = {}
        for job, _ in moves:
            needed.update((f.sha256, f.size) for f in job.spec.inputs)
        if not needed:
            return moves
        missing = {sha for sha in needed if (peer, sha) in self.transfers}
        asked = [sha for sha in needed if sha not in missing]

        async def held(sha: str) -> bool:
            answer = await site.stub.StatBlob(jobs_pb2.BlobRef(sha256=sha), timeout=ESTIMATE_TIMEOUT_S)
            return answer.complete

        answers = await asyncio.gather(*(held(sha) for sha in asked), return_exceptions=True)
        failed = False
        for sha, answer in zip(asked, answers):
            if answer is True:
                continue
            missing.add(sha)
            if isinstance(answer, BaseException):
                failed = True
                log.info("hub %s did not say whether it holds input %s... (%s); those jobs stay here this round",
                         peer, sha[:12], answer.code().name if isinstance(answer, grpc.aio.AioRpcError) else answer)
            else:
                self._start_transfer(peer, sha, needed[sha])
        if failed:
            self.breaker.failed(peer)
        for job, _ in moves:
            for f in job.spec.inputs:
                if (peer, f.sha256) in self.transfers:
                    self._wanted[(peer, f.sha256)].add(job.id)
        return [(job, move) for job, move in moves if not any(f.sha256 in missing for f in job.spec.inputs)]

    def _start_transfer(self, peer: str, sha: str, size: int) -> None:
        if (peer, sha) not in self.transfers:
            task = asyncio.create_task(self._transfer(peer, sha, size), name=f"inputs to {peer}")
            self.transfers[(peer, sha)] = task
            self._wanted[(peer, sha)] = set()

            def done(_):
                self.transfers.pop((peer, sha), None)
                self._wanted.pop((peer, sha), None)
            task.add_done_callback(done)

    def _drop_unwanted_transfers(self) -> None:
        """Stop sending inputs no job waiting here needs at that peer any more (each ended, started here or
        moved elsewhere): they would hold up the transfers that matter. A cut transfer resumes if needed again."""
        for (peer, sha), task in list(self.transfers.items()):
            if not any(self.core.journal.state(job_id) is JobState.QUEUED
                       for job_id in self._wanted.get((peer, sha), ())):
                log.info("hub %s: stopped sending input %s...: no job waiting here needs it there now", peer,
                         sha[:12])
                task.cancel()

    async def _transfer(self, peer: str, sha: str, size: int) -> None:
        """Send one input to a peer, at most TRANSFERS_PER_PEER at once per peer; measures the link."""
        async with self._transfer_slots[peer]:
            site = self.peers.get(peer)
            if site is None:
                return
            started = time.monotonic()
            self._started[peer] += 1
            self._sending[peer] += 1
            alone, turn = self._sending[peer] == 1, self._started[peer]
            try:
                sent = await send(site, self.core.blobs, sha, size, f"hub {peer}")
            except Exception as exc:
                self.transfers_failed.labels(peer).inc()
                opened = self.breaker.failed(peer)
                known = isinstance(exc, (grpc.aio.AioRpcError, AifedError, OSError))
                log.log(logging.WARNING if known else logging.ERROR, "hub %s: sending input %s... for a hand-off "
                        "failed (%s); the jobs that need it stay here%s", peer, sha[:12],
                        exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc,
                        "; its circuit breaker is open" if opened else "", exc_info=not known)
                return
            finally:
                self._sending[peer] -= 1
            took = time.monotonic() - started
            alone = alone and self._started[peer] == turn  # no other transfer to that peer shared the link
        if alone and sent >= LINK_SAMPLE_BYTES and took > 0:
            old = self.link_rates.get(peer)
            self.link_rates[peer] = sent / took if old is None else 0.7 * old + 0.3 * sent / took
        if sent:
            log.info("hub %s: sent input %s... (%d bytes) for a hand-off; the jobs that need it move at the next "
                     "round", peer, sha[:12], sent)

    async def transfers_done(self) -> None:
        """Wait for the input transfers running now (tests, shutdown)."""
        while self.transfers:
            await asyncio.gather(*list(self.transfers.values()), return_exceptions=True)

    @contextlib.contextmanager
    def _handing(self, job_ids: list[str]):
        """While the block runs, these jobs are being handed over: a cancel waits for the answer."""
        events = {job_id: asyncio.Event() for job_id in job_ids}
        self.handing.update(events)
        try:
            yield
        finally:
            for job_id, event in events.items():
                self.handing.pop(job_id, None)
                event.set()

    async def _hand_off(self, peer: str, jobs: list[Job], wait_here: dict[str, float] | None = None) -> None:
        """One HandOffJobs call for MOVING jobs, and its answer journaled."""
        site = self.peers.get(peer)
        if site is None:
            log.error("jobs %s are being moved to hub %s, which is not a peer of this hub any more: add it back "
                      "to [[balance.peers]] so that the hand-off can be settled", ", ".join(j.id for j in jobs), peer)
            return
        try:
            response = await self._call_hand_off(peer, jobs)
        except grpc.aio.AioRpcError as exc:
            self.moved.labels(peer, "unknown").inc(len(jobs))
            opened = self.breaker.failed(peer)
            log.warning("hub %s did not answer a hand-off of %d job(s) (%s: %s); they stay MOVING and are offered "
                        "to it again%s", peer, len(jobs), exc.code().name, exc.details(),
                        "; its circuit breaker is open" if opened else "")
            return
        results = {r.job_id: r for r in response.results}
        accepted = [j for j in jobs if j.id in results and results[j.id].HasField("accepted")]
        refused = {j.id: results[j.id].error.message if j.id in results else "no answer for this job"
                   for j in jobs if j not in accepted}
        self.placer.landed(peer, list(refused))  # what was refused will not show in its adverts
        for job in accepted:  # gone for good from this hub's scheduler (Slurm: the held job is cancelled)
            await self.core.backend.discard(job.id)
        if accepted:
            self.breaker.succeeded(peer)
            self.moved.labels(peer, "moved").inc(len(accepted))
        if refused:
            self.moved.labels(peer, "refused").inc(len(refused))
            if self.breaker.failed(peer):
                log.warning("hub %s refused hand-offs %d time(s) in a row: its circuit breaker is open for %ds",
                            peer, self.settings.breaker_failures, self.settings.breaker_cooldown_s)

        def settle(tx: Tx) -> list[Job]:
            out = []
            for job in jobs:
                current = tx.get(job.id)
                if current is None or current.state is not JobState.MOVING:
                    continue
                if job.id in refused:
                    job = current.moved(JobState.QUEUED, f"hub {peer} did not take it ({refused[job.id]}); queued "
                                        "here again", moved_to="")
                else:
                    here = f" (here: {format_duration(int(wait_here[job.id]))})" if wait_here else ""
                    job = current.moved(JobState.MOVED, f"moved to hub {peer}, which would start it sooner{here}")
                tx.update(job)
                out.append(job)
            return out

        settled = await self.core.journal.commit(settle)
        self.core._publish(settled)
        for job in settled:  # back in line here, unless a cancel came in since the answer was journaled
            if job.state is JobState.QUEUED and self.core.journal.state(job.id) is JobState.QUEUED:
                await self.core.backend.submit(job)
        for job in settled:
            self.core.audit.record("moved" if job.state is JobState.MOVED else "rejected",
                                   who=self.peers[peer].identity, owner=job.owner, job=job.id, site=peer,
                                   **({"reason": refused[job.id]} if job.id in refused else {}))
        if accepted:
            log.info("moved %d job(s) to hub %s", len(accepted), peer)
        if refused:
            log.info("hub %s refused %d job(s), for example %s: %s; they are queued here again", peer, len(refused),
                     *next(iter(refused.items())))

    async def _call_hand_off(self, peer: str, jobs: list[Job]) -> hub_pb2.ForwardJobsResponse:
        request = hub_pb2.ForwardJobsRequest(jobs=[hub_pb2.ForwardJobRequest(
            idempotency_key=job.id, job=convert.job_to_pb(job)) for job in jobs])
        return await self.peers[peer].stub.HandOffJobs(request, timeout=HAND_OFF_TIMEOUT_S)

    async def settle_unknown(self) -> None:
        """Offer again, with the same keys, the jobs whose hand-off has no answer yet (MOVING, not in a call)."""
        left = [j for j in self.core.journal.list(states=(JobState.MOVING,), limit=10**9) if j.id not in self.handing]
        by_peer: dict[str, list[Job]] = defaultdict(list)
        for job in left:
            by_peer[job.moved_to].append(job)
        for peer, jobs in by_peer.items():
            with self._handing([j.id for j in jobs]):
                await self._hand_off(peer, jobs)

    # -- cancels ---------------------------------------------------------------------------------------

    async def cancel(self, who: Identity, job: Job) -> Job:
        """Cancel a job this hub is handing on or has handed on: here if the peer did not take it, else there."""
        if (event := self.handing.get(job.id)) is not None:
            await wait_event(event, HAND_OFF_TIMEOUT_S + 5)
        job = self.core.journal.get(job.id) or job
        if job.state is JobState.MOVING:
            raise Unavailable(f"job {job.id} is being moved to hub {job.moved_to}, which has not answered yet; "
                              "try the cancel again in a moment")
        if job.state is not JobState.MOVED:
            return await self.core.cancel(who, job.id)
        site = self.peers.get(job.moved_to)
        if site is None:
            raise Unavailable(f"job {job.id} was moved to hub {job.moved_to}, which this hub does not know any more")
        try:
            remote = await site.stub.CancelJob(jobs_pb2.JobRef(job_id=job.id), timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"job {job.id} was moved to hub {job.moved_to}, which did not answer the cancel "
                                  f"({exc.code().name}); try again in a moment") from None
            raise error_from_status(exc.code().value[0], f"hub {job.moved_to}: {exc.details()}") from None
        self.core.audit.record("cancelled", who=who.uri, owner=job.owner, job=job.id, site=job.moved_to)
        return convert.job_from_pb(remote)
