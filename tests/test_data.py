"""Data staging, inputs: content-addressed uploads (resumable, checked), staging to the hub, the job's working
directory, and every way a name or an upload can be wrong. Through real daemons, and through a real Slurm."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import os
import time
from pathlib import Path

import grpc
import pytest
from hypothesis import given, strategies as st

from federation.blobs import (CHUNK_BYTES, BlobStore, Chunk, blob_chunks, collect_inputs, describe_inputs,
                              put_blob)
from federation.cli import main
from federation.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from federation.identity import Role
from federation.model import InputFile, JobSpec, JobState
from federation.pb import hub_pb2_grpc, jobs_pb2
from federation.rpc import secure_channel


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def chunks(*items: Chunk):
    for item in items:
        yield item


# -- the store ------------------------------------------------------------------------------------------------

async def test_an_interrupted_upload_resumes_where_it_stopped_and_is_checked(tmp_path):
    store = BlobStore(tmp_path)
    data = os.urandom(3 << 20)
    h = sha(data)
    first = await store.put("alice", chunks(Chunk(h, len(data), 0, data[:1 << 20])))
    assert (first.held, first.complete) == (1 << 20, False)
    assert not store.path(h).exists()  # nothing partial is visible as content
    assert store.stat("alice", h).held == 1 << 20
    rest = await store.put("alice", chunks(Chunk(h, len(data), 1 << 20, data[1 << 20:2 << 20]),
                                           Chunk("", 0, 2 << 20, data[2 << 20:])))
    assert rest.complete and store.path(h).read_bytes() == data
    assert store.stat("alice", h).complete


async def test_a_resume_at_the_wrong_offset_is_refused_and_says_where_to_resume(tmp_path):
    store = BlobStore(tmp_path)
    data = b"x" * 1000
    await store.put("alice", chunks(Chunk(sha(data), 1000, 0, data[:400])))
    with pytest.raises(FailedPrecondition, match="stands at byte 400, not 600"):
        await store.put("alice", chunks(Chunk(sha(data), 1000, 600, data[600:])))
    assert store.stat("alice", sha(data)).held == 400


async def test_a_checksum_mismatch_keeps_nothing(tmp_path):
    store = BlobStore(tmp_path)
    claimed = sha(b"the real thing")
    with pytest.raises(InvalidArgument, match="checksum mismatch"):
        await store.put("alice", chunks(Chunk(claimed, 14, 0, b"something else")))
    assert not store.path(claimed).exists() and store.stat("alice", claimed).held == 0
    assert not list((tmp_path / "partial").iterdir())


async def test_more_bytes_than_announced_and_oversized_uploads_are_refused(tmp_path):
    store = BlobStore(tmp_path, max_blob_bytes=100)
    with pytest.raises(InvalidArgument, match="more than the 3 bytes"):
        await store.put("alice", chunks(Chunk(sha(b"abc"), 3, 0, b"abcd")))
    with pytest.raises(ResourceExhausted, match="at most 100 bytes"):
        await store.put("alice", chunks(Chunk(sha(b"a"), 101, 0, b"a")))
    with pytest.raises(InvalidArgument, match="not a SHA-256"):
        await store.put("alice", chunks(Chunk("../../etc/passwd", 1, 0, b"a")))
    with pytest.raises(InvalidArgument, match="the upload is empty"):
        await store.put("alice", chunks())


async def test_nobody_learns_or_uses_content_another_uploaded(tmp_path):
    store = BlobStore(tmp_path)
    data = b"health records"
    assert (await store.put("alice", chunks(Chunk(sha(data), len(data), 0, data)))).complete
    assert store.stat("carol", sha(data)).held == 0 and not store.stat("carol", sha(data)).complete
    assert store.missing("carol", [InputFile("x", sha(data), len(data))])
    assert not store.missing("alice", [InputFile("x", sha(data), len(data))])
    # Carol may use it once she proved she has it, by uploading it; it is stored once.
    assert (await store.put("carol", chunks(Chunk(sha(data), len(data), 0, data)))).complete
    assert not store.missing("carol", [InputFile("x", sha(data), len(data))])
    assert len(list((tmp_path / "sha256").iterdir())) == 1


async def test_staging_copies_inputs_into_the_folder_and_a_job_cannot_change_the_stored_content(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    data = b"weights"
    await store.put("a", chunks(Chunk(sha(data), len(data), 0, data)))
    job = tmp_path / "job"
    job.mkdir()
    store.stage([InputFile("model/w.bin", sha(data), len(data))], job)
    (job / "model" / "w.bin").write_bytes(b"changed by the job")
    assert store.path(sha(data)).read_bytes() == data


def test_a_symbolic_link_in_the_folder_cannot_send_staging_outside(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    job, outside = tmp_path / "job", tmp_path / "outside"
    job.mkdir()
    outside.mkdir()
    (job / "data").symlink_to(outside)
    with pytest.raises(InvalidArgument, match="outside the job's working directory"):
        store.stage([InputFile("data/x", "0" * 64, 1)], job)
    assert not list(outside.iterdir())


@pytest.mark.parametrize("name,why", [
    ("../etc/passwd", "no '..'"), ("a/../../b", "no '..'"), ("/etc/passwd", "absolute path"), ("a//b", "plain"),
    ("./a", "plain"), ("a\x00b", "control character"), ("a\\..\\b", "backslash"), ("", "1 to 1024"),
    ("stdout", "aifed keeps"), ("exit", "aifed keeps"), ("x" * 256, "longer than 255"),
])
def test_bad_input_names_are_refused_with_the_reason(name, why):
    spec = JobSpec(argv=("true",), inputs=(InputFile(name, "0" * 64, 1),))
    with pytest.raises(InvalidArgument, match=why):
        spec.validate()


def test_inputs_that_collide_or_are_not_content_are_refused():
    ok = "0" * 64
    with pytest.raises(InvalidArgument, match="given twice"):
        JobSpec(argv=("true",), inputs=(InputFile("a", ok, 1), InputFile("a", ok, 1))).validate()
    with pytest.raises(InvalidArgument, match="is a file, and also a folder"):
        JobSpec(argv=("true",), inputs=(InputFile("a", ok, 1), InputFile("a/b", ok, 1))).validate()
    with pytest.raises(InvalidArgument, match="64 lower-case hex"):
        JobSpec(argv=("true",), inputs=(InputFile("a", "ABC", 1),)).validate()


def test_collecting_a_folder_names_files_under_it_and_refuses_links_out(tmp_path):
    top = tmp_path / "dataset"
    (top / "train").mkdir(parents=True)
    (top / "train" / "a.csv").write_text("1,2\n")
    (top / "README").write_text("hi")
    (top / "again").symlink_to(top / "README")  # inside: followed
    names = sorted(name for name, _ in collect_inputs([top]))
    assert names == ["dataset/README", "dataset/again", "dataset/train/a.csv"]
    (tmp_path / "secret").write_text("x")
    (top / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(InvalidArgument, match="symbolic link out of"):
        collect_inputs([top])
    with pytest.raises(InvalidArgument, match="does not exist"):
        collect_inputs([tmp_path / "nope"])
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        collect_inputs([tmp_path / "pipe"])


# -- through the daemons ------------------------------------------------------------------------------------------

def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


async def _upload_and_submit(client, files: dict[str, Path], script: str, **kw):
    inputs, sources = describe_inputs(list(files.items()))
    for h, local in sources.items():
        info = await client.upload(local, h, local.stat().st_size)
        assert info.complete
    return await client.submit(JobSpec(argv=("sh", "-c", script), walltime_s=120, inputs=inputs, **kw))


async def test_inputs_reach_the_job_through_antenna_and_hub(fed, tmp_path):
    client = fed.client("alice")
    data = os.urandom(2_500_000)  # three upload messages
    files = {"data/blob.bin": _write(tmp_path / "blob.bin", data),
             "config.txt": _write(tmp_path / "c.txt", b"lr=0.1\n")}
    job = await _upload_and_submit(client, files, "sha256sum data/blob.bin; cat config.txt")
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED, done
    out = b"".join([c.data async for c in client.logs(job.id, jobs_pb2.LOG_STREAM_STDOUT)]).decode()
    assert sha(data) in out and "lr=0.1" in out
    hub = fed.hubs[done.site].core
    assert hub.blobs.owns("antenna-a", sha(data))  # staged at the hub, once
    assert fed.antennas["antenna-a"].core.metrics.staged_bytes.labels(done.site)._value.get() >= len(data)


async def test_an_array_s_shared_input_travels_to_the_hub_once(fed, tmp_path):
    client = fed.client("alice")
    shared = _write(tmp_path / "shared.txt", b"same for every task\n")
    inputs, _ = describe_inputs([("shared.txt", shared)])
    await client.upload(shared, inputs[0].sha256, inputs[0].size)
    results = await client.submit_many([(JobSpec(argv=("cat", "shared.txt"), walltime_s=60, site="leonardo",
                                                 inputs=inputs), "", "0-5")])
    for r in results:
        assert (await client.wait(r.id)).state is JobState.COMPLETED
    staged = fed.antennas["antenna-a"].core.metrics.staged_bytes.labels("leonardo")._value.get()
    assert staged == inputs[0].size


async def test_a_job_whose_inputs_were_not_uploaded_is_refused_and_nothing_is_stored(fed, tmp_path):
    client = fed.client("alice")
    spec = JobSpec(argv=("true",), inputs=(InputFile("x", sha(b"never sent"), 10),))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.submit(spec)
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "has not been uploaded to antenna antenna-a by you" in refused.value.details()
    assert await client.list() == []
    # Bob's upload does not let Alice use the content.
    bob = fed.client("bob")
    path = _write(tmp_path / "b", b"bob's data")
    await bob.upload(path, sha(b"bob's data"), 10)
    with pytest.raises(grpc.aio.AioRpcError, match="has not been uploaded"):
        await client.submit(JobSpec(argv=("true",), inputs=(InputFile("x", sha(b"bob's data"), 10),)))
    assert (await client.stub.StatBlob(jobs_pb2.BlobRef(sha256=sha(b"bob's data")))).held == 0


async def forward_one(fed, test_pki, spec: jobs_pb2.JobSpec, job_id: str = "antenna-a-0123abcd"):
    """antenna-a forwards one job of alice's straight to hub leonardo; the error it gets back (empty if none)."""
    from federation.pb import hub_pb2
    async with secure_channel(f"127.0.0.1:{fed.hubs['leonardo'].port}", test_pki.tls(Role.ANTENNA, "antenna-a")) \
            as ch:
        answer = await hub_pb2_grpc.HubStub(ch).ForwardJobs(hub_pb2.ForwardJobsRequest(jobs=[
            hub_pb2.ForwardJobRequest(idempotency_key="k", job=jobs_pb2.Job(
                id=job_id, owner="spiffe://eurohpc.test/user/antenna-a/alice", state=1, spec=spec))]))
    return answer.results[0].error


