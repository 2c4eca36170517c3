"""FlashAttention-3 when a kernel is installed, else torch's scaled_dot_product_attention.

Layouts: FA3 takes (B, S, H, D); SDPA takes (B, H, S, D).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

# Import names of FA3 builds, in order of preference: the official hopper/ build (installed as
# `flash_attn_interface`, or by some releases as the `flash_attn_3` package), then PyPI's
# forward-only `fa3-fwd`.
_PROVIDERS = (
    ("flash_attn_interface", "flash-attention hopper/ (official FA3)"),
    ("flash_attn_3.flash_attn_interface", "flash_attn_3 package (official FA3)"),
    ("fa3_fwd_interface", "fa3-fwd (PyPI, forward only)"),
)


@dataclass(frozen=True)
class ProviderStatus:
    """Which FA3 build imported (module, description, version), or why none did."""

    available: bool
    module: str | None
    description: str
    version: str | None
    reason: str


def _detect() -> tuple[ModuleType | None, ProviderStatus]:
    errors = []
    for name, desc in _PROVIDERS:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # ImportError, or a build that fails to load its .so
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if not hasattr(mod, "flash_attn_func"):
            errors.append(f"{name}: has no flash_attn_func")
            continue
        version = _version_of(name)
        return mod, ProviderStatus(True, name, desc, version, "imported")
    return None, ProviderStatus(False, None, "none", None, "no FA3 build installed (" + "; ".join(errors) + ")")


def _version_of(module_name: str) -> str | None:
    from importlib import metadata

    for dist in ("flash_attn_3", "flash-attn-3", "fa3-fwd", "flash_attn"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


_FA3_MODULE, PROVIDER = _detect()
_HAS_FLASH3: bool = PROVIDER.available
