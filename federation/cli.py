"""The `aifed` command: daemons, PKI, and the user's job commands (Slurm-like: submit, status, list...).

Exit codes: 0 success; 1 other failure; 2 bad input or usage; 3 configuration error;
4 a daemon cannot be reached; 5 authentication or permission refused; 6 not found;
7 refused in the current state (for example a walltime above the partition's maximum);
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import orjson

from federation import output, sbatch
from federation.errors import AifedError, ConfigError, FailedPrecondition
from federation.model import AccessMode, JobSpec, JobState
from federation.pb import jobs_pb2
from federation.timefmt import parse_duration

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_CONFIG, EXIT_UNREACHABLE, EXIT_DENIED, EXIT_NOT_FOUND, EXIT_REFUSED = range(8)
EXIT_INTERRUPTED = 130
STATUS_EXIT = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE, grpc.StatusCode.UNAVAILABLE: EXIT_UNREACHABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNREACHABLE, grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED, grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_REFUSED, grpc.StatusCode.ALREADY_EXISTS: EXIT_REFUSED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_REFUSED,
}
log = logging.getLogger("aifed")


class UsageError(Exception):
    """Bad command-line input; the message says what to fix."""


# -- parsing helpers -----------------------------------------------------------------------------

def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _env_pair(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--env {text!r} must be NAME=VALUE")
    k, v = text.split("=", 1)
    return k, v


def _mode(text: str) -> AccessMode:
    try:
        return AccessMode.from_slug(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aifed", description="aifed: the federation daemon for EU AI Factories.",
                                epilog="Exit codes: " + " ".join(__doc__.split("Exit codes: ")[1].split()))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, text in (("hub", "run a hub daemon (a hosting site)"), ("antenna", "run an antenna daemon")):
        d = sub.add_parser(name, help=text, description=text)
        d.add_argument("--config", required=True, help=f"the {name}'s TOML config file")
        d.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        d.add_argument("--log-format", default="human", choices=["human", "json"])

    sub.add_parser("version", help="print aifed's version and the protocol version its daemons speak")
    cf = sub.add_parser("config", help="check a config file without starting anything").add_subparsers(
        dest="config_cmd", required=True)
    cc = cf.add_parser("check", help="validate a hub, antenna or client config: keys, values, files, certificates",
                       description="Load FILE exactly as the daemon (or client) would, checking every key, value, "
                                   "referenced file, the certificate and key, the CRL and the user map; start "
                                   "nothing. Exit 0 if it is good, 3 with FILE: KEY: PROBLEM if not.")
    cc.add_argument("file")

    c = sub.add_parser("certs", help="manage the federation PKI").add_subparsers(dest="certs_cmd", required=True)
    ci = c.add_parser("init", help="create the federation root CA")
    ci.add_argument("--dir", required=True, help="PKI folder (keep it out of version control)")
    ci.add_argument("--federation", required=True, help="the federation's name, e.g. eurohpc.example")
    ci.add_argument("--days", type=int, default=3650)
    ci.add_argument("--force", action="store_true", help="replace an existing CA")
    cs = c.add_parser("issue", help="issue a certificate: hub SITE | antenna SITE | user ANTENNA NAME | "
                                    "operator SITE NAME | service NAME (etcd, an MQTT broker)")
    cs.add_argument("--dir", required=True)
    cs.add_argument("role", choices=["hub", "antenna", "user", "operator", "service"])
    cs.add_argument("site", help="the hub or antenna site; for a user, the antenna that vouches for them")
    cs.add_argument("name", nargs="?", default="", help="the user's or operator's name (users and operators only)")
    cs.add_argument("--dns", action="append", help="DNS name the daemon serves on (repeatable; default localhost)")
    cs.add_argument("--ip", action="append", help="IP address the daemon serves on (default 127.0.0.1 and ::1)")
    cs.add_argument("--days", type=int, default=365)
    cr = c.add_parser("renew", help="a new key and certificate for an identity, same hosts, same files",
                      description="Write a new key and certificate over the existing ones (daemons take them up "
                                  "without a restart). The previous certificate stays valid until it expires: "
                                  "revoke it by serial if it must not.")
    cr.add_argument("--dir", required=True)
    cr.add_argument("role", choices=["hub", "antenna", "user", "operator"])
    cr.add_argument("site")
    cr.add_argument("name", nargs="?", default="", help="the user's or operator's name (users and operators only)")
    cr.add_argument("--days", type=int, default=365)
    cv = c.add_parser("revoke", help="revoke a certificate and re-sign the CRL",
                      description="Revoke by certificate file, serial (hex, see `aifed certs list`) or spiffe:// "
                                  "identity (every unexpired certificate of it), then re-sign crl.pem.")
    cv.add_argument("--dir", required=True)
    cv.add_argument("target", help="certificate file, serial number, or spiffe:// identity")
    cv.add_argument("--reason", default="unspecified",
                    help="unspecified (default), key_compromise, ca_compromise, affiliation_changed, superseded, "
                         "cessation_of_operation, privilege_withdrawn")
    cc = c.add_parser("crl", help="re-sign the certificate revocation list (before its next update)")
    cc.add_argument("--dir", required=True)
    cc.add_argument("--days", type=int, default=7, help="days until the CRL's next update (default 7)")
    cl = c.add_parser("list", help="list issued certificates with their expiry and status")
    cl.add_argument("--dir", required=True)

    def client_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group("connection (flags win over the client config file)")
        g.add_argument("--config", help="client TOML ([client] antenna, [tls] ca/cert/key); default $AIFED_CONFIG "
                                        "or ~/.config/aifed/client.toml")
        g.add_argument("--antenna", help="antenna address HOST:PORT")
        g.add_argument("--ca", help="federation CA certificate")
        g.add_argument("--cert", help="your user certificate")
        g.add_argument("--key", help="your user certificate's key")
        sp.add_argument("--json", action="store_true", help="print JSON for scripts")

    tp = sub.add_parser("top", help="a live view of the federation: hubs, GPUs, queues, health, recent jobs",
                        description="Refreshes every --interval seconds from the antenna's view of each hub's "
                                    "capacity stream; Ctrl-C quits. --once prints one view and exits.")
    tp.add_argument("--once", action="store_true", help="print one view and exit (for scripts and tests)")
    tp.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    client_opts(tp)

    ev = sub.add_parser("events", help="follow the federation's events live (MQTT): job states, capacity, "
                                       "membership",
                        description="Subscribe to the federation's MQTT broker and print each event as it arrives "
                                    "(topics in docs/membership.md). Uses your certificate for mutual TLS; the "
                                    "federation's name comes from it unless --federation is given.")
    ev.add_argument("--broker", required=True, help="the MQTT broker, HOST:PORT")
    ev.add_argument("--site", help="only this site's events")
    ev.add_argument("--federation", help="the federation's name (default: from your certificate)")
    ev.add_argument("--count", type=int, help="stop after this many events (default: run until Ctrl-C)")
    ev.add_argument("--no-tls", action="store_true", help="plain MQTT, for a broker on loopback without TLS")
    client_opts(ev)

    st = sub.add_parser("site", help="operate a hub site: drain, resume, status (an operator certificate of the site)",
                        description="Drain a hub (it takes no new forwarded jobs; antennas place them elsewhere; "
                                    "jobs already there run to their end), resume it, or show its state. Needs an "
                                    "operator certificate of that site (aifed certs issue operator SITE NAME).")
    st.add_argument("action", choices=["drain", "resume", "status"])
    st.add_argument("--hub", required=True, help="the hub's address HOST:PORT")
    st.add_argument("--reason", default="", help="why (drain only), shown in the advert and to users")
    client_opts(st)

    s = sub.add_parser("submit", help="submit a job: aifed submit [options] -- COMMAND [ARGS] | SCRIPT [ARGS]",
                       description="Submit a command (after --) or a script file.")
    client_opts(s)
    s.add_argument("-J", "--job-name", help="job name")
    s.add_argument("-G", "--gpus", type=int, help="GPUs (default 0)")
    s.add_argument("-c", "--cpus", type=int, help="CPUs (default 1)")
    s.add_argument("--mem", help="memory: megabytes, or with K/M/G/T suffix")
    s.add_argument("-t", "--time", type=_duration,
                   help="walltime: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS (default 1:00:00)")
    s.add_argument("-p", "--partition", help="partition (default: the hub chooses)")
    s.add_argument("--site", default="", help="run only at this hub site")
    s.add_argument("--prefer", type=_sites, default=(),
                   help="hub sites you prefer, in order (comma-separated): the job goes to the first that would "
                        "start it within --overflow-after, else wherever placement chooses")
    s.add_argument("--overflow-after", type=_duration, default=None,
                   help="how long you would wait for a preferred site before the job overflows elsewhere "
                        "(default 1:00:00)")
    s.add_argument("--exclude", type=_sites, default=(), help="hub sites the job must never go to (comma-separated)")
    s.add_argument("--mode", type=_mode, default=AccessMode.UNSPECIFIED,
                   help="access mode: playground, fast-lane, large-scale, ai-for-science")
    s.add_argument("-A", "--project", help="project / account")
    s.add_argument("--sector", default="", help="the strategic sector of the work (health, climate, manufacturing, "
                                                "...): hubs specialised in it are preferred")
    s.add_argument("--require-sector", action="store_true", help="run only at hubs specialised in --sector")
    s.add_argument("--env", type=_env_pair, action="append", default=[], help="NAME=VALUE for the job (repeatable)")
    s.add_argument("-a", "--array", help="a job array, as in sbatch: 0-999, 1,3,5-7, 0-98:2 (each task gets "
                                         "AIFED_ARRAY_TASK_ID and SLURM_ARRAY_TASK_ID)")
    s.add_argument("-i", "--input", action="append", default=[], metavar="FILE_OR_DIR",
                   help="a file or folder the job finds in its working directory (repeatable): uploaded to the "
                        "antenna first (resuming an interrupted upload), each content once")
    s.add_argument("--collect", action="append", default=[], metavar="PATH",
                   help="a file or folder in the job's working directory that the hub collects when the job "
                        "ends, for aifed fetch (repeatable)")
    s.add_argument("--residency", default="", metavar="PLACES",
                   help="data residency of every --input: the countries (ISO 3166 alpha-2, IT) or hub sites "
                        "(leonardo) it may go to, comma-separated; placement sends the job nowhere else")
    s.add_argument("--request-id", default="", help="a token that makes a retried submit return the first job")
    s.add_argument("--wait", action="store_true", help="wait for the job to end; exit with its exit code")
    s.add_argument("--dry-run", action="store_true",
                   help="check the job as the antenna would (validity, access mode limits, which hub takes it) "
                        "and submit nothing")
    s.add_argument("script", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    for name, text in (("status", "show a job in detail"), ("cancel", "cancel a job"),
                       ("wait", "wait until a job ends and show how it ended")):
        x = sub.add_parser(name, help=text, description=text)
        client_opts(x)
        x.add_argument("job_id")
    lg = sub.add_parser("logs", help="print a job's output", description="print a job's stdout and stderr")
    client_opts(lg)
    lg.add_argument("job_id")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing until the job ends")
    which = lg.add_mutually_exclusive_group()
    which.add_argument("--stdout", action="store_true", help="only stdout")
    which.add_argument("--stderr", action="store_true", help="only stderr")
    fe = sub.add_parser("fetch", help="download a job's collected outputs (submit --collect PATH)",
                        description="download a job's outputs, checked by SHA-256; an interrupted fetch resumes")
    client_opts(fe)
    fe.add_argument("job_id")
    fe.add_argument("--to", default=".", help="the folder to write them into (default: the current one)")
    ls = sub.add_parser("list", help="list your jobs, newest first")
    client_opts(ls)
    ls.add_argument("--state", action="append", choices=[s.name for s in JobState], help="filter (repeatable)")
    ls.add_argument("--limit", type=int, default=100)
    st = sub.add_parser("sites", help="the federation's sites and their capacity")
    client_opts(st)
    us = sub.add_parser("usage", help="allocations (GPU-hour budgets) and what has been used of them",
                        description="Per allocation: its project, hub (or federation-wide), modes, dates, budget, "
                                    "GPU-hours used (jobs that ended, by real runtime), reserved (jobs not ended, "
                                    "by walltime) and remaining; then GPU-hours per project and user at this "
                                    "antenna. Users see the allocations of projects they have jobs under, and "
                                    "their own consumption; operators of the antenna see all. With --hub: "
                                    "the GPU-hours consumed at that hub per antenna, project and access mode (an "
                                    "operator certificate of the hub's site).")
    client_opts(us)
    us.add_argument("--hub", help="ask this hub (HOST:PORT) for its consumption per antenna instead")
    us.add_argument("--days", type=int, default=30, help="with --hub: jobs accepted in the last DAYS days "
                                                         "(default 30)")
    ex = sub.add_parser("explain",
                        help="why a job is where it is: each hub's verdict for it, its status, its allocation",
                        description="For each hub: the rule that excludes the job there, or the estimated wait before "
                                    "it would start there now, in the order placement would choose; where the job "
                                    "is and why it has not started (or how it ended); the allocation it is charged "
                                    "to.")
    ex.add_argument("job_id")
    client_opts(ex)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_cmd", required=True)

    def bench_parser(name: str, text: str, kept: str) -> argparse.ArgumentParser:
        b = bench.add_parser(name, help=text, description=text)
        b.add_argument("--json", action="store_true", help="one JSON object on the last line")
        b.add_argument("--keep", help=f"keep {kept} in this folder")
        return b

    bs = bench_parser("slurm", "submission throughput into a private Slurm: direct sbatch vs through aifed",
                      "the cluster, configs and logs")
    bs.add_argument("--jobs", type=int, default=500, help="jobs per phase (default 500)")
    bs.add_argument("--single", action="store_true",
                    help="also run phase (c): through aifed with one sbatch per job (backend.array_size = 1)")
    bf = bench_parser("forward", "jobs per second an antenna and a hub acknowledge and forward durably",
                      "configs, journals and logs")
    bf.add_argument("--seconds", type=float, default=20, help="length of each run (default 20)")
    bf.add_argument("--clients", type=int, default=16, help="concurrent clients, unbatched run (default 16; the "
                                                            "batched run uses a quarter as many)")
    bf.add_argument("--batch", type=int, default=500, help="jobs per SubmitJobs call, batched run, and tasks per "
                                                        "array, arrays run (default 500)")
    bd = bench_parser("data", "input staging throughput, user to antenna to hub (mTLS, checksums), against cp",
                      "configs, state and logs")
    bd.add_argument("--mb", type=int, default=1024, help="size of the file, MiB (default 1024)")
    bd.add_argument("--runs", type=int, default=3, help="runs, each with new content (default 3); medians")
    bm = bench_parser("scale", "a hub holding a million finished jobs: memory and status query latency",
                      "the journal, configs and logs")
    bm.add_argument("--finished", type=int, default=1_000_000, help="finished jobs in the journal (default 1000000)")
    bm.add_argument("--active", type=int, default=10_000, help="active jobs (default 10000)")
    bm.add_argument("--queries", type=int, default=5000, help="status queries to time (default 5000)")
    bj = bench_parser("journal", "journaling cost per job as a journal grows: job ids that sort by time against "
                      "random ones", "the two journals")
    bj.add_argument("--jobs", type=int, default=200_000, help="jobs written to each journal (default 200000)")
    bj.add_argument("--batch", type=int, default=500, help="jobs per transaction (default 500)")
    bc = bench_parser("crash", "SIGKILL the daemons during a burst of submissions: nothing lost or run twice",
                      "configs, journals, logs and the executions record")
    bc.add_argument("--jobs", type=int, default=10_000, help="jobs in the burst (default 10000)")
    bc.add_argument("--kills", type=int, default=20, help="how many times daemons are killed (default 20)")
    bc.add_argument("--seed", type=int, help="random seed, to repeat a run")

    bb = bench_parser("membership", "how fast membership news travels through etcd: a capacity change from one "
                      "hub to every antenna, and a killed hub dropped", "the PKI and etcd's data and log")
    bb.add_argument("--hubs", type=int, default=10, help="hubs registered (default 10)")
    bb.add_argument("--antennas", type=int, default=50, help="antennas following the membership (default 50)")
    bb.add_argument("--changes", type=int, default=300, help="capacity changes to time (default 300)")
    bb.add_argument("--lease", type=int, default=3, help="the killed hub's lease in seconds (default 3)")
    bb.add_argument("--trials", type=int, default=3, help="times a hub is killed (default 3)")

    bp = bench.add_parser("placement", help="placement policies over a real job trace, in simulation",
                          description="A discrete-event simulation of sites and antennas running aifed's own queue "
                                      "model and placement code over an SWF or Philly CSV trace: per policy, mean "
                                      "and p95 wait, mean bounded slowdown (10 s), utilisation and jobs moved "
                                      "between hubs, and the pooled bound (all the capacity in one cluster).")
    bp.add_argument("--trace", required=True, help="an SWF (.swf) or Philly CSV trace file")
    bp.add_argument("--sites", default="1024,768,512,256",
                    help="each site's capacity, in the trace's unit (GPUs or processors); default 1024,768,512,256")
    bp.add_argument("--load", type=float, default=0.85, help="offered load the arrivals are scaled to (default 0.85)")
    bp.add_argument("--advert-period", type=float, default=10, help="seconds between a site's adverts (default 10)")
    bp.add_argument("--delay", type=float, default=0.5, help="seconds before antennas see an advert (default 0.5)")
    bp.add_argument("--seed", type=int, default=1, help="seed of the split into antennas and of random choices")
    bp.add_argument("--policies", help="comma-separated policies to run (default: all)")
    bp.add_argument("--balance", action="store_true",
                    help="hubs also balance load between them, with the hub's default [balance] settings, under "
                         "every policy but home-only (default: placement alone; much slower on long queues)")
    bp.add_argument("--no-lane", action="store_true",
                    help="earliest-start without the short-job lane (antenna.short_job_lane = false)")
    bp.add_argument("--workers", type=int, default=0,
                    help="policies simulated at once, each in a process of its own (default 0: one per CPU; 1: one "
                         "after the other); the figures are the same either way")
    bp.add_argument("--plot", help="draw the wait-time CDF of every policy into this PNG file (needs matplotlib)")
    bp.add_argument("--json", action="store_true", help="one JSON object on the last line")

    dm = sub.add_parser("demo", help="run a local federation on loopback and show it working")
    dm.add_argument("--dir", default="var/demo", help="where the demo keeps its PKI, configs and state")
    return p


# -- commands ------------------------------------------------------------------------------------

def _spec_from_args(args: argparse.Namespace, command: list[str] | None) -> tuple[JobSpec, str]:
    """The job from the flags, and for a script also from its #SBATCH lines (a flag that contradicts one is an
    error; directives aifed does not support are reported on stderr)."""
    flags = {"name": args.job_name, "gpus": args.gpus, "cpus": args.cpus, "walltime_s": args.time,
             "partition": args.partition, "project": args.project,
             "memory_mb": None if args.mem is None else _memory(args.mem)}
    if command is not None:
        if not command:
            raise UsageError("no command after `--`: give the program to run, e.g. aifed submit -- python train.py")
        return _spec(flags, {}, argv=tuple(command), args=args), _array(args.array)
    if not args.script:
        raise UsageError("nothing to run: give a script file, or a command after `--`")
    path = Path(args.script[0])
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        raise UsageError(f"script {path} does not exist (to run a command, put it after `--`)") from None
    except IsADirectoryError:
        raise UsageError(f"script {path} is a directory") from None
    except PermissionError:
        raise UsageError(f"script {path} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise UsageError(f"script {path} is not a text file") from None
    if not text.strip():
        raise UsageError(f"script {path} is empty")
    try:
        directives = sbatch.parse(text)
    except sbatch.DirectiveError as exc:
        raise UsageError(f"{path}: {exc}") from None
    for note in directives.notes:
        print(f"aifed: {path}: {note}", file=sys.stderr)
    flags["array"] = args.array
    for key, value in directives.values.items():
        if flags[key] is not None and flags[key] != value:
            raise UsageError(f"{path}: #SBATCH on line {directives.lines[key]} sets {key} to {value!r}, but the "
                             f"command line says {flags[key]!r}: remove one of them")
    array = _array(flags.pop("array") or directives.values.pop("array", None))
    return _spec(flags, directives.values, script=text, script_args=tuple(args.script[1:]), args=args), array


def _array(text: str | None) -> str:
    if text is None:
        return ""
    try:
        sbatch.parse_array(text)
    except ValueError as exc:
        raise UsageError(f"--array {text}: {exc}") from None
    return text


def _sites(text: str) -> tuple[str, ...]:
    sites = tuple(s.strip() for s in text.split(",") if s.strip())
    if not sites:
        raise argparse.ArgumentTypeError("give one or more site names, comma-separated")
    return sites


def _memory(text: str) -> int:
    try:
        return sbatch.parse_memory_mb(text)
    except ValueError as exc:
        raise UsageError(f"--mem {exc}") from None


def _spec(flags: dict, directives: dict, args: argparse.Namespace, **what) -> JobSpec:
    defaults = {"name": "", "gpus": 0, "cpus": 1, "walltime_s": 3600, "partition": "", "project": "",
                "memory_mb": 0}
    merged = {k: flags[k] if flags[k] is not None else directives.get(k, defaults[k]) for k in defaults}
    if args.require_sector and not args.sector:
        raise UsageError("--require-sector needs --sector")
    if args.overflow_after is not None and not args.prefer:
        raise UsageError("--overflow-after needs --prefer")
    if args.site and (args.prefer or args.exclude):
        raise UsageError("--site pins the job to one hub: --prefer and --exclude do not apply")
    overflow = {} if args.overflow_after is None else {"overflow_after_s": args.overflow_after}
    return JobSpec(**merged, site=args.site, access_mode=args.mode, env=dict(args.env), sector=args.sector,
                   sector_required=args.require_sector, prefer=args.prefer, exclude=args.exclude, **overflow, **what)


def _print_json(value) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


async def _client_command(args: argparse.Namespace, command: list[str] | None) -> int:
    from federation.client import AntennaClient, resolve_client_config

    spec, array = _spec_from_args(args, command) if args.command == "submit" else (None, "")
    sources: dict[str, Path] = {}
    if spec is not None and args.input:
        from federation.blobs import collect_inputs, describe_inputs
        inputs, sources = await asyncio.to_thread(lambda: describe_inputs(collect_inputs(args.input)))
        places = tuple(p.strip() for p in args.residency.split(",") if p.strip())
        spec = replace(spec, inputs=tuple(replace(f, residency=places) for f in inputs))
    elif spec is not None and args.residency:
        raise UsageError("--residency binds input files: give them with --input")
    if spec is not None and args.collect:
        spec = replace(spec, outputs=tuple(p.rstrip("/") or p for p in args.collect))
    if spec is not None:
        spec.validate()  # the same checks the antenna makes, before anything is sent
    config = resolve_client_config(args.config, args.antenna, args.ca, args.cert, args.key)
    config.tls.check()  # a missing, mismatched or expired certificate is reported before dialing
    async with AntennaClient(config) as client:
        if args.command == "submit" and args.dry_run:
            if array:
                try:
                    count = len(sbatch.parse_array(array))
                except ValueError as exc:
                    raise UsageError(f"--array {array!r}: {exc}") from None
            job = await client.submit(spec, dry_run=True)
            if args.json:
                _print_json(output.job_dict(job))
            else:
                print(job.reason + (f" (each of the {count} array tasks)" if array else ""))
            return EXIT_OK
        if args.command == "submit" and sources:
            if sum(f.size for f in spec.inputs) >= CHECK_BEFORE_UPLOAD_BYTES:
                await client.submit(spec, dry_run=True)  # refused now (quota, no hub), not after a long upload
            await _upload(client, spec, sources)
        if args.command == "submit" and array:
            return await _submit_array(client, spec, array, args)
        if args.command == "submit":
            job = await client.submit(spec, args.request_id)
            if not args.wait:
                _print_json(output.job_dict(job)) if args.json else print(f"Submitted job {job.id}")
                return EXIT_OK
            print(f"Submitted job {job.id}", file=sys.stderr)
            job = await client.wait(job.id)
            _print_json(output.job_dict(job)) if args.json else print(output.job_detail(job))
            return job.exit_code if job.exit_code is not None else (EXIT_OK if job.state is JobState.COMPLETED
                                                                    else EXIT_FAIL)
        if args.command in ("status", "cancel", "wait"):
            call = {"status": client.get, "cancel": client.cancel, "wait": client.wait}[args.command]
            job = await call(args.job_id)
            if args.json:
                _print_json(output.job_dict(job))
            elif args.command == "cancel":
                print(f"Job {job.id} is {job.state.name}")
            else:
                print(output.job_detail(job))
            return EXIT_OK
        if args.command == "list":
            jobs = await client.list(tuple(JobState[s] for s in args.state or ()), args.limit)
            _print_json([output.job_dict(j) for j in jobs]) if args.json else print(output.job_rows(jobs))
            return EXIT_OK
        if args.command == "sites":
            listing = await client.site_list()
            sites = list(listing.sites)
            if args.json:
                _print_json([output.site_dict(s) for s in sites])
            else:
                print(output.site_rows(sites))
                for warning in output.expiry_warnings(listing):
                    print(warning, file=sys.stderr)
                if listing.discovery_degraded:
                    print(f"warning: membership may be out of date: {listing.discovery_degraded}", file=sys.stderr)
            return EXIT_OK
        if args.command == "explain":
            explanation = await client.explain(args.job_id)
            _print_json(output.explanation_dict(explanation)) if args.json else \
                print(output.explanation_text(explanation))
            return EXIT_OK
        if args.command == "usage":
            usage = await client.usage()
            _print_json(output.usage_dict(usage)) if args.json else print(output.usage_rows(usage))
            return EXIT_OK
        if args.command == "fetch":
            return await _fetch(client, args.job_id, Path(args.to), args.json)
        if args.command == "logs":
            stream = (jobs_pb2.LOG_STREAM_STDOUT if args.stdout else
                      jobs_pb2.LOG_STREAM_STDERR if args.stderr else jobs_pb2.LOG_STREAM_UNSPECIFIED)
            async for chunk in client.logs(args.job_id, stream, args.follow):
                if args.json:
                    _print_json({"stream": "stderr" if chunk.stream == jobs_pb2.LOG_STREAM_STDERR else "stdout",
                                 "offset": chunk.offset, "data": chunk.data.decode(errors="replace")})
                else:
                    out = sys.stderr if chunk.stream == jobs_pb2.LOG_STREAM_STDERR else sys.stdout
                    out.buffer.write(chunk.data)
                    out.flush()
            return EXIT_OK
    raise AssertionError(args.command)


async def _fetch(client, job_id: str, to: Path, as_json: bool) -> int:
    """Download each collected output into `to` under its name: into `NAME.aifed-part` first (resumed if it is
    there from an interrupted fetch), checked against its SHA-256, then renamed."""
    import hashlib

    from federation.blobs import OrderedWriter, fsync_dir, hash_into
    from federation.model import check_input_name
    listing = await client.list_outputs(job_id)
    if not listing.ready:
        job = await client.get(job_id)
        raise FailedPrecondition(listing.error or (
            f"job {job_id} is {job.state.name}: its outputs are collected when it ends" if not job.final
            else f"the outputs of job {job_id} are being collected; try again in a moment"))
    tty = sys.stderr.isatty()
    fetched = []
    for f in listing.files:
        name = check_input_name(f.name, "output")  # never written outside `to`, whatever the hub says
        target = to / name
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".aifed-part")
        offset = part.stat().st_size if part.exists() else 0
        if offset > f.size:
            part.unlink()
            offset = 0
        started = time.monotonic()
        digest = hashlib.sha256()  # over what an interrupted fetch left, then each chunk as it arrives
        if offset:
            hash_into(digest, part, offset)

        # Written and hashed in order, a few chunks behind the receiving, and on disk before it is renamed into
        # place (OrderedWriter); after a failed write nothing more is written, and a fetch run again resumes.
        part.touch()
        try:
            async with OrderedWriter(part, offset, digest, 16, "fetch-write") as out:
                async for chunk in client.fetch_output(job_id, f.name, offset):
                    await out.write(chunk.data)
                    offset += len(chunk.data)
                    if tty:
                        rate = offset / max(time.monotonic() - started, 1e-6) / 1e6
                        print(f"\r{name}: {100 * offset / max(f.size, 1):3.0f}% of {f.size / 1e6:.1f} MB, "
                              f"{rate:.0f} MB/s", end="", file=sys.stderr, flush=True)
        except OSError as exc:  # the disk here: full, failing, not writable
            raise FailedPrecondition(f"output {name}: writing {part} failed ({exc.strerror or exc}); what was "
                                     "written before is kept: run the same fetch again to resume") from None
        if tty:
            print(file=sys.stderr)
        if digest.hexdigest() != f.sha256:
            part.unlink()
            raise FailedPrecondition(f"output {name}: the bytes received do not match its SHA-256 (removed); "
                                     "fetch again")
        part.replace(target)
        fsync_dir(target.parent)
        fetched.append({"name": name, "size": f.size, "sha256": f.sha256, "path": str(target)})
    if as_json:
        _print_json({"job": job_id, "files": fetched, "error": listing.error})
    else:
        for item in fetched:
            print(f"{item['path']} ({item['size']} bytes, sha256 {item['sha256'][:12]}...)")
        if listing.error:
            print(f"warning: {listing.error}", file=sys.stderr)
    return EXIT_OK


CHECK_BEFORE_UPLOAD_BYTES = 100_000_000  # inputs this large are checked by a dry run before they are uploaded


async def _upload(client, spec: JobSpec, sources: dict[str, Path]) -> None:
    """Upload each input's content the antenna does not hold from this user yet (resuming a partial upload)."""
    sizes = {f.sha256: f.size for f in spec.inputs}
    names = {f.sha256: f.name for f in spec.inputs}
    for sha, local in sources.items():
        started = time.monotonic()
        try:
            info = await client.upload(local, sha, sizes[sha])
        except OSError as exc:
            raise UsageError(f"input {local}: {exc.strerror or exc}") from None
        if not info.complete:
            raise UsageError(f"the upload of {local} stopped at byte {info.held} of {sizes[sha]}; run the same "
                             "command again to resume it")
        took = time.monotonic() - started
        if took > 0.5:
            print(f"uploaded {names[sha]} ({sizes[sha] / 1e6:.1f} MB) in {took:.1f} s", file=sys.stderr)