async def test_a_hub_refuses_a_job_whose_inputs_were_not_staged(fed, test_pki):
    error = await forward_one(fed, test_pki, jobs_pb2.JobSpec(argv=["true"], inputs=[
        jobs_pb2.InputFile(name="x", sha256="0" * 64, size=1)]))
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "was not staged at hub leonardo" in \
        error.message
    assert fed.hubs["leonardo"].core.journal.get("antenna-a-0123abcd") is None


async def test_an_interrupted_upload_through_the_antenna_resumes(fed, tmp_path):
    client = fed.client("alice")
    data = os.urandom(3 * CHUNK_BYTES)
    path = _write(tmp_path / "big", data)
    h = sha(data)

    async def first_two_chunks():
        n = 0
        async for msg in blob_chunks(path, h, len(data)):
            yield msg
            n += 1
            if n == 2:
                return  # the client goes away after 2 chunks

    partial = await put_blob(client.channel, "aifed.v1.Antenna")(first_two_chunks())
    assert (partial.held, partial.complete) == (2 * CHUNK_BYTES, False)
    held = await client.stub.StatBlob(jobs_pb2.BlobRef(sha256=h))
    assert held.held == 2 * CHUNK_BYTES
    done = await client.upload(path, h, len(data))  # sends the last chunk only
    assert done.complete and done.held == len(data)
    assert fed.antennas["antenna-a"].core.blobs.path(h).read_bytes() == data
    # Each byte counted once, although the upload came in two calls.
    assert fed.antennas["antenna-a"].core.metrics.uploaded_bytes._value.get() == len(data)


