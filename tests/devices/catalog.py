"""The product models, units and owners the registry tests share."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime

from devices.records import Category, MembershipTier, NewOwner, ProductModel

DSN = os.environ.get("USAGEPIPE_TEST_DSN", "postgresql://postgres@127.0.0.1:5432/test")
KAFKA = os.environ.get("USAGEPIPE_TEST_KAFKA", "127.0.0.1:9092")
T0 = datetime(2026, 1, 10, 9, 0, tzinfo=UTC)
"""The tests' clock: registrations, transfers and dormancy are stated relative to it."""

WASHER = ProductModel("WM-100", Category.WASHER, "Washer 100", date(2025, 3, 1))
DRYER = ProductModel("DR-200", Category.DRYER, "Dryer 200", date(2025, 6, 1))
# Codes must hold 64 bits to be imported (`devices.credentials.MIN_CODE_BITS`).
UNITS_CSV = (
    "model_number,serial_number,manufactured_on,registration_code\n"
    "WM-100,SN0001,2025-04-01,CODE-0001-7KQ2-M9DX\n"
    "WM-100,SN0002,2025-04-01,CODE-0002-7KQ2-M9DX\n"
    "DR-200,SN0003,2025-07-01,CODE-0003-7KQ2-M9DX\n"
)


def new_owner(name: str = "Ada Owner", *, marketing: bool = True) -> NewOwner:
    """An owner in Tokyo, gold tier, consenting to analytics (and marketing unless told)."""
    return NewOwner(
        name=name,
        email=f"{name.split(maxsplit=1)[0].lower()}@example.com",
        phone="+81-3-0000-0000",
        region="JP-13",
        membership_tier=MembershipTier.GOLD,
        analytics_consent=True,
        marketing_consent=marketing,
    )
