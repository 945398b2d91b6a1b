"""federation.config: TOML configs for hubs, antennas and clients, and the errors they raise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from certs import pki
from federation.config import (AntennaConfig, ClientConfig, HubConfig, HubEndpoint, PartitionConfig, load_antenna,
                               load_client, load_hub)
from federation.errors import ConfigError
from federation.identity import Role
from federation.model import AccessMode

REPO = Path(__file__).resolve().parents[1]

TLS = """
[tls]
ca = "pki/ca.pem"
cert = "pki/cert.pem"
key = "pki/cert.key"
"""

HUB = """
[hub]
site = "leonardo"
federation = "eurohpc.test"
listen = "127.0.0.1:50051"
state_dir = "state/leonardo"
services = ["inference", "training"]
sectors = ["health"]
access_modes = ["playground", "fast-lane"]
advert_ttl = "45s"

[backend]
type = "local"
kill_grace = "5s"
cpu_slots = 16

[[partitions]]
name = "booster"
gpu_model = "A100"
gpus = 4
max_walltime = "1-00:00:00"

[[partitions]]
name = "dcgp"
max_walltime = "30"
""" + TLS

TLS_ANTENNA = TLS.replace("pki/cert.", "pki/antenna.")

ANTENNA = """
[antenna]
site = "antenna-a"
federation = "eurohpc.test"
listen = "0.0.0.0:50060"
state_dir = "state/antenna-a"

[[hubs]]
site = "leonardo"
endpoint = "leonardo.example:50051"

[[hubs]]
site = "lumi"
endpoint = "127.0.0.1:50052"
""" + TLS_ANTENNA

CLIENT = """
[client]
antenna = "antenna.example:50060"
""" + TLS


@pytest.fixture(scope="module")
def tls_material(tmp_path_factory) -> dict[str, bytes]:
    """A real CA and a matching hub certificate and key (the loader checks that they are PEM and belong together)."""
    root = tmp_path_factory.mktemp("pki-src")
    pki.init_ca(root, "eurohpc.test")
    issued = pki.issue(root, Role.HUB, "leonardo")
    antenna = pki.issue(root, Role.ANTENNA, "antenna-a")
    return {"ca.pem": (root / pki.CA_CERT).read_bytes(), "cert.pem": issued.cert.read_bytes(),
            "cert.key": issued.key.read_bytes(), "antenna.pem": antenna.cert.read_bytes(),
            "antenna.key": antenna.key.read_bytes()}


@pytest.fixture
def folder(tmp_path: Path, tls_material) -> Path:
    """A config folder holding the TLS files under pki/."""
    (tmp_path / "pki").mkdir()
    for name, data in tls_material.items():
        (tmp_path / "pki" / name).write_bytes(data)
    return tmp_path


def write(folder: Path, text: str, name: str = "hub.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def edit(text: str, old: str, new: str) -> str:
    """Replace exactly one occurrence, so a test cannot silently edit nothing."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def config_error(loader, path: Path, key: str, *problem: str) -> ConfigError:
    """Load and expect a ConfigError naming the file, `key` and each fragment of `problem`."""
    with pytest.raises(ConfigError) as info:
        loader(path)
    err = info.value
    message = str(err)
    assert str(path) in message
    assert err.key == key
    if key:
        assert key in message
    for fragment in problem:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return err


# -- hub: valid --------------------------------------------------------------------------------------

def test_valid_hub_config_loads(folder):
    """Every setting of a complete hub file ends up in HubConfig, durations in seconds."""
    path = write(folder, HUB)
    config = load_hub(path)
    assert isinstance(config, HubConfig)
    assert config.path == path
    assert config.site == "leonardo"
    assert config.federation == "eurohpc.test"
    assert config.listen == "127.0.0.1:50051"
    assert config.partitions == (PartitionConfig("booster", "A100", 4, 86400), PartitionConfig("dcgp", "", 0, 1800))
    assert config.services == ("inference", "training")
    assert config.sectors == ("health",)
    assert config.access_modes == (AccessMode.PLAYGROUND, AccessMode.FAST_LANE)
    assert config.advert_ttl_s == 45
    assert config.backend == "local"
    assert config.kill_grace_s == 5
    assert config.cpu_slots == 16


