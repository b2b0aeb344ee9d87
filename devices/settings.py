"""Settings of the device registry (section `registry`, env `USAGEPIPE_REGISTRY__*`)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A PostgreSQL schema name we are willing to put between double quotes in SQL text:
# lower-case, no quotes, at most 63 bytes (PostgreSQL's identifier limit).
SCHEMA_NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


class RegistrySettings(BaseModel):
    """The device registry: registration, owners, consent and dormancy."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    dormancy_days: Annotated[int, Field(ge=1)] = 365
    """Owners idle this long become dormant (company policy; default one year)."""

    db_schema: str = "registry"
    """PostgreSQL schema holding every registry table; tests give each test its own."""

    pool_size: Annotated[int, Field(ge=1, le=100)] = 4
    """Connections in the registry's own pool (when it is not handed one)."""

    max_failed_attempts: Annotated[int, Field(ge=1, le=1000)] = 5
    """Failed registrations (unknown serial, model mismatch, wrong code) allowed per
    owner and per serial within `lockout_window_s` before further attempts are refused
    with `locked_out`. Five leaves room for typos, not for guessing an 8-character code."""

    lockout_window_s: Annotated[int, Field(ge=1)] = 15 * 60
    """The sliding window failures are counted in; a lockout lifts as failures age out."""

    attempts_retention_days: Annotated[int, Field(ge=1, le=3660)] = 90
    """Registration attempts (the lockout's memory, and the trail for reviewing abuse)
    are deleted this long after they were made, by `usagepipe registry dormancy`. Must
    be longer than `lockout_window_s`."""

    secret_hash_log2_n: Annotated[int, Field(ge=10, le=20)] = 14
    """scrypt cost (log2 of N, r=8, p=1) for registration codes and device secrets.
    2**14 is about 16 MiB and tens of milliseconds per hash; tests lower it for speed.
    The cost is stored with each hash, so raising it later keeps old hashes valid."""

    events_topic: str = "registry.events"
    """Kafka topic the registry's events (`device.registered`, ...) go to."""

    events_batch: Annotated[int, Field(ge=1, le=10_000)] = 500
    """Outbox events published per flush transaction."""

    events_retention_days: Annotated[int, Field(ge=0)] = 7
    """Published events stay in the PostgreSQL outbox this long (for inspection), then
    are deleted; Kafka's topic retention governs them from then on."""

    http_host: str = "127.0.0.1"
    """Where `usagepipe registry serve` listens; the API is for the maker's own site,
    which authenticates owners, so it is not meant to face the internet directly."""

    http_port: Annotated[int, Field(ge=0, le=65535)] = 8040
    """The port of `usagepipe registry serve` (beside the services' metrics ports)."""

    @model_validator(mode="after")
    def _attempts_outlive_the_lockout(self) -> RegistrySettings:
        if self.attempts_retention_days * 86400 <= self.lockout_window_s:
            raise ValueError(
                f"attempts_retention_days ({self.attempts_retention_days}) must be longer"
                f" than lockout_window_s ({self.lockout_window_s} s): the lockout counts them"
            )
        return self

    @field_validator("events_topic")
    @classmethod
    def _topic_is_legal(cls, value: str) -> str:
        if not _TOPIC_PATTERN.match(value) or value in {".", ".."}:
            raise ValueError(f"events_topic {value!r} is not a legal Kafka topic name")
        return value

    @field_validator("db_schema")
    @classmethod
    def _schema_is_identifier(cls, value: str) -> str:
        if not SCHEMA_NAME_PATTERN.match(value):
            raise ValueError(f"db_schema {value!r} is not a plain lower-case SQL identifier")
        return value
