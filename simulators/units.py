"""The fleet's units: six simulated product models and the serials made of them.

The fleet is a set of manufactured units: six simulated product models (one per
category, `SIM-WM` ... `SIM-RV`) and, for device `i`, the serial `{fleet}-{seed}-{i:06d}`
with a registration code derived from it. Device ids are the registry's
(`devices.records.device_id_for(model, serial)`), so `device_ids(plan)` and
`category_of` need no database; `simulators.provision` registers the units, which
gives each device its MQTT secret.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

from devices.credentials import CODE_ALPHABET, CODE_BITS
from devices.records import Category, ProductModel, device_id_for
from simulators.traffic import unregistered_count

if TYPE_CHECKING:
    from simulators.plan import FleetPlan

CATEGORY_PREFIX = {
    "washer": "wm",
    "dryer": "dr",
    "refrigerator": "rf",
    "air_conditioner": "ac",
    "air_purifier": "ap",
    "robot_vacuum": "rv",
}


# When each simulated model went on sale: the fleet is an installed base bought over
# the years since (`simulators.history`), so a window may start no earlier than a
# month or so after the newest of these.
LAUNCHED_ON = {
    "washer": date(2021, 3, 2),
    "dryer": date(2021, 9, 6),
    "refrigerator": date(2020, 4, 1),
    "air_conditioner": date(2022, 2, 14),
    "air_purifier": date(2022, 8, 22),
    "robot_vacuum": date(2023, 3, 13),
}

SIM_MODELS = {
    category: ProductModel(
        f"SIM-{CATEGORY_PREFIX[category].upper()}",
        Category(category),
        f"Simulated {category.replace('_', ' ')}",
        LAUNCHED_ON[category],
    )
    for category in CATEGORY_PREFIX
}
"""The simulator's product model per category (model numbers `SIM-WM`, `SIM-DR`, ...)."""

_CATEGORY_OF_MODEL = {model.model_number: category for category, model in SIM_MODELS.items()}


@dataclass(frozen=True, slots=True)
class FleetUnit:
    """One simulated unit as the factory made it, and the device id it registers as."""

    model: ProductModel
    serial_number: str
    registration_code: str
    device_id: str

    @property
    def category(self) -> str:
        return self.model.category.value


def fleet_units(plan: FleetPlan) -> list[FleetUnit]:
    """The fleet's units, categories in turn; the same for the same fleet name and seed.

    The registration codes follow from the serials so that a re-run can register the
    same units again; a real unit's code is random and printed inside it. They have
    the 80 bits of `devices.credentials.new_registration_code` (16 characters of its
    alphabet in groups of four), which the factory import requires at least 64 of.
    """
    categories = list(CATEGORY_PREFIX)
    units = []
    for i in range(plan.devices):
        model = SIM_MODELS[categories[i % len(categories)]]
        serial = f"{plan.fleet}-{plan.seed}-{i:06d}".upper()
        code = _code_for(serial)
        units.append(FleetUnit(model, serial, code, device_id_for(model.model_number, serial)))
    return units


def _code_for(serial: str) -> str:
    digest = hashlib.blake2s(f"code:{serial}".encode(), digest_size=CODE_BITS // 8).digest()
    number = int.from_bytes(digest)
    chars = "".join(CODE_ALPHABET[(number >> (5 * i)) & 31] for i in range(CODE_BITS // 5))
    return "-".join(chars[i : i + 4] for i in range(0, len(chars), 4))


def unregistered_units(plan: FleetPlan) -> list[FleetUnit]:
    """Units that join the fleet without ever being registered (`unregistered` fault)."""
    categories = list(CATEGORY_PREFIX)
    units = []
    for i in range(unregistered_count(plan)):
        model = SIM_MODELS[categories[i % len(categories)]]
        serial = f"{plan.fleet}-{plan.seed}-X{i:05d}".upper()
        units.append(FleetUnit(model, serial, "", device_id_for(model.model_number, serial)))
    return units


def device_ids(plan: FleetPlan) -> list[str]:
    """The fleet's device ids, as the registry derives them from model and serial."""
    return [unit.device_id for unit in fleet_units(plan)]


def category_of(device_id: str) -> str:
    """The category of a simulated device, from the model number its id starts with.

    Hand-made ids that start with a category's short prefix (`wm-43-000000`, as tests
    write them for messages of unregistered devices) map by that prefix.
    """
    category = _CATEGORY_OF_MODEL.get(device_id.rsplit("-", 1)[0])
    if category is None:
        prefix = device_id.split("-", 1)[0]
        category = next((c for c, p in CATEGORY_PREFIX.items() if p == prefix), None)
    if category is None:
        raise ValueError(f"{device_id!r} is not a simulated device's id")
    return category