def test_relative_paths_are_resolved_against_the_config_folder(folder, monkeypatch, tmp_path_factory):
    """state_dir and the TLS files are taken relative to the file's folder, not the working directory."""
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_hub(write(folder, HUB))
    assert config.state_dir == folder / "state" / "leonardo"
    assert config.tls.ca == folder / "pki" / "ca.pem"
    assert config.tls.cert == folder / "pki" / "cert.pem"
    assert config.tls.key == folder / "pki" / "cert.key"


def test_absolute_state_dir_is_kept(folder, tmp_path_factory):
    """An absolute state_dir is used as it is."""
    elsewhere = tmp_path_factory.mktemp("state")
    config = load_hub(write(folder, edit(HUB, '"state/leonardo"', f'"{elsewhere}"')))
    assert config.state_dir == elsewhere


def test_hub_defaults(folder):
    """Optional settings take their documented defaults."""
    text = """
[hub]
site = "leonardo"
federation = "eurohpc.test"
listen = "127.0.0.1:1"
state_dir = "s"

[[partitions]]
name = "small"
max_walltime = 3600
""" + TLS
    config = load_hub(write(folder, text))
    assert config.partitions == (PartitionConfig("small", "", 0, 3600),)
    assert config.services == () and config.sectors == () and config.access_modes == ()
    assert config.advert_ttl_s == 30
    assert config.backend == "local"
    assert config.kill_grace_s == 10
    assert config.cpu_slots == 64


# -- hub: errors -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    """A file that does not exist is named, with no key."""
    config_error(load_hub, tmp_path / "nope.toml", "", "file not found")


def test_invalid_toml(folder):
    """A syntax error says the file is not valid TOML."""
    config_error(load_hub, write(folder, HUB + "\n[hub\n"), "", "is not valid TOML")


def test_missing_site(folder):
    config_error(load_hub, write(folder, edit(HUB, 'site = "leonardo"\n', "")), "hub.site", "is required")


def test_missing_hub_table(folder):
    """Without a [hub] table the first required key is reported."""
    text = HUB[HUB.index("[backend]"):]
    config_error(load_hub, write(folder, text), "hub.site", "is required")


def test_bad_site_name(folder):
    config_error(load_hub, write(folder, edit(HUB, '"leonardo"', '"Leonardo!"')), "hub.site",
                 "'Leonardo!'", "not valid")


def test_bad_federation_name(folder):
    config_error(load_hub, write(folder, edit(HUB, '"eurohpc.test"', '"EuroHPC Test"')), "hub.federation",
                 "not valid")


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:", ":50051", "localhost:http", "127.0.0.1:70000"])
def test_listen_needs_host_and_port(folder, listen):
    """listen must be host:port with a numeric port in range."""
    config_error(load_hub, write(folder, edit(HUB, '"127.0.0.1:50051"', f'"{listen}"')), "hub.listen",
                 "must be host:port")


def test_misspelt_required_key_is_pointed_out(folder):
    """A required key that is missing because of a typo names the near miss."""
    config_error(load_hub, write(folder, edit(HUB, 'site = "leonardo"', 'sitee = "leonardo"')), "hub.site",
                 "is required", "hub.sitee")


def test_unknown_key_in_hub_table(folder):
    """A typo is an error, not silently ignored."""
    config_error(load_hub, write(folder, edit(HUB, 'site = "leonardo"\n', 'site = "leonardo"\nsitee = "x"\n')),
                 "hub.sitee", "is not a known setting")


def test_unknown_top_level_table(folder):
    config_error(load_hub, write(folder, HUB + '\n[extra]\nx = 1\n'), "extra", "is not a known setting")


def test_unknown_key_in_partition(folder):
    config_error(load_hub, write(folder, edit(HUB, 'gpus = 4\n', 'gpus = 4\ngpu = 4\n')), "partitions[0].gpu",
                 "is not a known setting")


def test_negative_gpus(folder):
    config_error(load_hub, write(folder, edit(HUB, "gpus = 4", "gpus = -1")), "partitions[0].gpus",
                 "must be between 0 and")


def test_gpus_without_gpu_model(folder):
    config_error(load_hub, write(folder, edit(HUB, 'gpu_model = "A100"\n', "")), "partitions[0].gpu_model",
                 "is required when the partition has GPUs")


def test_duplicate_partition_names(folder):
    config_error(load_hub, write(folder, edit(HUB, 'name = "dcgp"', 'name = "booster"')), "partitions[1].name",
                 "'booster'", "declared twice")


