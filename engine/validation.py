"""Argument checks shared by the engine: each raises ValueError naming the argument and its range.

Checks run before any large allocation, so a typo in a page field never reaches the allocator.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping

# Budget for one generated tensor or working set. The CI/dev machine has 24 GiB and two users may
# run at once; 4 GiB keeps a single request from taking the machine down.
MAX_BYTES = 4 * 2**30
# A capacity factor's range on every page and command (routing, training, cost): under 0.05 a
# router drops over 95% of its slots; 64 holds any realistic imbalance.
CAPACITY_FACTOR = (0.05, 64.0)


def check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """Return `value` as int if it is an integer in [lo, hi], else raise ValueError naming `name`."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)  # int, numpy and torch integer scalars; not floats or strings
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        upper = "" if hi is None else f" and <= {hi}"
        raise ValueError(f"{name} must be >= {lo}{upper}, got {v}")
    return v


def check_float(name: str, value: object, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> float:
    """Return `value` as a finite float in the range, else raise ValueError naming `name`."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be <= {hi}, got {v}")
    return v


def check_choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    """Return `value` if it is one of `choices`, else raise ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_bytes(name: str, nbytes: float, limit: int = MAX_BYTES) -> None:
    """Refuse a request whose estimated working set exceeds `limit` bytes, before allocating."""
    if nbytes > limit:
        raise ValueError(
            f"{name} would need about {nbytes / 2**30:.1f} GiB, over the {limit / 2**30:.0f} GiB "
            "limit; choose smaller sizes"
        )


def relabel(message: str, names: Mapping[str, str]) -> str:
    """`message` with each field name (a whole word) replaced by what the user typed it as."""
    if not names:
        return message
    # Not after a dash or word character: "--tokens" stays as typed when "tokens" is relabelled;
    # not before a word character (a name may end in ")").
    words = "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
    pattern = re.compile(rf"(?<![-\w])({words})(?!\w)")
    return pattern.sub(lambda m: names[m.group(1)], message)
