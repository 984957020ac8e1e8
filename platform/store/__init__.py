"""Object stores: where code archives, payloads and results live.

``open_store(url)`` picks the backend from a URL; the platform then only sees ``ObjectStore``.
``S3Store`` is imported lazily so boto3 stays optional (the ``s3`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from opbox.errors import ConfigError

from .base import ObjectStore, SignedRequest, validate_key, validate_prefix
from .local import LocalStore

if TYPE_CHECKING:
    from .s3 import S3Store

__all__ = ["LocalStore", "ObjectStore", "S3Store", "SignedRequest", "open_store", "validate_key", "validate_prefix"]

_LOCAL_OPTS = {"secret", "base_url"}
_S3_OPTS = {
    "endpoint_url", "region", "access_key", "secret_key", "path_style", "public_endpoint_url",
    "multipart_threshold", "max_attempts", "connect_timeout", "read_timeout",
}  # fmt: skip
# s3:// query parameters and the S3Store arguments they set
_S3_QUERY = {
    "endpoint": "endpoint_url",
    "region": "region",
    "path_style": "path_style",
    "public_endpoint": "public_endpoint_url",
    "multipart_threshold": "multipart_threshold",
}


def open_store(url: str, **opts: Any) -> ObjectStore:
    """Open the store ``url`` names.

    - ``file:///abs/path`` or a plain path: a ``LocalStore`` (opts ``secret``, ``base_url``).
    - ``s3://bucket/prefix?endpoint=http://host:port&region=...&path_style=1&public_endpoint=...``:
      an ``S3Store``; credentials from opts ``access_key``/``secret_key`` or the usual AWS
      environment variables. Opts override the query.

    Opts meant for the other kind of store are ignored, so callers can pass both sets.
    """
    unknown = set(opts) - _LOCAL_OPTS - _S3_OPTS
    if unknown:
        raise ConfigError(f"unknown store options: {', '.join(sorted(unknown))}")
    parts = urlsplit(url)
    if parts.scheme == "s3":
        return _open_s3(parts, opts)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"store URL {url!r}: file URLs take no host, write file:///abs/path")
        path = unquote(parts.path)
    elif parts.scheme == "":
        path = url
    else:
        raise ConfigError(
            f"store URL {url!r}: unsupported scheme; use file:///path, a plain path or s3://bucket/prefix"
        )
    if not path:
        raise ConfigError("the store URL names no folder")
    missing = [name for name in ("secret", "base_url") if not opts.get(name)]
    if missing:
        raise ConfigError(f"a local store needs {' and '.join(missing)} to sign its URLs")
    return LocalStore(Path(path), secret=opts["secret"], base_url=opts["base_url"])


def _open_s3(parts, opts: dict[str, Any]) -> ObjectStore:
    from .s3 import S3Store

    if not parts.netloc:
        raise ConfigError(f"store URL {parts.geturl()!r} names no bucket: write s3://bucket/prefix")
    kwargs: dict[str, Any] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _S3_QUERY:
            raise ConfigError(f"unknown s3 store URL parameter {name!r} (known: {', '.join(_S3_QUERY)})")
        kwargs[_S3_QUERY[name]] = value
    kwargs.update({name: value for name, value in opts.items() if name in _S3_OPTS})
    if isinstance(kwargs.get("path_style"), str):
        kwargs["path_style"] = kwargs["path_style"].lower() in ("1", "true", "yes", "on")
    if isinstance(kwargs.get("multipart_threshold"), str):
        try:
            kwargs["multipart_threshold"] = int(kwargs["multipart_threshold"])
        except ValueError:
            raise ConfigError("multipart_threshold must be a number of bytes") from None
    return S3Store(unquote(parts.netloc), prefix=unquote(parts.path), **kwargs)


def __getattr__(name: str) -> Any:
    if name == "S3Store":  # lazy: boto3 is optional
        from .s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