async def _submit_array(client, spec: JobSpec, array: str, args: argparse.Namespace) -> int:
    """Submit a job array in one call; with --wait, wait for every task (exit 0 only if all completed)."""
    results = await client.submit_many([(spec, args.request_id, array)])
    refused = [r for r in results if isinstance(r, AifedError)]
    if refused:
        raise refused[0]
    array_id = results[0].array_job
    if not args.wait:
        if args.json:
            _print_json({"array": array_id, "jobs": [{"id": r.id, "array_task": r.array_task, "state": r.state.name}
                                                     for r in results]})
        else:
            print(f"Submitted array {array_id}: {len(results)} jobs, {results[0].id} (task {results[0].array_task})"
                  f" to {results[-1].id} (task {results[-1].array_task})")
        return EXIT_OK
    print(f"Submitted array {array_id}: {len(results)} jobs", file=sys.stderr)
    jobs = [await client.wait(r.id) for r in results]
    if args.json:
        _print_json({"array": array_id, "jobs": [output.job_dict(j) for j in jobs]})
    else:
        print(output.job_rows(jobs))
    return EXIT_FAIL if any(j.state is not JobState.COMPLETED for j in jobs) else EXIT_OK


async def _events(args: argparse.Namespace) -> int:
    from federation.client import resolve_client_config
    from federation.events import run_events
    from federation.identity import parse_identity

    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    tls, federation = None, args.federation
    if not args.no_tls or not federation:
        tls = resolve_client_config(args.config, args.antenna or "-:0", args.ca, args.cert, args.key).tls
        tls.check()
        federation = federation or parse_identity(tls.identity_uri()).federation
    await run_events(args.broker, None if args.no_tls else tls, federation, args.site, json_lines=args.json,
                     count=args.count)
    return EXIT_OK


