"""Errors of the running pipeline.

    UsagepipeError            .retriable says whether trying again can help
     +-- ConfigurationError   False: unsafe or contradictory settings; refuse to start
     |    +-- PortUnavailable       a port of ours (metrics, HTTP) cannot be listened on
     +-- BrokerUnavailable    True:  MQTT or Kafka cannot be reached or timed out
     +-- StoreUnavailable     True:  PostgreSQL cannot be reached or the transaction failed
     +-- RegistryLookupFailed True:  the device registry did not answer a lookup in time
     +-- MigrationError       False: a migration file is malformed or was edited after
                                     it was applied (`ingest.migrations`)

Library errors are wrapped where they cross into usagepipe
(`raise StoreUnavailable(...) from exc`). A message that can never become a row is not an
error of the pipeline: it is `schemas.InvalidTelemetry`, and it goes to the dead-letter
topic with its reason.
"""

from __future__ import annotations


class UsagepipeError(Exception):
    """Base of usagepipe's runtime errors."""

    retriable: bool = False


class ConfigurationError(UsagepipeError):
    """The settings are unsafe or contradict each other."""

    retriable = False


class PortUnavailable(ConfigurationError):
    """A port usagepipe would serve on is taken (or not ours to take); the message names
    the port and the setting that moves it."""


class BrokerUnavailable(UsagepipeError):
    """The MQTT broker or the Kafka cluster cannot be reached right now."""

    retriable = True


class StoreUnavailable(UsagepipeError):
    """PostgreSQL cannot be reached, or a write transaction failed and was rolled back."""

    retriable = True


class RegistryLookupFailed(UsagepipeError):
    """The device registry could not be read (down, or slower than the lookup timeout);
    the batch waits and is retried, never stored without enrichment."""

    retriable = True


class MigrationError(UsagepipeError):
    """A migration cannot be applied: bad file name, duplicate number, edited file."""

    retriable = False
