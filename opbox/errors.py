"""The one error hierarchy of opbox, shared by the SDK, the platform and the runtime.

Every error carries a ``code`` (a stable, machine-readable string) and an HTTP ``status``
so the gateway can turn it into a JSON answer and the SDK can turn that answer back
into the same exception type.
"""

from __future__ import annotations


class OpboxError(Exception):
    """Base of every opbox error."""

    code = "error"
    status = 500

    def __init__(self, message: str = "", **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict:
        body = {"error": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class ConfigError(OpboxError):
    """Bad or missing configuration (environment, settings file, flags)."""

    code = "config_error"
    status = 500


class ValidationError(OpboxError, ValueError):
    """Input that does not fit: a bad quantity, a bad name, a malformed body."""

    code = "validation_error"
    status = 422


class MissingSecret(ValidationError):
    """A job names a workspace secret that does not exist (at deploy, or deleted since)."""

    code = "missing_secret"
    status = 422


class BadRequest(ValidationError):
    code = "bad_request"
    status = 400


class AuthError(OpboxError):
    """Missing, malformed or revoked credentials."""

    code = "unauthorized"
    status = 401


class Forbidden(OpboxError):
    code = "forbidden"
    status = 403


class NotFound(OpboxError, LookupError):
    code = "not_found"
    status = 404


class Gone(OpboxError):
    """What was asked for existed and has expired (a finished run's result or log, after its retention)."""

    code = "gone"
    status = 410


class Conflict(OpboxError):
    code = "conflict"
    status = 409


class NotSupported(OpboxError):
    """The platform's backend lacks an ability the request needs (e.g. serving classes)."""

    code = "not_supported"
    status = 501


class PayloadTooLarge(OpboxError):
    code = "payload_too_large"
    status = 413


class QuotaExceeded(OpboxError):
    """A limit was reached; retry later (``retry_after`` seconds, if known)."""

    code = "quota_exceeded"
    status = 429


class Unavailable(OpboxError):
    """The platform or one of its stores is not reachable right now."""

    code = "unavailable"
    status = 503


class ClusterRefused(OpboxError):
    """The Kubernetes API server (or an admission webhook, such as Knative's) refused what opbox
    asked of it; the message is the API's own (``status`` and ``reason`` in ``details``)."""

    code = "cluster_refused"
    status = 502


class ServiceFailed(OpboxError):
    """A service cannot answer: its replicas failed to start (the init error and log are in ``details``)."""

    code = "service_failed"
    status = 503


class PackagingError(OpboxError):
    """The code folder could not be packed (too big, unreadable)."""

    code = "packaging_error"
    status = 400


class UnsafeArchiveError(ValidationError):
    """An uploaded archive is unsafe or malformed (zip-slip, bomb, links, not a zip)."""

    code = "unsafe_archive"
    status = 422


class StorageError(OpboxError):
    code = "storage_error"
    status = 502


class StorageFull(StorageError):
    """The disk (or bucket) under the platform's state or object store is full: nothing new is
    stored until space returns; what was stored is intact."""

    code = "storage_full"
    status = 507


class StorageQuotaExceeded(OpboxError):
    """The workspace stores as many bytes (arguments, results, logs, code) as its quota allows."""

    code = "storage_quota_exceeded"
    status = 507


class BuildError(OpboxError):
    """Building a job version failed; ``log`` holds the build output."""

    code = "build_failed"
    status = 422

    def __init__(self, message: str = "", log: str = "", **details):
        super().__init__(message, **details)
        self.log = log

    def __str__(self) -> str:
        if self.log:
            return f"{self.message}\n--- build log ---\n{self.log.rstrip()}"
        return self.message


class RegistryError(BuildError):
    """A container registry could not be asked or refused us (``registry``, ``status`` in ``details``)."""

    code = "registry_error"
    status = 502


class SerializationError(OpboxError):
    """A payload could not be (de)serialized, e.g. Python or cloudpickle versions differ."""

    code = "serialization_error"
    status = 422


class RunError(OpboxError):
    """A Job-Run did not succeed."""

    code = "run_failed"
    status = 500

    def __init__(self, message: str = "", run_id: str | None = None, **details):
        super().__init__(message, run_id=run_id, **details)
        self.run_id = run_id


class RunFailed(RunError):
    code = "run_failed"


class RunTimeout(RunError, TimeoutError):
    code = "run_timed_out"


class RunCancelled(RunError):
    code = "run_cancelled"


class RemoteError(RunError):
    """A remote exception whose own type could not be rebuilt locally."""

    code = "remote_error"

    def __init__(self, type_name: str, message: str, traceback: str = "", run_id: str | None = None):
        super().__init__(f"{type_name}: {message}", run_id=run_id)
        self.type_name = type_name
        self.remote_message = message
        self.remote_traceback = traceback

    def __str__(self) -> str:
        text = self.message
        if self.remote_traceback:
            text += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return text


_BY_CODE: dict[str, type[OpboxError]] = {}


def _register(cls: type[OpboxError]) -> None:
    for sub in cls.__subclasses__():
        _BY_CODE.setdefault(sub.code, sub)
        _register(sub)


_register(OpboxError)


def from_response(status: int, body: dict) -> OpboxError:
    """Rebuild the error an API answer describes (the inverse of ``OpboxError.to_dict``)."""
    code = body.get("error", "error")
    message = body.get("message") or f"HTTP {status}"
    details = body.get("details") or {}
    cls = _BY_CODE.get(code)
    if cls is None or cls is RemoteError:
        cls = {401: AuthError, 403: Forbidden, 404: NotFound, 409: Conflict, 410: Gone, 413: PayloadTooLarge,
               422: ValidationError, 429: QuotaExceeded, 501: NotSupported, 503: Unavailable}.get(status, OpboxError)
    if issubclass(cls, BuildError):
        return cls(message, log=details.pop("log", ""), **details)
    if issubclass(cls, RunError):
        return cls(message, **details)
    return cls(message, **details)
