"""The console script as a user meets it: a mistake is one line and an exit status.

Every test runs `usagepipe` as a subprocess against the real servers: bad settings in
the environment, bad options, a port another usagepipe server holds, a database or
broker that does not answer, and a pipe closed before the output ends.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from uuid import UUID

import asyncpg
import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

from ingest.auth import DevSigner
from ingest.dead_letter import DeadLetter, send_dead_letters
from ingest.dead_letter_table import LetterRow
from ingest.kafka import ensure_topics, make_producer
from ingest.setting_errors import explain
from ingest.settings import AuthSettings, Settings
from ingest.store import UsageStore
from schemas.errors import InvalidTelemetry, Reason
from tests.conftest import free_port

USAGEPIPE = str(Path(sys.executable).with_name("usagepipe"))
if not Path(USAGEPIPE).exists():
    USAGEPIPE = shutil.which("usagepipe") or "usagepipe"


def environment(s: Settings | None = None, /, **variables: str) -> dict[str, str]:
    """The test run's environment, with `s`'s own names (topics, tables, schema, client
    ids, prefix) as the variables a user would set, every port off unless given."""
    env = dict(os.environ)
    if s is not None:
        env.update(
            USAGEPIPE_POSTGRES__TABLE=s.postgres.table,
            USAGEPIPE_REGISTRY__DB_SCHEMA=s.registry.db_schema,
            USAGEPIPE_REGISTRY__EVENTS_TOPIC=s.registry.events_topic,
            USAGEPIPE_REGISTRY__SECRET_HASH_LOG2_N="10",
            USAGEPIPE_KAFKA__RAW_TOPIC=s.kafka.raw_topic,
            USAGEPIPE_KAFKA__DLQ_TOPIC=s.kafka.dlq_topic,
            USAGEPIPE_MQTT__TOPIC_PREFIX=s.mqtt.topic_prefix,
            USAGEPIPE_BRIDGE__CLIENT_ID=s.bridge.client_id,
            USAGEPIPE_CONSUMER__GROUP_ID=s.consumer.group_id,
            USAGEPIPE_ENRICH__OWNER_KEY_SECRET="tests-only-owner-key-secret-0123456789abcdef",
            USAGEPIPE_BRIDGE__METRICS_PORT="0",
            USAGEPIPE_CONSUMER__METRICS_PORT="0",
            USAGEPIPE_SIMULATOR__METRICS_PORT="0",
        )
    env.update(variables)
    return env


def usagepipe(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [USAGEPIPE, *args],
        check=False,
        env=dict(env if env is not None else os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line on stderr (the test fails if there are more, or a traceback)."""
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


# -- settings -------------------------------------------------------------------------

