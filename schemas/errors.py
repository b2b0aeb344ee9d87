"""usagepipe's errors: the one base class, with the whole tree; and why a telemetry
message was refused (reason codes and `InvalidTelemetry`).

Every error usagepipe raises derives from `UsagepipeError`, whose `retriable` says
whether trying the same thing again can help (a server that does not answer: True; a
bad input, setting or file: False). The base lives here, at the bottom of the import
direction (schemas <- ingest <- devices, insights <- simulators <- usagepipe), so that
every package, the contract included, can derive from it. The tree, with each class's
module and `retriable`:

    UsagepipeError                      retriable: whether trying again can help
     +-- InvalidTelemetry         False  schemas.errors: a message that can never become
     |                                   a row; `reason` goes with its dead letter (also
     |                                   a ValueError)
     +-- ConfigurationError       False  ingest.errors: unsafe or contradictory settings;
     |    |                              refuse to start (the CLI exits 2)
     |    +-- PortUnavailable            ingest.errors: a port of ours cannot be listened on
     |    +-- SubscriptionRefused        ingest.mqtt: the broker refused a subscription
     +-- BrokerUnavailable        True   ingest.errors: MQTT or Kafka unreachable, timed out
     |    +-- LoginRefused        False  ingest.mqtt: the MQTT broker refused the login
     |                                   (a device retries; the bridge at start does not)
     +-- StoreUnavailable         True   ingest.errors: PostgreSQL unreachable, or the
     |                                   transaction failed and was rolled back
     +-- RowsRefused              False  ingest.errors: PostgreSQL refused rows for what they
     |    |                              hold; they are dead-lettered, the rest is written
     |    +-- ConflictingDuplicates      ingest.errors: rows whose message id is stored
     |                                   with other content; dead-lettered likewise
     +-- RegistryLookupFailed     True   ingest.errors: the registry did not answer in time
     +-- FramingError             True   ingest.mqtt_wire: a packet from the broker over the
     |                                   limit, malformed, or its handler raised; the
     |                                   connection is closed and opened again
     +-- Refused                  False  ingest.auth: a request's bearer token is missing
     |                                   or invalid (401), or not enough for it (403)
     +-- KeysUnavailable          True   ingest.auth: the sign-in's JWKS cannot be fetched
     +-- PublishRefused           False  ingest.mqtt: the broker answered a QoS 1 publish
     |                                   with a failure reason (not authorized, say)
     +-- RegistryError            False  devices.errors: the device registry's errors
     |    +-- RegistryUnavailable True   PostgreSQL or the broker's accounts unreachable
     |    +-- Rejected            False  a request breaks a rule; `reason` says which
     |    |    +-- TooManyAttempts       the caller used up its failed registrations;
     |    |                              `retry_after_s` says when it may try again
     |    |    +-- BadCsr                devices.certificates: a CSR the registry will not
     |    |                              sign (`bad_csr`); the message says why
     |    +-- CaUnavailable       False  devices.certificates: the device CA's key or
     |    |                              certificate is not configured or unreadable
     |    +-- MigrationError      False  a migration file is malformed or was edited
     |    +-- InvalidImportFile   False  a factory CSV export lacks its header
     |    +-- BrokerAccountError  False  the broker refused the admin login or a command
     |    +-- BrokerSyncMissing   False  devices.cli: a command that must not change broker
     |                                   accounts tried to (a bug)
     +-- FilterError              False  insights.filters: a filter value is not acceptable
     |                                   (also a ValueError)
     +-- BudgetExceeded           False  insights.dp_ledger: a private release would cost
     |                                   more of the planner's privacy budget than is left
     +-- ChartError               False  insights.charts: a chart cannot be written (also a
     |                                   ValueError)
     +-- HistoryError             False  simulators.history: the plan starts before its
     |                                   units could have been bought (also a ValueError)
     +-- ProvisioningError        False  simulators.provision: the factory import refused a
     |                                   simulated unit (a bug in the unit data)
     +-- ServiceError             False  usagepipe.services: a local server cannot be
          |                              started, stopped or checked; `states` says what
          |                              the same call did for the others
          +-- PortInUse                  the port answers, but not with its protocol

Library errors are wrapped where they cross into usagepipe, at one point per adapter
(`raise StoreUnavailable(...) from exc`). The classes that are also `ValueError`s stay
so because callers rely on it: pydantic validators and argparse `type=` functions turn
only a ValueError into their own message. The console script prints any
`UsagepipeError` that reaches it as one line (`usagepipe <command>: <message>`).

Reason codes: every refused message ends in the dead-letter topic carrying one, so the
codes are part of the published contract: add new ones, never rename or reuse one.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Reason codes carried by dead letters (`telemetry.dlq`)."""

    OVERSIZE = "oversize"
    """The payload is larger than the configured limit."""
    INVALID_UTF8 = "invalid_utf8"
    """The payload is not valid UTF-8."""
    INVALID_JSON = "invalid_json"
    """The payload is not a JSON document (or not a JSON object)."""
    NON_FINITE_NUMBER = "non_finite_number"
    """A number is NaN or +/-Infinity, which JSON does not allow."""
    SCHEMA_VIOLATION = "schema_violation"
    """A field is missing, has the wrong type, or is out of range."""
    UNKNOWN_SCHEMA = "unknown_schema"
    """The envelope names a schema that does not exist."""
    UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
    """The schema exists, but not in the version the envelope names."""
    EVENT_TIME_IN_FUTURE = "event_time_in_future"
    """The device's event time is further ahead than the allowed clock skew."""
    EVENT_TIME_EXPIRED = "event_time_expired"
    """The event time is older than the store keeps raw rows (the retention less one
    partition): retention would drop it before any rollup could count it."""
    DEVICE_ID_MISMATCH = "device_id_mismatch"
    """The payload's device id differs from the one in its MQTT topic."""
    UNREGISTERED_DEVICE = "unregistered_device"
    """No registered device has this id."""
    RETAINED = "retained"
    """The broker delivered the message as a retained one (RETAIN flag set): a copy kept
    from an earlier publish, not one the device just sent."""
    RATE_LIMITED = "rate_limited"
    """The device sent faster than the per-device ceiling allows (its excess, judged by
    arrival at the bridge); replayable."""
    UNSTORABLE = "unstorable"
    """Valid, but the store cannot hold it: PostgreSQL refused its row with a data
    exception or an integrity violation (the letter carries the database's message),
    or it could not be made a row at all. The rest of its batch is stored."""
    DUPLICATE_KEY = "duplicate_key"
    """An object in the payload holds the same key twice (`{"seq": 14, "seq": 1014}`):
    JSON parsers disagree on which value wins, so the message means nothing for sure."""
    CONFLICTING_DUPLICATE = "conflicting_duplicate"
    """Another message with the same `(device_id, boot_id, seq)` is already stored (or
    earlier in the same batch) and this one differs from it: another event time, schema,
    schema version or body. The first one stays; the id names one message for good. An
    identical resend is a duplicate, dropped and counted, never dead-lettered."""


class UsagepipeError(Exception):
    """Base of every usagepipe error; `retriable` says whether trying again can help."""

    retriable: bool = False


class InvalidTelemetry(UsagepipeError, ValueError):
    """A message that can never become a row, whatever is retried.

    `reason` is the machine-readable code, `message` says in words what was wrong and
    where (the field path for schema errors), for the person reading the dead letter.
    """

    retriable = False

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message
