"""The deployment kit: example configs (deploy/examples/) and systemd units (deploy/systemd/).

- every example config passes `aifed config check` once its /etc/aifed and /var/lib/aifed paths point at a
  temporary PKI and state folders (and so do its commented-out optional settings, once enabled);
- every key documented in docs/configuration.md appears in the matching example, and no example uses a key the
  documentation does not describe;
- the systemd units parse, run the commands they claim with the config the examples are installed as, and (where
  systemd-analyze exists) pass `systemd-analyze verify`; the example hub and antenna really start with the
  units' command line and exit 0 on SIGTERM;
- the operator guides link to files and headings that exist.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from certs import pki
from federation.cli import build_parser, main
from federation.identity import Role

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "deploy" / "examples"
UNITS = ROOT / "deploy" / "systemd"
CONFIG_DOC = ROOT / "docs" / "configuration.md"

HUB_EXAMPLES = ("hub.toml", "hub-slurm.toml")
CONFIGS = (*HUB_EXAMPLES, "antenna.toml", "client.toml")
# Where each example is meant to be installed: the path its systemd unit names.
INSTALLED_AS = {"hub.toml": "/etc/aifed/hub.toml", "hub-slurm.toml": "/etc/aifed/hub.toml",
                "antenna.toml": "/etc/aifed/antenna.toml"}
CLIENT_USER = "alice"  # the user whose certificate the client example names (~/.config/aifed/<antenna>-alice.pem)

# A TOML setting or table header, possibly commented out as "# key = value" / "# [table]".
_HEADER = re.compile(r"^\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?$")
_KEY = re.compile(r'^("?)([A-Za-z0-9_-]+)\1\s*=\s*\S')
_COMMENTED = re.compile(r'^# (\[\[?[A-Za-z0-9_.-]+\]\]?|"?[A-Za-z0-9_-]+"? = .*)$')


# -- helpers -----------------------------------------------------------------------------------------------

def documented_keys(section: str) -> set[tuple[str, str]]:
    """(table, key) for every key in the table of docs/configuration.md under the heading `## <section>`.

    The first column holds backticked keys: `hub.site`, `hub.services`, `hub.sectors` (several in one cell),
    or an array of tables and its keys: `[[partitions]]` `name`."""
    text = CONFIG_DOC.read_text()
    match = re.search(rf"^## {section}\b.*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/configuration.md has no section '## {section}'"
    keys: set[tuple[str, str]] = set()
    for line in match.group(1).splitlines():
        if not line.startswith("| `"):
            continue
        tokens = re.findall(r"`([^`]+)`", line.split("|")[1])
        if tokens[0].startswith("[["):
            table = tokens[0].strip("[]")
            keys |= {(table, k) for k in tokens[1:]}
        else:
            for token in tokens:
                table, _, key = token.rpartition(".")
                assert table, f"{token!r} in docs/configuration.md names no table"
                keys.add((table, key))
    assert keys, f"no keys found under '## {section}'"
    return keys


def example_keys(text: str) -> set[tuple[str, str]]:
    """(table, key) for every setting in an example, active or commented out (`# key = value`). A table
    header [a.b] also counts as key b of table a."""
    keys: set[tuple[str, str]] = set()
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if _COMMENTED.match(line):
            line = line[2:]
        elif line.startswith("#"):
            continue
        if m := _HEADER.match(line):
            table = m.group(1)
            parent, _, leaf = table.rpartition(".")
            if parent:
                keys.add((parent, leaf))
        elif m := _KEY.match(line):
            keys.add((table, m.group(2)))
    return keys


def enable_commented(text: str) -> str:
    """The example with every commented-out setting and table header enabled."""
    return "\n".join(raw[2:] if _COMMENTED.match(raw) else raw for raw in text.splitlines()) + "\n"


def example(name: str) -> dict:
    return tomllib.loads((EXAMPLES / name).read_text())


@pytest.fixture
def site(tmp_path, monkeypatch) -> dict[str, Path]:
    """A temporary stand-in for a machine: /etc/aifed holding a PKI for the examples' federation and sites (with
    its crl.pem), /var/lib/aifed, /etc/slurm/slurm.conf (empty: config check does not run Slurm), and a $HOME
    with a user's client files in ~/.config/aifed."""
    etc, var, slurm, home = (tmp_path / d for d in ("etc-aifed", "var-lib-aifed", "etc-slurm", "home"))
    hub, antenna, client = example("hub.toml"), example("antenna.toml"), example("client.toml")
    federation = hub["hub"]["federation"]
    assert {example(n)["hub"]["federation"] for n in HUB_EXAMPLES} | {antenna["antenna"]["federation"]} == \
        {federation}, "the examples belong to one federation"
    pki.init_ca(etc, federation)  # writes ca.pem, ca.key and an empty, signed crl.pem
    for hub_site in {example(n)["hub"]["site"] for n in HUB_EXAMPLES}:
        pki.issue(etc, Role.HUB, hub_site)
    pki.issue(etc, Role.ANTENNA, antenna["antenna"]["site"])
    user = pki.issue(etc, Role.USER, antenna["antenna"]["site"], CLIENT_USER)
    var.mkdir()
    slurm.mkdir()
    (slurm / "slurm.conf").write_text("")
    monkeypatch.setenv("HOME", str(home))
    for key, source in (("ca", etc / pki.CA_CERT), ("cert", user.cert), ("key", user.key)):
        target = Path(client["tls"][key]).expanduser()
        assert target.is_relative_to(home), f"client.toml tls.{key} should be under ~"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return {"etc": etc, "var": var, "slurm": slurm, "home": home, "root": tmp_path}