def test_no_partitions(folder):
    text = HUB[:HUB.index("[[partitions]]")] + TLS
    config_error(load_hub, write(folder, text), "partitions", "at least one [[partitions]]")


def test_unknown_access_mode(folder):
    config_error(load_hub, write(folder, edit(HUB, '"fast-lane"', '"express"')), "hub.access_modes",
                 "'express'", "playground")


def test_unknown_backend_type(folder):
    config_error(load_hub, write(folder, edit(HUB, 'type = "local"', 'type = "pbs"')), "backend.type",
                 "'pbs'", "unknown backend")


@pytest.mark.parametrize("value", ['"one day"', '"1-"', '"-5"', '"1.5"', "-1"])
def test_bad_max_walltime(folder, value):
    """An unparsable or negative walltime names the key and repeats the duration error."""
    config_error(load_hub, write(folder, edit(HUB, '"1-00:00:00"', value)), "partitions[0].max_walltime",
                 "is not a duration", "`HH:MM:SS`")


def test_zero_max_walltime(folder):
    config_error(load_hub, write(folder, edit(HUB, '"1-00:00:00"', '"0"')), "partitions[0].max_walltime",
                 "must be positive")


def test_missing_max_walltime(folder):
    config_error(load_hub, write(folder, edit(HUB, 'max_walltime = "30"\n', "")), "partitions[1].max_walltime",
                 "is required")


def test_advert_ttl_too_short(folder):
    config_error(load_hub, write(folder, edit(HUB, '"45s"', '"2s"')), "hub.advert_ttl", "at least 3 seconds")


def test_cpu_slots_must_be_positive(folder):
    config_error(load_hub, write(folder, edit(HUB, "cpu_slots = 16", "cpu_slots = 0")), "backend.cpu_slots",
                 "at least 1")


def test_tls_cert_missing(folder):
    """A TLS file that does not exist is named with its resolved path."""
    (folder / "pki" / "cert.pem").unlink()
    err = config_error(load_hub, write(folder, HUB), "tls.cert", "does not exist")
    assert str(folder / "pki" / "cert.pem") in str(err)


def test_tls_file_that_is_not_pem(folder):
    """A TLS file that exists but holds no PEM data is refused, naming the file."""
    (folder / "pki" / "ca.pem").write_text("dummy\n")
    err = config_error(load_hub, write(folder, HUB), "tls", "not a PEM file")
    assert str(folder / "pki" / "ca.pem") in str(err)


def test_tls_key_of_another_certificate(folder, tmp_path_factory):
    """A key that does not belong to the certificate is refused before the daemon starts."""
    other = tmp_path_factory.mktemp("other-pki")
    pki.init_ca(other, "eurohpc.test")
    (folder / "pki" / "cert.key").write_bytes(pki.issue(other, Role.HUB, "leonardo").key.read_bytes())
    config_error(load_hub, write(folder, HUB), "tls", "does not belong to certificate")


def test_tls_table_missing(folder):
    text = HUB[:HUB.index("[tls]")]
    config_error(load_hub, write(folder, text), "tls.ca", "is required")


@pytest.mark.parametrize("old, new, key, want", [
    ("gpus = 4", 'gpus = "4"', "partitions[0].gpus", "must be a int"),
    ("gpus = 4", "gpus = true", "partitions[0].gpus", "must be a int"),
    ("cpu_slots = 16", "cpu_slots = 1.5", "backend.cpu_slots", "must be a int"),
    ('site = "leonardo"', "site = 7", "hub.site", "must be a str"),
    ('services = ["inference", "training"]', 'services = "inference"', "hub.services", "must be a list"),
    ('services = ["inference", "training"]', 'services = ["inference", 3]', "hub.services", "non-empty strings"),
    ('advert_ttl = "45s"', "advert_ttl = true", "hub.advert_ttl", "must be a str or int"),
])
def test_wrong_types(folder, old, new, key, want):
    """A value of the wrong type names the key, the expected type and the value."""
    config_error(load_hub, write(folder, edit(HUB, old, new)), key, want)


def test_hub_must_be_a_table(folder):
    text = 'hub = "leonardo"\n' + HUB[HUB.index("[backend]"):]
    config_error(load_hub, write(folder, text), "hub", "must be a table")