BAD_SETTINGS = [
    # int, with the bounds of `Port`
    (
        {"USAGEPIPE_MQTT__PORT": "abc"},
        "USAGEPIPE_MQTT__PORT='abc' is not allowed: use a whole number from 0 to 65535",
    ),
    (
        {"USAGEPIPE_BRIDGE__METRICS_PORT": "70000"},
        "USAGEPIPE_BRIDGE__METRICS_PORT='70000' is not allowed: use a whole number from 0 to 65535",
    ),
    (
        {"USAGEPIPE_MQTT__SESSION_EXPIRY_S": "5"},
        "USAGEPIPE_MQTT__SESSION_EXPIRY_S='5' is not allowed: use a whole number of at least 60",
    ),
    # float, with an exclusive lower bound
    (
        {"USAGEPIPE_ENRICH__LOOKUP_TIMEOUT_S": "soon"},
        "USAGEPIPE_ENRICH__LOOKUP_TIMEOUT_S='soon' is not allowed: use a number greater than 0"
        " and at most 60",
    ),
    # bool
    (
        {"USAGEPIPE_POSTGRES__USE_TIMESCALEDB": "sure"},
        "USAGEPIPE_POSTGRES__USE_TIMESCALEDB='sure' is not allowed: use true or false"
        " (also 1/0, yes/no, on/off)",
    ),
    # Literal
    (
        {"USAGEPIPE_ENRICH__UNREGISTERED": "drop"},
        "USAGEPIPE_ENRICH__UNREGISTERED='drop' is not allowed: use one of 'dead_letter', 'store'",
    ),
    ({"USAGEPIPE_KAFKA__ACKS": "1"}, "USAGEPIPE_KAFKA__ACKS='1' is not allowed: use 'all'"),
    # a pattern
    (
        {"USAGEPIPE_BRIDGE__SHARED_GROUP": "a/b"},
        "USAGEPIPE_BRIDGE__SHARED_GROUP='a/b' is not allowed: use text matching ^[A-Za-z0-9_-]*$",
    ),
    # a field validator's own words; a secret's value is never repeated
    (
        {"USAGEPIPE_MQTT__TOPIC_PREFIX": "a/+/"},
        "USAGEPIPE_MQTT__TOPIC_PREFIX='a/+/' is not allowed: topic_prefix must not contain MQTT"
        " wildcards or NUL",
    ),
    (
        {"USAGEPIPE_ENRICH__OWNER_KEY_SECRET": "hunter2"},
        "USAGEPIPE_ENRICH__OWNER_KEY_SECRET (value not shown) is not allowed: owner_key_secret"
        " must be at least 32 characters",
    ),
    # a section's check across two fields names both variables
    (
        {
            "USAGEPIPE_REGISTRY__REGISTRATION_FAILURES_PER_ADDRESS": "1000",
            "USAGEPIPE_REGISTRY__REGISTRATION_WINDOW_S": "60",
        },
        "USAGEPIPE_REGISTRY__REGISTRATION_FAILURES_PER_ADDRESS (1000) per"
        " USAGEPIPE_REGISTRY__REGISTRATION_WINDOW_S (60 s) allows 1440000 failures per"
        " address per day; at most 2400 keep 64-bit registration codes safe",
    ),
    # names as the user spelt them: lower case, a short name, a section as JSON
    (
        {"usagepipe_kafka__partitions": "0"},
        "usagepipe_kafka__partitions='0' is not allowed: use a whole number from 1 to 1000",
    ),
    (
        {"USAGEPIPE_DORMANCY_DAYS": "a year"},
        "USAGEPIPE_DORMANCY_DAYS='a year' is not allowed: use a whole number of at least 1",
    ),
    (
        {"USAGEPIPE_INSIGHTS": '{"k_anonymity": "1"}'},
        "USAGEPIPE_INSIGHTS: k_anonymity='1' is not allowed: use a whole number from 3 to 1000",
    ),
    (
        {"USAGEPIPE_INSIGHTS": "k=5"},
        "USAGEPIPE_INSIGHTS is not allowed: a section set whole must be a JSON object of its"
        " settings",
    ),
    # a name that is no setting
    (
        {"USAGEPIPE_MQTT__PORTT": "1884"},
        "USAGEPIPE_MQTT__PORTT is not a setting; did you mean USAGEPIPE_MQTT__PORT?",
    ),
]


@pytest.mark.parametrize(("variables", "message"), BAD_SETTINGS)
def test_a_bad_setting_is_one_line_naming_the_variable(
    variables: dict[str, str], message: str
) -> None:
    done = usagepipe("settings", env=environment(**variables))
    assert (done.returncode, done.stdout) == (2, "")
    assert one_line(done) == f"usagepipe: {message}"
    assert "hunter2" not in done.stderr


def test_the_bridge_names_the_bad_port_before_it_starts() -> None:
    done = usagepipe("bridge", env=environment(USAGEPIPE_MQTT__PORT="abc"))
    assert done.returncode == 2
    assert one_line(done) == (
        "usagepipe: USAGEPIPE_MQTT__PORT='abc' is not allowed: use a whole number from 0 to 65535"
    )


