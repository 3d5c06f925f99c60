"""The worker on a Djinn CI server's own database (SPEC section 11), against real PostgreSQL, Redis and Docker.

tests/fixtures/upstream_schema.sql is the schema the server's revisions/schema
create. It was checked once against the real thing, on 2026-12-01: the server's
eight revisions (djinn-ci/djinn revisions/schema/20211023122824.sql through
20221002113314.sql) were applied in file-name order to one scratch database and
the fixture to another, and every column of every table (name, data type,
nullability, default), every enum type with its labels in order, and every
constraint (name, kind and definition) compared equal. The tests here compare the
fixture with what `migrate` makes, and run the worker on rows written the way the
server's build.Store Create and Submit write them, with plain SQL.

tests/fixtures/server_secrets/secrets.json was printed by the Go program beside it
(Go's AES-GCM, x/crypto's PBKDF2 and go-hashids, as the server uses them).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text
from worker_support import WorkerEnv, _databases

from djinn.db.migrate import head

FIXTURES = Path(__file__).parent / "fixtures"
SERVER_SCHEMA = (FIXTURES / "upstream_schema.sql").read_text()
SECRETS = json.loads((FIXTURES / "server_secrets" / "secrets.json").read_text())
# The crypto block the worker_support config and the Go generator share.
CRYPTO_BLOCK, CRYPTO_SALT = "0123456789abcdef0123456789abcdef", "test-salt"

# The worker's additions to the server's tables: all nullable or defaulted.
LEASE_COLUMNS = {("builds", "attempt"), ("builds", "worker"), ("builds", "heartbeat_at"), ("builds", "error")}
WORKER_TABLES = {"build_job_output", "build_notifications", "notification_outbox", "alembic_version"}


def _query(url: str, sql: str, **params):
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params)
            return result.all() if result.returns_rows else None
    finally:
        engine.dispose()


def _new_database(postgres, schema: str | None = None) -> str:
    name = f"djinn_server_{os.getpid()}_{next(_databases)}"
    postgres.create_database(name)
    if schema is not None:
        engine = create_engine(postgres.url(name))
        with engine.begin() as conn:
            conn.exec_driver_sql(schema)
        engine.dispose()
    return name


def schema_of(url: str) -> dict:
    """Columns, enum labels and constraints of the public schema, for comparing two databases."""
    columns = {
        (t, c): (dtype, udt, nullable, default)
        for t, c, dtype, udt, nullable, default in _query(
            url,
            "SELECT table_name, column_name, data_type, udt_name, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = 'public'",
        )
    }
    enums: dict[str, list[str]] = {}
    for typname, label in _query(
        url,
        "SELECT t.typname, e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid"
        " WHERE t.typnamespace = 'public'::regnamespace ORDER BY t.typname, e.enumsortorder",
    ):
        enums.setdefault(typname, []).append(label)
    constraints = set(
        _query(
            url,
            "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace",
        )
    )
    return {"columns": columns, "enums": enums, "constraints": constraints}


def test_migrate_on_an_empty_database_creates_the_server_schema(postgres):
    from djinn.config.settings import DatabaseSettings
    from djinn.db import engine as db
    from djinn.db.migrate import upgrade

    server = schema_of(postgres.url(_new_database(postgres, SERVER_SCHEMA)))
    name = _new_database(postgres)
    engine = db.make_engine(DatabaseSettings(addr=postgres.addr, name=name, username="postgres"))
    try:
        assert upgrade(engine) == (None, head())
    finally:
        engine.dispose()
    ours = schema_of(postgres.url(name))

    server_tables = {t for t, _ in server["columns"]}
    assert len(server_tables) == 29
    for key, shape in server["columns"].items():
        assert ours["columns"].get(key) == shape, key
    added = {key for key in ours["columns"] if key not in server["columns"]}
    assert {key for key in added if key[0] in server_tables} == LEASE_COLUMNS
    assert {t for t, _ in added if t not in server_tables} == WORKER_TABLES
    # Every constraint of the server's tables, by name and definition.
    assert {c for c in ours["constraints"] if c[0] in server_tables} >= server["constraints"]
    assert ours["enums"] == {**server["enums"], "driver_type": server["enums"]["driver_type"] + ["os"]}


def _server_rows(url: str) -> None:
    """What a server in use has: an account, a namespace, a build that failed before the worker came."""
    _query(
        url,
        """
        INSERT INTO users (email, username, password) VALUES ('old@team.test', 'old', 'bcrypt-hash');
        INSERT INTO namespaces (user_id, name, path, level) VALUES (1, 'team', 'team', 0);
        UPDATE namespaces SET root_id = id;
        INSERT INTO builds (user_id, namespace_id, number, manifest, status, secret, started_at, finished_at)
          VALUES (1, 1, 1, 'driver: {type: ssh}', 'failed', 'abc', now(), now());
        INSERT INTO build_drivers (build_id, type, config) VALUES (1, 'ssh', '{"type": "ssh"}');
        INSERT INTO build_stages (build_id, name, can_fail) VALUES (1, 'setup - #1', false);
        INSERT INTO build_jobs (build_id, stage_id, name, commands, status, output)
          VALUES (1, 1, 'create-driver', '', 'failed', 'no such host');
        """,
    )


ROW_TABLES = ("users", "namespaces", "builds", "build_drivers", "build_stages", "build_jobs")


def _rows(url: str) -> dict[str, list]:
    return {table: _query(url, f"SELECT * FROM {table} ORDER BY id") for table in ROW_TABLES}


@pytest.fixture
def server_env(tmp_path, postgres, redis_server):
    """A worker set up on a database the Djinn server made (the fixture schema) and has used."""
    database = _new_database(postgres, SERVER_SCHEMA)
    env = WorkerEnv(tmp_path, postgres, redis_server, database)
    _server_rows(env.url)
    env.write_config()
    yield env
    env.stop_all()


def test_migrate_on_the_server_database_only_adds_and_is_idempotent(server_env):
    env = server_env
    before, rows_before = schema_of(env.url), _rows(env.url)

    first = env.cli("migrate")
    assert f"upgraded from nothing to {head()}" in first.stdout
    second = env.cli("migrate")
    assert f"up to date (revision {head()})" in second.stdout

    after = schema_of(env.url)
    for key, shape in before["columns"].items():
        assert after["columns"][key] == shape, key  # no column of the server's changed
    added = {key: shape for key, shape in after["columns"].items() if key not in before["columns"]}
    server_tables = {t for t, _ in before["columns"]}
    assert {key for key in added if key[0] in server_tables} == LEASE_COLUMNS
    for key in LEASE_COLUMNS:
        _, _, nullable, default = added[key]
        assert nullable == "YES" or default is not None, key  # the server's INSERTs do not name them
    assert {t for t, _ in added if t not in server_tables} == WORKER_TABLES
    assert after["constraints"] >= before["constraints"]
    assert after["enums"] == {**before["enums"], "driver_type": ["ssh", "qemu", "docker", "os"]}
    assert tuple(_rows(env.url)["builds"][0])[:12] == tuple(rows_before["builds"][0])  # the server's columns come first
    for table in ROW_TABLES:
        if table != "builds":
            assert _rows(env.url)[table] == rows_before[table], table
    # The build that failed before the worker came is not mailed about now.
    assert env.sql("SELECT build_id, kind, state FROM build_notifications") == [(1, "mail", "skipped")]
    # The server's own INSERT, naming only its columns, still works.
    env.sql("INSERT INTO builds (user_id, number, manifest, status, created_at) VALUES (1, 2, 'x', 'queued', now())")


def _create_role(env, name: str) -> None:
    if not env.sql("SELECT 1 FROM pg_roles WHERE rolname = :n", n=name):
        env.sql(f"CREATE ROLE {name} LOGIN")


def test_migrate_as_a_role_without_ddl_rights_says_so_in_one_line(server_env):
    env = server_env
    _create_role(env, "djinn_worker")
    env.sql(f"GRANT CONNECT ON DATABASE {env.database} TO djinn_worker")
    env.sql("GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO djinn_worker")
    admin_config = env.config.read_text()
    env.config.write_text(admin_config.replace('username "postgres"', 'username "djinn_worker"'))

    res = env.cli("migrate", check=False)
    assert res.returncode in (1, 2)
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"role djinn_worker may not change the schema of database {env.database}" in lines[0]
    assert "run migrate as the database owner or an admin role" in lines[0]
    assert env.sql("SELECT to_regclass('alembic_version'), to_regclass('build_job_output')") == [(None, None)]

    # Run as the admin, migrate grants the server's worker role the worker's new tables.
    env.config.write_text(admin_config)
    env.cli("migrate")
    assert env.sql(
        "SELECT has_table_privilege('djinn_worker', 'build_job_output', 'INSERT'),"
        " has_table_privilege('djinn_worker', 'build_notifications', 'UPDATE'),"
        " has_table_privilege('djinn_worker', 'notification_outbox', 'UPDATE')"
    ) == [(True, True, True)]


def test_secrets_and_hashes_match_the_servers():
    from djinn.config import CryptoSettings
    from djinn.crypto import Cipher, Hasher

    cipher = Cipher(CryptoSettings(CRYPTO_BLOCK, CRYPTO_SALT))
    assert cipher.decrypt_text(SECRETS["masked_value"]) == "server-masked-value"
    assert b"server-key-material" in cipher.decrypt(bytes.fromhex(SECRETS["key_hex"]))
    assert Hasher(CRYPTO_SALT).hash_at(int(SECRETS["hash_ns"])) == SECRETS["hash"]
    # And what the worker encrypts, a fresh nonce each time, decrypts the same way.
    sealed = cipher.encrypt_text("worker-value")
    assert sealed != cipher.encrypt_text("worker-value") and cipher.decrypt_text(sealed) == "worker-value"


# -- the server's rows, the worker's run ------------------------------------------------------------


def write_server_build(env, manifest: str, stages: list[tuple[str, bool, list[tuple[str, str, list[tuple[str, str]]]]]],
                       *, driver: dict, with_secrets: bool = False, objects: list[tuple[int, str]] = ()) -> int:
    """Rows as build.Store Create then Submit write them, in plain SQL; returns the build id.

    `stages`: (name, can_fail, jobs) after the setup stage; a job is (name, commands, artifacts (source, name)).
    """
    from djinn.crypto import Hasher

    (user_id,) = env.sql("SELECT id FROM users WHERE username = 'alice'")[0]
    (number,) = env.sql("SELECT COALESCE(max(number), 0) + 1 FROM builds WHERE user_id = :u", u=user_id)[0]
    ((build_id,),) = env.sql(
        "INSERT INTO builds (user_id, number, manifest, status, secret, created_at)"
        " VALUES (:u, :n, :m, 'queued', :s, now()) RETURNING id",
        u=user_id, n=number, m=manifest, s=os.urandom(16).hex(),
    )
    env.sql("INSERT INTO build_triggers (build_id, type, comment, data, created_at) VALUES (:b, 'manual', 'by hand', '{}', now())",
            b=build_id)
    env.sql("INSERT INTO build_drivers (build_id, type, config) VALUES (:b, CAST(:t AS driver_type), :c)",
            b=build_id, t=driver["type"], c=json.dumps(driver))
    if with_secrets:
        env.sql("INSERT INTO build_variables (build_id, variable_id, key, value, masked)"
                " SELECT :b, id, key, value, masked FROM variables WHERE user_id = :u", b=build_id, u=user_id)
        env.sql("INSERT INTO build_keys (build_id, key_id, key, name, config, location)"
                " SELECT :b, id, key, name, config, '/root/.ssh/' || name FROM keys WHERE user_id = :u", b=build_id, u=user_id)
    env.sql("INSERT INTO build_variables (build_id, key, value, masked) VALUES (:b, 'GREETING', 'hello', false)", b=build_id)
    for object_id, destination in objects:
        env.sql("INSERT INTO build_objects (build_id, object_id, source, name)"
                " SELECT :b, id, :dst, name FROM objects WHERE id = :o", b=build_id, o=object_id, dst=destination)
    hashes = Hasher(CRYPTO_SALT)
    for stage, can_fail, jobs in [(f"setup - #{number}", False, [("create-driver", "", [])]), *stages]:
        ((stage_id,),) = env.sql(
            "INSERT INTO build_stages (build_id, name, can_fail, created_at) VALUES (:b, :n, :f, now()) RETURNING id",
            b=build_id, n=stage, f=can_fail,
        )
        for job, commands, artifacts in jobs:
            ((job_id,),) = env.sql(
                "INSERT INTO build_jobs (build_id, stage_id, name, commands, created_at) VALUES (:b, :s, :n, :c, now()) RETURNING id",
                b=build_id, s=stage_id, n=job, c=commands,
            )
            for source, name in artifacts:
                env.sql("INSERT INTO build_artifacts (user_id, build_id, job_id, hash, source, name, created_at)"
                        " VALUES (:u, :b, :j, :h, :s, :n, now())",
                        u=user_id, b=build_id, j=job_id, h=hashes.hash_at(time.time_ns()), s=source, n=name)
    return build_id


# The curlyq jobs Go's encoders printed (tests/fixtures/curlyq/gen): msgpack v4 {ID, Data, Attempt}
# around the gob Payload{Host, BuildID}. The emulated server's docker build goes on the queue as those very bytes.
GO_JOBS = {c["build_id"]: c for c in json.loads((FIXTURES / "curlyq" / "payloads.json").read_text()) if c["name"] == "build id 127"}


def enqueue(env, build_id: int, queue: str = "builds_docker") -> str:
    """Queue the build as the Djinn server does: a curlyq job (data hash + active list, no signal, as curlyq v0.4.0)."""
    from djinn.worker.curlyq import Job, QueueKeys
    from djinn.worker.gob import encode_payload

    go = GO_JOBS.get(build_id)
    if go is not None:
        job_id, raw = go["job_id"], bytes.fromhex(go["job_v4_0_4"])
    else:
        job_id = f"job-{build_id}"
        raw = Job(job_id, encode_payload("https://djinn-ci.com", build_id)).pack()
    keys = QueueKeys(queue)
    client = redis.Redis.from_url(env.redis.url)
    try:
        client.hset(keys.data, job_id, raw)
        client.rpush(keys.active, job_id)
    finally:
        client.close()
    return job_id


def assert_acknowledged(env, job_id: str, queue: str = "builds_docker") -> None:
    """The consumer settled the job: gone from the data hash, the active list and every in-flight set."""
    from djinn.worker.curlyq import QueueKeys

    keys = QueueKeys(queue)
    client = redis.Redis.from_url(env.redis.url)
    try:
        deadline = time.monotonic() + 30
        while client.hexists(keys.data, job_id):
            assert time.monotonic() < deadline, f"curlyq job {job_id} never acknowledged; worker log:\n{env.log_tail()}"
            time.sleep(0.1)
        assert job_id.encode() not in client.lrange(keys.active, 0, -1)
        for inflight in client.zrange(keys.consumers, 0, -1):
            assert not client.sismember(inflight, job_id)
        assert client.zscore(keys.dead, job_id) is None
    finally:
        client.close()


def wait_finished(env, build_id: int, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ((status,),) = env.sql("SELECT status FROM builds WHERE id = :b", b=build_id)
        if status not in ("queued", "running"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"build {build_id} still {status} after {timeout}s; worker log:\n{env.log_tail()}")


@pytest.fixture
def docker_server_env(server_env, docker_api):
    env = server_env
    env.write_config(driver="docker", driver_config="driver docker {}\n")
    env.cli("migrate")
    env.sql("INSERT INTO users (email, username, password) VALUES ('alice@team.test', 'alice', 'bcrypt-hash')")
    env.start_worker()
    return env


def test_a_docker_build_written_by_the_server_runs_and_leaves_the_servers_rows(docker_server_env):
    from docker_support import IMAGE

    env = docker_server_env
    (user_id,) = env.sql("SELECT id FROM users WHERE username = 'alice'")[0]
    data = b"object from the server\n"
    ((object_id,),) = env.sql(
        "INSERT INTO objects (user_id, author_id, hash, name, type, size, md5, sha256)"
        " VALUES (:u, :u, 'objhash0001', 'data.txt', 'text/plain', :n, :md5, :sha) RETURNING id",
        u=user_id, n=len(data), md5=hashlib.md5(data).digest(), sha=hashlib.sha256(data).digest(),
    )
    store = env.root / "objects" / str(user_id)
    store.mkdir(parents=True)
    (store / "objhash0001").write_bytes(data)
    # A masked variable and a key as the server stores them (made by Go: server_secrets).
    env.sql("INSERT INTO variables (user_id, author_id, key, value, masked) VALUES (:u, :u, 'TOKEN', :v, true)",
            u=user_id, v=SECRETS["masked_value"])
    env.sql("INSERT INTO keys (user_id, author_id, name, key, config) VALUES (:u, :u, 'deploy', :k, '')",
            u=user_id, k=bytes.fromhex(SECRETS["key_hex"]))

    make = (
        "cat in/data.txt\n"
        # The shell echoes each command, expanded, into the output: no command spells a secret.
        'test "$TOKEN" = "server-$(echo masked)-value" && echo masked-value-arrived\n'
        'echo "token=$TOKEN greeting=$GREETING"\n'
        "grep -c key-mat /root/.ssh/deploy\n"
        "printf artifact > art.bin"
    )
    # Go's encoder printed a job for build 127 (tests/fixtures/curlyq): this build gets that id.
    env.sql("SELECT setval('builds_id_seq', 127, false)")
    build_id = write_server_build(
        env,
        "driver: {type: docker}\n",
        [("make", False, [("make.1", make, [("art.bin", "out.bin")])]), ("check", False, [("check.1", "ls art.bin", [])])],
        driver={"type": "docker", "image": IMAGE, "workspace": "/build"},
        with_secrets=True,
        objects=[(object_id, "in/data.txt")],
    )
    assert build_id in GO_JOBS, build_id  # its curlyq job is Go's own bytes, which name this build
    job_id = enqueue(env, build_id)
    assert wait_finished(env, build_id) == "passed", env.log_tail()
    assert_acknowledged(env, job_id)

    ((status, created, started, finished, output, attempt, worker),) = env.sql(
        "SELECT status, created_at, started_at, finished_at, output, attempt, worker FROM builds WHERE id = :b", b=build_id
    )
    assert created.tzinfo is None and created <= started <= finished  # one clock: the server's TIMESTAMPs, UTC
    assert (attempt, worker) == (1, None)
    assert "masked-value-arrived" in output and "greeting=hello" in output
    assert "server-masked-value" not in output and "server-key-material" not in output, output
    jobs = env.sql("SELECT name, status, started_at, finished_at, output FROM build_jobs WHERE build_id = :b ORDER BY id",
                   b=build_id)
    assert [(name, status) for name, status, *_ in jobs] == [("create-driver", "passed"), ("make.1", "passed"), ("check.1", "passed")]
    for name, _, job_started, job_finished, job_output in jobs:
        assert started <= job_started <= job_finished <= finished, name
        assert job_output is not None and "server-masked-value" not in job_output, name
    assert "Placed object data.txt => in/data.txt" in jobs[0][4]
    assert "object from the server\n" in jobs[1][4] and "\n1\n" in jobs[1][4]
    assert env.sql("SELECT placed FROM build_objects WHERE build_id = :b", b=build_id) == [(True,)]
    assert env.sql("SELECT count(*) FROM build_job_output WHERE build_id = :b", b=build_id) == [(0,)]

    ((a_user, a_hash, size, md5, sha256),) = env.sql(
        "SELECT user_id, hash, size, md5, sha256 FROM build_artifacts WHERE build_id = :b", b=build_id
    )
    assert (a_user, size, bytes(md5), bytes(sha256)) == (
        user_id, 8, hashlib.md5(b"artifact").digest(), hashlib.sha256(b"artifact").digest()
    )
    assert (env.root / "artifacts" / str(user_id) / a_hash).read_bytes() == b"artifact"


def test_a_failing_and_a_killed_server_build_end_as_they_should(docker_server_env):
    from docker_support import IMAGE

    env = docker_server_env
    driver = {"type": "docker", "image": IMAGE, "workspace": "/build"}
    failing = write_server_build(
        env, "driver: {type: docker}\n",
        [("a", False, [("a.1", "echo before-failure\nexit 3", [])]), ("b", False, [("b.1", "echo never", [])])],
        driver=driver,
    )
    assert_acknowledged(env, enqueue(env, failing))
    assert wait_finished(env, failing) == "failed", env.log_tail()
    jobs = {name: rest for name, *rest in env.sql(
        "SELECT name, status, started_at, finished_at, output FROM build_jobs WHERE build_id = :b", b=failing)}
    assert jobs["create-driver"][0] == "passed" and jobs["a.1"][0] == "failed"
    # A job that never ran ends as the Go worker leaves it: the build's status, finished, no start, empty output.
    status, started, finished, output = jobs["b.1"]
    assert (status, started, output) == ("failed", None, "") and finished is not None
    ((finished, output),) = env.sql("SELECT finished_at, output FROM builds WHERE id = :b", b=failing)
    assert finished is not None and "before-failure" in output and "never" not in output

    killed = write_server_build(env, "driver: {type: docker}\n", [("a", False, [("a.1", "echo started\nsleep 120", [])])],
                                driver=driver)
    assert_acknowledged(env, enqueue(env, killed))
    deadline = time.monotonic() + 120
    while env.sql("SELECT status FROM build_jobs WHERE build_id = :b AND name = 'a.1'", b=killed) != [("running",)]:
        assert time.monotonic() < deadline, env.log_tail()
        time.sleep(0.2)
    # As the server's Build.Kill: PUBLISH kill-<id> <secret>.
    ((secret,),) = env.sql("SELECT secret FROM builds WHERE id = :b", b=killed)
    client = redis.Redis.from_url(env.redis.url)
    try:
        assert client.publish(f"kill-{killed}", secret) == 1
    finally:
        client.close()
    assert wait_finished(env, killed, timeout=60) == "killed", env.log_tail()
    ((status, finished),) = env.sql("SELECT status, finished_at FROM build_jobs WHERE build_id = :b AND name = 'a.1'", b=killed)
    assert status == "killed" and finished is not None


def test_a_qemu_build_uses_its_users_own_image_before_the_base_images(server_env):

    from djinn.config.settings import DatabaseSettings
    from djinn.db import engine as db
    from djinn.db import load
    from djinn.drivers.qemu import QEMUDriver, user_image_path
    from djinn.errors import DriverError

    env = server_env
    env.cli("migrate")
    env.sql("INSERT INTO users (email, username, password) VALUES ('alice@team.test', 'alice', ''), ('bob@team.test', 'bob', '')")
    ((alice,), (bob,)) = env.sql("SELECT id FROM users WHERE username IN ('alice', 'bob') ORDER BY username")
    env.sql("INSERT INTO images (user_id, author_id, driver, hash, name) VALUES (:b, :b, 'qemu', 'bobs0001', 'custom/img'),"
            " (:a, :a, 'qemu', 'alices01', 'custom/img')", a=alice, b=bob)
    own = write_server_build(env, "driver: {type: qemu, image: custom/img}\n", [],
                             driver={"type": "qemu", "image": "custom/img", "arch": "x86_64"})
    base = write_server_build(env, "driver: {type: qemu, image: debian/12}\n", [],
                              driver={"type": "qemu", "image": "debian/12", "arch": "x86_64"})

    engine = db.make_engine(DatabaseSettings(addr=env.postgres.addr, name=env.database, username="postgres"))
    try:
        with db.sessions(engine)() as session:
            loaded_own = load.decode(load.read(session, own), None)
            loaded_base = load.decode(load.read(session, base), None)
    finally:
        engine.dispose()
    assert loaded_own.image == (alice, "alices01") and loaded_base.image is None

    disks = env.root / "disks"
    path = user_image_path(str(disks), *loaded_own.image)
    assert path == str(disks / str(alice) / "qemu" / "alices01")
    driver = QEMUDriver({"image": "custom/img", "disks": str(disks), "user_image": path})
    with pytest.raises(DriverError, match=f"not found at {path}"):
        driver.create({}, lambda data: None)
    with pytest.raises(DriverError, match="_base/qemu/x86_64/debian/12"):
        QEMUDriver({"image": "debian/12", "disks": str(disks), "user_image": None}).create({}, lambda data: None)
