"""Herald's errors, one class per gRPC status the cache API answers with.

Every error the client raises is a :class:`HeraldError`; catch
:class:`HeraldUnavailable` to degrade (Herald, Redis or Postgres down) and
let the others surface: they are bugs or misconfiguration (a token not bound
to the tenant, a bad key, an unknown resource).
"""

from __future__ import annotations

from typing import Any


class HeraldError(Exception):
    """Any error from Herald. ``code`` is the gRPC status name (``UNAVAILABLE``)."""

    code = "UNKNOWN"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class HeraldUnavailable(HeraldError):
    """Herald (or a dependency behind it) cannot answer now; retrying later may work."""

    code = "UNAVAILABLE"


class PermissionDenied(HeraldError):
    """The token is not bound to the tenant (or may not drop a global resource)."""

    code = "PERMISSION_DENIED"


class Unauthenticated(HeraldError):
    """No token, or one the node does not know."""

    code = "UNAUTHENTICATED"


class InvalidArgument(HeraldError):
    """Bad input: tenant id, key, parameters, sizes. The message says which."""

    code = "INVALID_ARGUMENT"


class NotFound(HeraldError):
    """An unknown resource."""

    code = "NOT_FOUND"


class ResourceExhausted(HeraldError):
    """A node or tenant limit was reached (watch streams, GetMany size)."""

    code = "RESOURCE_EXHAUSTED"


class InternalError(HeraldError):
    """A resource query failed on the node; the message carries an error id for its log."""

    code = "INTERNAL"


_BY_CODE: dict[str, type[HeraldError]] = {
    cls.code: cls
    for cls in (
        HeraldUnavailable,
        PermissionDenied,
        Unauthenticated,
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        InternalError,
    )
}
# A call that timed out, or was cancelled because the channel went away, is
# as good as Herald being down.
_BY_CODE["DEADLINE_EXCEEDED"] = HeraldUnavailable
_BY_CODE["CANCELLED"] = HeraldUnavailable


def from_code(code: str, message: str) -> HeraldError:
    """The error for gRPC status ``code`` (its name, e.g. ``PERMISSION_DENIED``)."""
    cls = _BY_CODE.get(code, HeraldError)
    return cls(message, code=code)


def from_rpc_error(error: Any) -> HeraldError:
    """The error for a ``grpc.RpcError`` raised by a call."""
    try:
        code = error.code().name
        message = error.details() or str(error)
    except AttributeError:
        return HeraldUnavailable(str(error))
    return from_code(code, message)