def test_every_bad_setting_gets_its_line() -> None:
    done = usagepipe(
        "settings",
        env=environment(USAGEPIPE_MQTT__PORT="abc", USAGEPIPE_KAFKA__ENABLE_IDEMPOTENCE="2"),
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "usagepipe: USAGEPIPE_MQTT__PORT='abc' is not allowed: use a whole number from 0 to 65535",
        "usagepipe: USAGEPIPE_KAFKA__ENABLE_IDEMPOTENCE='2' is not allowed: use true or false"
        " (also 1/0, yes/no, on/off)",
    ]


def test_a_dotenv_file_gets_the_same_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """usagepipe's settings read no .env file; one that did would name its bad values
    the same way (the model below adds `env_file`, nothing else)."""
    for name in list(os.environ):
        if name.upper().startswith("USAGEPIPE_"):
            monkeypatch.delenv(name)  # the environment would win over the file
    dotenv = tmp_path / ".env"
    dotenv.write_text("USAGEPIPE_MQTT__PORT=abc\nUSAGEPIPE_NO_SUCH=1\n")

    class WithDotenv(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "env_file": dotenv})

    with pytest.raises(ValidationError) as bad:
        WithDotenv()
    assert explain(bad.value, {}, WithDotenv) == [
        "USAGEPIPE_MQTT__PORT='abc' is not allowed: use a whole number from 0 to 65535",
        "USAGEPIPE_NO_SUCH is not a setting (`usagepipe settings` lists them)",
    ]


# -- options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--log-level", "LOUD", "bridge"],
            "usagepipe: argument --log-level: invalid choice: 'LOUD' (choose from 'DEBUG',"
            " 'INFO', 'WARNING', 'ERROR')",
        ),
        (
            ["bridge", "--duration", "5x"],
            "usagepipe bridge: argument --duration: not a duration: '5x' (use 30, 30s, 5m)",
        ),
        (
            ["dlq", "list", "--limit", "-1"],
            "usagepipe dlq list: argument --limit: not a whole number of 0 or more: '-1'",
        ),
        (
            ["dlq", "show", "x:1"],
            "usagepipe dlq show: not a position: 'x:1' (use a letter's ID, e.g. 17, or its"
            " source's PARTITION:OFFSET, e.g. 2:17)",
        ),
        (
            ["dlq", "show", "--source", "kafka", "7:"],
            "usagepipe dlq show: not a position: '7:' (use PARTITION:OFFSET in the"
            " dead-letter topic, e.g. 2:17)",
        ),
        (
            ["dlq", "replay", "--partition", "1", "--to-offset", "9"],
            "usagepipe dlq replay: --partition, --to-offset are options of --source kafka;"
            " letters of --source postgres are chosen with --reason, --from-id, --to-id",
        ),
        (
            ["dlq", "replay", "--source", "kafka", "--from-id", "3"],
            "usagepipe dlq replay: --from-id is an option of --source postgres; letters of"
            " --source kafka are chosen with --reason, --partition, --from-offset, --to-offset",
        ),
        (
            ["registry", "add-model", "X-1", "--category", "toaster", "--name", "X"],
            "usagepipe registry add-model: argument --category: 'toaster' is not one of washer,"
            " dryer, refrigerator, air_conditioner, air_purifier, robot_vacuum",
        ),
        (
            ["registry", "dormancy", "--now", "2030-01-01"],
            "usagepipe registry dormancy: argument --now: not a time with zone: '2030-01-01'"
            " (use 2030-01-01T00:00:00+00:00)",
        ),
        (
            ["insights", "serve", "--port", "99999"],
            "usagepipe insights serve: argument --port: not a port: '99999' (use 0 to 65535)",
        ),
        (
            ["registry"],
            "usagepipe registry: the following arguments are required: COMMAND"
            " (see usagepipe registry --help)",
        ),
        (
            ["asyncapi", "--write", "/nonexistent/dir/asyncapi.json"],
            "usagepipe asyncapi: /nonexistent/dir/asyncapi.json: No such file or directory",
        ),
    ],
)
def test_a_bad_option_is_one_line(argv: list[str], message: str) -> None:
    done = usagepipe(*argv)
    assert (done.returncode, done.stdout) == (2, "")
    assert one_line(done) == message


