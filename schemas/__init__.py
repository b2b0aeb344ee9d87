"""The telemetry contract: the envelope every device sends, the body models of each
appliance category and their versions, and the consumer's validation of raw message
bytes (`parse_telemetry`), which refuses bad input with exactly one `Reason`; and
`errors.UsagepipeError`, the base of every usagepipe error, whose module draws the tree.

The names below are loaded on first use (PEP 562): `schemas.errors`, which every
package imports for its error base, must not build the 36 schemas' validators on the
way, which the bridge, the registry and the CLI's start never need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from schemas.envelope import Envelope
    from schemas.errors import InvalidTelemetry, Reason
    from schemas.parse import parse_telemetry

__all__ = ["Envelope", "InvalidTelemetry", "Reason", "parse_telemetry"]

_HOMES = {
    "Envelope": "schemas.envelope",
    "InvalidTelemetry": "schemas.errors",
    "Reason": "schemas.errors",
    "parse_telemetry": "schemas.parse",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
