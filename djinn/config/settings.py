"""Typed worker and driver settings decoded from the config language.

A value of the wrong type or an invalid choice is a ConfigError naming the key
and the FILE:LINE it was written at, because a bad value should stop the
worker at start-up, not surface as odd behaviour mid-build.

Unknown keys are what upstream's decoder ignores, so they are warnings here,
not errors (each names FILE:LINE and the key), and key names match case-
insensitively as upstream's (`Pidfile` is `pidfile`). Upstream keys that the
worker does not use (`crypto { hash, auth }`, `provider { secret, ... }`,
`driver qemu { arch, image }`, ...) are accepted quietly or with a note.
`database { ssl {} }` is upstream's deprecated spelling of `tls`: accepted
with a deprecation warning, as upstream prints one. Durations written as
strings (`timeout "60s"`, as upstream's dist/driver.conf does) work with a
warning, because upstream's decoder refuses them; sizes may be plain byte
counts. Warnings are collected in `.warnings` of the decoded config for the
commands to print on standard error.

Secrets (passwords, crypto keys, provider secrets) live in the dataclasses
for the code that needs them but are hidden from repr() and never appear in
`public_dict()`, which is what the CLIs print and log.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from djinn.config.language import ConfigDict, Pos, Size, config_error, parse_duration, parse_file
from djinn.errors import ConfigError


def quoted(value: object) -> str:
    """A value from a config file as a message shows it: in quotes, escaped, so an error stays one line."""
    return json.dumps(str(value), ensure_ascii=False)

__all__ = [
    "CryptoSettings",
    "DatabaseSettings",
    "DockerSettings",
    "DriverConfig",
    "LogSettings",
    "OSSettings",
    "ProviderSettings",
    "QemuSettings",
    "RedisSettings",
    "SMTPSettings",
    "SSHSettings",
    "StoreSettings",
    "TLSSettings",
    "WorkerConfig",
    "DRIVERS",
    "driver_kind",
    "split_address",
    "LOG_LEVELS",
    "WORKER_DRIVERS",
    "decode_driver",
    "decode_worker",
    "load_driver_config",
    "load_worker_config",
    "queue_for_driver",
]

LOG_LEVELS = ("debug", "info", "warn", "error")
# What a worker may serve; qemu and qemu-x86_64 are the same (the only arch).
WORKER_DRIVERS = ("docker", "qemu", "qemu-x86_64", "ssh", "os")
# What the driver config may configure.
DRIVERS = ("docker", "qemu", "ssh", "os")
PROVIDERS = ("github", "gitlab")
STORES = ("artifacts", "objects", "images")
QEMU_ACCELS = ("auto", "kvm", "tcg")

DEFAULT_PROVIDER_ENDPOINTS = {"github": "https://api.github.com", "gitlab": "https://gitlab.com/api/v4"}
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
DEFAULT_ORPHAN_TIMEOUT = datetime.timedelta(minutes=2)
# Upstream decodes parallelism into a Go int32; more processes than that cannot be meant.
MAX_PARALLELISM = (1 << 31) - 1
# Upstream's dist/driver.conf uses 60s; upstream code has no default at all.
DEFAULT_SSH_TIMEOUT = datetime.timedelta(seconds=60)
MIB = 1 << 20


def split_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` or `[v6]` as (host, port); the host may be empty (`:port`).

    A bare host gets `default_port`; without one the port is required. Raises
    ValueError saying what is wrong, for the caller to put in its own words.
    """
    text = address.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError("expected [host]:port")
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:  # a bare name, or a bare IPv6 address
        host, port = text, ""
    if not port:
        if default_port is None:
            raise ValueError("expected host:port")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"the port must be a number from 1 to 65535, not {port!r}")
    return host, int(port)


def driver_kind(driver: str) -> str:
    """The driver a worker's `driver` names: qemu-x86_64 (the queue's arch) is the qemu driver."""
    return "qemu" if driver == "qemu-x86_64" else driver


