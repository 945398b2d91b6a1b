"""Bad input gets a specific status and a message that says what to fix, and nothing is half-stored."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import orjson
import pytest

from federation import convert
from federation.identity import Role
from federation.model import AccessMode, Job, JobSpec, JobState
from federation.pb import antenna_pb2, antenna_pb2_grpc, hub_pb2, hub_pb2_grpc
from federation.rpc import secure_channel

ROOT = Path(__file__).resolve().parent.parent
C = grpc.StatusCode


def stored(fed) -> tuple[int, int]:
    return (fed.antennas["antenna-a"].core.journal.count(),
            sum(h.core.journal.count() for h in fed.hubs.values()))


@pytest.mark.parametrize("spec,code,words", [
    (JobSpec(argv=()), C.INVALID_ARGUMENT, "no command"),
    (JobSpec(argv=("",)), C.INVALID_ARGUMENT, "command is empty"),
    (JobSpec(script="   \n"), C.INVALID_ARGUMENT, "no command"),
    (JobSpec(argv=("true",), gpus=1_000_000), C.INVALID_ARGUMENT, "gpus must be between 0 and 100000"),
    (JobSpec(argv=("true",), gpus=64), C.FAILED_PRECONDITION, "at most 4 GPUs"),
    (JobSpec(argv=("true",), walltime_s=2 * 3600, partition="booster"), C.FAILED_PRECONDITION,
     "at most 01:00:00 of walltime"),
    (JobSpec(argv=("true",), walltime_s=400 * 86400), C.INVALID_ARGUMENT, "walltime must be between"),
    (JobSpec(argv=("true",), partition="nonexistent"), C.NOT_FOUND, "no hub has a partition 'nonexistent'"),
    (JobSpec(argv=("true",), site="jupiter"), C.NOT_FOUND, "no hub site 'jupiter'"),
    (JobSpec(argv=("true",), env={"1BAD": "x"}), C.INVALID_ARGUMENT, "environment variable name"),
    (JobSpec(argv=("true",), cpus=1000), C.FAILED_PRECONDITION, "runs jobs of at most 64 CPUs"),
    (JobSpec(argv=("true",), access_mode=AccessMode.AI_FOR_SCIENCE), C.FAILED_PRECONDITION,
     "does not accept access mode ai-for-science"),
])
async def test_submit_rejections(fed, spec, code, words):
    before = stored(fed)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fed.client("alice").submit(spec)
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()
    assert stored(fed) == before


async def test_missing_spec_is_invalid(fed, test_pki):
    port = fed.antennas["antenna-a"].port
    async with secure_channel(f"127.0.0.1:{port}", test_pki.user("antenna-a", "alice")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await antenna_pb2_grpc.AntennaStub(ch).SubmitJob(antenna_pb2.SubmitJobRequest())
    assert err.value.code() == C.INVALID_ARGUMENT and "no job spec" in err.value.details()


async def test_unknown_job_is_not_found(fed):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fed.client("alice").get("antenna-a-doesnotexist")
    assert err.value.code() == C.NOT_FOUND


@pytest.mark.parametrize("key,spec,code,words", [
    ("", JobSpec(argv=("true",)), C.INVALID_ARGUMENT, "idempotency key"),
    ("k1", JobSpec(argv=("true",), partition="nope"), C.NOT_FOUND, "has no partition 'nope'; it has: booster, dcgp"),
    ("k2", JobSpec(argv=("true",), partition="booster", walltime_s=7200), C.FAILED_PRECONDITION,
     "exceeds partition booster's maximum of 01:00:00"),
    ("k3", JobSpec(argv=("true",), partition="dcgp", gpus=1), C.FAILED_PRECONDITION, "partition dcgp has 0"),
    ("k4", JobSpec(argv=("true",), gpus=8), C.FAILED_PRECONDITION, "the most GPUs is 4"),
    ("k5", JobSpec(argv=()), C.INVALID_ARGUMENT, "no command"),
    ("k6", JobSpec(argv=("true",), access_mode=AccessMode.LARGE_SCALE), C.FAILED_PRECONDITION,
     "does not accept access mode large-scale; it accepts playground, fast-lane"),
])
async def test_hub_forward_rejections(fed, test_pki, key, spec, code, words):
    port = fed.hubs["leonardo"].port
    job = Job(id=f"antenna-a-{key or 'nokey'}", spec=spec, state=JobState.PENDING,
              owner="spiffe://eurohpc.test/user/antenna-a/alice")
    async with secure_channel(f"127.0.0.1:{port}", test_pki.tls(Role.ANTENNA, "antenna-a")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hub_pb2_grpc.HubStub(ch).ForwardJob(
                hub_pb2.ForwardJobRequest(idempotency_key=key, job=convert.job_to_pb(job)))
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()
    assert fed.hubs["leonardo"].core.journal.count() == 0


async def test_job_refused_by_reconfigured_hub_fails_with_reason(fed):
    """A hub that shrank while it was down refuses a job the antenna accepted: FAILED, with the hub's reason."""
    from federation.config import PartitionConfig
    client = fed.client("alice")
    await fed.hubs["leonardo"].stop()
    job = await client.submit(JobSpec(argv=("true",), gpus=4, site="leonardo"))
    assert job.state is JobState.PENDING
    await fed.start_hub("leonardo", partitions=(PartitionConfig("booster", "A100", 2, 3600),))
    done = await client.wait(job.id)
    assert done.state is JobState.FAILED
    assert done.reason == "no hub can run this job: leonardo has at most 2 GPUs in a partition"
    assert fed.hubs["leonardo"].core.journal.count() == 0