async def test_cli_submit_with_input_files_and_a_folder(fed, tmp_path):
    folder = tmp_path / "dataset"
    _write(folder / "a.txt", b"alpha\n")
    _write(folder / "sub" / "b.txt", b"beta\n")
    single = _write(tmp_path / "notes.md", b"# notes\n")
    out = await _cli(fed, "submit", "--wait", "--input", str(folder), "-i", str(single), "--",
                     "sh", "-c", "cat dataset/a.txt dataset/sub/b.txt notes.md")
    assert "COMPLETED" in out
    job_id = out.split("Job ")[1].split()[0] if "Job " in out else None
    client = fed.client("alice")
    jobs = await client.list()
    logs = b"".join([c.data async for c in client.logs(jobs[0].id, jobs_pb2.LOG_STREAM_STDOUT)])
    assert logs == b"alpha\nbeta\n# notes\n", (job_id, logs)


async def test_cli_refuses_a_link_out_of_an_input_folder_before_sending_anything(fed, tmp_path):
    folder = tmp_path / "dataset"
    _write(folder / "a.txt", b"alpha\n")
    (folder / "escape").symlink_to("/etc/passwd")
    code, err = await _cli_code(fed, "submit", "--input", str(folder), "--", "true")
    assert code != 0 and "symbolic link out of" in err
    assert await fed.client("alice").list() == []
    assert not list((fed.antennas["antenna-a"].core.blobs.root / "sha256").iterdir())


async def _cli_code(fed, *args: str) -> tuple[int, str]:
    tls = fed.test_pki.user("antenna-a", "alice")
    argv = [*args[:1], "--antenna", f"127.0.0.1:{fed.antennas['antenna-a'].port}", "--ca", str(tls.ca),
            "--cert", str(tls.cert), "--key", str(tls.key), *args[1:]]
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(argv)

    code = await asyncio.to_thread(run)
    return code, out.getvalue() + err.getvalue()


async def _cli(fed, *args: str) -> str:
    code, text = await _cli_code(fed, *args)
    assert code == 0, text
    return text


# -- through a real Slurm ---------------------------------------------------------------------------------------

async def test_inputs_reach_a_slurm_job(slurm_fed, tmp_path):
    client = slurm_fed.client("alice")
    data = os.urandom(1_200_000)
    job = await _upload_and_submit(client, {"in/data.bin": _write(tmp_path / "d", data)},
                                   "sha256sum in/data.bin; pwd")
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED, done
    out = b"".join([c.data async for c in client.logs(job.id, jobs_pb2.LOG_STREAM_STDOUT)]).decode()
    assert sha(data) in out


# -- data residency and transfer time in placement ----------------------------------------------------------------

async def test_data_residency_keeps_a_job_in_the_countries_or_sites_its_inputs_are_bound_to(test_pki, tmp_path):
    from tests.conftest import running_federation
    hubs = {"leonardo": {"location": "IT"}, "lumi": {"location": "FI"}}
    async with running_federation(test_pki, tmp_path, hubs, antenna={}) as f:
        client = f.client("alice")
        path = _write(tmp_path / "records.csv", b"patient,value\n")
        (plain,), _ = describe_inputs([("records.csv", path)])
        await client.upload(path, plain.sha256, plain.size)
        placed = {}
        for places in (("FI",), ("IT",), ("lumi",), ("leonardo", "DE")):
            spec = JobSpec(argv=("cat", "records.csv"), walltime_s=60,
                           inputs=(InputFile(plain.name, plain.sha256, plain.size, places),))
            job = await client.wait((await client.submit(spec)).id)
            assert job.state is JobState.COMPLETED, job
            placed[places] = job.site
        assert placed == {("FI",): "lumi", ("IT",): "leonardo", ("lumi",): "lumi", ("leonardo", "DE"): "leonardo"}
        # Bound to a country no hub is in: refused at submission, with the reason per hub; nothing stored.
        before = await client.list()
        bound = JobSpec(argv=("true",), inputs=(InputFile(plain.name, plain.sha256, plain.size, ("DE",)),))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.submit(bound)
        assert "must stay in DE (data residency)" in refused.value.details()
        assert len(await client.list()) == len(before)
        # aifed explain names the rule for the hub it excluded.
        job = await client.submit(JobSpec(argv=("sleep", "5"), walltime_s=60,
                                          inputs=(InputFile(plain.name, plain.sha256, plain.size, ("FI",)),)))
        explanation = await client.stub.ExplainJob(jobs_pb2.JobRef(job_id=job.id))
        reasons = {v.site: v.reason for v in explanation.sites}
        assert reasons["leonardo"] == "is in IT, and input 'records.csv' must stay in FI (data residency)"
        assert reasons["lumi"] == ""


