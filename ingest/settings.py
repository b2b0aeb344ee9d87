"""All of usagepipe's settings, in one pydantic-settings model.

Only the CLI builds `Settings()` from the environment (prefix `USAGEPIPE_`, nested
sections joined by `__`, e.g. `USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS`). Components receive
the frozen section they need, never the environment.

Client defaults are not safe defaults: Kafka acks, idempotence, auto-commit and offset
reset are stated here or in `ingest.kafka`, and unsafe values are refused at start-up.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ingest.sql_names import SCHEMA_NAME_PATTERN

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,40}$")
_TOPIC_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

Port = Annotated[int, Field(ge=0, le=65535)]
K_ANONYMITY_MIN = 3
"""The smallest `insights.k_anonymity` allowed. At k = 2 either owner of a two-owner
segment could subtract their own usage and read the other's exactly; from 3 on no
single owner can (two colluding owners still could, which is why the default is 10)."""


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class MqttSettings(Section):
    """The MQTT broker devices publish to, and how the bridge and simulator use it."""

    host: str = "127.0.0.1"
    """MQTT broker host."""
    port: Port = 1884
    """usagepipe runs its own Mosquitto (deploy/mosquitto) on 1884, beside any
    distribution broker on 1883, because the bridge relies on its queue limits."""
    username: str | None = None
    """MQTT user name of the bridge. Unset, the CLI takes the local broker's from
    `<run_dir>/mosquitto/credentials.json` (written by `usagepipe services up`)."""
    password: SecretStr | None = None
    """MQTT password of the bridge; never logged."""
    admin_username: str | None = None
    """MQTT user name the registry changes device accounts with (Mosquitto's
    dynamic-security admin). Unset, the CLI takes the local broker's, as for `username`."""
    admin_password: SecretStr | None = None
    """Password of the dynamic-security admin; never logged."""
    tls_port: Port = 8883
    """The broker's TLS listener for devices, which requires a client certificate
    from the project's device CA (deploy/mosquitto: `require_certificate`)."""
    tls_host: str = "0.0.0.0"
    """Address the TLS listener binds (the plain `port` stays on loopback)."""
    tls_server_names: list[str] = ["localhost", "127.0.0.1"]
    """Host names and addresses in the broker's server certificate (devices check
    it); add the name devices connect to."""
    password_tls_port: Port | None = None
    """A second TLS listener, server certificate only, where units of
    `registry.password_models` log in with their device id and MQTT password. Off when
    unset: the broker's service accounts could log in on it too, from wherever it is
    reachable (with their generated passwords)."""
    topic_prefix: str = ""
    """Prepended to `devices/{device_id}/telemetry`; tests isolate themselves with it."""
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    """MQTT keepalive: a silent link is declared dead after 1.5x this."""
    session_expiry_s: Annotated[int, Field(ge=60)] = 24 * 3600
    """How long the broker keeps the bridge's session (and queues for it) while it is away.
    A day: longer than a bridge should be down unnoticed, and far past the minute or so
    the broker's 1,000,000-message queue takes to fill at full load, after which it drops
    new messages anyway. Every bridge id that stops connecting (a retired one) keeps its
    queue this long, on disk and in memory, and every autosave writes it out again: drop
    one at once with `usagepipe bridge --forget-session ID`. The project's Mosquitto
    caps every session at 7 days (`persistent_client_expiration`)."""

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_literal(cls, value: str) -> str:
        if any(ch in value for ch in "+#\0"):
            raise ValueError("topic_prefix must not contain MQTT wildcards or NUL")
        return value