async def test_hub_refusal_after_placement_fails_the_job_with_the_hubs_reason(fed):
    """An antenna that crashed between placing and forwarding resumes; the hub's refusal ends the job FAILED."""
    import time
    from federation.journal import Journal
    from federation.model import Transition
    await fed.antennas["antenna-a"].stop()
    journal = Journal(fed.state / "antenna-a" / "antenna.sqlite")
    now = time.time()
    journal.insert(Job(id="antenna-a-placed", spec=JobSpec(argv=("true",), gpus=8), state=JobState.PENDING,
                       owner="spiffe://eurohpc.test/user/antenna-a/alice", antenna="antenna-a", site="leonardo",
                       created_at=now, updated_at=now, history=(Transition(JobState.PENDING, now),)))
    journal.close()
    await fed.start_antenna("antenna-a")
    done = await fed.client("alice").wait("antenna-a-placed")
    assert done.state is JobState.FAILED
    assert done.reason.startswith("hub leonardo refused the job:") and "the most GPUs is 4" in done.reason
    assert fed.hubs["leonardo"].core.journal.count() == 0


# -- the CLI ----------------------------------------------------------------------------------------

async def aifed(*args: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "federation.cli", *args, cwd=cwd, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "AIFED_CONFIG": ""})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def conn(fed, tls) -> list[str]:
    return ["--antenna", f"127.0.0.1:{fed.antennas['antenna-a'].port}", "--ca", str(tls.ca), "--cert",
            str(tls.cert), "--key", str(tls.key)]


async def test_cli_unreadable_script(fed, test_pki, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0)
    if os.access(script, os.R_OK):  # root reads anything: make it unreadable another way
        script.unlink()
        script.mkdir()
        expected = "is a directory"
    else:
        expected = "not readable"
    code, _, err = await aifed("submit", *conn(fed, test_pki.user("antenna-a", "alice")), str(script))
    assert code == 2 and expected in err
    code, _, err = await aifed("submit", *conn(fed, test_pki.user("antenna-a", "alice")), str(tmp_path / "nope.sh"))
    assert code == 2 and "does not exist" in err
    assert stored(fed) == (0, 0)


@pytest.mark.parametrize("args,code,words", [
    (["--"], 2, "no command after `--`"),
    (["-G", "-1", "--", "true"], 2, "gpus must be between 0 and 100000, not -1"),
    (["-t", "abc", "--", "true"], 2, "is not a duration"),
    (["--mem", "lots", "--", "true"], 2, "--mem 'lots' is not a size"),
    (["-G", "64", "--", "true"], 7, "no hub can run this job"),
    (["-p", "gpu-xl", "--", "true"], 6, "no hub has a partition 'gpu-xl'"),
    (["--overflow-after", "1h", "--", "true"], 2, "--overflow-after needs --prefer"),
    (["--site", "lumi", "--exclude", "leonardo", "--", "true"], 2, "--prefer and --exclude do not apply"),
    (["--prefer", "lumi", "--exclude", "lumi", "--", "true"], 2, "site lumi is both preferred and excluded"),
    (["--exclude", "leonardo,lumi", "--", "true"], 7, "lumi is excluded by the job's owner (--exclude)"),
])
async def test_cli_submit_bad_input(fed, test_pki, args, code, words):
    rc, _, err = await aifed("submit", *conn(fed, test_pki.user("antenna-a", "alice")), *args)
    assert (rc, words in err) == (code, True), err
    assert stored(fed) == (0, 0)


