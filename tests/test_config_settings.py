"""Typed worker and driver settings: defaults, strictness, queue names and secret-free public views."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import pytest

from djinn.config import (
    DockerSettings,
    DriverConfig,
    OSSettings,
    QemuSettings,
    SSHSettings,
    WorkerConfig,
    decode_driver,
    decode_worker,
    load_driver_config,
    load_worker_config,
    override,
    parse_text,
    split_address,
)
from djinn.config.settings import setting
from djinn.errors import ConfigError

td = datetime.timedelta

FULL_WORKER = """\
pidfile "/var/run/djinn/worker.pid"

log info "/var/log/djinn/worker.log"

parallelism 4

driver "docker"

timeout 45m

provider github {
\tendpoint      "https://github.example.com/api/v3"
\tclient_id     "id-123"
\tclient_secret "provider-client-secret"
}
provider gitlab

crypto {
\tblock "0123456789abcdef"
\tsalt  "pepper-salt-value"
}

database {
\taddr     "db.internal:5433"
\tname     "djinn"
\tusername "djinn_worker"
\tpassword "db-password-xyz"

\ttls {
\t\tca   "/var/lib/ssl/ca.crt"
\t\tcert "/var/lib/ssl/client.crt"
\t\tkey  "/var/lib/ssl/client.key"
\t}
}

redis {
\taddr     "redis.internal:6380"
\tpassword "redis-password-xyz"
}

smtp {
\taddr     "smtp.example.com:587"
\tca       "/etc/ssl/cert.pem"
\tadmin    "noreply@djinn-ci.com"
\tusername "postmaster@example.com"
\tpassword "smtp-password-xyz"
}

store artifacts {
\ttype  "file"
\tpath  "/var/lib/djinn/artifacts"
\tlimit 50MB
}

store objects {
\ttype "file"
\tpath "/var/lib/djinn/objects"
}

