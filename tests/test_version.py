"""Version negotiation: a caller of another protocol major is refused with both versions named."""

from __future__ import annotations

import grpc
import pytest

from federation import __version__
from federation.cli import main
from federation.identity import Role
from federation.pb import hub_pb2, hub_pb2_grpc
from federation.rpc import CHANNEL_OPTIONS, PROTOCOL, secure_channel


def channel_with_agent(port: int, tls, agent: str | None) -> grpc.aio.Channel:
    options = [*CHANNEL_OPTIONS] + ([("grpc.primary_user_agent", agent)] if agent else [])
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(), options=options)


async def test_a_caller_of_another_protocol_is_refused_clearly_and_others_are_served(fed, test_pki):
    tls, port = test_pki.tls(Role.ANTENNA, "antenna-a"), fed.hubs["leonardo"].port
    async with channel_with_agent(port, tls, f"aifed/9.0.0 (protocol {PROTOCOL + 1})") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await hub_pb2_grpc.HubStub(channel).GetAdvert(hub_pb2.AdvertRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"aifed {__version__} and speaks protocol {PROTOCOL}" in err.value.details()
    assert f"aifed 9.0.0 with protocol {PROTOCOL + 1}" in err.value.details()
    for agent in (None, "grpcurl/1.9.1", f"aifed/0.0.1 (protocol {PROTOCOL})"):  # tools, and other minor versions
        async with channel_with_agent(port, tls, agent) as channel:
            advert = await hub_pb2_grpc.HubStub(channel).GetAdvert(hub_pb2.AdvertRequest(), timeout=10)
            assert advert.site == "leonardo"
    async with secure_channel(f"127.0.0.1:{port}", tls) as channel:  # aifed's own channels say who they are
        assert (await hub_pb2_grpc.HubStub(channel).GetAdvert(hub_pb2.AdvertRequest(), timeout=10)).site


def test_version_command(capsys):
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"aifed {__version__} (protocol {PROTOCOL})"
