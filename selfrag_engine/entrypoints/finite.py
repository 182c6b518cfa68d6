"""Numbers a response carries are finite: JSON has no NaN or infinity (Python would write `Infinity`, which no
JSON parser reads, or refuse to encode), so a computed value that overflowed is the request's fault, reported
as a 400 naming the inputs that made it, never a 500 or a broken stream."""
from __future__ import annotations

import math
from typing import Any

from selfrag_engine.entrypoints.openai_errors import FieldError


def first_non_finite(value: Any, where: str = "") -> str | None:
    """The path of the first NaN or infinity in a JSON-shaped value, or None."""
    todo = [(value, where)]
    while todo:
        node, path = todo.pop()
        if isinstance(node, float) and not math.isfinite(node):
            return path or "the response"
        if isinstance(node, dict):
            todo.extend((v, f"{path}.{k}" if path else str(k)) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            todo.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node))
    return None


def require_finite(value: Any, inputs: tuple[str, ...], param: str | None = None) -> Any:
    """value, if every number in it is finite; else a FieldError naming the inputs that can make it so."""
    where = first_non_finite(value)
    if where is not None:
        raise FieldError(param or inputs[0], f"{', '.join(inputs)}: these values make {where} overflow to a "
                                             f"number JSON cannot carry; use smaller ones", code="non_finite")
    return value
