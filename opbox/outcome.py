"""Turning a finished run's result envelope into a value, or into the exception to raise."""

from __future__ import annotations

from . import serialization
from .errors import RemoteError, RunCancelled, RunFailed, RunTimeout, SerializationError


class RemoteTraceback(Exception):
    """Set as ``__cause__`` of a re-raised remote exception, so the remote traceback prints too."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\nRemote traceback:\n" + self.text.rstrip()


def to_exception(status: str, payload: bytes | None, run_id: str, exit_reason: str | None = None) -> BaseException:
    header, body = serialization.unpack(payload) if payload else ({}, b"")
    message = header.get("message") or exit_reason or status
    if status == "cancelled":
        return RunCancelled(f"run {run_id} was cancelled: {message}", run_id=run_id)
    if status == "timed_out":
        return RunTimeout(f"run {run_id} {message}", run_id=run_id)
    type_name = header.get("type", "Error")
    if type_name.startswith("opbox.") and not len(body):
        return RunFailed(f"run {run_id} failed: {message}", run_id=run_id)
    remote_tb = header.get("traceback") or ""
    exc = None
    if len(body):
        try:
            exc = serialization.load_body(header, body)
        except SerializationError:
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(type_name, message, remote_tb, run_id=run_id)
    if remote_tb:
        exc.__cause__ = RemoteTraceback(remote_tb)
    try:
        exc.remote_traceback = remote_tb
        exc.run_id = run_id
    except Exception:
        pass
    return exc


def decode(status: str, payload: bytes | None, run_id: str, exit_reason: str | None = None):
    """The run's value; raises its exception when it did not succeed."""
    if status == "succeeded":
        header, body = serialization.unpack(payload)
        return serialization.load_body(header, body)
    raise to_exception(status, payload, run_id, exit_reason)
