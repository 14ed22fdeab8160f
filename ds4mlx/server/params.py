"""Request validation shared by both APIs: each bad value becomes an ``APIError`` naming its field."""

from __future__ import annotations

import math
from typing import Any, Optional

from ..generate import MAX_SEED


class APIError(Exception):
    """A request the server refuses; ``param`` is the offending field (dotted path)."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


_MISSING = object()


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__)


def get(body: dict, key: str, kind: type | tuple, *, required: bool = False, default: Any = None,
        where: str = "") -> Any:
    """``body[key]`` checked against ``kind`` (bool never counts as a number)."""
    name = f"{where}{key}"
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise APIError(f"missing required field '{name}'", name)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    numeric = any(k in (int, float) for k in kinds)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        if not (float in kinds and isinstance(value, int) and not isinstance(value, bool)):
            want = " or ".join(_type_name(k()) if k is not type(None) else "null" for k in kinds)
            raise APIError(f"'{name}' must be {want}, got {_type_name(value)}", name)
    if numeric and isinstance(value, float) and not math.isfinite(value):
        raise APIError(f"'{name}' must be a finite number, got {value}", name)
    return value


def messages(body: dict, roles: tuple[str, ...]) -> list[tuple[str, str, dict]]:
    """``body["messages"]``: a non-empty array of objects, each with a role of ``roles``; as
    ``(where, role, message)`` with ``where`` the message's field path (``messages[3]``)."""
    value = get(body, "messages", list, required=True)
    if not value:
        raise APIError("'messages' must not be empty", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"'{where}' must be an object", where)
        role = m.get("role")
        if role not in roles:
            want = " or ".join(roles) if len(roles) == 2 else f"one of {', '.join(roles)}"
            raise APIError(f"'{where}.role' must be {want}, got {role!r}", f"{where}.role")
        out.append((where, role, m))
    return out


def number(body: dict, key: str, default: float, lo: float, hi: float, where: str = "") -> float:
    value = get(body, key, float, default=default, where=where)
    if not lo <= value <= hi:
        raise APIError(f"'{where}{key}' must be between {lo} and {hi}, got {value}", f"{where}{key}")
    return float(value)


def integer(body: dict, key: str, default: Optional[int], lo: int, hi: Optional[int] = None,
            where: str = "") -> Optional[int]:
    value = get(body, key, int, default=default, where=where)
    if value is not None and (value < lo or (hi is not None and value > hi)):
        bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise APIError(f"'{where}{key}' must be {bound}, got {value}", f"{where}{key}")
    return value


def seed(body: dict, key: str = "seed") -> Optional[int]:
    return integer(body, key, None, 0, MAX_SEED)


def stop_list(body: dict, key: str, limit: int = 16) -> list[str]:
    value = get(body, key, (str, list), default=[])
    stops = [value] if isinstance(value, str) else value
    if len(stops) > limit:
        raise APIError(f"'{key}' may hold at most {limit} strings, got {len(stops)}", key)
    for i, s in enumerate(stops):
        if not isinstance(s, str) or not s:
            raise APIError(f"'{key}[{i}]' must be a non-empty string", f"{key}[{i}]")
    return stops


def refuse(body: dict, keys: tuple[str, ...], what: str, where: str = "", allowed: tuple = (None, False, 0, 0.0, "", [], {})
           ) -> None:
    """Fields this server does not implement: fine when absent or at a value that asks for
    nothing (``allowed``), otherwise a 400 naming the field rather than an answer that ignores it."""
    for key in keys:
        value = body.get(key)
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise APIError(f"'{where}{key}' is not supported by ds4mlx serve ({what})", f"{where}{key}")