class KafkaSettings(Section):
    """The Kafka cluster between the bridge and the consumers."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port of Kafka brokers."""
    raw_topic: str = "telemetry.raw"
    """Telemetry as devices sent it, keyed by device id."""
    dlq_topic: str = "telemetry.dlq"
    """Dead letters: refused messages with reason, origin and original bytes."""
    partitions: Annotated[int, Field(ge=1, le=1000)] = 6
    """Partitions for topics usagepipe creates (`usagepipe kafka init` reports an existing
    topic with another count). It bounds the work one consumer group can share: each
    partition is read by one consumer of the group at a time, so at most this many
    consumers do work and more sit idle. Set it for the most consumers you will run:
    partitions can be added later (moving devices' keys to others), never removed."""
    replication_factor: Annotated[int, Field(ge=1)] = 1
    """Replicas for topics usagepipe creates (3 on a production cluster)."""
    raw_retention_h: Annotated[float, Field(gt=0)] = 168
    """How long the raw topic keeps records (`retention.ms`): long enough to replay a
    consumer outage from Kafka (7 days)."""
    dlq_retention_h: Annotated[float, Field(gt=0)] = 720
    """How long the dead-letter topic keeps letters (30 days; the record of them is the
    dead-letter table)."""
    events_retention_h: Annotated[float, Field(gt=0)] = 168
    """How long other topics usagepipe creates keep records (`registry.events`: 7 days)."""
    cleanup_policy: Literal["delete", "compact", "compact,delete"] = "delete"
    """`cleanup.policy` of the topics usagepipe creates: `delete` drops records past the
    retention. Telemetry is keyed by device, so `compact` would keep only each device's
    last message: never that for the raw topic."""
    acks: Literal["all"] = "all"
    """Only `all` is accepted: a message is confirmed once every in-sync replica has it."""
    enable_idempotence: bool = False
    """On for Apache Kafka in production; off for the local Tansu broker, which lacks
    InitProducerId. Duplicates from producer retries are removed by the store anyway."""
    linger_ms: Annotated[int, Field(ge=0, le=1000)] = 5
    """How long the producer waits to fill a batch; trades latency for throughput."""
    max_batch_bytes: Annotated[int, Field(ge=1024)] = 512 * 1024
    """Largest producer batch per partition."""
    request_timeout_ms: Annotated[int, Field(ge=1000)] = 30_000
    """How long a Kafka request (a produce, a commit) may take before it is retried."""
    fetch_max_wait_ms: Annotated[int, Field(ge=1, le=10_000)] = 50
    """Longest a consumer's fetch waits for records. Tansu answers a waiting fetch only
    when this runs out, even if records arrive meanwhile (Apache Kafka answers at
    once), so on Tansu it adds up to this much to a record's latency: at aiokafka's
    default, 500 ms, a trickle of records reached a consumer in 131 ms (median), at
    50 ms in 14 ms."""
    session_timeout_ms: Annotated[int, Field(ge=3000)] = 6_000
    """Consumer group session: a killed consumer's partitions wait this long for the
    coordinator to notice, plus the rejoin (on Tansu about half of it again:
    `bench/failover.py` measured 9.5 s at 6 s, 15.1 s at 10 s). 6 s is Apache Kafka's
    default `group.min.session.timeout.ms`, the least a broker takes."""
    heartbeat_interval_ms: Annotated[int, Field(ge=100)] = 1_000
    """Consumer heartbeat; well under a third of the session timeout."""
    topic_check_s: Annotated[float, Field(ge=0.5, le=3600)] = 5.0
    """How often the bridge and the consumer check their topics (one with fewer than
    `partitions` gets the rest; a missing one is created once a producer was refused for
    it) and the consumer that each partition's log is the one it was reading (a
    memory-storage broker's restart re-creates it empty); every 0.2 s while Kafka does
    not answer."""