def queue_for_driver(driver: str) -> str:
    """The Celery queue a worker of `driver` serves: builds_<driver>, qemu being qemu-x86_64."""
    if driver in ("qemu", "qemu-x86_64"):
        return "builds_qemu-x86_64"
    return f"builds_{driver}"


def _seconds(delta: datetime.timedelta) -> int:
    return int(round(delta.total_seconds()))


# --- settings ---------------------------------------------------------------


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    file: str | None = None  # None: standard error


@dataclass(frozen=True)
class ProviderSettings:
    name: str
    endpoint: str
    oauth2_endpoint: str | None = None
    # Accepted for files shared with the server; the worker does not use them.
    secret: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class CryptoSettings:
    block: str = field(repr=False)
    salt: str = field(repr=False)
    hash: str | None = field(default=None, repr=False)
    auth: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TLSSettings:
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class DatabaseSettings:
    addr: str = "localhost:5432"
    name: str = "djinn"
    username: str = "djinn"
    password: str = field(default="", repr=False)
    tls: TLSSettings | None = None


@dataclass(frozen=True)
class RedisSettings:
    addr: str = "localhost:6379"
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SMTPSettings:
    addr: str
    admin: str
    ca: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class StoreSettings:
    path: str
    type: str = "file"
    limit: int = 0  # bytes; 0 = unlimited


@dataclass(frozen=True)
class WorkerConfig:
    """djinn-worker.conf, decoded."""

    driver: str
    source: str = "<config>"
    pidfile: str | None = None
    log: LogSettings = LogSettings()
    parallelism: int = 0  # as written; 0 = one per CPU, see resolved_parallelism
    timeout: datetime.timedelta = DEFAULT_TIMEOUT
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    crypto: CryptoSettings | None = None
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    smtp: SMTPSettings | None = None
    artifacts: StoreSettings = StoreSettings("/var/lib/djinn/artifacts")
    objects: StoreSettings = StoreSettings("/var/lib/djinn/objects")
    images: StoreSettings | None = None
    metrics: str | None = None  # listen address for metrics, None = off
    host: str | None = None  # the Djinn server's address, for links to builds in mail
    orphan_timeout: datetime.timedelta = DEFAULT_ORPHAN_TIMEOUT
    # "FILE:LINE: ..." lines about keys ignored or deprecated, for stderr.
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @property
    def resolved_parallelism(self) -> int:
        """Builds run at once: the configured number, or the CPU count for 0."""
        return self.parallelism or os.cpu_count() or 1

    @property
    def queue(self) -> str:
        return queue_for_driver(self.driver)

    def public_dict(self) -> dict[str, Any]:
        """Every effective setting safe to print or log: JSON-able, no passwords, keys or salts.

        Secrets are shown only as whether they are set ("password_set"), so an
        operator can tell an empty password from a forgotten one.
        """
        tls = self.database.tls
        return {
            "pidfile": self.pidfile,
            "log": {"level": self.log.level, "file": self.log.file},
            "parallelism": self.resolved_parallelism,
            "driver": self.driver,
            "queue": self.queue,
            "timeout": _seconds(self.timeout),
            "orphan_timeout": _seconds(self.orphan_timeout),
            "metrics": self.metrics,
            "host": self.host,
            "providers": {
                name: {
                    "endpoint": p.endpoint,
                    "oauth2_endpoint": p.oauth2_endpoint,
                    "client_id": p.client_id,
                    "secret_set": bool(p.secret),
                    "client_secret_set": bool(p.client_secret),
                }
                for name, p in sorted(self.providers.items())
            },
            "crypto_set": self.crypto is not None,
            "database": {
                "addr": self.database.addr,
                "name": self.database.name,
                "username": self.database.username,
                "password_set": bool(self.database.password),
                "tls": None if tls is None else {"ca": tls.ca, "cert": tls.cert, "key": tls.key},
            },
            "redis": {"addr": self.redis.addr, "password_set": bool(self.redis.password)},
            "smtp": (
                None
                if self.smtp is None
                else {
                    "addr": self.smtp.addr,
                    "admin": self.smtp.admin,
                    "ca": self.smtp.ca,
                    "username": self.smtp.username,
                    "password_set": bool(self.smtp.password),
                }
            ),
            "store": {
                name: None if store is None else {"type": store.type, "path": store.path, "limit": int(store.limit)}
                for name, store in (("artifacts", self.artifacts), ("objects", self.objects), ("images", self.images))
            },
        }


