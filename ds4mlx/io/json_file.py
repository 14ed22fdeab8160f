"""The one reader of the small JSON files next to the weights (config, index, journal).

Each caller passes its own error class, so a bad file fails with the message of the reader
that met it: one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import json_kind


def read_json_object(path: Path, error: type[Exception], what: str = "the file") -> dict[str, Any]:
    """``path`` parsed as a JSON object, or ``error("<path>: ...")`` for text that is not
    UTF-8, not JSON, or JSON of another kind."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: {what} is {json_kind(value)}, expected a JSON object")
    return value


def read_weight_map(index: Path, error: type[Exception]) -> dict[str, str]:
    """The ``weight_map`` of a safetensors index (tensor name → shard file)."""
    weight_map = read_json_object(index, error, "the index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise error(f"{index}: not a safetensors index (weight_map is {json_kind(weight_map)}, "
                    "expected an object of file names)")
    return dict(weight_map)