metrics "127.0.0.1:9100"
orphan_timeout 5m
"""

SECRETS = (
    "provider-client-secret",
    "0123456789abcdef",
    "pepper-salt-value",
    "db-password-xyz",
    "redis-password-xyz",
    "smtp-password-xyz",
)


def worker(text: str, name: str = "worker.conf") -> WorkerConfig:
    return decode_worker(parse_text(text, name))


def worker_error(text: str, name: str = "worker.conf") -> str:
    with pytest.raises(ConfigError) as info:
        worker(text, name)
    return str(info.value)


def driver_error(text: str, name: str = "driver.conf") -> str:
    with pytest.raises(ConfigError) as info:
        decode_driver(parse_text(text, name))
    return str(info.value)


# --- worker: full file --------------------------------------------------------


def test_full_worker_config_from_file(tmp_path):
    path = tmp_path / "djinn-worker.conf"
    path.write_text(FULL_WORKER)
    cfg = load_worker_config(path)
    assert cfg.source == str(path)
    assert cfg.pidfile == "/var/run/djinn/worker.pid"
    assert (cfg.log.level, cfg.log.file) == ("info", "/var/log/djinn/worker.log")
    assert cfg.parallelism == 4 and cfg.resolved_parallelism == 4
    assert cfg.driver == "docker"
    assert cfg.queue == "builds_docker"
    assert cfg.timeout == td(minutes=45)
    assert sorted(cfg.providers) == ["github", "gitlab"]
    assert cfg.providers["github"].endpoint == "https://github.example.com/api/v3"
    assert cfg.providers["gitlab"].endpoint == "https://gitlab.com/api/v4"
    assert cfg.crypto is not None
    assert (cfg.crypto.block, cfg.crypto.salt) == ("0123456789abcdef", "pepper-salt-value")
    assert cfg.database.addr == "db.internal:5433"
    assert cfg.database.password == "db-password-xyz"
    assert cfg.database.tls is not None and cfg.database.tls.key == "/var/lib/ssl/client.key"
    assert (cfg.redis.addr, cfg.redis.password) == ("redis.internal:6380", "redis-password-xyz")
    assert cfg.smtp is not None
    assert (cfg.smtp.addr, cfg.smtp.admin, cfg.smtp.password) == (
        "smtp.example.com:587",
        "noreply@djinn-ci.com",
        "smtp-password-xyz",
    )
    assert cfg.artifacts.limit == 50 * 1024 * 1024
    assert (cfg.artifacts.type, cfg.artifacts.path) == ("file", "/var/lib/djinn/artifacts")
    assert (cfg.objects.type, cfg.objects.path, cfg.objects.limit) == ("file", "/var/lib/djinn/objects", 0)
    assert cfg.metrics == "127.0.0.1:9100"
    assert cfg.orphan_timeout == td(minutes=5)


def test_settings_are_frozen():
    cfg = worker(FULL_WORKER)
    with pytest.raises(AttributeError):
        cfg.driver = "os"  # type: ignore[misc]


def test_public_dict_is_exact_and_json_able():
    cfg = worker(FULL_WORKER)
    assert cfg.public_dict() == {
        "pidfile": "/var/run/djinn/worker.pid",
        "log": {"level": "info", "file": "/var/log/djinn/worker.log"},
        "parallelism": 4,
        "driver": "docker",
        "queue": "builds_docker",
        "timeout": 2700,
        "orphan_timeout": 300,
        "metrics": "127.0.0.1:9100",
        "host": None,
        "providers": {
            "github": {
                "endpoint": "https://github.example.com/api/v3",
                "oauth2_endpoint": None,
                "client_id": "id-123",
                "secret_set": False,
                "client_secret_set": True,
            },
            "gitlab": {
                "endpoint": "https://gitlab.com/api/v4",
                "oauth2_endpoint": None,
                "client_id": None,
                "secret_set": False,
                "client_secret_set": False,
            },
        },
        "crypto_set": True,
        "database": {
            "addr": "db.internal:5433",
            "name": "djinn",
            "username": "djinn_worker",
            "password_set": True,
            "tls": {"ca": "/var/lib/ssl/ca.crt", "cert": "/var/lib/ssl/client.crt", "key": "/var/lib/ssl/client.key"},
        },
        "redis": {"addr": "redis.internal:6380", "password_set": True},
        "smtp": {
            "addr": "smtp.example.com:587",
            "admin": "noreply@djinn-ci.com",
            "ca": "/etc/ssl/cert.pem",
            "username": "postmaster@example.com",
            "password_set": True,
        },
        "store": {
            "artifacts": {"type": "file", "path": "/var/lib/djinn/artifacts", "limit": 52428800},
            "objects": {"type": "file", "path": "/var/lib/djinn/objects", "limit": 0},
            "images": None,
        },
    }


def test_public_dict_and_repr_exclude_secrets():
    cfg = worker(FULL_WORKER)
    dumped = json.dumps(cfg.public_dict())
    for secret in SECRETS:
        assert secret not in dumped
        assert secret not in repr(cfg)
    # ...but the code that needs them still has them.
    assert cfg.smtp.password == "smtp-password-xyz"
    assert cfg.providers["github"].client_secret == "provider-client-secret"


# --- worker: defaults -------------------------------------------------------


def test_minimal_worker_config_defaults(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    cfg = worker('driver "os"\n')
    assert cfg.driver == "os"
    assert cfg.pidfile is None
    assert (cfg.log.level, cfg.log.file) == ("info", None)
    assert cfg.parallelism == 0
    assert cfg.resolved_parallelism == 6
    assert cfg.timeout == td(minutes=30)
    assert cfg.orphan_timeout == td(minutes=2)
    assert cfg.providers == {}
    assert cfg.crypto is None
    assert cfg.database.addr == "localhost:5432"
    assert cfg.redis.addr == "localhost:6379"
    assert cfg.redis.password is None
    assert cfg.smtp is None
    assert cfg.metrics is None
    assert cfg.artifacts.type == "file" and cfg.artifacts.limit == 0
    public = cfg.public_dict()
    assert public["smtp"] is None
    assert public["parallelism"] == 6
    assert public["timeout"] == 1800
    assert public["providers"] == {}
    assert public["log"] == {"level": "info", "file": None}


def test_block_defaults_apply_to_keys_left_out():
    cfg = worker('driver "os"\ndatabase {\n\tpassword "x"\n}\nredis {}\nstore artifacts {\n\tlimit 1KB\n}\n')
    assert cfg.database.addr == "localhost:5432"
    assert cfg.redis.addr == "localhost:6379"
    assert cfg.artifacts.limit == 1024
    assert cfg.artifacts.type == "file"


def test_parallelism_zero_resolves_to_cpu_count():
    cfg = worker('driver "os"\nparallelism 0\n')
    assert cfg.parallelism == 0
    assert cfg.resolved_parallelism == (os.cpu_count() or 1)


# --- worker: queues -------------------------------------------------------------


@pytest.mark.parametrize(
    "driver, queue",
    [
        ("docker", "builds_docker"),
        ("ssh", "builds_ssh"),
        ("os", "builds_os"),
        ("qemu", "builds_qemu-x86_64"),
        ("qemu-x86_64", "builds_qemu-x86_64"),
    ],
)
def test_queue_mapping(driver, queue):
    cfg = worker(f'driver "{driver}"\n')
    assert cfg.queue == queue
    assert cfg.public_dict()["queue"] == queue


# --- worker: accepted upstream spellings ------------------------------------------


def test_upstream_spellings_are_accepted():
    cfg = worker(
        'driver "docker"\n'
        'timeout "30m"\n'  # upstream's dist file writes durations as strings
        "provider github\n"
        "provider gitlab {}\n"
        'crypto {\n\tblock "1a2b3c4d5e6f7g8h"\n\tsalt "s"\n\thash "h"\n\tauth "a"\n}\n'
        'database {\n\tssl {\n\t\tca "/ca.crt"\n\t}\n}\n'
        "store artifacts {\n\tlimit 52428800\n}\n"
        'store images {\n\ttype "file"\n\tpath "/var/lib/djinn/images"\n}\n'
    )
    assert cfg.timeout == td(minutes=30)
    assert sorted(cfg.providers) == ["github", "gitlab"]
    assert cfg.database.tls is not None and cfg.database.tls.ca == "/ca.crt"
    assert cfg.artifacts.limit == 52428800
    assert cfg.images is not None and cfg.images.path == "/var/lib/djinn/images"


def test_most_verbose_log_level_wins():
    cfg = worker('driver "os"\nlog error "/var/log/e.log"\nlog debug "/var/log/d.log"\n')
    assert (cfg.log.level, cfg.log.file) == ("debug", "/var/log/d.log")
    assert worker('driver "os"\nlog warn\n').log == type(cfg.log)("warn", None)


def test_env_vars_reach_settings():
    values = parse_text('driver "os"\ndatabase {\n\tpassword "${DBPW}"\n}\n', "w.conf", env={"DBPW": "from-env"})
    assert decode_worker(values).database.password == "from-env"


def test_include_in_worker_config(tmp_path):
    (tmp_path / "smtp.conf").write_text('smtp {\n\taddr "mail:25"\n\tadmin "ci@example.com"\n}\n')
    (tmp_path / "worker.conf").write_text('driver "ssh"\ninclude "smtp.conf"\n')
    cfg = load_worker_config(tmp_path / "worker.conf")
    assert cfg.smtp is not None and cfg.smtp.admin == "ci@example.com"


# --- worker: errors -----------------------------------------------------------


def test_unknown_top_level_key_is_a_warning_naming_key_and_line():
    # Upstream's decoder ignores keys it has no field for; a warning here, not a refusal.
    cfg = worker('driver "os"\n\nparalelism 4\n')
    assert cfg.parallelism == 0
    assert len(cfg.warnings) == 1
    assert cfg.warnings[0].startswith('worker.conf:3: unknown key "paralelism" ignored (known keys: ')
    known = cfg.warnings[0].split("(known keys: ", 1)[1].rstrip(")").split(", ")
    assert set(known) == {
        "pidfile", "log", "parallelism", "driver", "timeout", "provider", "crypto", "database",
        "redis", "smtp", "store", "metrics", "host", "orphan_timeout",
    }


def test_unknown_nested_keys_are_warnings_naming_key_block_and_line():
    cfg = worker(
        'driver "os"\ndatabase {\n\taddr "x:1"\n\tpasword "p"\n}\n'
        'store artifacts {\n\tsize 1MB\n}\nprovider github {\n\turl "x"\n}\nstore logs {}\n'
    )
    assert cfg.database.addr == "x:1" and cfg.database.password == ""
    assert sorted(w.split(" ignored")[0] for w in cfg.warnings) == [
        'worker.conf:10: unknown key "url" in provider.github',
        'worker.conf:12: unknown store "logs"',
        'worker.conf:4: unknown key "pasword" in database',
        'worker.conf:7: unknown key "size" in store.artifacts',
    ]


def test_keys_match_case_insensitively_as_upstream():
    cfg = worker('Driver "os"\nPidfile "/run/w.pid"\nDATABASE {\n\tAddr "db:1"\n}\n')
    assert (cfg.driver, cfg.pidfile, cfg.database.addr, cfg.warnings) == ("os", "/run/w.pid", "db:1", ())


def test_unknown_key_in_included_file_names_that_file(tmp_path):
    (tmp_path / "extra.conf").write_text("\nbogus 1\n")
    (tmp_path / "worker.conf").write_text('driver "os"\ninclude "extra.conf"\n')
    cfg = load_worker_config(tmp_path / "worker.conf")
    assert cfg.warnings[0].startswith(f'{tmp_path / "extra.conf"}:2: unknown key "bogus" ignored')


def test_ssl_is_read_as_tls_with_a_deprecation_warning():
    cfg = worker('driver "os"\ndatabase {\n\tssl {\n\t\tca "/ca.crt"\n\t}\n}\n')
    assert cfg.database.tls is not None and cfg.database.tls.ca == "/ca.crt"
    assert cfg.warnings == ("worker.conf:3: database.ssl is deprecated, use tls instead (read as tls)",)


def test_quoted_duration_works_with_a_portability_warning():
    cfg = worker('driver "os"\ntimeout "45m"\n')
    assert cfg.timeout == datetime.timedelta(minutes=45)
    assert cfg.warnings[0].startswith("worker.conf:2: timeout: a duration in quotes works here, but upstream")


def test_parallelism_beyond_upstreams_int32_is_refused():
    assert worker_error('driver "os"\nparallelism 2147483648\n') == "worker.conf:2: parallelism: must be at most 2147483647"
    assert worker_error('driver "os"\nparallelism ' + "9" * 5000 + "\n").startswith("worker.conf:2: integer 9999")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('driver "os"\nparallelism "four"\n', 'worker.conf:2: parallelism: expected an integer, got string "four"'),
        ('driver "os"\nparallelism true\n', "worker.conf:2: parallelism: expected an integer, got boolean true"),
        ("driver 5\n", "worker.conf:1: driver: expected a string, got integer 5"),
        ('driver "os"\npidfile 1\n', "worker.conf:2: pidfile: expected a string, got integer 1"),
        ('driver "os"\nlog info 5\n', "worker.conf:2: log info: expected a file name string, got integer 5"),
        ('driver "os"\ndatabase "localhost"\n', 'worker.conf:2: database: expected a block { ... }, got string "localhost"'),
        ('driver "os"\nredis {\n\taddr 6379\n}\n', "worker.conf:3: redis.addr: expected a string, got integer 6379"),
        (
            'driver "os"\nstore artifacts {\n\tlimit "big"\n}\n',
            'worker.conf:3: store.artifacts.limit: expected a size such as 50MB or a number of bytes, got string "big"',
        ),
        ('driver "os"\ntimeout 30\n', "worker.conf:2: timeout: expected a duration such as 90s, 30m or 1h30m, got integer 30 (add a unit, e.g. 30m)"),
        (
            'driver "os"\ntimeout "soon"\n',
            "worker.conf:2: timeout: invalid duration 'soon' (expected e.g. 90s, 30m, 1h30m, 500ms)",
        ),
    ],
)
def test_wrong_types_name_the_key(text, expected):
    assert worker_error(text) == expected


def test_invalid_choices():
    assert worker_error('driver "kubernetes"\n') == (
        'worker.conf:1: driver: unknown value "kubernetes" (expected one of: docker, qemu, qemu-x86_64, ssh, os)'
    )
    assert worker_error('driver "os"\nlog verbose "/x"\n').startswith('worker.conf:2: log: unknown level "verbose"')
    assert worker_error('driver "os"\nstore artifacts {\n\ttype "s3"\n}\n').startswith(
        'worker.conf:3: store.artifacts.type: unknown value "s3" (expected one of: file)'
    )
    assert worker_error('driver "os"\nprovider bitbucket\n').startswith('worker.conf:2: provider: unknown provider "bitbucket"')


def test_missing_driver_is_an_error():
    assert worker_error("parallelism 2\n") == 'worker.conf:1: missing required key "driver" in config'


def test_labels_where_none_belong_and_none_where_needed():
    assert worker_error("driver docker\n").startswith("worker.conf:1: driver: takes no label")
    assert worker_error('driver "os"\nlog "/var/log/w.log"\n').startswith("worker.conf:2: log: needs a label")
    assert worker_error('driver "os"\nstore {\n\tpath "x"\n}\n').startswith("worker.conf:2: store: needs a label")


def test_value_checks():
    assert worker_error('driver "os"\nparallelism -1\n') == "worker.conf:2: parallelism: must be 0 (one per CPU) or more"
    assert worker_error('driver "os"\ncrypto {\n\tblock "short"\n\tsalt "s"\n}\n') == (
        "worker.conf:3: crypto.block: must be 16, 24 or 32 characters long"
    )
    assert worker_error('driver "os"\ncrypto {\n\tblock "0123456789abcdef"\n}\n') == (
        'worker.conf:2: missing required key "crypto.salt" in crypto block'
    )
    assert worker_error('driver "os"\nsmtp {\n\taddr "mail:25"\n}\n') == (
        'worker.conf:2: missing required key "smtp.admin" in smtp block'
    )
    assert worker_error('driver "os"\ntimeout 0s\n') == "worker.conf:2: timeout: must be a positive duration"
    assert worker_error('driver "os"\nstore artifacts {\n\tlimit -1\n}\n') == (
        "worker.conf:3: store.artifacts.limit: must not be negative"
    )


def test_decode_plain_dict_without_positions():
    cfg = decode_worker({"driver": "ssh", "store": {"artifacts": {"path": "/a", "limit": 10}}}, "inline")
    assert cfg.queue == "builds_ssh"
    assert cfg.artifacts.path == "/a" and cfg.artifacts.limit == 10
    assert decode_worker({"driver": "ssh", "nope": 1}, "inline").warnings[0].startswith('inline: unknown key "nope" ignored')


def test_missing_worker_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_worker_config(tmp_path / "absent.conf")


# --- driver config ------------------------------------------------------------

FULL_DRIVER = """\
# The driver config.
driver ssh {
\ttimeout "60s"
\tuser    "builder"
\tpassword "ssh-password-xyz"
}

