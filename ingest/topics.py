"""`usagepipe kafka init`: the topics made from the settings, not assumed.

The three topics usagepipe uses (`kafka.raw_topic`, `kafka.dlq_topic`,
`registry.events_topic`) are created with the partitions, replication factor,
retention and cleanup policy the settings give (`ingest.kafka.topic_configs`); a topic
that exists already is described and compared with them, each difference reported in
words. Nothing that exists is changed: on a cluster in use, adding partitions moves
devices' keys to other partitions (their order across the move is lost) and a shorter
retention deletes records, so an operator decides (`kafka-topics.sh --alter`,
`kafka-configs.sh --alter`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from ingest.kafka import admin_client, create_topics, topic_configs
from ingest.settings import Settings

_CHECKED = ("retention.ms", "cleanup.policy")


@dataclass(frozen=True)
class TopicSpec:
    """What a topic should be."""

    name: str
    partitions: int
    replication_factor: int
    configs: dict[str, str]
    variables: dict[str, str] = field(default_factory=dict)
    """The setting behind each config, for the report."""


@dataclass
class TopicState:
    """What `init_topics` found or did for one topic."""

    spec: TopicSpec
    created: bool = False
    partitions: int | None = None
    replication_factor: int | None = None
    configs: dict[str, str] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """The topics usagepipe uses, as the settings want them."""
    k = settings.kafka
    retention = {k.raw_topic: "RAW", k.dlq_topic: "DLQ"}
    return [
        TopicSpec(
            name,
            k.partitions,
            k.replication_factor,
            topic_configs(k, name),
            {
                "retention.ms": f"USAGEPIPE_KAFKA__{retention.get(name, 'EVENTS')}_RETENTION_H",
                "cleanup.policy": "USAGEPIPE_KAFKA__CLEANUP_POLICY",
            },
        )
        for name in (k.raw_topic, k.dlq_topic, settings.registry.events_topic)
    ]


async def init_topics(settings: Settings, *, create: bool = True) -> list[TopicState]:
    """Create the missing topics (unless `create` is False: then they are reported
    missing) and compare the existing ones with their specs."""
    states = [TopicState(spec) for spec in topic_specs(settings)]
    async with admin_client(settings.kafka) as admin:
        existing = set(await admin.list_topics())
        absent = [s for s in states if s.spec.name not in existing]
        if absent and create:
            errors = await create_topics(admin, settings.kafka, [s.spec.name for s in absent])
            for s in absent:
                code, message = errors[s.spec.name]
                if code == 0:
                    s.created = True
                elif code != 36:  # 36: created meanwhile by another process; described below
                    s.mismatches.append(f"could not be created: {message or f'error {code}'}")
        elif absent:
            for s in absent:
                s.mismatches.append("does not exist (run `usagepipe kafka init` to create it)")
        await _describe(admin, [s for s in states if not s.mismatches])
    return states


async def _describe(admin: AIOKafkaAdminClient, states: list[TopicState]) -> None:
    """Fill each state with what the broker says of its topic, and its mismatches."""
    if not states:
        return
    by_name = {s.spec.name: s for s in states}
    for described in await admin.describe_topics(list(by_name)):
        s = by_name[described["topic"]]
        partitions = described["partitions"]
        s.partitions = len(partitions)
        s.replication_factor = min((len(p["replicas"]) for p in partitions), default=0)
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in by_name]
    for response in await admin.describe_configs(resources):
        for _code, _message, _type, name, entries in response.resources:
            by_name[name].configs = {
                entry[0]: entry[1] for entry in entries if entry[0] in _CHECKED
            }
    for s in states:
        spec = s.spec
        if s.partitions != spec.partitions:
            s.mismatches.append(
                f"has {s.partitions} partitions, the settings say {spec.partitions}"
                " (USAGEPIPE_KAFKA__PARTITIONS)"
            )
        if s.replication_factor != spec.replication_factor:
            s.mismatches.append(
                f"has replication factor {s.replication_factor}, the settings say"
                f" {spec.replication_factor} (USAGEPIPE_KAFKA__REPLICATION_FACTOR)"
            )
        for name in _CHECKED:
            found, wanted = s.configs.get(name), spec.configs[name]
            if found is None:
                s.mismatches.append(f"{name} not reported by the broker (wanted {wanted})")
            elif found != wanted:
                s.mismatches.append(
                    f"has {name}={found}, the settings say {wanted} ({spec.variables[name]})"
                )