def install(site: dict[str, Path], name: str, text: str | None = None) -> Path:
    """Copy an example (and the user map and allocations) into the temporary machine, its paths rewritten to it."""
    def rewrite(t: str) -> str:
        return (t.replace("/etc/aifed", str(site["etc"])).replace("/var/lib/aifed", str(site["var"]))
                .replace("/etc/slurm", str(site["slurm"])))

    for data in ("users.toml", "allocations.toml"):  # the files the configs name
        if not (site["etc"] / data).exists():
            (site["etc"] / data).write_text(rewrite((EXAMPLES / data).read_text()))
    path = site["root"] / name
    path.write_text(rewrite(text if text is not None else (EXAMPLES / name).read_text()))
    return path


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read_string((UNITS / name).read_text())
    return unit


def aifed_args(command_line: str) -> list[str]:
    """The arguments after the aifed executable in a unit's Exec line."""
    argv = shlex.split(command_line)
    assert Path(argv[0]).name == "aifed", command_line
    return argv[1:]


# -- (a) the examples pass `aifed config check` -----------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_example_config_passes_config_check(name, site, capsys):
    path = install(site, name)
    assert main(["config", "check", str(path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert f"{path}: good" in out.out
    assert "warning" not in out.err


@pytest.mark.parametrize("name", HUB_EXAMPLES)
def test_hub_examples_name_their_backend_crl_and_user_map(name, site, capsys):
    assert main(["config", "check", str(install(site, name))]) == 0
    out = capsys.readouterr().out
    assert f"CRL {site['etc'] / 'crl.pem'}" in out
    if name == "hub-slurm.toml":
        assert "backend slurm" in out and f"user map {site['etc'] / 'users.toml'}" in out
    else:
        assert "backend local" in out


@pytest.mark.parametrize("name", CONFIGS)
def test_commented_out_settings_are_valid_once_enabled(name, site, capsys):
    """Optional settings shown commented out (the maintenance window, the user map, the other backend's keys)
    are valid as written: enabled all at once, with type = "slurm" for a hub, the config still passes."""
    text = enable_commented((EXAMPLES / name).read_text())
    if name in HUB_EXAMPLES:
        text = text.replace('type = "local"', 'type = "slurm"')
    if name == "antenna.toml":  # with etcd discovery enabled, the static [[hubs]] must go, as the example says
        text = text[:text.index("\n[[hubs]]")]
    assert main(["config", "check", str(install(site, name, text))]) == 0, capsys.readouterr().err


def test_slurm_only_settings_are_commented_out_in_the_local_example(site, capsys):
    """hub.toml comments them out because with type = "local" they are errors, as it says."""
    text = enable_commented((EXAMPLES / "hub.toml").read_text())
    assert main(["config", "check", str(install(site, "hub.toml", text))]) == 3
    assert 'applies only to type = "slurm"' in capsys.readouterr().err


@pytest.mark.parametrize("role, name", [("hub", "hub.toml"), ("antenna", "antenna.toml")])
def test_example_daemon_starts_and_stops_with_the_unit_command_line(role, name, site):
    """The unit's ExecStart on the example (ports made free ones): it logs `<role> ready` as JSON lines, and exits
    0 on SIGTERM, as the unit's KillSignal sends it."""
    text = re.sub(r'listen = "[^"]+"', 'listen = "127.0.0.1:0"', (EXAMPLES / name).read_text())
    config = install(site, name, text)
    args = aifed_args(read_unit(f"aifed-{role}.service")["Service"]["ExecStart"])
    args[args.index("--config") + 1] = str(config)
    log = site["root"] / f"{role}.log"
    with open(log, "wb") as err:
        daemon = subprocess.Popen([str(Path(sys.executable).parent / "aifed"), *args], stderr=err)
    try:
        deadline = time.monotonic() + 30
        while f'"msg":"{role} ready"' not in log.read_text():
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(records[-1]) and records[-1]["msg"].startswith(f"{role} stopped")
    assert (site["var"] / role / f"{role}.sqlite").exists()  # the state_dir the unit's StateDirectory= makes


def test_user_map_example_means_what_its_comments_say():
    from federation.errors import PermissionDenied
    from hub.usermap import UserMap, load

    assert len(load(EXAMPLES / "users.toml")) == 4
    users = UserMap(EXAMPLES / "users.toml", "leonardo")
    assert users.account("antenna-si", "alice", "ai-health-2026") == "euhpc_ai_042"
    assert users.account("antenna-si", "alice", "") == "euhpc_ai_guest"  # "" : only jobs without a project
    assert users.account("antenna-si", "bob", "climate-dt") == "euhpc_ai_077"  # "*": any user of that antenna
    assert users.account("antenna-pt", "zoe", "anything") == "euhpc_ai_pt"
    with pytest.raises(PermissionDenied, match="users.toml"):
        users.account("antenna-si", "bob", "ai-health-2026")


def test_allocations_example_means_what_its_comments_say(site, capsys):
    from antenna.allocations import load

    access = load(EXAMPLES / "allocations.toml")
    health, climate = access.allocations
    assert [(p.name, p.country, sorted(p.members)) for p in access.projects] == \
        [("ai-health-2026", "SI", ["ana", "bojan"])]
    assert access.users == (("marta", "HR"),)
    assert (health.hub, climate.hub, climate.start) == ("", "leonardo", 1790812800.0)  # a date: midnight UTC
    assert {m.slug for m in health.modes} == {"large-scale", "ai-for-science"}
    text = enable_commented((EXAMPLES / "antenna.toml").read_text())
    text = text[:text.index("\n[[hubs]]")]  # with etcd discovery enabled, as in the test above
    assert main(["config", "check", str(install(site, "antenna.toml", text))]) == 0
    assert f"allocations {site['etc'] / 'allocations.toml'}" in capsys.readouterr().out


def test_daemon_examples_mirror_the_pki_layout():
    """/etc/aifed on a daemon host is a copy of the PKI folder's public part plus the daemon's own key."""
    for name, role, table in (("hub.toml", "hubs", "hub"), ("hub-slurm.toml", "hubs", "hub"),
                              ("antenna.toml", "antennas", "antenna")):
        config = example(name)
        site_name = config[table]["site"]
        assert config["tls"] == {"ca": "/etc/aifed/ca.pem", "cert": f"/etc/aifed/{role}/{site_name}.pem",
                                 "key": f"/etc/aifed/{role}/{site_name}.key", "crl": "/etc/aifed/crl.pem",
                                 "reload": "30s"}, name
        assert config[table]["state_dir"] == f"/var/lib/aifed/{table}"


# -- (b) every documented key is in the matching example -------------------------------------------------

@pytest.mark.parametrize("name, section", [("hub.toml", "Hub"), ("hub-slurm.toml", "Hub"),
                                           ("antenna.toml", "Antenna"), ("client.toml", "Client")])
def test_every_documented_key_is_in_the_example(name, section):
    documented = documented_keys(section)
    present = example_keys((EXAMPLES / name).read_text())
    missing = sorted(f"{t}.{k}" for t, k in documented - present)
    assert not missing, f"{name} lacks keys documented in docs/configuration.md ({section}): {missing}"
    tables = {t for t, _ in documented}
    undocumented = sorted(f"{t}.{k}" for t, k in present - documented if t in tables)
    assert not undocumented, f"{name} has keys docs/configuration.md ({section}) does not describe: {undocumented}"


def test_the_documentation_parser_sees_the_tables():
    hub = documented_keys("Hub")
    assert {("hub", "site"), ("hub", "services"), ("hub", "sectors"), ("backend", "accounts"), ("tls", "crl"),
            ("tls", "reload"), ("partitions", "name"), ("partitions", "max_walltime")} <= hub
    assert {("antenna", "state_dir"), ("tls", "reload"), ("hubs", "site"), ("hubs", "endpoint")} <= \
        documented_keys("Antenna")
    assert example_keys("[backend]\n# [backend.accounts]\n# \"p\" = \"a\"\n# prose = not a key\n") == {
        ("backend", "accounts"), ("backend.accounts", "p"), ("backend.accounts", "prose")}


# -- (c) the systemd units --------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["hub", "antenna"])
def test_daemon_unit_runs_the_checked_config(role):
    unit = read_unit(f"aifed-{role}.service")
    service = unit["Service"]
    start, pre = aifed_args(service["ExecStart"]), aifed_args(service["ExecStartPre"])
    assert start[:2] == [role, "--config"] and pre[:2] == ["config", "check"]
    config = start[2]
    assert pre[2] == config, "ExecStartPre must check the config ExecStart runs"
    assert start[3:] == ["--log-format", "json"]
    assert shlex.split(service["ExecStart"])[0] == shlex.split(service["ExecStartPre"])[0], "the same aifed"
    for args in (start, pre):
        build_parser().parse_args(args)  # aifed itself accepts the command line
    for name, installed in INSTALLED_AS.items():
        if name.startswith(role):
            assert installed == config
            assert config in (EXAMPLES / name).read_text(), f"{name} should say it is installed as {config}"
    assert service["Type"] == "exec"
    assert service["User"] == service["Group"] == "aifed"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 5  # the daemon gives in-flight calls 5 s
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] == "read-only"
    state_dir = f"/var/lib/{service['StateDirectory']}"
    assert state_dir == f"/var/lib/aifed/{role}"
    assert state_dir in service["ReadWritePaths"].split()
    for name in INSTALLED_AS:
        if name.startswith(role):
            assert example(name)[role]["state_dir"] == state_dir, f"{name}: state_dir is the unit's StateDirectory"
    if role == "hub":
        # Local jobs live in the unit's cgroup: only the daemon may be signalled, or a restart kills them.
        assert service["KillMode"] == "process"
        assert service["PrivateTmp"] == "no"  # a private /tmp is deleted under surviving jobs at a stop
        for setting in ("PrivateDevices", "MemoryDenyWriteExecute", "RestrictAddressFamilies", "SystemCallFilter"):
            assert setting not in service, f"{setting} would also confine the local backend's jobs"
    else:
        assert service.get("KillMode", "control-group") == "control-group"
        assert service["PrivateTmp"] == "yes"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_daemons_do_not_notify_systemd():
    """Type=exec is right as long as no daemon calls sd_notify (then it should become Type=notify)."""
    for folder in ("federation", "hub", "antenna"):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text()
            assert "NOTIFY_SOCKET" not in text and "sd_notify" not in text, source


def test_crl_timer_resigns_the_crl_weekly():
    service = read_unit("aifed-crl.service")["Service"]
    assert service["Type"] == "oneshot"
    args = aifed_args(service["ExecStart"])
    assert args[:4] == ["certs", "crl", "--dir", "/etc/aifed/pki"]
    parsed = build_parser().parse_args(args)
    assert parsed.days >= 7  # valid at least until the next weekly run
    assert "/etc/aifed/pki" in service["ReadWritePaths"].split()
    assert "crl.pem must then be copied to every daemon" in (UNITS / "aifed-crl.service").read_text()
    timer = read_unit("aifed-crl.timer")
    assert timer["Timer"]["OnCalendar"] == "weekly"
    assert timer["Timer"]["Unit"] == "aifed-crl.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    aifed = Path(sys.executable).parent / "aifed"
    assert aifed.exists(), f"{aifed}: run `make install`"
    names = sorted(p.name for p in UNITS.iterdir())
    assert names == ["aifed-antenna.service", "aifed-crl.service", "aifed-crl.timer", "aifed-hub.service"]
    for name in names:  # verify checks that the Exec binaries exist: point them at this checkout's aifed
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(re.sub(r"/\S+/bin/aifed\b", str(aifed), text))
    done = subprocess.run([analyze, "verify", "--man=no", *names], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    output = done.stdout + done.stderr
    ours = [line for line in output.splitlines() if any(n in line for n in names)]
    assert done.returncode == 0 and not ours, output


# -- the guides ----------------------------------------------------------------------------------------------

def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("guide", ["guide-hub.md", "guide-antenna.md"])
def test_guide_links_and_deploy_files_exist(guide):
    text = (ROOT / "docs" / guide).read_text()
    for target in re.findall(r"\]\(([^)#]*)(?:#([^)]*))?\)", text):
        page, anchor = target
        path = (ROOT / "docs" / page) if page else ROOT / "docs" / guide
        assert path.exists(), f"{guide} links to {page}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{guide} links to {page}#{anchor}: no such heading"
    for named in re.findall(r"deploy/(?:systemd|examples)/[\w.-]+", text):
        assert (ROOT / named).exists(), f"{guide} names {named}, which does not exist"
