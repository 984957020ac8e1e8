"""A served class's methods and their OpenAPI document, typed from the methods' hints."""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import enum
import inspect
import json
import types
import typing

_SIMPLE = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}, bool: {"type": "boolean"},
           bytes: {"type": "string", "format": "byte"}, type(None): {"nullable": True},
           datetime.datetime: {"type": "string", "format": "date-time"},
           datetime.date: {"type": "string", "format": "date"}}


def public_methods(cls, reserved=frozenset()) -> dict:
    """Public methods (no leading underscore) of a class, by name."""
    found = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") or name in reserved:
            continue
        raw = inspect.getattr_static(cls, name, None)
        if isinstance(raw, (property, types.MemberDescriptorType)):
            continue
        if callable(member):
            found[name] = member
    return found


def schema_of(hint, depth: int = 0) -> dict:
    """A JSON schema for a type hint ({} when it has no JSON form)."""
    if hint is inspect.Parameter.empty or hint is typing.Any or depth > 8:
        return {}
    if hint in _SIMPLE:
        return dict(_SIMPLE[hint])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, set, frozenset, collections.abc.Sequence) or hint in (list, set, frozenset):
        return {"type": "array", "items": schema_of(args[0], depth + 1) if args else {}}
    if origin is tuple or hint is tuple:
        return {"type": "array"}
    if origin is dict or hint is dict:
        out = {"type": "object"}
        if len(args) == 2:
            out["additionalProperties"] = schema_of(args[1], depth + 1)
        return out
    if origin in (typing.Union, getattr(types, "UnionType", ())):
        options = [a for a in args if a is not type(None)]
        inner = schema_of(options[0], depth + 1) if len(options) == 1 else {"anyOf": [schema_of(a, depth + 1) for a in options]}
        if len(options) < len(args):
            inner["nullable"] = True
        return inner
    if origin is typing.Literal:
        return {"enum": list(args)}
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    if dataclasses.is_dataclass(hint):
        hints = _hints(hint)
        fields = dataclasses.fields(hint)
        return {"type": "object", "title": hint.__name__,
                "properties": {f.name: schema_of(hints.get(f.name, f.type), depth + 1) for f in fields},
                "required": [f.name for f in fields if f.default is dataclasses.MISSING
                             and f.default_factory is dataclasses.MISSING]}
    if inspect.isclass(hint) and hasattr(hint, "model_json_schema"):  # pydantic
        try:
            return hint.model_json_schema()
        except Exception:
            return {"type": "object"}
    return {}


def _hints(obj) -> dict:
    try:
        return typing.get_type_hints(obj)
    except Exception:
        return dict(getattr(obj, "__annotations__", {}) or {})


def _request_schema(method) -> dict:
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        return {"type": "object"}
    hints = _hints(method)
    properties, required = {}, []
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        schema = schema_of(hints.get(name, param.annotation))
        if param.default is param.empty:
            required.append(name)
        else:
            try:
                json.dumps(param.default)
                schema["default"] = param.default
            except (TypeError, ValueError):
                pass
        properties[name] = schema
    out = {"type": "object", "properties": properties}
    if required:
        out["required"] = required
    return out


def call_schema(fn) -> dict | None:
    """A function's parameters as JSON, for the platform to check JSON triggers against without importing the
    code: ``{"text": "add(a, b=0)", "params": [{"name", "kind", "required", "schema"}]}`` (None: no signature)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    hints = _hints(fn)
    params = [{"name": name, "kind": param.kind.name.lower(), "required": param.default is param.empty,
               "schema": schema_of(hints.get(name, param.annotation))} for name, param in sig.parameters.items()]
    return {"text": f"{getattr(fn, '__name__', 'function')}{sig}"[:2000], "params": params}


def openapi_document(title: str, methods: dict, prefix: str) -> dict:
    error = {"description": "The method raised (error: remote_error)", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}, "message": {"type": "string"}, "details": {
            "type": "object", "properties": {"type": {"type": "string"}, "traceback": {"type": "string"}}}}}}}}
    paths = {}
    for name, method in sorted(methods.items()):
        doc = inspect.getdoc(method) or ""
        operation = {
            "operationId": name,
            "summary": doc.splitlines()[0] if doc else name,
            "requestBody": {"required": False, "content": {
                "application/json": {"schema": _request_schema(method)},
                "application/x-opbox-envelope": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": {
                "200": {"description": "The method's result", "content": {
                    "application/json": {"schema": schema_of(_hints(method).get("return", inspect.Parameter.empty))}}},
                "404": {"description": "No such method"},
                "422": {"description": "Arguments do not fit the method's signature"},
                "429": {"description": "Concurrency and queue are full; retry after Retry-After seconds"},
                "500": error,
            },
        }
        if doc:
            operation["description"] = doc
        paths[f"{prefix}/{name}"] = {"post": operation}
    return {"openapi": "3.0.3", "info": {"title": title, "version": "1"}, "paths": paths}
