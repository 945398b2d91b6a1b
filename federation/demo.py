"""`aifed demo` (`make demo`): a local federation on loopback, shown working end to end.

Generates a demo PKI, starts three hubs named after real AI Factories and two
antennas as separate processes, submits jobs through the `aifed` CLI (one
completes, one uses GPUs, one fails, one times out, one is cancelled, one is
refused), shows where each ran and how it ended and one job's logs, then stops
every daemon. Exits 0 only if every job ended as expected.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from certs import pki
from federation.identity import Role
from federation.net import free_port

FEDERATION = "eurohpc.demo"
HUBS = {
    "leonardo": [("boost_usr_prod", "A100-64GB", 4, "1-00:00:00")],
    "lumi": [("standard-g", "MI250X", 8, "2-00:00:00"), ("small-g", "MI250X", 2, "3-00:00:00")],
    "marenostrum5": [("acc", "H100", 4, "2-00:00:00")],
}
ANTENNAS = {"antenna-si": ["leonardo", "lumi", "marenostrum5"], "antenna-ch": ["lumi", "marenostrum5"]}
USERS = [("antenna-si", "alice"), ("antenna-ch", "bob")]


def write_configs(root: Path) -> dict[str, Path]:
    """PKI, hub, antenna and client configs for the demo federation under `root`; returns config paths."""
    pki_dir = root / "pki"
    pki.init_ca(pki_dir, FEDERATION, force=True)
    configs: dict[str, Path] = {}
    ports = {name: free_port() for name in [*HUBS, *ANTENNAS]}
    for site, partitions in HUBS.items():
        issued = pki.issue(pki_dir, Role.HUB, site)
        parts = "".join(f'\n[[partitions]]\nname = "{n}"\ngpu_model = "{m}"\ngpus = {g}\nmax_walltime = "{w}"\n'
                        for n, m, g, w in partitions)
        configs[site] = _write(root / f"{site}.toml", f'''[hub]
site = "{site}"
federation = "{FEDERATION}"
listen = "127.0.0.1:{ports[site]}"
state_dir = "state/{site}"
services = ["llm-training", "inference"]
sectors = ["health", "climate"]
access_modes = ["playground", "fast-lane"]
advert_ttl = "15s"

[backend]
type = "local"
kill_grace = "1s"

[tls]
ca = "pki/ca.pem"
cert = "{issued.cert.relative_to(root)}"
key = "{issued.key.relative_to(root)}"
{parts}''')
    for site, hubs in ANTENNAS.items():
        issued = pki.issue(pki_dir, Role.ANTENNA, site)
        hub_tables = "".join(f'\n[[hubs]]\nsite = "{h}"\nendpoint = "127.0.0.1:{ports[h]}"\n' for h in hubs)
        configs[site] = _write(root / f"{site}.toml", f'''[antenna]
site = "{site}"
federation = "{FEDERATION}"
listen = "127.0.0.1:{ports[site]}"
state_dir = "state/{site}"

[tls]
ca = "pki/ca.pem"
cert = "{issued.cert.relative_to(root)}"
key = "{issued.key.relative_to(root)}"
{hub_tables}''')
    for antenna, user in USERS:
        issued = pki.issue(pki_dir, Role.USER, antenna, user)
        configs[user] = _write(root / f"client-{user}.toml", f'''[client]
antenna = "127.0.0.1:{ports[antenna]}"

[tls]
ca = "pki/ca.pem"
cert = "{issued.cert.relative_to(root)}"
key = "{issued.key.relative_to(root)}"
''')
    return configs


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class Demo:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.procs: dict[str, subprocess.Popen] = {}
        self.aifed = [sys.executable, "-m", "federation.cli"]
        self.env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}

    def say(self, text: str) -> None:
        print(f"\n== {text}", flush=True)

    def start(self, name: str, kind: str, config: Path) -> None:
        log = open(self.root / "logs" / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([*self.aifed, kind, "--config", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        print(f"   started {kind} {name} (pid {self.procs[name].pid}), log in {self.root / 'logs' / (name + '.log')}")

    def cli(self, user: str, *args: str, check: bool = True, show: bool = True) -> subprocess.CompletedProcess:
        argv = [*self.aifed, *args[:1], "--config", str(self.root / f"client-{user}.toml"), *args[1:]]
        if show:
            print(f"   [{user}]$ aifed {shlex.join(args)}", flush=True)
        res = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=self.root, timeout=120)
        if check and res.returncode != 0:
            raise RuntimeError(f"aifed {shlex.join(args)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        for antenna, user in USERS:
            while True:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.root}/logs/{name}.log")
                res = self.cli(user, "sites", "--json", check=False, show=False)
                if res.returncode == 0 and all(s["reachable"] for s in orjson.loads(res.stdout)):
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"antenna {antenna} did not see all its hubs within {timeout:.0f}s")
                time.sleep(0.3)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            print(f"   {name} stopped (exit {code})")


def submit(demo: Demo, user: str, *args: str) -> str:
    res = demo.cli(user, "submit", "--json", *args)
    job = orjson.loads(res.stdout)
    print(f"     -> {job['id']}")
    return job["id"]


def run_demo(root: Path) -> int:
    if root.exists():
        shutil.rmtree(root)
    (root / "logs").mkdir(parents=True)
    demo = Demo(root)
    demo.say(f"Generating a demo PKI and configs for federation {FEDERATION} in {demo.root}")
    configs = write_configs(demo.root)
    ok = False
    try:
        demo.say("Starting three hubs and two antennas on loopback (mutual TLS on every port)")
        for site in HUBS:
            demo.start(site, "hub", configs[site])
        for site in ANTENNAS:
            demo.start(site, "antenna", configs[site])
        demo.wait_ready()
        demo.say("The federation as antenna-si sees it")
        print(demo.cli("alice", "sites").stdout.rstrip())

        demo.say("Submitting jobs through the CLI")
        script = demo.root / "train.sh"
        script.write_text("#!/bin/sh\necho \"training on $AIFED_SITE, GPUs $CUDA_VISIBLE_DEVICES\"\n"
                          "echo 'loss diverged' >&2\nexit 3\n")
        expected = {
            submit(demo, "alice", "-J", "hello", "--", "sh", "-c", "echo hello from $AIFED_SITE"): "COMPLETED",
            submit(demo, "alice", "-J", "gpu-probe", "-G", "4", "-t", "5", "--site", "leonardo", "--", "sh", "-c",
                   "echo GPUs $CUDA_VISIBLE_DEVICES on $AIFED_SITE/$AIFED_PARTITION; sleep 1"): "COMPLETED",
            submit(demo, "bob", "-J", "train", "-G", "2", "-p", "acc", str(script)): "FAILED",
            submit(demo, "bob", "-J", "too-long", "-t", "0:03", "--", "sleep", "60"): "TIMEOUT",
        }
        cancel_me = submit(demo, "alice", "-J", "cancel-me", "--", "sleep", "300")
        expected[cancel_me] = "CANCELLED"
        refused = demo.cli("alice", "submit", "-G", "64", "--", "python3", "train.py", check=False)
        print(f"     -> refused (exit {refused.returncode}): {refused.stderr.strip()}")

        demo.say("Waiting for the jobs to end (the timeout job takes 3 seconds)")
        owner = {j: ("bob" if i in (2, 3) else "alice") for i, j in enumerate(expected)}
        time.sleep(0.5)
        demo.cli("alice", "cancel", cancel_me)
        ended = {}
        for job_id in expected:
            ended[job_id] = orjson.loads(demo.cli(owner[job_id], "wait", "--json", job_id, show=False).stdout)
        rows = [[j["id"], owner[j["id"]], j["spec"]["name"], j["site"], j["partition"], j["state"],
                 "-" if j["exit_code"] is None else str(j["exit_code"]), j["reason"]] for j in ended.values()]
        from federation.output import table
        print(table(["JOB", "USER", "NAME", "SITE", "PARTITION", "STATE", "EXIT", "REASON"], rows))

        demo.say("Logs of the failed training job (stdout, then stderr)")
        failed = next(j for j, state in expected.items() if state == "FAILED")
        res = demo.cli("bob", "logs", failed)
        print(res.stdout.rstrip())
        print(res.stderr.rstrip())

        demo.say(f"Detail of job {failed}")
        print(demo.cli("bob", "status", failed).stdout.rstrip())

        wrong = {j: (ended[j]["state"], want) for j, want in expected.items() if ended[j]["state"] != want}
        ok = not wrong and refused.returncode != 0
        if wrong:
            print(f"\nUNEXPECTED: {wrong}")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
    finally:
        demo.say("Stopping every daemon")
        demo.stop()
    print("\nDemo " + ("succeeded: every job ended as expected." if ok else "FAILED."))
    return 0 if ok else 1