async def test_a_hub_refuses_a_job_whose_inputs_must_stay_elsewhere(test_pki, tmp_path):
    from tests.conftest import running_federation
    async with running_federation(test_pki, tmp_path, {"leonardo": {"location": "IT"}}) as f:
        error = await forward_one(f, test_pki, jobs_pb2.JobSpec(argv=["true"], inputs=[jobs_pb2.InputFile(
            name="x", sha256="0" * 64, size=1, residency=["FI", "lumi"])]))
        assert "must stay in FI, lumi (data residency); hub leonardo is in IT" in error.message
        assert f.hubs["leonardo"].core.journal.get("antenna-a-0123abcd") is None


def test_placement_counts_the_transfer_of_inputs():
    from federation.placement import Candidate, Placer
    placer = Placer("earliest-start")
    # An idle hub behind a slow link, and a busy one behind a fast link: the job starts first at the second.
    near = Candidate("near", wait_s=50, total_gpus=8, transfer_s=10)
    far = Candidate("far", wait_s=0, total_gpus=8, transfer_s=100)
    assert [s.site for s in placer.order([far, near], 1, 60, now=0)] == ["near", "far"]
    assert [s.site for s in placer.order([Candidate("far", 0, total_gpus=8), near], 1, 60, now=0)] == ["far", "near"]


async def test_transfers_measure_the_link_to_each_hub(fed, tmp_path):
    core = fed.antennas["antenna-a"].core
    assert core.link_rate("leonardo") == core.config.link_rate_mb_s * 1e6  # configured, until measured
    client = fed.client("alice")
    big = _write(tmp_path / "big", os.urandom(10 << 20))
    job = await _upload_and_submit(client, {"big": big}, "true", site="leonardo")
    assert (await client.wait(job.id)).state is JobState.COMPLETED
    measured = core.link_rate("leonardo")
    assert measured != core.config.link_rate_mb_s * 1e6 and measured > 1e6


def test_residency_survives_the_journal_and_the_wire():
    from federation import convert
    from federation.journal import job_from_json, job_to_json
    from federation.model import Job
    spec = JobSpec(argv=("true",), inputs=(InputFile("a", "0" * 64, 3, ("IT", "lumi")), InputFile("b", "1" * 64, 4)))
    job = Job(id="antenna-a-1", spec=spec, state=JobState.PENDING, owner="o", antenna="antenna-a")
    assert job_from_json(job_to_json(job)).spec == spec
    assert convert.spec_from_pb(convert.spec_to_pb(spec)) == spec
    with pytest.raises(InvalidArgument, match="neither a country"):
        JobSpec(argv=("true",), inputs=(InputFile("a", "0" * 64, 3, ("Italy",)),)).validate()


async def test_cli_residency_without_inputs_is_a_usage_error(fed):
    code, err = await _cli_code(fed, "submit", "--residency", "IT", "--", "true")
    assert code == 2 and "--residency binds input files" in err


# -- outputs: collected when the job ends, fetched back through the antenna ----------------------------------------

PRODUCE = ("mkdir -p results/deep && echo alpha > results/a.txt && echo beta > results/deep/b.txt && "
           "head -c 2500000 /dev/urandom > model.bin")


async def _ended_with_outputs(fed, script: str, collect=("results", "model.bin"), **kw):
    client = fed.client("alice")
    job = await client.submit(JobSpec(argv=("sh", "-c", script), walltime_s=120, outputs=tuple(collect), **kw))
    done = await client.wait(job.id)
    listing = await eventually_ready(client, job.id)
    return done, listing


async def eventually_ready(client, job_id: str, timeout: float = 15):
    from tests.conftest import eventually
    return await eventually(lambda: _ready(client, job_id), timeout)


async def _ready(client, job_id):
    listing = await client.list_outputs(job_id)
    return listing if listing.ready else None


async def test_outputs_come_back_byte_for_byte_with_aifed_fetch(fed, tmp_path):
    done, listing = await _ended_with_outputs(fed, PRODUCE)
    assert done.state is JobState.COMPLETED, done
    assert sorted(f.name for f in listing.files) == ["model.bin", "results/a.txt", "results/deep/b.txt"]
    assert listing.error == ""
    out = await _cli(fed, "fetch", done.id, "--to", str(tmp_path / "got"))
    assert "model.bin" in out
    hub_folder = fed.hubs[done.site].core.backend.folder(done.id)
    for name in ("model.bin", "results/a.txt", "results/deep/b.txt"):
        assert (tmp_path / "got" / name).read_bytes() == (hub_folder / name).read_bytes(), name
    assert not list((tmp_path / "got").rglob("*.aifed-part"))


async def test_an_interrupted_fetch_resumes_and_a_corrupt_one_is_thrown_away(fed, tmp_path):
    done, _ = await _ended_with_outputs(fed, PRODUCE, collect=("model.bin",))
    truth = (fed.hubs[done.site].core.backend.folder(done.id) / "model.bin").read_bytes()
    to = tmp_path / "got"
    to.mkdir()
    (to / "model.bin.aifed-part").write_bytes(truth[:1_000_000])  # what an interrupted fetch left
    await _cli(fed, "fetch", done.id, "--to", str(to))
    assert (to / "model.bin").read_bytes() == truth
    (to / "model.bin").unlink()
    (to / "model.bin.aifed-part").write_bytes(b"x" * 1_000_000)  # not the file's first bytes
    code, err = await _cli_code(fed, "fetch", done.id, "--to", str(to))
    assert code != 0 and "do not match its SHA-256" in err
    assert not (to / "model.bin").exists() and not (to / "model.bin.aifed-part").exists()


