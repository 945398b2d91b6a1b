"""The RPC edge shared by every daemon: authentication, authorization, error translation,
and secure servers and channels.

`GuardInterceptor` is the one place where a peer certificate becomes an `Identity`,
where the daemon's access rules are applied to each method, and where typed
`AifedError`s become gRPC status codes. Servicers read the caller with `caller()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from federation.audit import AuditLog
from federation.crl import Revocations
from federation import __version__
from federation.errors import AifedError, FailedPrecondition, PermissionDenied, ResourceExhausted, Unauthenticated
from federation.identity import Identity, Role, article, parse_identity
from federation.tls import TlsFiles
from federation.watch import bounded, stop_tasks

log = logging.getLogger(__name__)

HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List")
REFLECTION_METHODS = ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                      "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
PROTOCOL = 1  # the aifed protocol's major version: daemons and clients of different majors refuse each other
USER_AGENT = f"aifed/{__version__} (protocol {PROTOCOL})"
_AGENT = re.compile(r"aifed/(\S+) \(protocol (\d+)\)")
MAX_STREAMS_PER_CALLER = 1000  # open server streams (watches, logs) one identity may hold on one daemon
MAX_CONNECTION_STREAMS = 1000  # concurrent calls on one connection
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
    ("grpc.max_concurrent_streams", MAX_CONNECTION_STREAMS),
)

_caller: contextvars.ContextVar[Identity] = contextvars.ContextVar("aifed_caller")
_peer: contextvars.ContextVar[str] = contextvars.ContextVar("aifed_peer", default="")

# An access rule takes the caller and raises PermissionDenied if it may not call the method.
Rule = Callable[[Identity], None]


def caller() -> Identity:
    """The authenticated identity of the peer whose RPC is being served."""
    return _caller.get()


def peer() -> str:
    """The network address of the peer whose RPC is being served, as gRPC names it (ipv4:127.0.0.1:50512)."""
    return _peer.get()


def allow_roles(*roles: Role) -> Rule:
    names = "/".join(r.value for r in roles)

    def rule(who: Identity) -> None:
        if who.role not in roles:
            raise PermissionDenied(f"{article(who.role.value)} may not call this method; it is for {names} identities")
    return rule


def allow_any(who: Identity) -> None:
    """Any authenticated member of the federation (health checks, reflection)."""


@dataclass(frozen=True)
class PeerCert:
    """What the guard needs from a peer certificate, parsed once per distinct certificate."""

    serial: int
    roles: tuple[str, ...]  # the subject's OU: the role the CA issued the certificate for
    uris: tuple[str, ...]  # the spiffe:// URI SANs


@functools.lru_cache(maxsize=4096)
def _peer_cert(pem: bytes) -> PeerCert:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(u for u in sans.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://"))
    except x509.ExtensionNotFound:
        uris = ()
    roles = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME))
    return PeerCert(cert.serial_number, roles, uris)


def authenticate(context: grpc.aio.ServicerContext, federation: str,
                 revocations: Revocations | None = None) -> tuple[Identity, int]:
    """The identity in the peer certificate's spiffe:// URI SAN, on this federation, from a certificate that was
    issued for that role and is not revoked; and that certificate's serial number."""
    pems = context.auth_context().get("x509_pem_cert") or ()
    if not pems:
        raise Unauthenticated("no client certificate; every call needs one from the federation CA")
    cert = _peer_cert(pems[0])
    if len(cert.uris) != 1:
        raise Unauthenticated(
            "the client certificate must carry exactly one spiffe:// URI SAN; issue it with `aifed certs issue`")
    try:
        who = parse_identity(cert.uris[0])
    except ValueError as exc:
        raise Unauthenticated(f"the client certificate's identity is not valid: {exc}") from None
    if who.federation != federation:
        raise Unauthenticated(f"the client certificate belongs to federation {who.federation!r}, not {federation!r}")
    if cert.roles != (who.role.value,):
        raise Unauthenticated(f"the client certificate claims to be {article(who.role.value)} ({who.uri}) but was "
                              f"issued for the role {'/'.join(cert.roles) or 'none'}")
    if revocations is not None and revocations.revoked(cert.serial):
        raise Unauthenticated(f"the client certificate of {who.uri} (serial {cert.serial:x}) has been revoked")
    return who, cert.serial


