"""The hub's user map: (antenna, user, project) -> local account; unmapped users refused with a clear reason."""

from __future__ import annotations

import pytest

from federation import audit
from federation.errors import ConfigError, PermissionDenied
from federation.model import JobSpec, JobState
from hub.usermap import UserMap, load
from tests.conftest import eventually, running_federation

MAP = """
[[map]]
antenna = "antenna-a"
user = "alice"
project = "climate-7"
account = "ext_alice_climate"

[[map]]
antenna = "antenna-a"
user = "alice"
account = "ext_alice"

[[map]]
antenna = "antenna-b"
project = ""
account = "guests_b"
"""


def test_first_matching_entry_wins_and_wildcards_match(tmp_path):
    path = tmp_path / "users.toml"
    path.write_text(MAP)
    users = UserMap(path, "leonardo")
    assert users.account("antenna-a", "alice", "climate-7") == "ext_alice_climate"
    assert users.account("antenna-a", "alice", "other") == "ext_alice"  # project defaults to "*"
    assert users.account("antenna-a", "alice", "") == "ext_alice"
    assert users.account("antenna-b", "carol", "") == "guests_b"
    with pytest.raises(PermissionDenied, match="no local account for user carol of antenna antenna-b in project 'x'"):
        users.account("antenna-b", "carol", "x")  # project "" matches jobs without a project only
    with pytest.raises(PermissionDenied, match="user bob of antenna antenna-a without a project.*users.toml"):
        users.account("antenna-a", "bob", "")
    with pytest.raises(PermissionDenied):
        users.account("antenna-c", "alice", "climate-7")  # the antenna is part of the key


@pytest.mark.parametrize("text, where", [
    ("[[map]]\nuser = 'alice'\naccount = 'a'\n", "map[0].antenna"),
    ("[[map]]\nantenna = 'antenna-a'\n", "map[0].account"),
    ("[[map]]\nantenna = 'antenna-a'\naccount = 'a b'\n", "map[0].account"),
    ("[[map]]\nantenna = 'antenna-a'\naccount = 'a'\nuid = 0\n", "map[0].uid"),
    ("[[map]]\nantenna = 'Bad Site'\naccount = 'a'\n", "map[0]"),
    ("[[map]]\nantenna = 'antenna-a'\nuser = '../root'\naccount = 'a'\n", "map[0]"),
    ("[users]\n", "users"),
    ("map = 3\n", "map"),
    ("[[map]\n", ""),
])
def test_a_broken_map_names_the_entry_and_key(tmp_path, text, where):
    path = tmp_path / "users.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == where


def test_an_edited_map_is_reloaded_and_a_broken_edit_keeps_the_old_one(tmp_path, caplog):
    path = tmp_path / "users.toml"
    path.write_text(MAP)
    users = UserMap(path, "leonardo")
    path.write_text(MAP + '\n[[map]]\nantenna = "antenna-a"\nuser = "bob"\naccount = "ext_bob"\n')
    users.refresh()
    assert users.account("antenna-a", "bob", "") == "ext_bob"
    path.write_text("[[map]]\nantenna = 'antenna-a'\n")  # no account: refused, previous map kept
    users.refresh()
    assert users.account("antenna-a", "bob", "") == "ext_bob"
    assert "user map not reloaded" in caplog.text


@pytest.fixture
async def mapped(test_pki, tmp_path):
    """One hub with a user map, and antenna-a."""
    path = tmp_path / "users.toml"
    path.write_text(MAP)
    async with running_federation(test_pki, tmp_path, {"leonardo": {"user_map": path}}, antenna={}) as f:
        yield f


async def test_unmapped_users_are_refused_at_the_hub_and_mapped_ones_run_under_their_account(mapped):
    fed = mapped
    hub = fed.hubs["leonardo"]
    alice, bob = fed.client("alice"), fed.client("bob")
    ok = await alice.submit(JobSpec(argv=("true",), project="climate-7"))
    refused = await bob.submit(JobSpec(argv=("true",)))
    assert (await alice.wait(ok.id)).state is JobState.COMPLETED
    done = await bob.wait(refused.id)
    assert done.state is JobState.FAILED
    assert "no local account for user bob of antenna antenna-a" in done.reason
    assert hub.core.journal.get(refused.id) is None  # nothing stored at the hub
    assert hub.core.journal.get(ok.id).account == "ext_alice_climate"
    log = hub.config.state_dir / "audit.jsonl"

    def audited() -> bool:
        records = audit.read(log) if log.exists() else []
        return (any(r["event"] == "accepted" and r.get("account") == "ext_alice_climate" and r["job"] == ok.id
                    for r in records)
                and any(r["event"] == "rejected" and "no local account for user bob" in r["reason"]
                        for r in records))
    assert await eventually(audited)