@dataclass(frozen=True)
class DockerSettings:
    host: str | None = None  # None: the Docker SDK's default (DOCKER_HOST, else the local socket)
    version: str | None = None  # None: negotiate the API version with the daemon


@dataclass(frozen=True)
class QemuSettings:
    disks: str = "/var/lib/djinn/images"  # images: <disks>/_base/qemu/x86_64/<image> or <disks>/qemu/x86_64/<image>
    cpus: int = 1
    memory: int = 2048  # MiB
    accel: str = "auto"  # kvm when /dev/kvm works, else tcg


@dataclass(frozen=True)
class SSHSettings:
    timeout: datetime.timedelta = DEFAULT_SSH_TIMEOUT
    user: str = "root"
    password: str | None = field(default=None, repr=False)
    key: str | None = None  # path to a private key file


@dataclass(frozen=True)
class OSSettings:
    """The os driver has no settings; present so `driver os {}` is recorded."""


@dataclass(frozen=True)
class DriverConfig:
    """djinn-driver.conf, decoded: a settings object per configured driver, None if absent."""

    docker: DockerSettings | None = None
    qemu: QemuSettings | None = None
    ssh: SSHSettings | None = None
    os: OSSettings | None = None
    source: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def defaults(cls) -> DriverConfig:
        """Every driver with built-in settings, for when there is no driver config file."""
        return cls(DockerSettings(), QemuSettings(), SSHSettings(), OSSettings())

    @property
    def configured(self) -> tuple[str, ...]:
        return tuple(name for name in DRIVERS if getattr(self, name) is not None)

    def settings_for(self, driver_type: str) -> dict[str, Any]:
        """That driver's settings as a plain dict, built-in defaults when the file lacks it.

        Meant to be merged under a manifest's driver map; includes secrets (the driver
        needs them) and keeps typed values (timedelta, int).
        """
        name = driver_kind(driver_type)
        if name not in DRIVERS:
            raise ConfigError(f"unknown driver type {driver_type!r} (expected one of: {', '.join(WORKER_DRIVERS)})")
        settings = getattr(self, name)
        if settings is None:
            settings = getattr(DriverConfig.defaults(), name)
        return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}

    def public_dict(self) -> dict[str, Any]:
        """The configured drivers' settings, JSON-able, without passwords."""
        out: dict[str, Any] = {}
        if self.docker is not None:
            out["docker"] = {"host": self.docker.host, "version": self.docker.version}
        if self.qemu is not None:
            out["qemu"] = {"disks": self.qemu.disks, "cpus": self.qemu.cpus, "memory": self.qemu.memory, "accel": self.qemu.accel}
        if self.ssh is not None:
            out["ssh"] = {
                "timeout": _seconds(self.ssh.timeout),
                "user": self.ssh.user,
                "key": self.ssh.key,
                "password_set": bool(self.ssh.password),
            }
        if self.os is not None:
            out["os"] = {}
        return out


# --- decoding ---------------------------------------------------------------

_MISSING = object()


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, Size):
        return f"size {int(value)} bytes"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {quoted(value)}"
    if isinstance(value, datetime.timedelta):
        return f"duration {value}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a block"
    return type(value).__name__