class _StreamSlot:
    """One open response stream: whose, and the task serving it (cancelled to end it on revocation)."""

    def __init__(self, who: Identity, serial: int, task: asyncio.Task | None):
        self.who, self.serial, self.task, self.evicted = who, serial, task, False

    def raise_if_evicted(self) -> None:
        if self.evicted:
            raise Unauthenticated(f"the client certificate of {self.who.uri} (serial {self.serial:x}) has been "
                                  "revoked")


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Authenticate, authorize by method (default deny), bound streams per caller, and translate errors, for
    every RPC."""

    def __init__(self, federation: str, rules: Mapping[str, Rule], revocations: Revocations | None = None,
                 max_streams: int = MAX_STREAMS_PER_CALLER, audit: AuditLog | None = None, metrics=None):
        self.metrics = metrics
        self._counters: dict[tuple[str, str], object] = {}
        self.federation = federation
        self.rules = dict(rules)
        self.revocations = revocations
        self.max_streams = max_streams
        self.audit = audit
        self.streams: collections.Counter[str] = collections.Counter()  # open streams per caller
        self._open: dict[int, set[_StreamSlot]] = {}  # open streams by certificate serial
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

        streaming = handler.response_streaming

        def admit(context) -> tuple[Identity, int]:
            _peer.set(context.peer())
            who, serial = authenticate(context, self.federation, self.revocations)
            _caller.set(who)
            check_protocol(context.invocation_metadata())
            if rule is None:
                raise PermissionDenied(f"{method} is not open to any caller")
            rule(who)
            return who, serial

        if inspect.isasyncgenfunction(behaviour):
            async def wrapped(request, context):
                try:
                    who, serial = admit(context)
                    with self._stream_slot(who, serial) as slot:
                        try:
                            async for item in behaviour(request, context):
                                yield item
                        except asyncio.CancelledError:
                            self._count(method, "CANCELLED")
                            slot.raise_if_evicted()
                            raise
                    self._count(method, "OK")
                except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                    await self._abort(context, method, exc)
        else:
            async def wrapped(request, context):
                try:
                    who, serial = admit(context)
                    if not streaming:
                        response = await behaviour(request, context)
                        self._count(method, "OK")
                        return response
                    with self._stream_slot(who, serial) as slot:  # a stream written with context.write()
                        try:
                            response = await behaviour(request, context)
                        except asyncio.CancelledError:
                            self._count(method, "CANCELLED")
                            slot.raise_if_evicted()
                            raise
                    self._count(method, "OK")
                    return response
                except Exception as exc:  # noqa: BLE001 - translated, never swallowed
                    await self._abort(context, method, exc)

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        deserializer = handler.request_deserializer
        if method.endswith("/PutBlob"):  # uploads: the data is not copied out of the received message
            from federation.blobs import parse_chunk
            deserializer = parse_chunk
        serializer = handler.response_serializer
        if method.endswith("/FetchOutput"):  # outputs: chunks built or relayed already serialized
            from federation.blobs import pass_serialized
            serializer = pass_serialized
        return factory(wrapped, request_deserializer=deserializer, response_serializer=serializer)

    @contextlib.contextmanager
    def _stream_slot(self, who: Identity, serial: int):
        """Hold one of the caller's stream slots while a response stream is open, and register the stream so
        that `end_revoked` can end it when the caller's certificate is revoked."""
        if self.streams[who.uri] >= self.max_streams:
            raise ResourceExhausted(f"{who.uri} already has {self.max_streams} open streams on this daemon; "
                                    "close some before opening more")
        slot = _StreamSlot(who, serial, asyncio.current_task())
        self.streams[who.uri] += 1
        self._open.setdefault(serial, set()).add(slot)
        try:
            yield slot
        finally:
            self._open[serial].discard(slot)
            if not self._open[serial]:
                del self._open[serial]
            self.streams[who.uri] -= 1
            if not self.streams[who.uri]:
                del self.streams[who.uri]

    def end_revoked(self) -> int:
        """End every open stream whose caller's certificate is now revoked; return how many."""
        ended = 0
        if self.revocations is None:
            return ended
        for serial, slots in list(self._open.items()):
            if self.revocations.revoked(serial):
                for slot in slots:
                    if not slot.evicted:
                        slot.evicted = True
                        slot.task.cancel()
                        ended += 1
        if ended:
            log.warning("ended %d open stream(s) of revoked certificates", ended)
        return ended

    def _count(self, method: str, code: str) -> None:
        if self.metrics is None:
            return
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._counters[(method, code)] = self.metrics.rpcs.labels(method, code)
        counter.inc()

    async def _abort(self, context, method: str, exc: Exception) -> None:
        if isinstance(exc, AifedError):
            self._count(method, exc.code.name)
        elif isinstance(exc, NotImplementedError):
            self._count(method, "UNIMPLEMENTED")
        elif not isinstance(exc, grpc.aio.AbortError):
            self._count(method, "INTERNAL")
        if self.audit is not None and isinstance(exc, (Unauthenticated, PermissionDenied)):
            try:
                who = _caller.get().uri
            except LookupError:
                who = ""
            self.audit.record("denied", who=who, method=method, reason=exc.message)
        await _abort(context, method, exc)


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
    """A grpc.aio server on one mTLS port, with health and reflection, guarded by `GuardInterceptor`.

    While it serves, it looks every `tls.reload_s` for a new CRL and renewed certificates (new connections get
    them; `on_renewed` callbacks let the daemon renew its own client channels), warns once a day while its
    certificate or the CA is near expiry, and flushes the audit log."""

    AUDIT_FLUSH_S = 0.25
    STOP_SLACK_S = 10.0  # a stop waits this long past the grace period for gRPC to let go of its calls

    def __init__(self, federation: str, tls: TlsFiles, rules: Mapping[str, Rule], audit: AuditLog | None = None,
                 max_streams: int = MAX_STREAMS_PER_CALLER, revocations: Revocations | None = None, metrics=None):
        self.revocations = revocations or Revocations(tls)
        self.revocations.refresh()
        self.audit = audit
        self.guard = GuardInterceptor(federation, {**health_and_reflection_rules(), **rules}, self.revocations,
                                      max_streams=max_streams, audit=audit, metrics=metrics)
        self.server = grpc.aio.server(interceptors=[self.guard], options=SERVER_OPTIONS)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._tls = tls
        self._services: list[str] = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        self._tasks: list[asyncio.Task] = []
        self.on_renewed: list[Callable[[], Awaitable[None]]] = []  # after the certificate or key changed
        self.on_crl: list[Callable[[], Awaitable[None]]] = []  # after a new CRL came into force
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
        self._tasks.append(asyncio.create_task(self._watch_tls(), name="tls watch"))
        if self.audit is not None:
            self._tasks.append(asyncio.create_task(self._flush_audit(), name="audit flush"))
        return self.port

    async def stop(self, grace: float | None) -> None:
        await self.health.enter_graceful_shutdown()
        await bounded(self.server.stop(grace), (grace or 0) + self.STOP_SLACK_S, "stopping the gRPC server")
        for task in self._tasks:
            task.cancel()
        await stop_tasks(self._tasks)
        if self.audit is not None:
            self.audit.close()

    def watch_readiness(self, service: str, ready: Callable[[], bool], every_s: float = 1.0) -> None:
        """Report `service` in gRPC health as SERVING only while `ready()` holds (readiness); the overall
        status ("") stays SERVING while the daemon runs (liveness)."""
        async def watch() -> None:
            state = None
            while True:
                now = ready()
                if now != state:
                    state = now
                    await self.health.set(service, health_pb2.HealthCheckResponse.SERVING if now
                                          else health_pb2.HealthCheckResponse.NOT_SERVING)
                await asyncio.sleep(every_s)
        self._tasks.append(asyncio.create_task(watch(), name=f"readiness {service}"))

    async def _watch_tls(self) -> None:
        stamp, warned, refused = self._tls.stamp(), 0.0, None
        while True:
            try:
                if self.revocations.refresh():
                    self.guard.end_revoked()
                    for changed in self.on_crl:
                        await changed()
                if (new := self._tls.stamp())[:3] != stamp[:3]:
                    try:
                        self._tls.check()  # a half-written or mismatched renewal is not used, not even by clients
                    except (OSError, ValueError) as exc:
                        if new != refused:
                            log.error("renewed TLS files not taken up yet, keeping the previous ones: %s", exc)
                            refused = new
                    else:
                        stamp = new
                        for renewed in self.on_renewed:
                            await renewed()
                if time.monotonic() - warned > 86400 or not warned:
                    try:
                        warning = self._tls.expiry_warning()
                    except (OSError, ValueError):
                        warning = ""  # unreadable now: reported above; looked at again next round
                    if warning:
                        log.warning("%s", warning)
                        warned = time.monotonic()
            except Exception:  # noqa: BLE001 - the watch must outlive a bad file; the next round retries
                log.exception("checking TLS files and the CRL failed")
            await asyncio.sleep(self._tls.reload_s)

    async def _flush_audit(self) -> None:
        while True:
            await asyncio.sleep(self.AUDIT_FLUSH_S)
            await asyncio.to_thread(self.audit.flush)


def secure_channel(target: str, tls: TlsFiles, options: Iterable[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """An mTLS channel to a federation daemon. Every call carries this aifed's version and protocol in its
    user agent, so that a daemon of an incompatible version refuses it clearly."""
    return grpc.aio.secure_channel(target, tls.channel_credentials(),
                                   options=(*CHANNEL_OPTIONS, ("grpc.primary_user_agent", USER_AGENT), *options))


def check_protocol(metadata) -> None:
    """Refuse a caller that speaks another major version of the aifed protocol (its user agent says
    `aifed/<version> (protocol <n>)`); a caller without one (grpcurl, a health checker) is served."""
    for key, value in metadata or ():
        if key == "user-agent":
            match = _AGENT.search(value)
            if match and int(match.group(2)) != PROTOCOL:
                raise FailedPrecondition(
                    f"this daemon is aifed {__version__} and speaks protocol {PROTOCOL}; the caller is aifed "
                    f"{match.group(1)} with protocol {match.group(2)}: upgrade the older side (mixed versions "
                    "within a protocol work together)")
            return
