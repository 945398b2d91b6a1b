"""The RPC edge shared by every daemon: authentication, authorization, error translation,
and secure servers and channels.

`GuardInterceptor` is the one place where a peer certificate becomes an `Identity`,
where the daemon's access rules are applied to each method, and where typed
`AifedError`s become gRPC status codes. Servicers read the caller with `caller()`.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from federation.errors import AifedError, PermissionDenied, Unauthenticated
from federation.identity import Identity, Role, parse_identity
from federation.tls import TlsFiles

log = logging.getLogger(__name__)

HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List")
REFLECTION_METHODS = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                      "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_DETAILS = 2000  # an error message echoing a huge request value must not exceed gRPC's metadata limit
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
)
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Clients keep idle connections alive with a ping every 30 s; without this the server counts those pings as
    # abuse and closes the connection (GOAWAY "too_many_pings").
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)

_caller: contextvars.ContextVar[Identity] = contextvars.ContextVar("aifed_caller")

# An access rule takes the caller and raises PermissionDenied if it may not call the method.
Rule = Callable[[Identity], None]


def caller() -> Identity:
    """The authenticated identity of the peer whose RPC is being served."""
    return _caller.get()


def allow_roles(*roles: Role) -> Rule:
    names = "/".join(r.value for r in roles)

    def rule(who: Identity) -> None:
        if who.role not in roles:
            raise PermissionDenied(f"a {who.role.value} may not call this method; it is for {names} identities")
    return rule


def allow_any(who: Identity) -> None:
    """Any authenticated member of the federation (health checks, reflection)."""


def peer_identity(context: grpc.aio.ServicerContext, federation: str) -> Identity:
    """The identity in the peer certificate's spiffe:// URI SAN, on this federation."""
    sans = [s.decode() if isinstance(s, bytes) else s for s in (context.peer_identities() or ())]
    uris = [s for s in sans if s.startswith("spiffe://")]
    if len(uris) != 1:
        raise Unauthenticated(
            "the client certificate must carry exactly one spiffe:// URI SAN; issue it with `aifed certs issue`")
    try:
        who = parse_identity(uris[0])
    except ValueError as exc:
        raise Unauthenticated(f"the client certificate's identity is not valid: {exc}") from None
    if who.federation != federation:
        raise Unauthenticated(f"the client certificate belongs to federation {who.federation!r}, not {federation!r}")
    return who


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Authenticate, authorize by method (default deny), and translate errors, for every RPC."""

    def __init__(self, federation: str, rules: Mapping[str, Rule]):
        self.federation = federation
        self.rules = dict(rules)
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}  # per method: the handler wrapped once

    async def intercept_service(self, continuation, details):
        guarded = self._guarded.get(details.method)
        if guarded is not None:
            return guarded
        handler = await continuation(details)
        if handler is None:
            return None
        guarded = self._guard(details.method, handler)
        self._guarded[details.method] = guarded
        return guarded

    def _guard(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        rule = self.rules.get(method)
        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary")
        behaviour = getattr(handler, kind)

        def admit(context) -> contextvars.Token:
            who = peer_identity(context, self.federation)
            if rule is None:
                raise PermissionDenied(f"{method} is not open to any caller")
            rule(who)
            return _caller.set(who)

        if inspect.isasyncgenfunction(behaviour):
            async def wrapped(request, context):
                try:
                    admit(context)
                    async for item in behaviour(request, context):
                        yield item
                except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                    await _abort(context, method, exc)
        else:
            async def wrapped(request, context):
                try:
                    admit(context)
                    return await behaviour(request, context)
                except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                    await _abort(context, method, exc)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(wrapped, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)


async def _abort(context, method: str, exc: Exception) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, AifedError):
        message = exc.message if len(exc.message) <= MAX_DETAILS else exc.message[:MAX_DETAILS] + "..."
        log.info("%s refused: %s: %s", method, exc.code.name, message)
        await context.abort(exc.code, message)
    if isinstance(exc, NotImplementedError):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this daemon")
    ref = uuid.uuid4().hex[:8]
    log.exception("%s failed unexpectedly (ref %s)", method, ref)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (ref {ref}); see the daemon's log")


def health_and_reflection_rules() -> dict[str, Rule]:
    return {m: allow_any for m in (*HEALTH_METHODS, *REFLECTION_METHODS)}


class SecureServer:
    """A grpc.aio server on one mTLS port, with health and reflection, guarded by `GuardInterceptor`."""

    def __init__(self, federation: str, tls: TlsFiles, rules: Mapping[str, Rule]):
        self.guard = GuardInterceptor(federation, {**health_and_reflection_rules(), **rules})
        self.server = grpc.aio.server(interceptors=[self.guard], options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._tls = tls
        self._services: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self.port = 0

    def add(self, register: Callable[[object, grpc.aio.Server], None], servicer: object, full_name: str) -> None:
        register(servicer, self.server)
        self._services.append(full_name)

    async def start(self, listen: str) -> int:
        """Bind with mTLS and start serving; return the bound port (useful with port 0)."""
        reflection.enable_server_reflection((*self._services, reflection.SERVICE_NAME), self.server)
        self.port = self.server.add_secure_port(listen, self._tls.server_credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        await self.server.start()
        for name in ("", *self._services):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def secure_channel(target: str, tls: TlsFiles, options: Iterable[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """An mTLS channel to a federation daemon."""
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=(*CHANNEL_OPTIONS, *options))
