"""opbox: decorate a function, deploy it, call it remotely, map it over many inputs.

    from opbox import operator

    @operator()
    def foo(i: int = 4):
        return i * i

    foo_remote = foo.deploy()
    foo_remote(i=4)                 # 16, computed in a Job-Run
    foo_remote.map([1, 2, 3])       # [1, 4, 9]

Names are imported on first use, so the runtime and the platform, which import submodules
of ``opbox``, do not pay for the SDK's HTTP client. Type checkers read the imports under
``TYPE_CHECKING`` below, so every public name has its real type (tests/test_public_api.py
keeps the two lists equal).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .client import Client, configure, set_default_client
    from .config import ClientConfig
    from .decorator import Operator, operator
    from .deploying import deploy
    from .files import Dir, File
    from .image import Image
    from .errors import (BuildError, OpboxError, RemoteError, RunCancelled, RunError, RunFailed, RunTimeout,
                         SerializationError, ServiceFailed, ValidationError)
    from .jobs import Job, Jobs
    from .remote import RemoteFunction, RunHandle
    from .resource import Resource
    from .retries import Retries
    from .schedules import Cron, Period
    from .serving import RemoteService, serve_asgi

_EXPORTS = {
    "operator": "decorator", "Operator": "decorator", "Resource": "resource", "Job": "jobs", "Jobs": "jobs",
    "RemoteFunction": "remote", "RunHandle": "remote", "Client": "client", "set_default_client": "client",
    "configure": "client", "ClientConfig": "config", "deploy": "deploying",
    "OpboxError": "errors", "BuildError": "errors", "RemoteError": "errors", "RunError": "errors",
    "RunFailed": "errors", "RunTimeout": "errors", "RunCancelled": "errors", "SerializationError": "errors",
    "ValidationError": "errors", "ServiceFailed": "errors", "RemoteService": "serving", "serve_asgi": "serving",
    "Retries": "retries", "Cron": "schedules", "Period": "schedules", "Image": "image", "File": "files", "Dir": "files",
}
__all__ = [
    "BuildError", "Client", "ClientConfig", "Cron", "Dir", "File", "Image", "Period", "Retries", "Job", "Jobs", "OpboxError", "Operator", "RemoteError", "RemoteFunction",
    "RemoteService", "Resource", "RunCancelled", "RunError", "RunFailed", "RunHandle", "RunTimeout",
    "SerializationError", "ServiceFailed", "ValidationError", "__version__", "configure", "deploy", "operator", "serve_asgi",
    "set_default_client",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'opbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