async def test_a_fetch_whose_disk_fails_keeps_only_good_bytes_and_resumes_after_them(fed, tmp_path, monkeypatch):
    """The disk fails on the second chunk: nothing queued behind it is written (at the wrong place), the part
    file holds the output's first bytes only, and the fetch run again completes it."""
    from federation import blobs
    done, _ = await _ended_with_outputs(fed, "head -c 13000000 /dev/urandom > model.bin", collect=("model.bin",))
    truth = (fed.hubs[done.site].core.backend.folder(done.id) / "model.bin").read_bytes()
    real, calls = blobs.write_chunk, []

    def failing(out, digest, data, failed):
        calls.append(len(data))
        if len(calls) == 2:
            failed.append(OSError(errno.EIO, "Input/output error"))
            raise failed[0]
        real(out, digest, data, failed)

    monkeypatch.setattr(blobs, "write_chunk", failing)
    to = tmp_path / "got"
    code, err = await _cli_code(fed, "fetch", done.id, "--to", str(to))
    assert code != 0 and "writing" in err and "(Input/output error)" in err and "run the same fetch again" in err
    part = (to / "model.bin.aifed-part").read_bytes()
    assert 0 < len(part) < len(truth) and truth.startswith(part)
    monkeypatch.setattr(blobs, "write_chunk", real)
    await _cli(fed, "fetch", done.id, "--to", str(to))
    assert (to / "model.bin").read_bytes() == truth


async def test_a_full_disk_mid_upload_says_so_and_leaves_no_file_open(tmp_path, monkeypatch):
    store = BlobStore(tmp_path)
    data = os.urandom(3 * CHUNK_BYTES)
    h = sha(data)
    real, calls = os.pwrite, []

    def pwrite(fd, view, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, view, offset)

    def open_here() -> int:  # files of this store this process has open
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
        return count

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(ResourceExhausted, match="no space left to store uploads here") as caught:
        await store.put("alice", chunks(*(Chunk(h if i == 0 else "", len(data), i * CHUNK_BYTES,
                                                data[i * CHUNK_BYTES:(i + 1) * CHUNK_BYTES]) for i in range(3))))
    assert "can resume later" in str(caught.value)
    assert open_here() == 0  # nothing left open, even with the error kept alive
    monkeypatch.setattr(os, "pwrite", real)
    held = store.stat("alice", h).held
    assert held < len(data) and (tmp_path / "partial").exists()
    done = await store.put("alice", chunks(Chunk(h, len(data), held, data[held:])))
    assert done.complete and store.path(h).read_bytes() == data


async def test_outputs_over_the_limit_or_leading_out_are_not_collected_and_say_why(fed, tmp_path):
    fed.hubs["leonardo"].core.outputs.max_bytes = 1000
    done, listing = await _ended_with_outputs(fed, "head -c 5000 /dev/zero > big.bin", collect=("big.bin",),
                                              site="leonardo")
    assert listing.files == [] and "over this hub's limit of 1000 bytes" in listing.error
    done, listing = await _ended_with_outputs(fed, "ln -s /etc/passwd leak; echo ok > fine.txt",
                                              collect=("leak", "fine.txt", "missing.txt"), site="leonardo")
    assert [f.name for f in listing.files] == ["fine.txt"]
    assert "leak: leads out of the job's folder" in listing.error and "missing.txt: not found" in listing.error


async def test_outputs_are_only_for_the_job_owner_and_only_once_the_job_ended(fed):
    client = fed.client("alice")
    job = await client.submit(JobSpec(argv=("sleep", "30"), walltime_s=60, outputs=("x",)))
    code, err = await _cli_code(fed, "fetch", job.id, "--to", "/tmp/never")
    assert code != 0 and "its outputs are collected when it ends" in err
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await fed.client("bob").list_outputs(job.id)
    assert other.value.code() is grpc.StatusCode.NOT_FOUND
    await client.cancel(job.id)
    with pytest.raises(InvalidArgument, match="output name"):
        JobSpec(argv=("true",), outputs=("../../etc",)).validate()


async def test_outputs_left_uncollected_by_a_crash_are_collected_at_the_next_start(fed):
    client = fed.client("alice")
    job = await client.wait((await client.submit(JobSpec(argv=("sh", "-c", "echo kept > r.txt"), walltime_s=60,
                                                         outputs=("r.txt",), site="leonardo"))).id)
    await eventually_ready(client, job.id)
    hub = fed.hubs["leonardo"].core
    hub.outputs.forget(job.id)
    hub.outputs.expect(job.id)  # as if the hub had died between the job's end and the copy
    await fed.hubs["leonardo"].stop()
    await fed.start_hub("leonardo")
    listing = await eventually_ready(client, job.id)
    assert [f.name for f in listing.files] == ["r.txt"]


async def test_outputs_of_a_slurm_job_come_back(slurm_fed, tmp_path):
    client = slurm_fed.client("alice")
    job = await client.submit(JobSpec(argv=("sh", "-c", "head -c 1500000 /dev/urandom > out.bin"), walltime_s=120,
                                      outputs=("out.bin",)))
    done = await client.wait(job.id)
    assert done.state is JobState.COMPLETED, done
    await eventually_ready(client, job.id)
    await _cli(slurm_fed, "fetch", job.id, "--to", str(tmp_path))
    truth = (slurm_fed.hubs["leonardo"].core.backend.folder(job.id) / "out.bin").read_bytes()
    assert (tmp_path / "out.bin").read_bytes() == truth and len(truth) == 1_500_000