# -- antenna -----------------------------------------------------------------------------------------

def test_valid_antenna_config_loads(folder):
    path = write(folder, ANTENNA, "antenna.toml")
    config = load_antenna(path)
    assert isinstance(config, AntennaConfig)
    assert config.site == "antenna-a"
    assert config.listen == "0.0.0.0:50060"
    assert config.state_dir == folder / "state" / "antenna-a"
    assert config.hubs == (HubEndpoint("leonardo", "leonardo.example:50051"), HubEndpoint("lumi", "127.0.0.1:50052"))
    assert config.tls.key == folder / "pki" / "antenna.key"


def test_antenna_without_hubs(folder):
    text = ANTENNA[:ANTENNA.index("[[hubs]]")] + TLS_ANTENNA
    config_error(load_antenna, write(folder, text, "antenna.toml"), "hubs", "at least one [[hubs]]")


def test_antenna_duplicate_hub_sites(folder):
    path = write(folder, edit(ANTENNA, 'site = "lumi"', 'site = "leonardo"'), "antenna.toml")
    config_error(load_antenna, path, "hubs[1].site", "'leonardo'", "listed twice")


def test_antenna_hub_endpoint_without_port(folder):
    path = write(folder, edit(ANTENNA, '"leonardo.example:50051"', '"leonardo.example"'), "antenna.toml")
    config_error(load_antenna, path, "hubs[0].endpoint", "must be host:port")


def test_antenna_hub_bad_site(folder):
    path = write(folder, edit(ANTENNA, 'site = "lumi"', 'site = "LUMI"'), "antenna.toml")
    config_error(load_antenna, path, "hubs[1].site", "not valid")


def test_antenna_unknown_key(folder):
    path = write(folder, edit(ANTENNA, 'site = "lumi"', 'site = "lumi"\nport = 1'), "antenna.toml")
    config_error(load_antenna, path, "hubs[1].port", "is not a known setting")


# -- client ------------------------------------------------------------------------------------------

def test_valid_client_config_loads(folder):
    config = load_client(write(folder, CLIENT, "client.toml"))
    assert isinstance(config, ClientConfig)
    assert config.antenna == "antenna.example:50060"
    assert config.tls.ca == folder / "pki" / "ca.pem"


def test_client_errors(folder):
    """The client file has the same checks: address format, unknown keys, TLS files."""
    config_error(load_client, write(folder, edit(CLIENT, ":50060", ""), "c1.toml"), "client.antenna",
                 "must be host:port")
    config_error(load_client, write(folder, CLIENT + "\n[hub]\nsite = 'x'\n", "c2.toml"), "hub",
                 "is not a known setting")
    (folder / "pki" / "ca.pem").unlink()
    config_error(load_client, write(folder, CLIENT, "c3.toml"), "tls.ca", "does not exist")


