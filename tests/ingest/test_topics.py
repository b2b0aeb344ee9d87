"""`usagepipe kafka init`: the topics made from the settings, and an existing topic
compared with them, each difference named (`ingest.topics`)."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from ingest.settings import Settings
from ingest.topics import init_topics
from tests.usagepipe.test_cli import environment, usagepipe


def names(s: Settings) -> list[str]:
    return [s.kafka.raw_topic, s.kafka.dlq_topic, s.registry.events_topic]


async def test_missing_topics_are_made_as_the_settings_say(settings: Settings) -> None:
    states = await init_topics(settings)
    assert [(st.spec.name, st.created, st.ok) for st in states] == [
        (n, True, True) for n in names(settings)
    ]
    again = await init_topics(settings)
    assert [(st.created, st.ok, st.mismatches) for st in again] == [(False, True, [])] * 3
    raw, dlq, events = again
    assert (raw.partitions, raw.replication_factor) == (settings.kafka.partitions, 1)
    assert raw.configs == {"retention.ms": "604800000", "cleanup.policy": "delete"}
    assert dlq.configs == {"retention.ms": "2592000000", "cleanup.policy": "delete"}
    assert events.configs == {"retention.ms": "604800000", "cleanup.policy": "delete"}


async def test_an_existing_topic_that_differs_is_reported_and_left_alone(
    settings: Settings,
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(
                    settings.kafka.raw_topic,
                    2,
                    1,
                    topic_configs={"retention.ms": "3600000", "cleanup.policy": "compact"},
                )
            ]
        )
    finally:
        await admin.close()
    raw, dlq, events = await init_topics(settings)
    assert (raw.created, dlq.created, events.created) == (False, True, True)
    assert raw.mismatches == [
        f"has 2 partitions, the settings say {settings.kafka.partitions}"
        " (USAGEPIPE_KAFKA__PARTITIONS)",
        "has retention.ms=3600000, the settings say 604800000 (USAGEPIPE_KAFKA__RAW_RETENTION_H)",
        "has cleanup.policy=compact, the settings say delete (USAGEPIPE_KAFKA__CLEANUP_POLICY)",
    ]
    assert raw.partitions == 2  # nothing existing was changed


def test_the_command_says_what_it_made_and_what_differs(settings: Settings) -> None:
    env = environment(
        settings,
        USAGEPIPE_REGISTRY__EVENTS_TOPIC=settings.registry.events_topic,
    )
    check = usagepipe("kafka", "init", "--check", env=env)
    assert check.returncode == 1
    assert check.stdout.splitlines() == [
        f"{n}: differs: does not exist (run `usagepipe kafka init` to create it)"
        for n in names(settings)
    ]
    made = usagepipe("kafka", "init", env=env)
    assert (made.returncode, made.stderr) == (0, "")
    raw = settings.kafka.raw_topic
    assert made.stdout.splitlines()[0] == (
        f"{raw}: created (6 partitions, replication 1, retention.ms=604800000,"
        " cleanup.policy=delete)"
    )
    wider = usagepipe("kafka", "init", env={**env, "USAGEPIPE_KAFKA__PARTITIONS": "12"})
    assert wider.returncode == 1
    assert wider.stdout.splitlines()[0] == (
        f"{raw}: differs: has 6 partitions, the settings say 12 (USAGEPIPE_KAFKA__PARTITIONS)"
    )
    assert wider.stderr == (
        "usagepipe kafka init: 3 topic(s) differ from the settings:"
        f" {', '.join(names(settings))}; nothing existing was changed\n"
    )


def test_a_broker_that_does_not_answer_is_one_line() -> None:
    done = usagepipe(
        "kafka", "init", env=environment(None, USAGEPIPE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1")
    )
    assert done.returncode == 1
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        "usagepipe kafka init: Kafka at 127.0.0.1:1 could not list/create topics:"
    )