async def test_the_same_upload_twice_at_once_is_stored_once_and_whole(tmp_path):
    store = BlobStore(tmp_path)
    data = os.urandom(3 << 20)
    h = sha(data)

    async def slow_upload():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield Chunk(h if i == 0 else "", len(data), i << 20, data[i << 20:(i + 1) << 20])

    results = await asyncio.gather(*(store.put("alice", slow_upload()) for _ in range(3)))
    assert all(r.complete for r in results) and store.path(h).read_bytes() == data
    assert not store._locks  # noqa: SLF001 - nothing left behind


# -- a full disk: refused up front, not failed later ---------------------------------------------------------------

async def test_an_upload_that_would_fill_the_disk_is_refused_before_a_byte_is_written(tmp_path):
    store = BlobStore(tmp_path, reserve_bytes=10**18)  # more than any disk: "full"
    with pytest.raises(ResourceExhausted, match="no space for 3 bytes here"):
        await store.put("alice", chunks(Chunk(sha(b"abc"), 3, 0, b"abc")))
    assert not list((tmp_path / "partial").iterdir())


async def test_a_hub_short_of_disk_takes_no_new_jobs_and_placement_goes_elsewhere(test_pki, tmp_path):
    from tests.conftest import running_federation
    hubs = {"leonardo": {"min_free_disk_mb": 10**12}, "lumi": {}}  # leonardo's disk "nearly full"
    async with running_federation(test_pki, tmp_path, hubs, antenna={}) as f:
        client = f.client("alice")
        job = await client.wait((await client.submit(JobSpec(argv=("true",), walltime_s=60))).id)
        assert job.state is JobState.COMPLETED and job.site == "lumi", job
        sites = {s.site: s for s in await client.sites()}
        assert sites["leonardo"].advert.draining and "disk is nearly full" in sites["leonardo"].advert.drain_reason
        error = await forward_one(f, test_pki, jobs_pb2.JobSpec(argv=["true"]))
        assert error.code == grpc.StatusCode.UNAVAILABLE.value[0] and "disk is nearly full" in error.message


# -- quotas and retention -------------------------------------------------------------------------------------------

def _age(path: Path, seconds: float) -> None:
    then = path.stat().st_mtime - seconds
    os.utime(path, (then, then))


async def test_an_uploader_over_its_quota_is_refused_before_a_byte_is_written(tmp_path):
    store = BlobStore(tmp_path, quota_bytes=5000, retention_s=7 * 86400)
    first, second = os.urandom(3000), os.urandom(3000)
    await store.put("alice", chunks(Chunk(sha(first), 3000, 0, first[:1000])))  # partial uploads count too
    assert store.held_bytes("alice") == 3000
    with pytest.raises(ResourceExhausted, match="you hold 0 MB .* would pass your quota of 0 MB") as refused:
        await store.put("alice", chunks(Chunk(sha(second), 3000, 0, second)))
    assert "deleted after 7 day(s) unused" in str(refused.value)
    assert not store.stat("alice", sha(second)).held  # nothing of it written
    done = await store.put("alice", chunks(Chunk(sha(first), 3000, 1000, first[1000:])))  # a resume is no more
    assert done.complete and store.held_bytes("alice") == 3000
    assert (await store.put("bob", chunks(Chunk(sha(second), 3000, 0, second)))).complete  # quotas are per uploader
    assert BlobStore(tmp_path).held_bytes("alice") == 3000  # counted again from disk after a restart


async def test_retention_deletes_unused_content_but_not_what_a_job_needs_or_another_uploader_still_holds(tmp_path):
    store = BlobStore(tmp_path)
    old, needed, shared, fresh = (os.urandom(2000) for _ in range(4))
    for owner, data in (("alice", old), ("alice", needed), ("alice", shared), ("bob", shared), ("alice", fresh)):
        await store.put(owner, chunks(Chunk(sha(data), len(data), 0, data)))
    stale = os.urandom(2000)
    await store.put("carol", chunks(Chunk(sha(stale), 2000, 0, stale[:500])))  # an upload given up half way
    week = 7 * 86400
    for data in (old, needed, shared):  # Alice has not used these for two weeks; Bob used `shared` lately
        _age(store._owner_mark(sha(data), "alice"), 2 * week)
    for partial in (tmp_path / "partial").iterdir():
        _age(partial, 2 * week)
    deleted, freed = await store.sweep(week, lambda: {sha(needed)})
    assert deleted == 1 and freed >= 2000
    assert not store.path(sha(old)).exists() and not store.stat("alice", sha(old)).held
    assert store.stat("alice", sha(needed)).complete  # an unfinished job needs it
    assert store.path(sha(shared)).exists() and store.stat("bob", sha(shared)).complete
    assert not store.stat("alice", sha(shared)).held  # Alice's own hold on it went
    assert store.stat("alice", sha(fresh)).complete
    assert store.stat("carol", sha(stale)).held == 0 and store.held_bytes("carol") == 0


async def test_a_job_naming_content_counts_as_using_it(tmp_path):
    store = BlobStore(tmp_path)
    data = os.urandom(100)
    await store.put("alice", chunks(Chunk(sha(data), 100, 0, data)))
    _age(store._owner_mark(sha(data), "alice"), 30 * 86400)
    assert store.missing("alice", [InputFile("x", sha(data), 100)]) == []  # a submission names it: used now
    assert await store.sweep(7 * 86400, set) == (0, 0)
    assert store.stat("alice", sha(data)).complete
    assert await store.sweep(7 * 86400, set, now=time.time() + 8 * 86400) == (1, 100)


