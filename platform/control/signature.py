"""JSON triggers checked against the function's signature, as the SDK read it at deploy (``runtime.schema.call_schema``):
missing or unknown arguments are a 422 naming the signature, before a run is made. The platform never imports
the code; it binds the JSON arguments to the recorded parameters the way Python would."""

from __future__ import annotations

from opbox.errors import ValidationError

KINDS = ("positional_only", "positional_or_keyword", "var_positional", "keyword_only", "var_keyword")
MAX_PARAMS = 256


def parse(signature) -> dict | None:
    """A deploy's ``signature`` field, checked (None when absent)."""
    if signature is None:
        return None
    ok = (isinstance(signature, dict) and isinstance(signature.get("text"), str) and len(signature["text"]) <= 2000
          and isinstance(signature.get("params"), list) and len(signature["params"]) <= MAX_PARAMS
          and all(isinstance(p, dict) and isinstance(p.get("name"), str) and p.get("kind") in KINDS
                  and isinstance(p.get("required"), bool) for p in signature["params"]))
    if not ok:
        raise ValidationError("signature must be {text, params: [{name, kind, required}]} (runtime.schema.call_schema)")
    return {"text": signature["text"],
            "params": [{k: p[k] for k in ("name", "kind", "required")} for p in signature["params"]]}


def check(signature: dict, args: list, kwargs: dict) -> None:
    """ValidationError (422) naming the signature when ``args`` and ``kwargs`` do not bind to it."""
    problem = _bind(signature["params"], args, kwargs)
    if problem:
        raise ValidationError(f"bad arguments: {problem}; signature: {signature['text']}", signature=signature["text"])


def _bind(params: list[dict], args: list, kwargs: dict) -> str | None:
    positional = [p for p in params if p["kind"] in ("positional_only", "positional_or_keyword")]
    has_var_args = any(p["kind"] == "var_positional" for p in params)
    has_var_kwargs = any(p["kind"] == "var_keyword" for p in params)
    if len(args) > len(positional) and not has_var_args:
        return f"takes {len(positional)} positional argument(s) but {len(args)} were given"
    bound = {p["name"] for p in positional[:len(args)]}
    by_name = {p["name"]: p for p in params if p["kind"] in ("positional_or_keyword", "keyword_only")}
    for name in kwargs:
        if name in bound:
            return f"got multiple values for argument {name!r}"
        if name not in by_name and not has_var_kwargs:
            return f"got an unexpected keyword argument {name!r}"
        bound.add(name)
    missing = [p["name"] for p in params if p["required"] and p["kind"] not in ("var_positional", "var_keyword")
               and p["name"] not in bound]
    if missing:
        return f"missing required argument(s) {', '.join(repr(m) for m in missing)}"
    return None