async def _top(args: argparse.Namespace) -> int:
    import shutil
    import time

    from federation.client import AntennaClient, resolve_client_config

    if args.interval < 0.2:
        raise UsageError("--interval must be at least 0.2 seconds")
    config = resolve_client_config(args.config, args.antenna, args.ca, args.cert, args.key)
    config.tls.check()
    live = not args.once and sys.stdout.isatty()
    async with AntennaClient(config) as client:
        while True:
            listing, jobs = await asyncio.gather(client.site_list(), client.list(limit=15))
            if args.json:
                _print_json({"sites": [output.site_dict(s) | {"health": output.site_health(s)}
                                       for s in listing.sites],
                             "jobs": [output.job_dict(j) for j in jobs]})
            else:
                view = output.top_view(listing, jobs, config.antenna, time.time(),
                                       shutil.get_terminal_size((120, 40)).columns)
                print(("\x1b[H\x1b[2J" if live else "") + view, flush=True)
            if args.once:
                return EXIT_OK
            try:
                await asyncio.sleep(args.interval)
            except asyncio.CancelledError:
                return EXIT_OK


async def _site_command(args: argparse.Namespace) -> int:
    """`aifed site drain|resume|status --hub HOST:PORT`: an operator talking to their hub."""
    from federation.client import resolve_client_config
    from federation.pb import hub_pb2, hub_pb2_grpc
    from federation.rpc import secure_channel

    if args.reason and args.action != "drain":
        raise UsageError("--reason goes with drain")
    config = resolve_client_config(args.config, args.hub, args.ca, args.cert, args.key)
    config.tls.check()
    async with secure_channel(args.hub, config.tls) as channel:
        stub = hub_pb2_grpc.HubStub(channel)
        if args.action == "status":
            advert = await stub.GetAdvert(hub_pb2.AdvertRequest(), timeout=30)
            state = {"site": advert.site, "draining": advert.draining, "reason": advert.drain_reason,
                     "running": sum(p.running_jobs for p in advert.partitions),
                     "pending": sum(p.pending_jobs for p in advert.partitions)}
        else:
            reply = await stub.SetDrain(hub_pb2.SetDrainRequest(drain=args.action == "drain", reason=args.reason),
                                        timeout=30)
            state = {"site": "", "draining": reply.draining, "reason": reply.reason,
                     "running": reply.jobs_running, "pending": reply.jobs_queued}
    if args.json:
        _print_json(state)
    elif state["draining"]:
        print(f"draining ({state['reason']}): no new jobs; {state['running']} running and {state['pending']} "
              "queued here run to their end")
    else:
        print(f"taking jobs; {state['running']} running, {state['pending']} queued")
    return EXIT_OK