async def test_antenna_quotas_per_user_and_per_job_are_refused_with_clear_errors(test_pki, tmp_path):
    from federation.config import DataConfig
    from tests.conftest import running_federation
    limits = DataConfig(quota_mb=3, max_job_input_mb=1)
    async with running_federation(test_pki, tmp_path, {"leonardo": {}}, antenna={"data": limits}) as f:
        client = f.client("alice")
        big = _write(tmp_path / "big.bin", os.urandom(1_500_000))
        inputs, _ = describe_inputs([("big.bin", big)])
        assert (await client.upload(big, inputs[0].sha256, inputs[0].size)).complete
        with pytest.raises(grpc.aio.AioRpcError) as per_job:
            await client.submit(JobSpec(argv=("true",), inputs=inputs))
        assert per_job.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "inputs come to 2 MB; antenna antenna-a takes at most 1 MB of inputs per job" in per_job.value.details()
        assert await client.list() == []
        other = _write(tmp_path / "other.bin", os.urandom(2_000_000))
        code, text = await _cli_code(f, "submit", "--input", str(other), "--", "true")
        assert code != 0 and "over your quota here: you hold 2 MB" in text and "quota of 3 MB" in text, text
        assert f.antennas["antenna-a"].core.blobs.held_bytes(
            "spiffe://eurohpc.test/user/antenna-a/alice") == 1_500_000  # nothing of the refused file kept
        # Bob has a quota of his own.
        assert (await f.client("bob").upload(other, sha(other.read_bytes()), 2_000_000)).complete


async def test_a_large_input_over_the_job_limit_is_refused_before_it_is_uploaded(test_pki, tmp_path):
    from federation.config import DataConfig
    from tests.conftest import running_federation
    async with running_federation(test_pki, tmp_path, {"leonardo": {}},
                                  antenna={"data": DataConfig(max_job_input_mb=50)}) as f:
        huge = tmp_path / "huge.bin"
        huge.touch()
        os.truncate(huge, 120_000_000)  # sparse: 120 MB to hash, nothing to write
        code, text = await _cli_code(f, "submit", "--input", str(huge), "--", "true")
        assert code != 0 and "takes at most 50 MB of inputs per job" in text, text
        core = f.antennas["antenna-a"].core
        assert core.blobs.held_bytes("spiffe://eurohpc.test/user/antenna-a/alice") == 0  # not a byte sent


async def test_hub_retention_trims_folders_then_deletes_outputs_inputs_and_logs(fed, tmp_path):
    client = fed.client("alice")
    data = os.urandom(50_000)
    inputs, _ = describe_inputs([("in.bin", _write(tmp_path / "in.bin", data))])
    assert (await client.upload(tmp_path / "in.bin", inputs[0].sha256, inputs[0].size)).complete
    job = await client.submit(JobSpec(argv=("sh", "-c", "cp in.bin out.bin; echo done"), walltime_s=60,
                                      site="leonardo", inputs=inputs, outputs=("out.bin",)))
    assert (await client.wait(job.id)).state is JobState.COMPLETED
    await eventually_ready(client, job.id)
    hub = fed.hubs["leonardo"].core
    folder = hub.backend.folder(job.id)
    assert (folder / "in.bin").exists() and (folder / "out.bin").exists()
    day = 86400
    assert await hub.sweep_data(now=time.time() + day) == {"blobs": 0, "outputs": 0, "trimmed": 0, "folders": 0}
    # A week on: the job's working files and the staged input go; its outputs and logs stay.
    swept = await hub.sweep_data(now=time.time() + 8 * day)
    assert swept == {"blobs": 1, "outputs": 0, "trimmed": 1, "folders": 0}, swept
    assert sorted(p.name for p in folder.iterdir()) == ["stderr", "stdout"]
    assert not hub.blobs.path(sha(data)).exists()
    logs = b"".join([c.data async for c in client.logs(job.id, jobs_pb2.LOG_STREAM_STDOUT)])
    assert logs == b"done\n"
    assert [f.name for f in (await client.list_outputs(job.id)).files] == ["out.bin"]
    # A month on: the outputs go, and saying so.
    swept = await hub.sweep_data(now=time.time() + 31 * day)
    assert swept["outputs"] == 1 and not (hub.outputs.root / job.id).exists()
    hub.outputs.retention_s = 0  # as if the month had passed: the job ended longer ago than outputs are kept
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await client.list_outputs(job.id)
    assert gone.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "were deleted: this hub keeps outputs 0 day(s) after a job ends" in gone.value.details()
    # Its record expires (`retention`, 90 days by default): the folder and logs go with it.
    assert hub.journal.purge(time.time() + 1) == 1
    _age(folder, 8 * day)
    assert (await hub.sweep_data())["folders"] == 1 and not folder.exists()
    assert {kind: hub.metrics.deleted.labels(kind)._value.get() for kind in
            ("inputs", "outputs", "working_files", "folders")} == {"inputs": 1, "outputs": 1, "working_files": 1,
                                                                   "folders": 1}


# -- the upload and fetch messages, encoded and decoded without copying their data ------------------------------


@given(st.text(max_size=70), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_upload_messages_decode_as_protobuf_does(sha256, size, offset, data):
    from federation.blobs import parse_chunk
    raw = jobs_pb2.BlobChunk(sha256=sha256, size=size, offset=offset, data=data).SerializeToString()
    chunk = parse_chunk(raw)
    assert (chunk.sha256, chunk.size, chunk.offset, bytes(chunk.data)) == (sha256, size, offset, data)


@given(st.text(max_size=70), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=300))
def test_upload_and_fetch_messages_encode_as_protobuf_does(sha256, size, offset, data):
    from federation.blobs import chunk_bytes
    assert chunk_bytes(offset, data) == jobs_pb2.BlobChunk(offset=offset, data=data).SerializeToString()
    assert chunk_bytes(offset, data, sha256, size) == jobs_pb2.BlobChunk(sha256=sha256, size=size, offset=offset,
                                                                         data=data).SerializeToString()


