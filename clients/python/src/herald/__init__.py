"""Herald's Python client: Herald's cache API with a coherent near cache in the
process (see clients/python/README.md).

    from herald import Client, NearConfig
"""

from herald.client import Client, NearConfig, Result
from herald.decorators import cached
from herald.errors import (
    HeraldError,
    HeraldUnavailable,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from herald.metrics import Metrics

__all__ = [
    "Client",
    "HeraldError",
    "HeraldUnavailable",
    "InternalError",
    "InvalidArgument",
    "Metrics",
    "NearConfig",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Result",
    "Unauthenticated",
    "cached",
]