def test_a_factory_export_that_is_not_utf8(tmp_path: Path) -> None:
    export = tmp_path / "units.csv"
    export.write_bytes("model_number,serial_number\nWM-100,Größe\n".encode("latin-1"))
    done = usagepipe("registry", "import-units", str(export))
    assert (done.returncode, done.stdout) == (2, "")
    assert one_line(done) == (
        f"usagepipe registry: {export} is not UTF-8 text (byte 36: invalid start byte);"
        " export the CSV as UTF-8"
    )


def test_log_levels_are_not_case_sensitive() -> None:
    done = usagepipe("--log-level", "debug", "settings")
    assert done.returncode == 0
    assert done.stdout.startswith("USAGEPIPE_MQTT__HOST=")


# -- the dev signer -------------------------------------------------------------------


async def test_auth_token_prints_what_the_apis_accept(tmp_path: Path) -> None:
    """`usagepipe auth token` signs with a key it generates into the state directory
    (mode 0600), and the APIs' verifier of that key accepts its tokens."""
    env = environment(USAGEPIPE_SERVICES__RUN_DIR=str(tmp_path))
    owner = usagepipe("auth", "token", "--subject", "ada", env=env)
    planner = usagepipe("auth", "token", "--dashboard", "--ttl", "1h", env=env)
    operator = usagepipe(
        "auth", "token", "--subject", "sam", "--scope", "operator", "--auth-time", "none", env=env
    )
    assert "generated the dev signer's key in" in owner.stderr  # the first use only
    for done in (owner, planner, operator):
        assert done.returncode == 0, done.stderr
    assert planner.stderr == operator.stderr == ""
    key = tmp_path / "auth" / "dev_signer.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    verifier = DevSigner(key).verifier(AuthSettings())
    ada = await verifier.verify(owner.stdout.strip())
    assert (ada.subject, ada.scopes) == ("ada", frozenset())
    assert ada.signed_in_within(timedelta(minutes=1))
    address, _, token = planner.stdout.strip().partition("#token=")
    assert address == "http://127.0.0.1:8050/"
    pat = await verifier.verify(token)
    assert (pat.subject, pat.scopes) == ("planner", frozenset({"usagepipe:planner"}))
    assert pat.claims["exp"] - pat.claims["iat"] == 3600
    sam = await verifier.verify(operator.stdout.strip())
    assert (sam.subject, sam.scopes, sam.auth_time) == (
        "sam",
        frozenset({"usagepipe:operator"}),
        None,
    )

    refusals = [
        (["--subject", "ada", "--auth-time", "yesterday"], "usagepipe auth token: --auth-time"
         " 'yesterday': use now, none or an ISO time with zone (2026-12-01T09:00:00+00:00)"),
        ([], "usagepipe auth token: give --subject (who signs in)"),
    ]  # fmt: skip
    for argv, message in refusals:
        done = usagepipe("auth", "token", *argv, env=env)
        assert (done.returncode, done.stdout, one_line(done)) == (2, "", message)
    issuer = {
        "USAGEPIPE_AUTH__ISSUER": "https://sign-in.example.com",
        "USAGEPIPE_AUTH__JWKS_URL": "https://sign-in.example.com/jwks",
    }
    done = usagepipe("auth", "token", "--subject", "ada", env={**env, **issuer})
    assert (done.returncode, done.stdout, one_line(done)) == (
        2,
        "",
        "usagepipe auth token: auth.issuer is set (https://sign-in.example.com): tokens come"
        " from that sign-in; the dev signer is for local runs only",
    )


# -- a pipe closed early ---------------------------------------------------------------