async def test_cli_missing_certificate(fed, test_pki, tmp_path):
    tls = test_pki.user("antenna-a", "alice")
    args = conn(fed, tls)
    args[args.index("--cert") + 1] = str(tmp_path / "missing.pem")
    rc, _, err = await aifed("list", *args)
    assert rc == 3 and "missing.pem does not exist" in err


async def test_cli_certificate_from_another_ca(fed, test_pki):
    from certs import pki
    cert, key = pki.cert_paths(test_pki.other_ca_root, pki.identity_for("eurohpc.test", Role.USER, "antenna-a",
                                                                          "alice"))
    args = conn(fed, test_pki.user("antenna-a", "alice"))
    args[args.index("--cert") + 1], args[args.index("--key") + 1] = str(cert), str(key)
    rc, _, err = await aifed("list", *args)
    assert rc == 4 and "refused the TLS handshake" in err


async def test_cli_mismatched_key(fed, test_pki):
    args = conn(fed, test_pki.user("antenna-a", "alice"))
    args[args.index("--key") + 1] = str(test_pki.user("antenna-a", "bob").key)
    rc, _, err = await aifed("list", *args)
    assert rc == 3 and err.strip() == f"aifed: private key {args[args.index('--key') + 1]} does not belong to " \
        f"certificate {args[args.index('--cert') + 1]}"


async def test_cli_wrong_antenna_for_user(fed, test_pki):
    rc, _, err = await aifed("list", *conn(fed, test_pki.user("antenna-b", "carol")))
    assert rc == 5 and "PERMISSION_DENIED" in err and "submit through antenna-b" in err


async def test_cli_round_trip(fed, test_pki, tmp_path):
    """submit, status, wait, list, logs, cancel and sites through the real `aifed` command, with --json."""
    c = conn(fed, test_pki.user("antenna-a", "alice"))
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/sh\necho \"hello $1 from $AIFED_SITE\"\n")
    rc, out, err = await aifed("submit", *c, "--json", "-J", "hello", "-t", "5", str(script), "world")
    assert rc == 0, err
    job_id = orjson.loads(out)["id"]
    rc, out, _ = await aifed("wait", *c, "--json", job_id)
    done = orjson.loads(out)
    assert rc == 0 and done["state"] == "COMPLETED" and done["spec"]["walltime_s"] == 300
    rc, out, _ = await aifed("logs", *c, job_id)
    assert out == f"hello world from {done['site']}\n"
    rc, out, _ = await aifed("status", *c, job_id)
    assert f"JobId={job_id} Name=hello" in out and "State=COMPLETED" in out
    rc, out, _ = await aifed("list", *c)
    assert job_id in out and "COMPLETED" in out.splitlines()[1]
    rc, out, _ = await aifed("sites", *c, "--json")
    assert {s["site"] for s in orjson.loads(out)} == {"leonardo", "lumi"}
    rc, out, _ = await aifed("submit", *c, "--", "sleep", "30")
    sleeper = out.split()[-1]
    rc, out, _ = await aifed("cancel", *c, sleeper)
    assert rc == 0
    rc, out, _ = await aifed("wait", *c, "--json", sleeper)
    assert orjson.loads(out)["state"] == "CANCELLED"
    rc, out, err = await aifed("submit", *c, "--wait", "--", "sh", "-c", "exit 4")
    assert rc == 4 and "State=FAILED" in out


async def test_cli_client_config_file(fed, test_pki, tmp_path):
    tls = test_pki.user("antenna-a", "alice")
    cfg = tmp_path / "client.toml"
    cfg.write_text(f'[client]\nantenna = "127.0.0.1:{fed.antennas["antenna-a"].port}"\n\n'
                   f'[tls]\nca = "{tls.ca}"\ncert = "{tls.cert}"\nkey = "{tls.key}"\n')
    rc, out, err = await aifed("list", "--config", str(cfg), "--json")
    assert rc == 0 and orjson.loads(out) == []
    cfg.write_text('[client]\nantena = "x"\n')
    rc, _, err = await aifed("list", "--config", str(cfg))
    assert rc == 3 and str(cfg) in err and "client.antena" in err