# -- the daemon command ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, text, key", [
    ("hub", edit(HUB, "gpus = 4", 'gpus = "4"'), "partitions[0].gpus"),
    ("antenna", edit(ANTENNA, '"leonardo.example:50051"', '"leonardo.example"'), "hubs[0].endpoint"),
])
def test_daemon_exits_3_on_a_bad_config(folder, kind, text, key):
    """`aifed hub|antenna --config BAD` exits with code 3 and names the file and the key on stderr."""
    path = write(folder, text, f"{kind}.toml")
    proc = subprocess.run([sys.executable, "-m", "federation.cli", kind, "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert str(path) in proc.stderr
    assert key in proc.stderr


def test_daemon_exits_3_on_a_missing_config(tmp_path):
    path = tmp_path / "missing.toml"
    proc = subprocess.run([sys.executable, "-m", "federation.cli", "hub", "--config", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert str(path) in proc.stderr and "file not found" in proc.stderr


def test_certificate_of_another_identity_is_refused(folder):
    """A hub config that points at the antenna's certificate (or another site's) is a config error."""
    path = write(folder, HUB.replace("pki/cert.", "pki/antenna."))
    err = config_error(load_hub, path, "tls.cert", "spiffe://eurohpc.test/antenna/antenna-a",
                       "but this config is spiffe://eurohpc.test/hub/leonardo")
    assert "antenna.pem" in str(err)
    path = write(folder, edit(HUB, 'site = "leonardo"', 'site = "lumi"'))
    config_error(load_hub, path, "tls.cert", "spiffe://eurohpc.test/hub/leonardo", "hub/lumi")


# -- aifed config check -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, says", [
    ("hub.toml", HUB, "good: hub leonardo of eurohpc.test, listens on 127.0.0.1:50051, backend local, 2 partition(s)"),
    ("antenna.toml", ANTENNA, "good: antenna antenna-a of eurohpc.test, listens on 0.0.0.0:50060, 2 hub(s), no CRL"),
    ("client.toml", CLIENT, "good: client of antenna antenna.example:50060, identity spiffe://eurohpc.test/hub/leonardo"),
])
def test_config_check_accepts_good_files_and_says_what_they_are(folder, capsys, name, text, says):
    from federation.cli import main
    assert main(["config", "check", str(write(folder, text, name))]) == 0
    assert says in capsys.readouterr().out
    assert not (folder / "state").exists()  # nothing was started or created


@pytest.mark.parametrize("text, says", [
    (edit(HUB, 'cpu_slots = 16', 'cpu_slots = 0'), "backend.cpu_slots: must be at least 1"),
    (edit(HUB, 'site = "leonardo"', 'site = "lumi"'), "tls.cert"),
    (HUB + '\n[limits]\nsubmit_burst = 10\n', "limits.submit_burst"),
    (edit(HUB, '[hub]\n', '[hub]\nuser_map = "users.toml"\n'), "user map not found"),
    (HUB + ANTENNA.split("[[hubs]]")[0], "exactly one of the tables"),
    ("[hub\n", "not a readable TOML file"),
])
def test_config_check_reports_file_key_and_problem_with_exit_3(folder, capsys, text, says):
    from federation.cli import main
    path = write(folder, text)
    assert main(["config", "check", str(path)]) == 3
    err = capsys.readouterr().err
    assert says in err and str(path) in err


def test_maintenance_windows_are_parsed_and_checked(folder):
    windows = HUB + '''
[[maintenance]]
start = 2026-12-01T08:00:00Z
end = "2026-12-01T14:00:00+01:00"
reason = "firmware"

[[maintenance]]
start = "2026-11-30T08:00:00Z"
end = "2026-11-30T09:00:00Z"
'''
    config = load_hub(write(folder, windows))
    assert [(w.start, w.end, w.reason) for w in config.maintenance] == [
        (1796025600.0, 1796029200.0, ""), (1796112000.0, 1796130000.0, "firmware")]  # sorted by start
    for text, key, says in [
        ('start = "2026-12-01T08:00:00"\nend = "2026-12-01T09:00:00Z"', "maintenance[0].start", "time zone"),
        ('start = "tomorrow"\nend = "2026-12-01T09:00:00Z"', "maintenance[0].start", "not a date"),
        ('start = "2026-12-01T09:00:00Z"\nend = "2026-12-01T08:00:00Z"', "maintenance[0].end", "after start"),
        ('start = "2026-12-01T08:00:00Z"', "maintenance[0].end", "required"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_hub(write(folder, HUB + "\n[[maintenance]]\n" + text + "\n"))
        assert err.value.key == key and says in err.value.problem


def test_access_mode_limits_are_parsed_and_checked(folder):
    config = load_hub(write(folder, HUB + '\n[modes.playground]\nmax_gpus = 1\nmax_walltime = "1:00:00"\n'
                                          '\n[modes.fast-lane]\nmax_gpus = 8\n'))
    assert [(m.mode, m.max_gpus, m.max_walltime_s) for m in config.mode_limits] == [
        (AccessMode.PLAYGROUND, 1, 3600), (AccessMode.FAST_LANE, 8, 0)]
    for text, key, says in [
        ("[modes.sandbox]\nmax_gpus = 1\n", "modes.sandbox", "unknown access mode"),
        ("[modes.large-scale]\nmax_gpus = 1\n", "modes.large-scale", "does not accept"),
        ("[modes.playground]\nmax_gpus = -1\n", "modes.playground.max_gpus", "between 0"),
        ("[modes.playground]\ngpus = 1\n", "modes.playground.gpus", "not a known setting"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_hub(write(folder, HUB + "\n" + text))
        assert err.value.key == key and says in err.value.problem


def test_countries_are_checked_and_eu_expands_to_the_member_states(folder):
    from federation.config import EU_MEMBER_STATES
    config = load_hub(write(folder, edit(HUB, 'sectors = ["health"]', 'sectors = ["health"]\ncountries = ["NO", "EU", "SI"]')))
    assert config.countries == ("NO", *EU_MEMBER_STATES) and len(config.countries) == 28
    with pytest.raises(ConfigError) as err:
        load_hub(write(folder, edit(HUB, 'sectors = ["health"]', 'sectors = ["health"]\ncountries = ["Slovenia"]')))
    assert err.value.key == "hub.countries" and "ISO 3166" in err.value.problem
    antenna = load_antenna(write(folder, edit(ANTENNA, 'site = "antenna-a"', 'site = "antenna-a"\ncountry = "SI"'),
                                 "antenna.toml"))
    assert antenna.country == "SI"
    with pytest.raises(ConfigError) as err:
        load_antenna(write(folder, edit(ANTENNA, 'site = "antenna-a"', 'site = "antenna-a"\ncountry = "si"'),
                           "antenna.toml"))
    assert err.value.key == "antenna.country"


# -- membership, high availability, events ------------------------------------------------------------

ETCD = '\n[discovery]\nbackend = "etcd"\nendpoints = ["etcd1.example:2379", "127.0.0.1:2379"]\n'


def test_discovery_defaults_to_static_and_etcd_settings_are_read(folder):
    hub = load_hub(write(folder, HUB))
    assert hub.discovery.backend == "static" and hub.ha_instance == "" and hub.events.broker == ""
    hub = load_hub(write(folder, HUB + ETCD + 'lease = "20s"\n[ha]\ninstance = "leonardo-b"\n'
                         '[events]\nbroker = "mqtt.example:8883"\nbuffer = 50\n'))
    assert hub.discovery.endpoints == ("etcd1.example:2379", "127.0.0.1:2379") and hub.discovery.lease_s == 20
    assert hub.discovery.key_prefix("eurohpc.test") == "/aifed/eurohpc.test"
    assert hub.ha_instance == "leonardo-b"
    assert (hub.events.broker, hub.events.tls, hub.events.buffer) == ("mqtt.example:8883", True, 50)
    antenna = load_antenna(write(folder, ANTENNA[:ANTENNA.index("[[hubs]]")] + TLS_ANTENNA + ETCD
                                 + 'prefix = "/fed/test"\n', "antenna.toml"))
    assert antenna.hubs == () and antenna.discovery.key_prefix("x") == "/fed/test"


@pytest.mark.parametrize("extra, key, says", [
    ('\n[discovery]\nbackend = "zookeeper"\n', "discovery.backend", "this version has: static, etcd"),
    ('\n[discovery]\nbackend = "etcd"\n', "discovery.endpoints", "is required with backend"),
    ('\n[discovery]\nendpoints = ["127.0.0.1:2379"]\n', "discovery.endpoints", "applies only to backend"),
    (ETCD + 'prefix = "aifed/"\n', "discovery.prefix", "must start with '/'"),
    ('\n[discovery]\nbackend = "etcd"\nendpoints = ["etcd1"]\n', "discovery.endpoints[0]", "host:port"),
    (ETCD + 'lease = "1s"\n', "discovery.lease", "at least 2 seconds"),
    ('\n[ha]\ninstance = "leonardo-a"\n', "ha.instance", "needs [discovery] backend"),
    (ETCD + '[ha]\ninstance = "Leonardo A"\n', "ha.instance", "not valid"),
    ('\n[events]\nbuffer = 10\n', "events.broker", "is required"),
    ('\n[events]\nbroker = "mqtt:1883"\nbuffer = 0\n', "events.buffer", "between 1"),
])
def test_membership_and_events_settings_are_checked(folder, extra, key, says):
    config_error(load_hub, write(folder, HUB + extra), key, says)


def test_a_hub_on_every_interface_must_say_where_antennas_dial_it_with_etcd(folder):
    text = edit(HUB, 'listen = "127.0.0.1:50051"', 'listen = "0.0.0.0:50051"') + ETCD
    config_error(load_hub, write(folder, text), "hub.advertise", "is required when listen is '0.0.0.0:50051'")
    text = edit(text, 'state_dir = "state/leonardo"', 'state_dir = "state/leonardo"\nadvertise = "hub.example:50051"')
    assert load_hub(write(folder, text)).advertise == "hub.example:50051"


def test_an_antenna_lists_hubs_only_with_static_discovery(folder):
    config_error(load_antenna, write(folder, ANTENNA + ETCD, "antenna.toml"), "hubs", "[[hubs]] are for backend")
    config_error(load_antenna, write(folder, ANTENNA + ETCD + 'lease = "5s"\n', "antenna.toml"), "discovery.lease",
                 "not a known setting")


def test_partition_energy_efficiency_is_read_and_checked(folder):
    wall = 'max_walltime = "1-00:00:00"'
    good = load_hub(write(folder, edit(HUB, wall, f"{wall}\ngflops_per_watt = 52.3")))
    assert good.partitions[0].gflops_per_watt == 52.3
    assert load_hub(write(folder, HUB)).partitions[0].gflops_per_watt == 0.0
    for value in ("-1", "1e9", "true", '"fast"', "nan"):
        path = write(folder, edit(HUB, wall, f"{wall}\ngflops_per_watt = {value}"))
        with pytest.raises(ConfigError) as err:
            load_hub(path)
        assert err.value.key == "partitions[0].gflops_per_watt", value


def test_data_quotas_and_retention_are_parsed_and_checked(folder):
    from federation.config import DataConfig
    assert load_hub(write(folder, HUB)).data == DataConfig()
    hub = load_hub(write(folder, HUB + '\n[data]\nretention = "2d"\noutputs_retention = "60d"\nquota_mb = 500000\n'
                                       'max_output_mb = 2048\noutputs_quota_mb = 50000\n'))
    assert hub.data == DataConfig(2 * 86400, 60 * 86400, 500_000, 100_000, 2048, 50_000)
    antenna = load_antenna(write(folder, ANTENNA + '\n[data]\nquota_mb = 200000\nmax_job_input_mb = 50000\n',
                                 "antenna.toml"))
    assert (antenna.data.quota_mb, antenna.data.max_job_input_mb, antenna.data.retention_s) == (200_000, 50_000,
                                                                                                7 * 86400)
    for loader, base, name, text, key, says in [
        (load_hub, HUB, "hub.toml", 'retention = "10m"', "data.retention", "at least 1h"),
        (load_hub, HUB, "hub.toml", "quota_mb = -1", "data.quota_mb", "from 0 to"),
        (load_hub, HUB, "hub.toml", "max_output_mb = 0", "data.max_output_mb", "from 1 to"),
        (load_hub, HUB, "hub.toml", "max_job_input_mb = 5", "data.max_job_input_mb", "is an antenna setting"),
        (load_antenna, ANTENNA, "antenna.toml", "max_output_mb = 5", "data.max_output_mb", "is a hub setting"),
        (load_antenna, ANTENNA, "antenna.toml", "outputs_quota_mb = 5", "data.outputs_quota_mb", "is a hub setting"),
        (load_hub, HUB, "hub.toml", "outputs_quota_mb = -5", "data.outputs_quota_mb", "from 0 to"),
        (load_antenna, ANTENNA, "antenna.toml", "max_job_input_mb = 200000", "data.max_job_input_mb", "to 107374"),
        (load_antenna, ANTENNA, "antenna.toml", "quota = 5", "data.quota", "not a known setting"),
    ]:
        with pytest.raises(ConfigError) as err:
            loader(write(folder, base + "\n[data]\n" + text + "\n", name))
        assert err.value.key == key and says in err.value.problem, (text, err.value)


@pytest.mark.parametrize("value, says", [("0", "must be 1 to 10000"), ("20000", "must be 1 to 10000"),
                                          ('"big"', "must be a int")])
def test_array_size_is_bounded(folder, value, says):
    text = edit(HUB, 'type = "local"\nkill_grace = "5s"\n', f'type = "slurm"\narray_size = {value}\n')
    config_error(load_hub, write(folder, text), "backend.array_size", says)


def test_array_size_is_for_slurm_and_loads(folder):
    config_error(load_hub, write(folder, edit(HUB, "cpu_slots = 16", "cpu_slots = 16\narray_size = 8")),
                 "backend.array_size", 'applies only to type = "slurm"')
    slurm = edit(HUB, 'type = "local"\nkill_grace = "5s"\n', 'type = "slurm"\narray_size = 8\n')
    assert load_hub(write(folder, slurm)).array_size == 8