async def _hub_usage(args: argparse.Namespace) -> int:
    """`aifed usage --hub HOST:PORT [--days N]`: consumption at one hub, per antenna, project and mode."""
    from federation.client import resolve_client_config
    from federation.pb import hub_pb2, hub_pb2_grpc
    from federation.rpc import secure_channel

    if not 0 < args.days <= 3660:
        raise UsageError(f"--days must be between 1 and 3660, not {args.days}")
    config = resolve_client_config(args.config, args.hub, args.ca, args.cert, args.key)
    config.tls.check()
    async with secure_channel(args.hub, config.tls) as channel:
        reply = await hub_pb2_grpc.HubStub(channel).GetUsage(hub_pb2.HubUsageRequest(days=args.days), timeout=120)
    _print_json(output.hub_usage_dict(reply)) if args.json else print(output.hub_usage_rows(reply))
    return EXIT_OK


def _membership(cfg) -> str:
    d, e = cfg.discovery, cfg.events
    out = (f", membership in etcd at {', '.join(d.endpoints)} under {d.key_prefix(cfg.federation)}"
           if d.backend == "etcd" else "")
    return out + (f", events to MQTT broker {e.broker}" if e.broker else "")


def _config_check(path: Path) -> int:
    """`aifed config check FILE`: which kind of file it is comes from its first table."""
    import tomllib

    from federation import config

    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(path, "", f"not a readable TOML file: {exc}") from None
    kinds = [k for k in ("hub", "antenna", "client") if k in data]
    if len(kinds) != 1:
        raise ConfigError(path, "", "a config has exactly one of the tables [hub], [antenna] or [client]")
    kind = kinds[0]
    if kind == "hub":
        hub = config.load_hub(path)
        print(f"{path}: good: hub {hub.site} of {hub.federation}, listens on {hub.listen}, backend {hub.backend}, "
              f"{len(hub.partitions)} partition(s)" + (f", user map {hub.user_map}" if hub.user_map else "")
              + (f", CRL {hub.tls.crl}" if hub.tls.crl else ", no CRL") + _membership(hub)
              + (f", HA instance {hub.ha_instance}" if hub.ha_instance else ""))
    elif kind == "antenna":
        antenna = config.load_antenna(path)
        print(f"{path}: good: antenna {antenna.site} of {antenna.federation}, listens on {antenna.listen}, "
              + (f"{len(antenna.hubs)} hub(s)" if antenna.discovery.backend == "static" else "hubs from etcd")
              + (f", CRL {antenna.tls.crl}" if antenna.tls.crl else ", no CRL") + _membership(antenna)
              + (f", allocations {antenna.allocations}" if antenna.allocations else ""))
    else:
        client = config.load_client(path)
        print(f"{path}: good: client of antenna {client.antenna}, identity {client.tls.identity_uri()}")
    tls = {"hub": lambda: hub.tls, "antenna": lambda: antenna.tls, "client": lambda: client.tls}[kind]()
    if warning := tls.expiry_warning():
        print(f"{path}: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _certs_command(args: argparse.Namespace) -> int:
    from cryptography import x509

    from certs import pki
    from federation.identity import Role

    def print_crl() -> None:
        crl = pki.read_crl(args.dir)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        print(f"Wrote {Path(args.dir) / pki.CRL}: CRL number {number}, {len(crl)} revoked certificate(s), "
              f"next update {crl.next_update_utc:%Y-%m-%d %H:%M} UTC")
        print("Copy crl.pem to every daemon (the file its config names in tls.crl); daemons re-read it when it "
              "changes.")

    try:
        if args.certs_cmd == "init":
            path = pki.init_ca(args.dir, args.federation, days=args.days, force=args.force)
            print(f"Created the root CA of federation {args.federation}: {path}")
            print(f"Keep {Path(args.dir) / pki.CA_KEY} offline and out of version control.")
        elif args.certs_cmd == "issue" and args.role == "service":
            if args.name:
                raise UsageError("a service certificate needs: aifed certs issue service NAME")
            cert, key = pki.issue_service(args.dir, args.site, dns=tuple(args.dns or ("localhost",)),
                                          ips=tuple(args.ip or ("127.0.0.1", "::1")), days=args.days)
            print(f"Issued the service certificate {args.site} (TLS server and client; no daemon accepts it as a "
                  f"caller)\n  certificate {cert}\n  key         {key} (0600)")
        elif args.certs_cmd in ("issue", "renew"):
            role = Role(args.role)
            if role in pki.NAMED_ROLES and not args.name:
                where = "ANTENNA" if role is Role.USER else "SITE"
                raise UsageError(f"a {role.value} certificate needs: aifed certs {args.certs_cmd} {role.value} "
                                 f"{where} NAME")
            if args.certs_cmd == "issue":
                issued = pki.issue(args.dir, role, args.site, args.name, dns=tuple(args.dns or ("localhost",)),
                                   ips=tuple(args.ip or ("127.0.0.1", "::1")), days=args.days)
                print(f"Issued {issued.identity.uri}")
            else:
                issued = pki.renew(args.dir, role, args.site, args.name, days=args.days)
                print(f"Renewed {issued.identity.uri}")
            print(f"  certificate {issued.cert}\n  key         {issued.key} (0600)\n"
                  f"  serial      {issued.serial}\n  expires     {issued.not_after:%Y-%m-%d}")
            if issued.replaced:
                print(f"The previous certificate (serial {issued.replaced}) stays valid until it expires; if it "
                      f"must not, run: aifed certs revoke --dir {args.dir} {issued.replaced} --reason superseded")
        elif args.certs_cmd == "revoke":
            serials = pki.revoke(args.dir, args.target, args.reason)
            if serials:
                who = {c.serial: c.identity for c in pki.list_certs(args.dir)}
                for serial in serials:
                    print(f"Revoked serial {serial} ({who.get(serial, '?')})")
            else:
                print(f"Nothing new revoked: every certificate {args.target} names was already revoked or has "
                      "expired")
            print_crl()
        elif args.certs_cmd == "crl":
            pki.write_crl(args.dir, days=args.days)
            print_crl()
            print("Re-sign it before its next update, e.g. daily from a systemd timer (aifed certs crl).")
        else:
            rows = [[c.identity, c.serial, f"{c.not_after:%Y-%m-%d}", c.status,
                     str(c.path) if c.current else f"{c.path} (replaced)"] for c in pki.list_certs(args.dir)]
            print(output.table(["IDENTITY", "SERIAL", "EXPIRES", "STATUS", "PATH"], rows))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except pki.PkiNotFound as exc:
        print(f"aifed: {exc}", file=sys.stderr)
        return EXIT_NOT_FOUND
    except pki.PkiError as exc:
        print(f"aifed: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    if argv and argv[0] == "submit" and "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("hub", "antenna"):
            from federation.runner import run_daemon
            return run_daemon(args.command, args.config, args.log_level, args.log_format)
        if args.command == "certs":
            return _certs_command(args)
        if args.command == "config":
            return _config_check(Path(args.file))
        if args.command == "version":
            import federation
            from federation.rpc import PROTOCOL
            print(f"aifed {federation.__version__} (protocol {PROTOCOL})")
            return EXIT_OK
        if args.command == "bench":
            from federation import bench
            keep = Path(args.keep) if getattr(args, "keep", None) else None
            if args.bench_cmd == "scale":
                return bench.run_scale_bench(args.finished, args.active, args.queries, args.json, keep)
            if args.bench_cmd == "crash":
                from federation.crash import run_crash_bench
                return run_crash_bench(args.jobs, args.kills, args.seed, args.json, keep)
            if args.bench_cmd == "membership":
                from federation.bench_membership import run_membership_bench
                return run_membership_bench(args.hubs, args.antennas, args.changes, args.lease, args.trials,
                                            args.json, keep)
            if args.bench_cmd == "placement":
                from federation.simulate import run_bench
                return run_bench(args)
            if args.bench_cmd == "data":
                from federation.bench_data import run_data_bench
                return run_data_bench(args.mb, args.runs, args.json, keep)
            if args.bench_cmd == "journal":
                from federation.bench_journal import run_journal_bench
                return run_journal_bench(args.jobs, args.batch, args.json, keep)
            if args.bench_cmd == "forward":
                return bench.run_forward_bench(args.seconds, args.clients, args.batch, args.json, keep)
            return bench.run_slurm_bench(args.jobs, args.json, keep, args.single)
        if args.command == "site":
            return asyncio.run(_site_command(args))
        if args.command == "usage" and args.hub:
            return asyncio.run(_hub_usage(args))
        if args.command == "top":
            return asyncio.run(_top(args))
        if args.command == "events":
            return asyncio.run(_events(args))
        if args.command == "demo":
            from federation.demo import run_demo
            return run_demo(Path(args.dir))
        if command is not None and args.script:
            raise UsageError("give either a script file or a command after `--`, not both")
        return asyncio.run(_client_command(args, command))
    except UsageError as exc:
        print(f"aifed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AifedError as exc:
        print(f"aifed: {exc.code.name}: {exc.message}", file=sys.stderr)
        return STATUS_EXIT.get(exc.code, EXIT_FAIL)
    except ConfigError as exc:
        print(f"aifed: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"aifed: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except grpc.aio.AioRpcError as exc:
        hub = args.command == "site" or bool(getattr(args, "hub", None))
        print(f"aifed: {_explain_rpc_error(exc, 'hub' if hub else 'antenna')}",
              file=sys.stderr)
        return STATUS_EXIT.get(exc.code(), EXIT_FAIL)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _explain_rpc_error(exc: grpc.aio.AioRpcError, daemon: str = "antenna") -> str:
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.UNAVAILABLE and details.startswith(("hub ", "logs of ", "site ")):
        return f"UNAVAILABLE: {details}"  # the daemon answered: one of its hubs is unreachable, or it drains
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        if "CERTIFICATE_VERIFY_FAILED" in (exc.debug_error_string() or "") + details:
            return (f"the {daemon}'s certificate is not signed by your CA (--ca): are you in the right "
                    f"federation? ({details})")
        who = "a user" if daemon == "antenna" else "an operator"
        return (f"cannot reach the {daemon} ({details}). Is it running at that address? If it is, it refused "
                f"the TLS handshake: check that --cert/--key are {who} certificate from this federation's CA")
    return f"{exc.code().name}: {details}"


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