def head_of(argv: list[str], env: Mapping[str, str], lines: int) -> tuple[int, list[bytes], bytes]:
    """`usagepipe ARGV | head -LINES`: exit status, the lines read, stderr."""
    reader = subprocess.Popen(
        [USAGEPIPE, *argv], env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert reader.stdout is not None and reader.stderr is not None
    with reader.stderr:
        head = [reader.stdout.readline() for _ in range(lines)]
        reader.stdout.close()  # what `head` does after its last line
        stderr = reader.stderr.read()
    return reader.wait(timeout=60), head, stderr


async def test_dlq_list_into_a_pipe_closed_early_ends_quietly(settings: Settings) -> None:
    """`usagepipe dlq list --limit 0 | head -3`: the reader stops after three lines.

    1,000 letters print about 150 kB, more than the pipe and stdout's buffer hold
    together, so the command is certainly still writing when the reader is gone."""
    kafka = settings.kafka
    letters = [
        DeadLetter.from_error(
            InvalidTelemetry(Reason.INVALID_JSON, f"line 1 column {n}: expecting value"),
            topic=kafka.raw_topic,
            partition=0,
            offset=n,
            key=b"wm-7-000001",
            original=b"{not json",
        )
        for n in range(1000)
    ]
    await ensure_topics(kafka, kafka.dlq_topic)
    producer = make_producer(kafka, client_id="test-cli-dlq")
    await producer.start()
    try:
        await send_dead_letters(producer, kafka.dlq_topic, letters)
    finally:
        await producer.stop()

    argv = ["dlq", "list", "--limit", "0", "--source", "kafka"]
    status, head, stderr = head_of(argv, environment(settings), 3)
    assert status == 1
    assert head[0] == f"{kafka.dlq_topic}: 1000 records (invalid_json 1000)\n".encode()
    assert head[1] == b"the newest 1000 of 1000, oldest first:\n"
    assert head[2].split() == b"POSITION REASON SOURCE DEVICE FAILED_AT MESSAGE".split()
    assert stderr == b""  # no BrokenPipeError, no "Exception ignored"

    # The same from the dead-letter table, the default source.
    async with UsageStore(settings.postgres) as store:
        await store.migrate()
        assert await store.write_letters([LetterRow(letter) for letter in letters]) == 1000
    status, head, stderr = head_of(["dlq", "list", "--limit", "0"], environment(settings), 3)
    assert status == 1
    table = f"{settings.postgres.table}_dead_letters"
    assert head[0] == f"{table}: 1000 letters (invalid_json 1000)\n".encode()
    assert head[1] == b"the newest 1000 of 1000, oldest first:\n"
    assert head[2].split() == b"ID REASON SOURCE DEVICE FAILED_AT MESSAGE".split()
    assert stderr == b""


def test_dlq_commands_before_the_table_exists_say_what_to_do(settings: Settings) -> None:
    env = environment(settings)
    t = settings.postgres.table
    for argv in (["list"], ["show", "3"], ["replay", "--dry-run"]):
        done = usagepipe("dlq", *argv, env=env)
        assert (done.returncode, done.stdout) == (1, "")
        assert one_line(done) == (
            f"usagepipe dlq {argv[0]}: usage table {t!r} has no dead-letter table"
            f" ({t}_dead_letters) yet; `usagepipe db migrate` creates it"
        )


# -- ports held by another server ------------------------------------------------------


@contextmanager
def running(argv: list[str], env: Mapping[str, str], ready_url: str) -> Iterator[None]:
    """A real `usagepipe` server, until the block ends (SIGTERM, then wait)."""
    server = subprocess.Popen(
        [USAGEPIPE, *argv], env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"{argv} exited with {server.returncode}"
            try:
                urllib.request.urlopen(ready_url, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break  # it answers: a 404 will do
            except OSError:
                assert time.monotonic() < deadline, f"{argv} never answered {ready_url}"
                time.sleep(0.2)
        yield
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_a_metrics_port_another_bridge_holds(settings: Settings) -> None:
    port = free_port()
    env = environment(settings, USAGEPIPE_BRIDGE__METRICS_PORT=str(port))
    with running(["bridge"], env, f"http://127.0.0.1:{port}/metrics"):
        done = usagepipe("bridge", env=env)
    assert (done.returncode, done.stdout) == (2, "")
    assert one_line(done) == (
        f"usagepipe bridge: metrics port {port} is already in use on 127.0.0.1; set"
        " USAGEPIPE_BRIDGE__METRICS_PORT to a free port"
    )


def test_ports_another_server_holds(settings: Settings) -> None:
    """An insights server holds the port; every other server told to use it says so."""
    port = free_port()
    env = environment(settings)
    held = str(port)
    with running(["insights", "serve", "--port", held], env, f"http://127.0.0.1:{port}/health"):
        attempts = {
            "insights serve": usagepipe(
                "insights", "serve", env={**env, "USAGEPIPE_INSIGHTS__HTTP_PORT": held}
            ),
            "registry serve": usagepipe(
                "registry", "serve", env={**env, "USAGEPIPE_REGISTRY__HTTP_PORT": held}
            ),
            "registry serve --port": usagepipe("registry", "serve", "--port", held, env=env),
            "consume": usagepipe("consume", env={**env, "USAGEPIPE_CONSUMER__METRICS_PORT": held}),
            "simulate": usagepipe(
                "simulate",
                "--devices",
                "1",
                "--duration",
                "1s",
                env={**env, "USAGEPIPE_SIMULATOR__METRICS_PORT": held},
            ),
        }
    assert {name: done.returncode for name, done in attempts.items()} == dict.fromkeys(attempts, 2)
    in_use = "is already in use on 127.0.0.1; set"
    assert one_line(attempts["insights serve"]) == (
        f"usagepipe insights serve: port {port} {in_use} USAGEPIPE_INSIGHTS__HTTP_PORT to a"
        " free port"
    )
    assert one_line(attempts["registry serve"]) == (
        f"usagepipe registry serve: port {port} {in_use} USAGEPIPE_REGISTRY__HTTP_PORT to a"
        " free port"
    )
    assert one_line(attempts["registry serve --port"]) == (
        f"usagepipe registry serve: port {port} {in_use} --port to a free port"
    )
    assert one_line(attempts["consume"]) == (
        f"usagepipe consume: metrics port {port} {in_use} USAGEPIPE_CONSUMER__METRICS_PORT to a"
        " free port"
    )
    # The simulator provisions its fleet first; its last line names the port.
    simulate = attempts["simulate"]
    assert "Traceback" not in simulate.stderr
    assert simulate.stderr.splitlines()[-1] == (
        f"usagepipe simulate: metrics port {port} {in_use} USAGEPIPE_SIMULATOR__METRICS_PORT"
        " to a free port"
    )


# -- the registry's schema ------------------------------------------------------------


def test_consume_on_a_fresh_database_migrates_the_registry_first(settings: Settings) -> None:
    """The consumer enriches from the registry's schema and never creates it; the
    command does, as `usagepipe registry migrate` would, so the two commands of a
    fresh install still work in order."""
    fresh = f"{settings.registry.db_schema}_fresh"
    env = environment(settings, USAGEPIPE_REGISTRY__DB_SCHEMA=fresh)
    dsn = settings.postgres.dsn.get_secret_value()
    try:
        done = usagepipe("--log-level", "error", "consume", "--duration", "1s", env=env)
        assert (done.returncode, done.stderr, done.stdout) == (
            0,
            "",
            "consumer: 0 consumed, 0 stored, 0 duplicates, 0 dead letters\n",
        )
        applied = asyncio.run(_registry_migrations(dsn, fresh))
        assert applied == [
            ("registry", 1, "001_registry"),
            ("registry", 2, "002_notify"),
            ("registry", 3, "003_firmware"),
            ("registry", 4, "004_consumer_interface"),
            ("registry", 5, "005_subjects_audit"),
            ("registry", 6, "006_registration_limits"),
            ("registry", 7, "007_device_certificates"),
            ("registry", 8, "008_purposes_policies"),
            ("registry", 11, "011_analytics_consent_ends"),
        ]
    finally:
        asyncio.run(_drop_schema(dsn, fresh))


async def _registry_migrations(dsn: str, schema: str) -> list[tuple[str, int, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT component, version, name FROM {schema}.schema_migrations ORDER BY 1, 2"
        )
    finally:
        await conn.close()
    return [(r["component"], r["version"], r["name"]) for r in rows]


async def _drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


# -- servers that do not answer --------------------------------------------------------


def test_a_stopped_database_is_one_line(settings: Settings) -> None:
    closed = free_port()
    env = environment(
        settings,
        USAGEPIPE_POSTGRES__DSN=f"postgresql://postgres@127.0.0.1:{closed}/test",
        USAGEPIPE_CONSUMER__START_WAIT_S="1",
    )
    refused = f"[Errno 111] Connect call failed ('127.0.0.1', {closed})"
    quiet = ["--log-level", "error"]
    expected = {
        ("db", "migrate"): (1, f"usagepipe db migrate: PostgreSQL unreachable: {refused}"),
        ("consume",): (1, f"usagepipe consume: PostgreSQL unreachable: {refused}"),
        ("report", "programs"): (1, f"usagepipe report programs: {refused}"),
        ("insights", "serve", "--port", "0"): (
            1,
            f"usagepipe insights serve: PostgreSQL unreachable: {refused}",
        ),
        ("registry", "migrate"): (2, f"usagepipe registry: {refused}"),
        ("registry", "export-owner", str(UUID(int=1))): (2, f"usagepipe registry: {refused}"),
        ("erasure", "prove", str(UUID(int=1))): (
            1,
            f"usagepipe erasure prove: PostgreSQL unreachable: {refused}",
        ),
        ("registry", "serve", "--port", "0"): (
            2,
            f"usagepipe registry: cannot connect to PostgreSQL: {refused}",
        ),
    }
    for argv, (status, message) in expected.items():
        done = usagepipe(*quiet, *argv, env=env)
        assert (argv, done.returncode, one_line(done)) == (argv, status, message)


def test_a_stopped_broker_is_one_line(settings: Settings) -> None:
    closed = free_port()
    done = usagepipe(
        "--log-level",
        "error",
        "bridge",
        env=environment(
            settings, USAGEPIPE_MQTT__PORT=str(closed), USAGEPIPE_BRIDGE__START_WAIT_S="1"
        ),
    )
    assert done.returncode == 1
    assert one_line(done) == (
        f"usagepipe bridge: MQTT broker 127.0.0.1:{closed} unreachable: [Errno 111] Connection"
        " refused"
    )


def test_a_refused_login_stops_the_bridge_at_once(settings: Settings) -> None:
    """A wrong password is a setting to fix, not a broker to wait for: exit 2."""
    env = environment(settings, USAGEPIPE_MQTT__PASSWORD="not-the-password")
    done = usagepipe("--log-level", "error", "bridge", env=env)
    assert done.returncode == 2
    assert one_line(done) == (
        f"usagepipe bridge: MQTT broker refused {settings.bridge.client_id}: Not authorized"
        " (are USAGEPIPE_MQTT__USERNAME and USAGEPIPE_MQTT__PASSWORD right?)"
    )


def test_a_refused_subscription_stops_the_bridge(
    settings: Settings, base_settings: Settings
) -> None:
    """The bridge's login may read one prefix level above `devices/`, not two: the
    bridge exits naming the prefix, where it used to wait for ever (and ignore SIGTERM)."""
    prefix = f"{settings.mqtt.topic_prefix}deeper/"
    env = environment(settings, USAGEPIPE_MQTT__TOPIC_PREFIX=prefix)
    done = usagepipe("--log-level", "error", "bridge", env=env)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"usagepipe bridge: the MQTT broker refused the subscription to"
        f" '{prefix}devices/+/telemetry': Not authorized; the bridge's login"
        f" {base_settings.mqtt.username!r} may not read it"
        f" (is USAGEPIPE_MQTT__TOPIC_PREFIX={prefix!r} right?)"
    )