class _Section:
    """One block being decoded: typed getters that report errors at the key's line."""

    def __init__(self, values: Any, source: str, path: str, pos: Pos, warnings: list[str]) -> None:
        self.source = source
        self.path = path  # dotted, e.g. "store.artifacts"; "" at the top level
        self.pos = pos
        self.warnings = warnings
        if not isinstance(values, Mapping):
            raise config_error(pos, f"{path}: expected a block {{ ... }}, got {_describe(values)}")
        self.values: Any = values  # a ConfigDict from a file, or a plain mapping

    def warn(self, pos: Pos, message: str) -> None:
        self.warnings.append(f"{pos}: {message}")

    def key_pos(self, key: str) -> Pos:
        if isinstance(self.values, ConfigDict):
            return self.values.positions.get(key, self.pos)
        return self.pos

    def qual(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return config_error(self.key_pos(key), f"{self.qual(key)}: {message}")

    def check_keys(self, allowed: tuple[str, ...], unused: tuple[str, ...] = ()) -> None:
        """Match keys as upstream does (case-insensitively); warn about, and drop, the others.

        `unused` are keys upstream knows that this worker does not use: dropped with a note.
        """
        known = {k.lower(): k for k in (*allowed, *unused)}
        tracked = isinstance(self.values, ConfigDict)
        renamed: Any = ConfigDict(self.values.pos) if tracked else {}
        for key, value in self.values.items():
            pos = self.key_pos(key)
            canonical = key if key in allowed or key in unused else known.get(key.lower())
            where = f" in {self.path}" if self.path else ""
            if canonical is None:
                self.warn(pos, f'unknown key {quoted(key)}{where} ignored (known keys: {", ".join(allowed)})')
                continue
            if canonical in unused:
                self.warn(pos, f'"{self.qual(canonical)}" is not used by this worker, ignored')
                continue
            if canonical in renamed:
                continue  # upstream keeps the first field that folds to the name it matched; both exist rarely
            renamed[canonical] = value
            if tracked:
                renamed.positions[canonical] = pos
                if key in self.values.labelled:
                    renamed.labelled.add(canonical)
        self.values = renamed

    def is_labelled(self, key: str) -> bool | None:
        """Whether key was written with labels; None when not known (plain dict input)."""
        if isinstance(self.values, ConfigDict):
            return key in self.values.labelled
        return None

    def get(self, key: str, check: Callable[[Any, str], Any], default: Any = _MISSING) -> Any:
        if key not in self.values:
            if default is _MISSING:
                where = f"{self.path} block" if self.path else "config"
                raise config_error(self.pos, f'missing required key "{self.qual(key)}" in {where}')
            return default
        if self.is_labelled(key):
            raise self.error(key, f"takes no label, e.g. {key} <value>")
        return check(self.values[key], key)

    # value checks: (value, key) -> decoded value, raising at the key's line

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_describe(value)}")
        return value

    def address(self, value: Any, key: str) -> str:
        """host, host:port or [v6]:port (the port has a default where one is used)."""
        text = self.nonempty_string(value, key)
        try:
            split_address(text, 0)
        except ValueError as exc:
            raise self.error(key, f"{quoted(text)} is not an address: {exc}") from None
        return text

    def nonempty_string(self, value: Any, key: str) -> str:
        value = self.string(value, key)
        if not value:
            raise self.error(key, "must not be empty")
        return value

    def integer(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or isinstance(value, Size) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_describe(value)}")
        return value

    def duration(self, value: Any, key: str) -> datetime.timedelta:
        if isinstance(value, str):
            try:
                value = parse_duration(value)
            except ConfigError as exc:
                raise self.error(key, str(exc)) from None
            self.warn(
                self.key_pos(key),
                f"{self.qual(key)}: a duration in quotes works here, but upstream's djinn-worker refuses it; "
                "write it without quotes",
            )
        if not isinstance(value, datetime.timedelta):
            hint = " (add a unit, e.g. 30m)" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
            raise self.error(key, f"expected a duration such as 90s, 30m or 1h30m, got {_describe(value)}{hint}")
        if value <= datetime.timedelta(0):
            raise self.error(key, "must be a positive duration")
        return value

    def size(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected a size such as 50MB or a number of bytes, got {_describe(value)}")
        if value < 0:
            raise self.error(key, "must not be negative")
        return int(value)

    def choice(self, choices: tuple[str, ...]) -> Callable[[Any, str], str]:
        def check(value: Any, key: str) -> str:
            value = self.string(value, key)
            if value not in choices:
                raise self.error(key, f'unknown value {quoted(value)} (expected one of: {", ".join(choices)})')
            return value

        return check

    def block(self, key: str) -> _Section | None:
        """The unlabelled block at key, or None when absent."""
        if key not in self.values:
            return None
        if self.is_labelled(key):
            raise self.error(key, f"takes no label, e.g. {key} {{ ... }}")
        value = self.values[key]
        if not isinstance(value, Mapping):
            raise self.error(key, f"expected a block {{ ... }}, got {_describe(value)}")
        return _Section(value, self.source, self.qual(key), self.key_pos(key), self.warnings)

    def group(self, key: str, example: str) -> list[tuple[str, Any, Pos]]:
        """The labelled entries at key as (label, value, pos); [] when absent."""
        if key not in self.values:
            return []
        value = self.values[key]
        if self.is_labelled(key) is False or not isinstance(value, Mapping):
            raise self.error(key, f"needs a label, e.g. {example}")
        positions = value.positions if isinstance(value, ConfigDict) else {}
        key_pos = self.key_pos(key)
        return [(label, item, positions.get(label, key_pos)) for label, item in value.items()]

    def labelled_block(self, key: str, label: str, value: Any, pos: Pos) -> _Section:
        qual = f"{self.qual(key)}.{label}"
        if not isinstance(value, Mapping):
            raise config_error(pos, f"{qual}: expected a block {{ ... }}, got {_describe(value)}")
        return _Section(value, self.source, qual, pos, self.warnings)


def _top(values: Mapping[str, Any], source: str, warnings: list[str]) -> _Section:
    pos = values.pos if isinstance(values, ConfigDict) else Pos(source)
    return _Section(values, source, "", pos, warnings)


def _decode_log(top: _Section) -> LogSettings:
    entries = top.group("log", 'log info "/var/log/djinn/worker.log"')
    if not entries:
        return LogSettings()
    chosen: tuple[str, str | None] | None = None
    for level, value, pos in entries:
        if level not in LOG_LEVELS:
            raise config_error(pos, f'log: unknown level {quoted(level)} (expected one of: {", ".join(LOG_LEVELS)})')
        if isinstance(value, Mapping) and not value:
            file = None  # `log debug` alone: standard error
        elif isinstance(value, str):
            file = value or None
        else:
            raise config_error(pos, f"log {level}: expected a file name string, got {_describe(value)}")
        # Several levels: the most verbose wins, as upstream.
        if chosen is None or LOG_LEVELS.index(level) < LOG_LEVELS.index(chosen[0]):
            chosen = (level, file)
    assert chosen is not None
    return LogSettings(chosen[0], chosen[1])


def _decode_providers(top: _Section) -> dict[str, ProviderSettings]:
    providers: dict[str, ProviderSettings] = {}
    for name, value, pos in top.group("provider", 'provider github { endpoint "https://api.github.com" }'):
        if name not in PROVIDERS:
            raise config_error(pos, f'provider: unknown provider {quoted(name)} (expected one of: {", ".join(PROVIDERS)})')
        sec = top.labelled_block("provider", name, value, pos)
        sec.check_keys(("endpoint", "oauth2_endpoint", "secret", "client_id", "client_secret"))
        providers[name] = ProviderSettings(
            name=name,
            endpoint=sec.get("endpoint", sec.nonempty_string, DEFAULT_PROVIDER_ENDPOINTS[name]),
            oauth2_endpoint=sec.get("oauth2_endpoint", sec.string, None),
            secret=sec.get("secret", sec.string, None),
            client_id=sec.get("client_id", sec.string, None),
            client_secret=sec.get("client_secret", sec.string, None),
        )
    return providers


def _decode_crypto(top: _Section) -> CryptoSettings | None:
    sec = top.block("crypto")
    if sec is None:
        return None
    sec.check_keys(("block", "salt", "hash", "auth"))
    block = sec.get("block", sec.string)
    if len(block.encode()) not in (16, 24, 32):
        raise sec.error("block", "must be 16, 24 or 32 characters long")
    salt = sec.get("salt", sec.nonempty_string)
    return CryptoSettings(block, salt, sec.get("hash", sec.string, None), sec.get("auth", sec.string, None))


def _decode_tls(sec: _Section, key: str) -> TLSSettings | None:
    tls = sec.block(key)
    if tls is None:
        return None
    tls.check_keys(("ca", "cert", "key"))
    return TLSSettings(tls.get("ca", tls.string, None), tls.get("cert", tls.string, None), tls.get("key", tls.string, None))


def _decode_database(top: _Section) -> DatabaseSettings:
    sec = top.block("database")
    if sec is None:
        return DatabaseSettings()
    sec.check_keys(("addr", "name", "username", "password", "tls", "ssl"))
    if "tls" in sec.values and "ssl" in sec.values:
        raise sec.error("ssl", "give either tls or ssl (its old name), not both")
    if "ssl" in sec.values:
        sec.warn(sec.key_pos("ssl"), "database.ssl is deprecated, use tls instead (read as tls)")
    tls = _decode_tls(sec, "tls" if "tls" in sec.values else "ssl")
    default = DatabaseSettings()
    return DatabaseSettings(
        addr=sec.get("addr", sec.address, default.addr),
        name=sec.get("name", sec.nonempty_string, default.name),
        username=sec.get("username", sec.nonempty_string, default.username),
        password=sec.get("password", sec.string, default.password),
        tls=tls,
    )


def _decode_redis(top: _Section) -> RedisSettings:
    sec = top.block("redis")
    if sec is None:
        return RedisSettings()
    sec.check_keys(("addr", "password"))
    password = sec.get("password", sec.string, None)
    return RedisSettings(sec.get("addr", sec.address, RedisSettings.addr), password or None)


def _decode_smtp(top: _Section) -> SMTPSettings | None:
    sec = top.block("smtp")
    if sec is None:
        return None
    sec.check_keys(("addr", "ca", "admin", "username", "password"))
    return SMTPSettings(
        addr=sec.get("addr", sec.address),
        admin=sec.get("admin", sec.nonempty_string),
        ca=sec.get("ca", sec.string, None),
        username=sec.get("username", sec.string, None),
        password=sec.get("password", sec.string, None),
    )


def _decode_stores(top: _Section) -> dict[str, StoreSettings]:
    stores: dict[str, StoreSettings] = {}
    for name, value, pos in top.group("store", 'store artifacts { type "file" path "/var/lib/djinn/artifacts" }'):
        if name not in STORES:
            top.warn(pos, f'unknown store {quoted(name)} ignored (known stores: {", ".join(STORES)})')
            continue
        sec = top.labelled_block("store", name, value, pos)
        sec.check_keys(("type", "path", "limit"), unused=("name",))
        stores[name] = StoreSettings(
            path=sec.get("path", sec.nonempty_string, f"/var/lib/djinn/{name}"),
            type=sec.get("type", sec.choice(("file",)), "file"),
            limit=sec.get("limit", sec.size, 0),
        )
    return stores


WORKER_KEYS = (
    "pidfile",
    "log",
    "parallelism",
    "driver",
    "timeout",
    "provider",
    "crypto",
    "database",
    "redis",
    "smtp",
    "store",
    "metrics",
    "host",
    "orphan_timeout",
)


def decode_worker(values: Mapping[str, Any], source: str = "<config>") -> WorkerConfig:
    """A WorkerConfig from parsed values; `source` names the file when values carry no positions."""
    if isinstance(values, ConfigDict):
        source = values.pos.file if source == "<config>" else source
    warnings: list[str] = []
    top = _top(values, source, warnings)
    top.check_keys(WORKER_KEYS)
    parallelism = top.get("parallelism", top.integer, 0)
    if parallelism < 0:
        raise top.error("parallelism", "must be 0 (one per CPU) or more")
    if parallelism > MAX_PARALLELISM:
        raise top.error("parallelism", f"must be at most {MAX_PARALLELISM}")
    stores = _decode_stores(top)
    return WorkerConfig(
        driver=top.get("driver", top.choice(WORKER_DRIVERS)),
        source=source,
        pidfile=top.get("pidfile", top.nonempty_string, None),
        log=_decode_log(top),
        parallelism=parallelism,
        timeout=top.get("timeout", top.duration, DEFAULT_TIMEOUT),
        providers=_decode_providers(top),
        crypto=_decode_crypto(top),
        database=_decode_database(top),
        redis=_decode_redis(top),
        smtp=_decode_smtp(top),
        artifacts=stores.get("artifacts", WorkerConfig.artifacts),
        objects=stores.get("objects", WorkerConfig.objects),
        images=stores.get("images"),
        metrics=top.get("metrics", top.nonempty_string, None),
        host=top.get("host", top.nonempty_string, None),
        orphan_timeout=top.get("orphan_timeout", top.duration, DEFAULT_ORPHAN_TIMEOUT),
        warnings=tuple(warnings),
    )


def _decode_docker(sec: _Section) -> DockerSettings:
    sec.check_keys(("host", "version"), unused=("image", "workspace"))
    return DockerSettings(sec.get("host", sec.nonempty_string, None), sec.get("version", sec.nonempty_string, None))


def _decode_qemu(sec: _Section) -> QemuSettings:
    sec.check_keys(("disks", "cpus", "memory", "accel"), unused=("arch", "image"))
    default = QemuSettings()
    cpus = sec.get("cpus", sec.integer, default.cpus)
    if cpus < 1:
        raise sec.error("cpus", "must be at least 1")

    def memory(value: Any, key: str) -> int:
        # A plain number is MiB (upstream's 2048); a size literal (2GB) is converted.
        if isinstance(value, Size):
            mib = int(value) // MIB
        else:
            mib = sec.integer(value, key)
        if mib < 1:
            raise sec.error(key, "must be at least 1 MiB")
        return mib

    return QemuSettings(
        disks=sec.get("disks", sec.nonempty_string, default.disks),
        cpus=cpus,
        memory=sec.get("memory", memory, default.memory),
        accel=sec.get("accel", sec.choice(QEMU_ACCELS), default.accel),
    )


def _decode_ssh(sec: _Section) -> SSHSettings:
    sec.check_keys(("timeout", "user", "password", "key"), unused=("addr",))
    return SSHSettings(
        timeout=sec.get("timeout", sec.duration, DEFAULT_SSH_TIMEOUT),
        user=sec.get("user", sec.nonempty_string, "root"),
        password=sec.get("password", sec.string, None),
        key=sec.get("key", sec.nonempty_string, None),
    )


def _decode_os(sec: _Section) -> OSSettings:
    sec.check_keys(())
    return OSSettings()


_DRIVER_DECODERS: dict[str, Callable[[_Section], Any]] = {
    "docker": _decode_docker,
    "qemu": _decode_qemu,
    "ssh": _decode_ssh,
    "os": _decode_os,
}


def decode_driver(values: Mapping[str, Any], source: str = "<config>") -> DriverConfig:
    """A DriverConfig from parsed values: `driver <type> { ... }` blocks only."""
    if isinstance(values, ConfigDict):
        source = values.pos.file if source == "<config>" else source
    warnings: list[str] = []
    top = _top(values, source, warnings)
    top.check_keys(("driver",))
    found: dict[str, Any] = {}
    for label, value, pos in top.group("driver", 'driver docker { host "unix:///var/run/docker.sock" }'):
        name = label.lower()  # upstream matches driver names like keys, case-insensitively
        if name not in _DRIVER_DECODERS:
            top.warn(pos, f'unknown driver {quoted(label)} ignored (known drivers: {", ".join(DRIVERS)})')
            continue
        found[name] = _DRIVER_DECODERS[name](top.labelled_block("driver", name, value, pos))
    return DriverConfig(source=source, warnings=tuple(warnings), **found)


def load_worker_config(path: str | os.PathLike[str]) -> WorkerConfig:
    """Parse and decode a djinn-worker.conf."""
    return decode_worker(parse_file(path), os.fspath(path))


def load_driver_config(path: str | os.PathLike[str]) -> DriverConfig:
    """Parse and decode a djinn-driver.conf."""
    return decode_driver(parse_file(path), os.fspath(path))