class BridgeSettings(Section):
    """`usagepipe bridge`: MQTT -> Kafka."""

    client_id: str = "usagepipe-bridge"
    """Fixed, so the broker keeps this bridge's persistent session across restarts."""
    max_inflight: Annotated[int, Field(ge=1, le=65535)] = 20_000
    """MQTT messages the bridge holds received but not yet acknowledged, at most (sent as
    MQTT v5 Receive Maximum; the bridge stops reading while that many are held)."""
    max_payload_bytes: Annotated[int, Field(ge=64)] = 64 * 1024
    max_packet_bytes: Annotated[int, Field(ge=1024, le=268_435_460)] = 272 * 1024
    """Largest MQTT packet the bridge takes (sent as MQTT v5 Maximum Packet Size); a
    packet claiming more closes the connection. Must exceed the broker's own
    `max_packet_size` (deploy/mosquitto: 264 KiB) by 1 KiB, or the bridge refuses to
    start: Mosquitto silently drops a message larger than its subscriber's limit."""
    shared_group: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]*$")] = ""
    """MQTT v5 shared subscription group: bridges (each its own client id) in one group
    split the devices' messages between them (`$share/<group>/...`); empty: this bridge
    takes every message."""
    metrics_port: Port = 9101
    """Port of the bridge's `/metrics`, `/health` and `/ready`; 0 turns them off."""
    metrics_host: str = "127.0.0.1"
    """Address `metrics_port` listens on: `0.0.0.0` where Prometheus or an orchestrator's
    probes come from another host or container (deploy/production)."""
    start_wait_s: Annotated[int, Field(ge=0)] = 300
    """How long the bridge waits at start for the MQTT broker and Kafka to answer (a
    try every 0.1-5 s, each logged) before it exits 1; 0: for ever."""
    trace_sample_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0001
    """Of the messages that come without a W3C `traceparent` MQTT user property, the
    fraction the bridge starts a sampled trace for (a `traceparent` Kafka header; the
    consumer logs where it stored the message). 1: every message (some 70 bytes more a
    record, `bench/trace.py`), 0: none. A device's own traceparent is always carried."""


class ConsumerSettings(Section):
    """`usagepipe consume`: Kafka -> PostgreSQL."""

    group_id: str = "usagepipe-store"
    """Kafka consumer group; every consumer process in it shares the partitions."""
    batch_max: Annotated[int, Field(ge=1, le=100_000)] = 5_000
    """Most records written in one database transaction."""
    batch_wait_ms: Annotated[int, Field(ge=1, le=60_000)] = 200
    """Longest wait for a batch to fill before writing what there is."""
    max_future_skew_s: Annotated[int, Field(ge=0)] = 300
    """Event times further ahead of the consumer's clock than this are dead-lettered."""
    metrics_host: str = "127.0.0.1"
    """Address `metrics_port` (its `/metrics`, `/health` and `/ready`; 0 turns them off)
    listens on: `0.0.0.0` where Prometheus or probes come from elsewhere (deploy/production)."""
    device_rate_per_s: Annotated[float, Field(ge=0, le=1_000_000)] = 1.0
    """Per-device ceiling: messages a second one device may send, sustained, judged by
    their arrival at the bridge (the Kafka timestamp); the excess is dead-lettered
    `rate_limited`. 0 turns the ceiling off. Appliances send a message every few
    seconds at most; history played faster than real time (the demo) needs it off."""
    device_burst: Annotated[int, Field(ge=1, le=1_000_000)] = 1000
    """Messages one device may send at once before `device_rate_per_s` applies: its
    backlog after being offline, or what the broker queued while no bridge ran."""
    metrics_port: Port = 9102
    lag_interval_s: Annotated[float, Field(ge=0.5, le=3600)] = 15.0
    """How often the consumer measures its partitions' lag (committed against end
    offsets, `usagepipe_consumer_lag_messages`); the lag alert's window should span
    several."""
    start_wait_s: Annotated[int, Field(ge=0)] = 300
    """How long the consumer waits at start for Kafka and PostgreSQL to answer (a try
    every 0.1-5 s, each logged) before it exits 1; 0: for ever."""
    trace_log_max: Annotated[int, Field(ge=0, le=100_000)] = 100
    """Most INFO lines a stored batch logs for its sampled traced messages (trace id,
    device, boot, seq, partition, offset: one a message); the rest of them, and the
    traced messages not sampled, are logged at DEBUG, and one INFO line says how many
    were held back."""

    @property
    def max_future_skew(self) -> timedelta:
        return timedelta(seconds=self.max_future_skew_s)