driver docker {
\thost    "unix:///var/run/docker.sock"
\tversion "1.40"
}

driver qemu {
\tdisks  "/var/lib/djinn/images"
\tcpus   2
\tmemory 4096
\taccel  "kvm"
}

driver os {}
"""


def test_full_driver_config(tmp_path):
    path = tmp_path / "djinn-driver.conf"
    path.write_text(FULL_DRIVER)
    cfg = load_driver_config(path)
    assert cfg.source == str(path)
    assert cfg.configured == ("docker", "qemu", "ssh", "os")
    assert (cfg.docker.host, cfg.docker.version) == ("unix:///var/run/docker.sock", "1.40")
    assert (cfg.qemu.disks, cfg.qemu.cpus, cfg.qemu.memory, cfg.qemu.accel) == ("/var/lib/djinn/images", 2, 4096, "kvm")
    assert (cfg.ssh.timeout, cfg.ssh.user, cfg.ssh.password) == (td(seconds=60), "builder", "ssh-password-xyz")
    assert cfg.public_dict() == {
        "docker": {"host": "unix:///var/run/docker.sock", "version": "1.40"},
        "qemu": {"disks": "/var/lib/djinn/images", "cpus": 2, "memory": 4096, "accel": "kvm", "warm": True, "warm_limit": 8589934592},
        "ssh": {"timeout": 60, "user": "builder", "key": None, "password_set": True},
        "os": {},
    }
    dumped = json.dumps(cfg.public_dict())
    assert "ssh-password-xyz" not in dumped
    assert "ssh-password-xyz" not in repr(cfg)


def test_driver_config_only_lists_present_drivers():
    cfg = decode_driver(parse_text("driver qemu\n", "d.conf"))
    assert cfg.configured == ("qemu",)
    assert cfg.docker is None and cfg.ssh is None
    assert (cfg.qemu.cpus, cfg.qemu.memory, cfg.qemu.accel) == (1, 2048, "auto")
    assert cfg.public_dict() == {"qemu": {"disks": "/var/lib/djinn/images", "cpus": 1, "memory": 2048, "accel": "auto", "warm": True, "warm_limit": 8589934592}}


def test_driver_defaults():
    cfg = DriverConfig.defaults()
    assert cfg.configured == ("docker", "qemu", "ssh", "os")
    assert cfg.ssh == SSHSettings(timeout=td(seconds=60), user="root")
    assert cfg.qemu.cpus == 1 and cfg.qemu.memory == 2048 and cfg.qemu.accel == "auto"
    assert cfg.docker.host is None and cfg.docker.version is None
    assert cfg.public_dict()["ssh"] == {"timeout": 60, "user": "root", "key": None, "password_set": False}


def test_settings_for_returns_the_block_and_falls_back_to_defaults():
    cfg = decode_driver(parse_text('driver ssh {\n\tuser "ci"\n\ttimeout 10s\n}\n', "d.conf"))
    assert cfg.settings_for("ssh") == SSHSettings(timeout=td(seconds=10), user="ci")
    assert cfg.settings_for("qemu") == QemuSettings()
    assert cfg.settings_for("qemu-x86_64") == cfg.settings_for("qemu")
    assert cfg.settings_for("docker") == DockerSettings()
    assert cfg.settings_for("os") == OSSettings()
    with pytest.raises(ConfigError, match="unknown driver type 'lxc'"):
        cfg.settings_for("lxc")


@dataclasses.dataclass(frozen=True)
class _RunSettings(SSHSettings):
    address: str = setting("")
    cpus: int = setting(1, check="integer")


def test_override_lays_manifest_strings_over_the_block_through_each_fields_check():
    block = SSHSettings(timeout=td(seconds=10), user="ci")
    merged = override(_RunSettings, block, {"type": "ssh", "address": "10.0.0.2:22", "timeout": "1m30s", "cpus": "4", "key": None})
    assert merged == _RunSettings(timeout=td(seconds=90), user="ci", address="10.0.0.2:22", cpus=4)
    assert override(_RunSettings, None, {}) == _RunSettings()  # the declared defaults
    assert override(_RunSettings, block, {"timeout": td(seconds=5), "cpus": 2}).cpus == 2  # typed values as they are
    with pytest.raises(ConfigError, match=r'^manifest: driver\.cpus: expected an integer, got string "many"$'):
        override(_RunSettings, block, {"cpus": "many"})
    with pytest.raises(ConfigError, match=r"driver\.timeout: must be a positive duration"):
        override(_RunSettings, block, {"timeout": "-5s"})
    with pytest.raises(ConfigError, match=r"driver\.user: must not be empty"):
        override(_RunSettings, block, {"user": ""})


def test_qemu_memory_as_size_literal_is_converted_to_mib():
    cfg = decode_driver(parse_text("driver qemu {\n\tmemory 4GB\n}\n", "d.conf"))
    assert cfg.qemu.memory == 4096


def test_unknown_driver_keys_and_drivers_are_warnings():
    cfg = decode_driver(
        parse_text(
            'pidfile "/x"\ndriver lxc {}\ndriver docker {\n\thost "x"\n\tsocket "y"\n}\n'
            'driver os {\n\tshell "/bin/bash"\n}\ndriver QEMU {\n\tarch "x86_64"\n\tCPUs 2\n}\n',
            "driver.conf",
        )
    )
    assert cfg.docker.host == "x" and cfg.os is not None and cfg.qemu.cpus == 2
    assert [w.split(" ignored")[0] for w in cfg.warnings] == [
        'driver.conf:1: unknown key "pidfile"',
        'driver.conf:2: unknown driver "lxc"',
        'driver.conf:5: unknown key "socket" in driver.docker',
        'driver.conf:8: unknown key "shell" in driver.os',
        'driver.conf:11: "driver.qemu.arch" is not used by this worker,',
    ]


def test_driver_config_errors():
    assert driver_error('driver qemu {\n\tcpus "two"\n}\n') == 'driver.conf:2: driver.qemu.cpus: expected an integer, got string "two"'
    assert driver_error("driver qemu {\n\tcpus 0\n}\n") == "driver.conf:2: driver.qemu.cpus: must be at least 1"
    assert driver_error('driver qemu {\n\taccel "hvf"\n}\n').startswith(
        'driver.conf:2: driver.qemu.accel: unknown value "hvf" (expected one of: auto, kvm, tcg)'
    )
    assert driver_error("driver ssh {\n\ttimeout 10\n}\n").startswith("driver.conf:2: driver.ssh.timeout: expected a duration")
    assert driver_error('driver "docker"\n').startswith("driver.conf:1: driver: needs a label")
    assert driver_error('driver docker "x"\n') == 'driver.conf:1: driver.docker: expected a block { ... }, got string "x"'


@pytest.mark.parametrize(
    "text, expected",
    [
        ("db.example", ("db.example", 5432)),
        ("db.example:6000", ("db.example", 6000)),
        (":9102", ("", 9102)),
        ("[::1]:6379", ("::1", 6379)),
        ("[::1]", ("::1", 5432)),
        ("::1", ("::1", 5432)),
    ],
)
def test_split_address_reads_every_form_the_configs_use(text, expected):
    assert split_address(text, 5432) == expected


@pytest.mark.parametrize("text", ["db:0", "db:70000", "db:x", "[::1", "[::1]x"])
def test_split_address_refuses_bad_ports_and_brackets(text):
    with pytest.raises(ValueError):
        split_address(text, 5432)


def test_a_bad_database_address_is_a_config_error_at_its_line(tmp_path):
    path = tmp_path / "worker.conf"
    path.write_text('driver "os"\nqueue "builds_os"\ndatabase {\n\taddr "db:99999"\n}\n')
    with pytest.raises(ConfigError, match=r"worker.conf:4.*database.addr.*not an address"):
        load_worker_config(str(path))