@given(st.binary(max_size=60))
def test_a_malformed_upload_message_is_refused_as_protobuf_refuses_it(raw):
    from google.protobuf.message import DecodeError

    from federation.blobs import parse_chunk
    try:
        want = jobs_pb2.BlobChunk.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_chunk(raw)
        return
    chunk = parse_chunk(raw)
    assert (chunk.sha256, chunk.size, chunk.offset, bytes(chunk.data)) == (want.sha256, want.size, want.offset,
                                                                          want.data)


async def test_a_write_that_fails_mid_upload_leaves_only_bytes_at_their_right_offsets(tmp_path, monkeypatch):
    from federation import blobs
    store = BlobStore(tmp_path)
    data = os.urandom(6 * 1000)
    h = sha(data)
    real = blobs.write_chunk
    calls = []

    def flaky(out, digest, chunk, failed):
        calls.append(len(chunk))
        if len(calls) == 2:  # the disk fails on the second chunk, after part of it was written
            out.write(bytes(chunk[:100]))
            failed.append(OSError(5, "Input/output error"))
            raise failed[0]
        real(out, digest, chunk, failed)

    monkeypatch.setattr(blobs, "write_chunk", flaky)
    with pytest.raises(OSError):
        await store.put("alice", chunks(*(Chunk(h if i == 0 else "", len(data), i * 1000, data[i * 1000:(i + 1) * 1000])
                                          for i in range(6))))
    partial = store.stat("alice", h)
    assert partial.held == 1100 and not partial.complete  # the chunks queued behind the failure were not written
    monkeypatch.setattr(blobs, "write_chunk", real)
    done = await store.put("alice", chunks(Chunk(h, len(data), 1100, data[1100:])))  # resumes where it stands
    assert done.complete and store.path(h).read_bytes() == data


async def test_an_upload_cancelled_twice_still_writes_every_byte_it_received(tmp_path, monkeypatch):
    """A cancel, and another while the received chunks are still being written: they are all written (in
    order, synced), and the upload resumes after them."""
    import time as _time

    from federation import blobs
    store = BlobStore(tmp_path)
    piece = 3 << 20  # chunks that do not fill the writer's buffer: some bytes wait there at the end
    data = os.urandom(3 * piece)
    h = sha(data)
    real = blobs.write_chunk

    def slow(out, digest, chunk, failed):
        _time.sleep(0.3)  # a slow disk: the chunks wait in line
        real(out, digest, chunk, failed)

    monkeypatch.setattr(blobs, "write_chunk", slow)
    received = asyncio.Event()

    async def two_chunks_then_nothing():
        for i in range(2):
            yield Chunk(h if i == 0 else "", len(data), i * piece, data[i * piece:(i + 1) * piece])
        received.set()
        await asyncio.Event().wait()

    upload = asyncio.ensure_future(store.put("alice", two_chunks_then_nothing()))
    await received.wait()
    upload.cancel()
    await asyncio.sleep(0.1)  # the writes are still going on
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert store.stat("alice", h).held == 2 * piece
    monkeypatch.setattr(blobs, "write_chunk", real)
    done = await store.put("alice", chunks(Chunk(h, len(data), 2 * piece, data[2 * piece:])))
    assert done.complete and store.path(h).read_bytes() == data


async def test_one_uploader_may_run_only_a_few_uploads_at_once(tmp_path):
    from federation.blobs import MAX_UPLOADS_PER_OWNER
    store = BlobStore(tmp_path)
    gate = asyncio.Event()

    async def held_open(content: bytes):
        yield Chunk(sha(content), len(content) + 1, 0, content)
        await gate.wait()  # the upload stays open

    uploads = [asyncio.ensure_future(store.put("alice", held_open(bytes([i]) * 10)))
               for i in range(MAX_UPLOADS_PER_OWNER)]
    await asyncio.sleep(0.2)
    with pytest.raises(ResourceExhausted, match=f"at most {MAX_UPLOADS_PER_OWNER} uploads at once"):
        await store.put("alice", held_open(b"one too many"))
    other = asyncio.ensure_future(store.put("bob", held_open(b"bob's")))  # others are not affected
    await asyncio.sleep(0.1)
    gate.set()
    results = await asyncio.gather(*uploads, other)
    assert all(r.held == 10 or r.held == 5 for r in results)


def test_the_data_benchmark_prints_its_figures(capsys, tmp_path):
    """`aifed bench data`, small: real daemons, every path timed against cp, CPU per GiB per process."""
    import orjson
    assert main(["bench", "data", "--mb", "32", "--runs", "1", "--json", "--keep", str(tmp_path / "bench")]) == 0
    result = orjson.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mb"] == 32 and result["runs"] == 1
    for key in ("cp_mb_per_s", "upload_mb_per_s", "stage_mb_per_s", "user_to_hub_mb_per_s", "fetch_mb_per_s"):
        assert result[key] > 0, key
    assert result["user_to_hub_mb_per_s"] < min(result["upload_mb_per_s"], result["stage_mb_per_s"])
    assert set(result["cpu_s_per_gib"]) == {"upload", "stage", "fetch"}
    assert result["cpu_s_per_gib"]["upload"]["antenna"] > 0  # the antenna received the upload