class EnrichSettings(Section):
    """Enrichment in the consumer: registry facts and the owner's pseudonymous key."""

    owner_key_secret: SecretStr | None = None
    """HMAC-SHA256 key of the owner keys stored with usage (`owner_key`), as key version
    1; never stored with the data nor logged. This or `owner_key_secrets_file` is
    required: neither set, `usagepipe consume` uses a key generated into
    `<run_dir>/enrich/owner_key_secret` for local runs, with a warning. Never change it in
    place: rotate with a secrets file (README, Privacy), or erasure misses stored keys."""
    owner_key_secrets_file: Path | None = None
    """A file (lines `VERSION SECRET`) or directory (a file per version, named by it)
    holding the owner-key secrets by version, from the secret store or key manager, never
    the repository; instead of `owner_key_secret`. Erasure looks owners up under every
    version it holds (`usagepipe owner-keys rotate` adds one)."""
    owner_key_version: int | None = Field(default=None, ge=1, le=9999)
    """The version of `owner_key_secrets_file` new owner keys are made with; required
    with it (chosen explicitly, never the newest by default). With `owner_key_secret`
    only 1 (or unset)."""
    cache_ttl_s: Annotated[int, Field(ge=1, le=3600)] = 60
    """Longest a cached registry answer is used; the backstop behind the registry's
    change notifications (LISTEN/NOTIFY), which normally evict it at once."""
    cache_max_devices: Annotated[int, Field(ge=100)] = 500_000
    """Devices whose registry facts one consumer keeps cached (oldest go first)."""
    lookup_timeout_s: Annotated[float, Field(gt=0, le=60)] = 5.0
    """Longest one registry query may take; past it the batch is retried with backoff
    (never stored without enrichment)."""
    unregistered: Literal["dead_letter", "store"] = "dead_letter"
    """Telemetry of a device the registry does not know: `dead_letter` (reason
    `unregistered_device`), or `store` it without enrichment (tests, migrations)."""

    @field_validator("owner_key_secret")
    @classmethod
    def _secret_is_long(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("owner_key_secret must be at least 32 characters")
        return value

    @model_validator(mode="after")
    def _one_secret_source(self) -> EnrichSettings:
        if self.owner_key_secrets_file is not None:
            if self.owner_key_secret is not None:
                raise ValueError(
                    "set owner_key_secrets_file or owner_key_secret, not both"
                    " (put the secret in the file as version 1)"
                )
            if self.owner_key_version is None:
                raise ValueError(
                    "owner_key_version must be set with owner_key_secrets_file:"
                    " the version of the file new owner keys are made with"
                )
        elif self.owner_key_version not in (None, 1):
            raise ValueError(
                "owner_key_version other than 1 needs owner_key_secrets_file"
                " (owner_key_secret is version 1)"
            )
        return self


class PostgresSettings(Section):
    """The usage store (PostgreSQL, with TimescaleDB where the extension exists)."""

    dsn: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/test")
    """PostgreSQL connection string; never logged."""
    table: str = "usage_events"
    """The usage table's name; tests give each run its own."""
    pool_size: Annotated[int, Field(ge=1, le=100)] = 4
    """Most connections one process holds."""
    use_timescaledb: bool = True
    """Store a new usage table in TimescaleDB where the server has it preloaded
    (`shared_preload_libraries`) and `CREATE EXTENSION timescaledb` succeeds (installed
    but not preloaded: native partitions, with a warning); false gives native
    partitions. An existing table keeps its layout."""
    partition_interval_s: Annotated[int, Field(ge=3600, le=366 * 86400)] = 86400
    """Event-time range of one partition (one TimescaleDB chunk); fixed for a table once
    it is created, the setting only applies to new tables."""
    allowed_lateness_s: Annotated[int, Field(ge=0)] = 3 * 86400
    """How late events are expected to arrive: TimescaleDB compresses a chunk only this
    plus one partition interval after it ends, and retention must exceed it. A later
    event is stored and counted all the same (into a compressed chunk on TimescaleDB)."""
    retention_days: Annotated[int, Field(ge=1)] = 400
    """Raw usage rows older than this are dropped, a whole partition (chunk) at a time;
    the rollups keep their history."""
    rollup_refresh_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    """How often a consumer materialises the ended hours that got rows (both layouts:
    recomputed on plain PostgreSQL, `refresh_continuous_aggregate` on TimescaleDB);
    reads are exact meanwhile: they aggregate those buckets from the raw rows."""
    rollup_day_refresh_s: Annotated[float, Field(gt=0, le=86400)] = 1800.0
    """How often, at most, a consumer materialises the ended days that got rows (the
    daily and device-daily rollups; the first refresh that finds one takes it). Each
    reads the whole day's raw rows, and late events keep noting yesterday, so not every
    `rollup_refresh_s`. Reads are exact meanwhile."""

    @property
    def partition_interval(self) -> timedelta:
        return timedelta(seconds=self.partition_interval_s)

    @property
    def allowed_lateness(self) -> timedelta:
        return timedelta(seconds=self.allowed_lateness_s)

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.retention_days)

    @field_validator("table")
    @classmethod
    def _table_is_identifier(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(f"table {value!r} is not a plain lower-case SQL identifier")
        return value


class SimulatorSettings(Section):
    """`usagepipe simulate`: the virtual fleet."""

    max_inflight_per_client: Annotated[int, Field(ge=1, le=65535)] = 200
    """QoS 1 publishes awaiting PUBACK per MQTT connection (paho reuses 16-bit ids)."""
    metrics_port: Port = 9103
    provision_hash_log2_n: Annotated[int, Field(ge=10, le=20)] = 10
    """Simulation only: the scrypt cost the simulator's own registry instance hashes its
    simulated units' codes and secrets with when it provisions a fleet (2**10 is about
    1 ms; real registrations use `registry.secret_hash_log2_n`)."""


class InsightsSettings(Section):
    """Planners' reports (`usagepipe report`, `usagepipe insights serve`): read-only."""

    k_anonymity: Annotated[int, Field(ge=K_ANONYMITY_MIN, le=1000)] = 10
    """No report row shows fewer distinct owners than this: a smaller segment is merged
    with others along its report's hierarchy until the group has this many, or else
    suppressed (its numbers withheld, with the reason). At least `K_ANONYMITY_MIN`."""
    timezone: str = "Asia/Seoul"
    """Local time of the hour-of-day x day-of-week heat map (an IANA zone whose offset
    is whole hours: the rollups are hourly)."""
    max_range_days: Annotated[int, Field(ge=1, le=3660)] = 400
    """Longest time range one report may cover."""
    report_work_mem_mb: Annotated[int, Field(ge=4, le=4096)] = 64
    """PostgreSQL's `work_mem` for one report's transaction (`SET LOCAL`): its sorts and
    hashes (distinct owners and devices per segment, each boot's sequence in order)
    stay in memory up to this much each, instead of spilling to disk at the server's
    default 4 MB (bench/report_scale.py). A report may use a few times this at once."""
    http_host: str = "127.0.0.1"
    """Where `usagepipe insights serve` listens (its `/api/...` routes need a bearer token
    with `auth.planner_scope`)."""
    http_port: Port = 8050
    """The port of `usagepipe insights serve`."""
    dp_budget: Annotated[float, Field(gt=0, le=1000)] = 10.0
    """Each planner's privacy budget (total epsilon) for differentially private releases
    (`/api/dp/reports/...`, `usagepipe report --dp`): each new release is charged its
    epsilon, a replay of one already made costs nothing, and a release beyond what is
    left is refused, naming what is left."""
    dp_delta: Annotated[float, Field(gt=0, le=1e-3)] = 1e-6
    """Each private release's delta: the chance a segment of too few owners passes its
    noisy threshold (the threshold is chosen so the chance is at most this)."""
    dp_epsilon: dict[str, Annotated[float, Field(gt=0, le=100)]] = {}
    """Epsilon per report of its private release, as JSON (`{"regions": 2.0}`); a report
    not named keeps its default (`insights.dp.DP_REPORTS`, 1.0 each)."""


class AuthSettings(Section):
    """Bearer tokens of both HTTP APIs (`ingest.auth`): the sign-in's OpenID Connect
    issuer and keys, the scopes, and the local dev signer."""

    issuer: str | None = None
    """The `iss` tokens must carry (the maker's OpenID Connect issuer URL). Unset: the APIs
    trust only the local dev signer (`usagepipe auth token`); never in production."""
    audience: str = "usagepipe"
    """The `aud` tokens must name (the client id the sign-in issues them for)."""
    jwks_url: str | None = None
    """The issuer's JWK Set URL; cached, fetched again for a key id it lacks. With
    `issuer`, this or `keys_file` is required."""
    keys_file: Path | None = None
    """A file with the issuer's public key(s): a PEM public key, a JWK or a JWK Set."""
    algorithms: list[str] = ["RS256", "ES256"]
    """Signature algorithms accepted (asymmetric only: HMAC and `none` are never)."""
    leeway_s: Annotated[int, Field(ge=0, le=300)] = 30
    """Clock skew allowed on `exp` and `iat`."""
    scope_claim: str = "scope"
    """The claim holding the scopes: space-separated text (`scope`) or a list (`scp`)."""
    planner_scope: str = "usagepipe:planner"
    """The scope every `/api/...` route of the planners' API needs."""
    operator_scope: str = "usagepipe:operator"
    """The scope of the registry's operator routes (`/operator/...`: revoke, reissue,
    erase on a request support received), each written to the registry's audit log."""
    reauth_max_age_s: Annotated[int, Field(ge=1, le=86400)] = 300
    """Reactivating a dormant owner needs a token whose `auth_time` is at most this old."""
    docs: bool | None = None
    """Serve `/docs` and `/redoc` (`/openapi.json` always is). Unset: on with the dev
    signer (local runs), off with an `issuer` (production)."""
    dev_signer: bool = True
    """With no `issuer`, trust the dev signer's key `dev_key_file`. False and no issuer:
    the APIs refuse to start. Ignored when `issuer` is set."""
    dev_key_file: Path | None = None
    """The dev signer's private key (generated on first use, mode 0600). Unset:
    `<run_dir>/auth/dev_signer.pem`."""

    @model_validator(mode="after")
    def _issuer_has_keys(self) -> AuthSettings:
        if self.issuer is not None and (self.jwks_url is None) == (self.keys_file is None):
            raise ValueError("with auth.issuer set exactly one of jwks_url or keys_file is needed")
        if self.issuer is None and (self.jwks_url is not None or self.keys_file is not None):
            raise ValueError("auth.jwks_url and auth.keys_file need auth.issuer too")
        return self

    @property
    def docs_enabled(self) -> bool:
        return self.issuer is None if self.docs is None else self.docs


class LogSettings(Section):
    """How every command logs (`--log-level` and `--log-format` override these)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """The least severe level logged: DEBUG, INFO, WARNING or ERROR, in any case."""
    format: Literal["text", "json"] = "text"
    """`text`: one readable line an event; `json`: one JSON object a line (time, level,
    logger, message, and the event's fields: device_id, partition, offset where they
    apply), for a log shipper."""

    @field_validator("level", "format", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: Any) -> object:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "level" else value.lower()


class ServicesSettings(Section):
    """`usagepipe services`: the local servers for the demo and tests."""

    run_dir: Path = Field(default_factory=lambda: Path.home() / ".local/state/usagepipe")
    """PID files, logs, the broker's config, data and logins. Per machine, not per
    checkout: every clone on a machine shares one set of local servers."""


def describe(
    model: type[BaseModel] | None = None, env: str = "USAGEPIPE_"
) -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, in order."""
    out: list[tuple[str, str, str]] = []
    for name, info in (model or Settings).model_fields.items():
        var = f"{env}{name.upper()}"
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out.extend(describe(kind, var + "__"))
            continue
        default = info.default if info.default_factory is None else info.default_factory()  # type: ignore[call-arg]
        if isinstance(default, Path) and default.is_relative_to(Path.home()):
            default = f"~/{default.relative_to(Path.home())}"
        shown = (
            "(secret)"
            if isinstance(default, SecretStr)
            else ("" if default is None else str(default))
        )
        out.append((var, shown, " ".join((info.description or "").split())))
    return out


def markdown_table() -> str:
    """Every setting as the Markdown table in README.md (a test keeps the two equal)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for var, default, doc in describe():
        shown = f"`{default}`" if default else ""
        lines.append(f"| `{var}` | {shown} | {doc} |")
    return "\n".join(lines) + "\n"


MAX_FAILURES_PER_ADDRESS_PER_DAY = 2400
"""The most failed registrations the settings may allow one address per day: the bound
the registration codes' entropy is reckoned against (`devices.credentials.MIN_CODE_BITS`)."""


class RegistrySettings(BaseModel):
    """The device registry: registration, owners, consent and dormancy."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    dormancy_days: Annotated[int, Field(ge=1)] = 365
    """Owners idle this long become dormant (company policy; default one year)."""

    db_schema: str = "registry"
    """PostgreSQL schema holding every registry table; tests give each test its own."""

    pool_size: Annotated[int, Field(ge=1, le=100)] = 4
    """Connections in the registry's own pool (when it is not handed one)."""

    registration_failures_per_subject: Annotated[int, Field(ge=1, le=1000)] = 10
    """Failed registrations (model, serial or code wrong) one subject, the owner the
    caller signed in as, may make per `registration_window_s`; more are refused with
    `too_many_attempts` (429, `Retry-After`). A token bucket: the allowance refills
    evenly over the window, and a registration that succeeds costs nothing. Ten leaves
    room for typos, not for guessing a code (`devices.credentials` says why)."""

    registration_failures_per_address: Annotated[int, Field(ge=1, le=10_000)] = 30
    """The same per client address (IPv4, or IPv6 by `registration_ipv6_prefix`),
    larger since households and carrier NATs share an address. Failures from other
    subjects and addresses never count against a caller. At most 2400 a day
    (`MAX_FAILURES_PER_ADDRESS_PER_DAY`, against this and `registration_window_s`): the
    bound the registration codes' entropy is reckoned against."""

    registration_window_s: Annotated[int, Field(ge=60, le=7 * 86400)] = 3600
    """The window the two allowances above refill over."""

    registration_ipv6_prefix: Annotated[int, Field(ge=32, le=128)] = 56
    """IPv6 callers are counted per prefix of this length, not per address (a home
    is given a /56 or more, so one attacker has a great many addresses)."""

    attempts_retention_days: Annotated[int, Field(ge=1, le=3660)] = 90
    """Registration attempts (the trail for reviewing abuse) are deleted this long
    after they were made, by `usagepipe registry dormancy`."""

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

    ca_cert_file: Path | None = None
    """The device CA's certificate (PEM): devices' and the broker's certificates chain
    to it. Unset, the CLI takes `<run_dir>/ca/ca.crt` if `usagepipe services up` made it."""

    ca_key_file: Path | None = None
    """The device CA's private key (PEM, keep it mode 0600 outside the repository);
    the registry signs devices' CSRs with it. Unset, the CLI takes `<run_dir>/ca/ca.key`."""

    crl_file: Path | None = None
    """Where the registry writes the device CA's revocation list (PEM) when it revokes
    certificates; the broker's TLS listener reads it (`crlfile`). Unset, the CLI takes
    the local broker's `<run_dir>/mosquitto/tls/crl.pem` if `usagepipe services up` made it."""

    broker_pid_file: Path | None = None
    """The broker the registry sends SIGHUP after writing the revocation list, so that
    Mosquitto reloads it without a restart (connections stay). Unset, the CLI takes the
    local broker's `<run_dir>/mosquitto/mosquitto.pid`; a broker on another host must
    reload the file itself."""

    certificate_days: Annotated[int, Field(ge=1, le=825)] = 365
    """Validity of a device certificate; the device renews before it ends
    (`POST /devices/{device_id}/certificate` with a new CSR)."""

    password_models: list[str] = ["*"]
    """Models whose devices may log in with a password (for units that cannot do TLS
    client certificates); `*` is every model. Any other model must send a CSR at
    registration (422 `certificate_required` without one) and gets no password login."""

    http_host: str = "127.0.0.1"
    """Where `usagepipe registry serve` listens; every route but `/health`, `/ready` and
    `/metrics` needs a bearer token from the maker's sign-in (`auth`)."""

    http_port: Annotated[int, Field(ge=0, le=65535)] = 8040
    """The port of `usagepipe registry serve` (beside the services' metrics ports)."""

    @model_validator(mode="after")
    def _limits_keep_guessing_hopeless(self) -> RegistrySettings:
        per_day = self.registration_failures_per_address * 86400 / self.registration_window_s
        if per_day > MAX_FAILURES_PER_ADDRESS_PER_DAY:
            raise ValueError(
                f"registration_failures_per_address ({self.registration_failures_per_address})"
                f" per registration_window_s ({self.registration_window_s} s) allows"
                f" {per_day:.0f} failures per address per day; at most"
                f" {MAX_FAILURES_PER_ADDRESS_PER_DAY} keep 64-bit registration codes safe"
            )
        return self

    def allows_password(self, model_number: str) -> bool:
        """Whether devices of `model_number` may log in with a password."""
        return "*" in self.password_models or model_number.strip().upper() in {
            m.strip().upper() for m in self.password_models
        }

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


# Short names the company's policies use, for settings that live in a section.
SHORT_NAMES = {"USAGEPIPE_DORMANCY_DAYS": ("registry", "dormancy_days")}


class _ShortNameSource(EnvSettingsSource):
    """`USAGEPIPE_DORMANCY_DAYS` for `USAGEPIPE_REGISTRY__DORMANCY_DAYS` (the nested
    name wins when both are set)."""

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for var, (section, name) in SHORT_NAMES.items():
            value = self.env_vars.get(var.lower())
            if value is not None:
                found.setdefault(section, {})[name] = value
        return found


class Settings(BaseSettings):
    """Every setting of every usagepipe command."""

    model_config = SettingsConfigDict(
        env_prefix="USAGEPIPE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    mqtt: MqttSettings = MqttSettings()
    kafka: KafkaSettings = KafkaSettings()
    bridge: BridgeSettings = BridgeSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    enrich: EnrichSettings = EnrichSettings()
    postgres: PostgresSettings = PostgresSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    services: ServicesSettings = ServicesSettings()
    registry: RegistrySettings = RegistrySettings()
    insights: InsightsSettings = InsightsSettings()
    auth: AuthSettings = AuthSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        short = _ShortNameSource(settings_cls, case_sensitive=False)
        return (init_settings, env_settings, short, dotenv_settings, file_secret_settings)
