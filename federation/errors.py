"""One error vocabulary for aifed.

Code inside the daemons raises these typed errors; the RPC layer
(`federation.rpc`) is the one place that turns them into gRPC status codes.
The message is shown to users as it is, so it must say what to fix.
"""

from __future__ import annotations

import grpc


class AifedError(Exception):
    """A failure that a caller can act on. `code` is the gRPC status it maps to."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(AifedError):
    """The request is malformed, whatever the state of the federation."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(AifedError):
    """The request is well formed but cannot be honoured here (too large, too long, wrong state)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NotFound(AifedError):
    """A named job, partition or site does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AifedError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(AifedError):
    """The caller is authenticated but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(AifedError):
    """The caller's certificate does not carry a usable federation identity."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(AifedError):
    """A peer or backend cannot be reached now; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(AifedError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def error_from_status(code: int, message: str) -> AifedError:
    """The typed error for a gRPC status code carried in a message (a per-job result of a batch)."""
    for cls in (InvalidArgument, FailedPrecondition, NotFound, AlreadyExists, PermissionDenied, Unauthenticated,
                Unavailable, ResourceExhausted):
        if cls.code.value[0] == code:
            return cls(message)
    error = AifedError(message)
    error.code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return error


class ConfigError(Exception):
    """A configuration file is wrong. Names the file, the key and the problem."""

    def __init__(self, path: object, key: str, problem: str):
        self.path, self.key, self.problem = str(path), key, problem
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + problem)


class BackendError(Exception):
    """The site's scheduler failed to do what was asked (an internal, retryable failure)."""
