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
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from djinn.config.language import ConfigDict, Pos, Size, config_error, parse_duration, parse_file, parse_size
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


# --- declaring settings -----------------------------------------------------

#: How a field's written value is decoded: a _Section check by name ("string",
#: "address", "duration", ...) or a function (section, value, key).
Check = Any


def setting(default: Any = dataclasses.MISSING, *, check: Check = "string", secret: bool = False) -> Any:
    """A settings field that is also a key of its config block, declared once.

    The block's allowed keys, the decoding (`decode_fields`) and what the CLIs may
    print (`public_view`) all come from these fields. A `secret` is hidden from
    repr() and shown only as whether it is set (`<name>_set`).
    """
    return field(default=default, repr=not secret, metadata={"check": check, "secret": secret})


def config_keys(cls: type) -> tuple[str, ...]:
    """The keys a settings block takes: its fields declared with `setting`."""
    return tuple(f.name for f in dataclasses.fields(cls) if "check" in f.metadata)


def public_view(settings: Any) -> dict[str, Any]:
    """A settings object's keys, JSON-able and safe to print: secrets only as `<name>_set`."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(settings):
        if "check" not in f.metadata:
            continue
        value = getattr(settings, f.name)
        if f.metadata["secret"]:
            out[f"{f.name}_set"] = bool(value)
        elif isinstance(value, datetime.timedelta):
            out[f.name] = _seconds(value)
        elif dataclasses.is_dataclass(value):
            out[f.name] = public_view(value)
        else:
            out[f.name] = value
    return out


# --- settings ---------------------------------------------------------------


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    file: str | None = None  # None: standard error


def one_of(choices: tuple[str, ...]) -> Check:
    """A check that takes one of `choices`."""

    def check(sec: _Section, value: Any, key: str) -> str:
        text = sec.string(value, key)
        if text not in choices:
            raise sec.error(key, f'unknown value {quoted(text)} (expected one of: {", ".join(choices)})')
        return text

    return check


def _crypto_block(sec: _Section, value: Any, key: str) -> str:
    block = sec.string(value, key)
    if len(block.encode()) not in (16, 24, 32):
        raise sec.error(key, "must be 16, 24 or 32 characters long")
    return block


def _set_or_none(sec: _Section, value: Any, key: str) -> str | None:
    return sec.string(value, key) or None


@dataclass(frozen=True)
class ProviderSettings:
    name: str  # the block's label
    endpoint: str = setting(check="nonempty_string")  # default: DEFAULT_PROVIDER_ENDPOINTS[name]
    oauth2_endpoint: str | None = setting(None)
    # Accepted for files shared with the server; the worker does not use them.
    secret: str | None = setting(None, secret=True)
    client_id: str | None = setting(None)
    client_secret: str | None = setting(None, secret=True)


@dataclass(frozen=True)
class CryptoSettings:
    block: str = setting(check=_crypto_block, secret=True)
    salt: str = setting(check="nonempty_string", secret=True)
    hash: str | None = setting(None, secret=True)
    auth: str | None = setting(None, secret=True)


@dataclass(frozen=True)
class TLSSettings:
    ca: str | None = setting(None)
    cert: str | None = setting(None)
    key: str | None = setting(None)


@dataclass(frozen=True)
class DatabaseSettings:
    addr: str = setting("localhost:5432", check="address")
    name: str = setting("djinn", check="nonempty_string")
    username: str = setting("djinn", check="nonempty_string")
    password: str = setting("", secret=True)
    tls: TLSSettings | None = setting(None, check="tls")  # also read from `ssl`, its old name


@dataclass(frozen=True)
class RedisSettings:
    addr: str = setting("localhost:6379", check="address")
    password: str | None = setting(None, check=_set_or_none, secret=True)


@dataclass(frozen=True)
class SMTPSettings:
    addr: str = setting(check="address")
    admin: str = setting(check="nonempty_string")
    ca: str | None = setting(None)
    username: str | None = setting(None)
    password: str | None = setting(None, secret=True)


@dataclass(frozen=True)
class StoreSettings:
    path: str = setting(check="nonempty_string")  # default: /var/lib/djinn/<name>
    type: str = setting("file", check=one_of(("file",)))
    limit: int = setting(0, check="size")  # bytes; 0 = unlimited


def _parallelism(sec: _Section, value: Any, key: str) -> int:
    parallelism = sec.integer(value, key)
    if parallelism < 0:
        raise sec.error(key, "must be 0 (one per CPU) or more")
    if parallelism > MAX_PARALLELISM:
        raise sec.error(key, f"must be at most {MAX_PARALLELISM}")
    return parallelism


@dataclass(frozen=True)
class WorkerConfig:
    """djinn-worker.conf, decoded. Its blocks (log, provider, store, ...) have decoders of their own."""

    driver: str = setting(check=one_of(WORKER_DRIVERS))
    source: str = "<config>"
    pidfile: str | None = setting(None, check="nonempty_string")
    log: LogSettings = LogSettings()
    parallelism: int = setting(0, check=_parallelism)  # as written; 0 = one per CPU, see resolved_parallelism
    timeout: datetime.timedelta = setting(DEFAULT_TIMEOUT, check="duration")
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    crypto: CryptoSettings | None = None
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    smtp: SMTPSettings | None = None
    artifacts: StoreSettings = StoreSettings("/var/lib/djinn/artifacts")
    objects: StoreSettings = StoreSettings("/var/lib/djinn/objects")
    images: StoreSettings | None = None
    metrics: str | None = setting(None, check="nonempty_string")  # listen address for metrics, None = off
    host: str | None = setting(None, check="nonempty_string")  # the Djinn server's address, for links to builds in mail
    orphan_timeout: datetime.timedelta = setting(DEFAULT_ORPHAN_TIMEOUT, check="duration")
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
            "providers": {name: public_view(p) for name, p in sorted(self.providers.items())},
            "crypto_set": self.crypto is not None,
            "database": public_view(self.database),
            "redis": public_view(self.redis),
            "smtp": None if self.smtp is None else public_view(self.smtp),
            "store": {
                name: None if store is None else public_view(store)
                for name, store in (("artifacts", self.artifacts), ("objects", self.objects), ("images", self.images))
            },
        }


@dataclass(frozen=True)
class DockerSettings:
    host: str | None = setting(None, check="nonempty_string")  # None: the Docker SDK's default (DOCKER_HOST, else the local socket)
    version: str | None = setting(None, check="nonempty_string")  # None: negotiate the API version with the daemon


def _cpus(sec: _Section, value: Any, key: str) -> int:
    cpus = sec.integer(value, key)
    if cpus < 1:
        raise sec.error(key, "must be at least 1")
    return cpus


def _memory_mib(sec: _Section, value: Any, key: str) -> int:
    # A plain number is MiB (upstream's 2048); a size literal (2GB) is converted.
    mib = int(value) // MIB if isinstance(value, Size) else sec.integer(value, key)
    if mib < 1:
        raise sec.error(key, "must be at least 1 MiB")
    return mib


@dataclass(frozen=True)
class QemuSettings:
    disks: str = setting("/var/lib/djinn/images", check="nonempty_string")  # <disks>/_base/qemu/x86_64/<image> or <disks>/qemu/x86_64/<image>
    cpus: int = setting(1, check=_cpus)
    memory: int = setting(2048, check=_memory_mib)  # MiB
    accel: str = setting("auto", check=one_of(QEMU_ACCELS))  # kvm when /dev/kvm works, else tcg
    # Builds start from a saved running machine (djinn.drivers.qemu_state); false: every build boots cold.
    warm: bool = setting(True, check="boolean")
    warm_limit: int = setting(8 << 30, check="size")  # bytes of saved machine states kept, least recently used removed first


@dataclass(frozen=True)
class SSHSettings:
    timeout: datetime.timedelta = setting(DEFAULT_SSH_TIMEOUT, check="duration")
    user: str = setting("root", check="nonempty_string")
    password: str | None = setting(None, secret=True)
    key: str | None = setting(None, check="nonempty_string")  # path to a private key file


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

    def settings_for(self, driver_type: str) -> Any:
        """That driver's settings object (built-in defaults when the file lacks its block), for the driver to extend."""
        name = driver_kind(driver_type)
        if name not in DRIVERS:
            raise ConfigError(f"unknown driver type {driver_type!r} (expected one of: {', '.join(WORKER_DRIVERS)})")
        settings = getattr(self, name)
        return getattr(DriverConfig.defaults(), name) if settings is None else settings

    def public_dict(self) -> dict[str, Any]:
        """The configured drivers' settings, JSON-able, without passwords."""
        return {name: public_view(getattr(self, name)) for name in self.configured}


# --- decoding ---------------------------------------------------------------

_MISSING = object()
T = TypeVar("T")


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
        text = self.string(value, key)
        if not text:
            raise self.error(key, "must not be empty")
        return text

    def integer(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or isinstance(value, Size) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {_describe(value)}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_describe(value)}")
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


def decode_fields(cls: type[T], sec: _Section, defaults: Mapping[str, Any] | None = None, **given: Any) -> T:
    """`cls` from the keys of `sec` its `setting` fields declare (after `sec.check_keys`).

    `defaults` overrides a field's declared default; `given` sets fields outright.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # every settings class is a dataclass
        if f.name in given or "check" not in f.metadata:
            continue
        default = (defaults or {}).get(f.name, _MISSING if f.default is dataclasses.MISSING else f.default)
        values[f.name] = sec.get(f.name, _decoder(sec, f), default)
    return cls(**values, **given)


def _decoder(sec: _Section, f: dataclasses.Field[Any]) -> Callable[[Any, str], Any]:
    """The (value, key) check a `setting` field declares, bound to `sec`."""
    check = f.metadata["check"]
    if isinstance(check, str):
        method: Callable[[Any, str], Any] = getattr(sec, check)
        return method
    return lambda value, key: check(sec, value, key)


def _literal(text: str) -> Any:
    """A string read as the config language would read it unquoted: 4096, 2GB, 30s, true; else the string."""
    if re.fullmatch(r"-?[0-9]+", text.strip()):
        return int(text)
    if text.strip() in ("true", "false"):
        return text.strip() == "true"
    for parse in (parse_size, parse_duration):
        try:
            return parse(text)
        except ConfigError:
            pass
    return text


def override(cls: type[T], base: Any, values: Mapping[str, Any], where: str = "driver", source: str = "manifest") -> T:
    """A `cls` with `base`'s fields (a settings object; None for the defaults) and the keys of `values` laid over them.

    This is how a driver's settings are made (SPEC 4): `base` is its driver-config
    block and `values` the manifest's `driver` map. Each value is decoded by its
    field's check; since a manifest's values are all strings, a string the check
    refuses is read again as an unquoted config literal (4096, 2GB, 30s). Keys
    that are not fields of `cls` (`type`, ...) are the caller's; None is unset.
    """
    known = {f.name: f for f in dataclasses.fields(cls) if "check" in f.metadata}  # type: ignore[arg-type]
    merged = {name: getattr(base, name) for name in known if base is not None and hasattr(base, name)}
    sec = _Section(dict(values), source, where, Pos(source), [])
    for key, value in values.items():
        f = known.get(key)
        if f is None or value is None:
            continue
        decode = _decoder(sec, f)
        try:
            merged[key] = decode(value, key)
        except ConfigError:
            literal = _literal(value) if isinstance(value, str) else value
            if literal is value:
                raise
            merged[key] = decode(literal, key)
    return cls(**merged)


def _optional_block(sec: _Section, key: str, cls: type[T]) -> T | None:
    """The `key { ... }` block of `sec` as a `cls`, None when it is not there."""
    block = sec.block(key)
    if block is None:
        return None
    block.check_keys(config_keys(cls))
    return decode_fields(cls, block)


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
        sec.check_keys(config_keys(ProviderSettings))
        providers[name] = decode_fields(ProviderSettings, sec, {"endpoint": DEFAULT_PROVIDER_ENDPOINTS[name]}, name=name)
    return providers


def _decode_database(top: _Section) -> DatabaseSettings:
    sec = top.block("database")
    if sec is None:
        return DatabaseSettings()
    sec.check_keys((*config_keys(DatabaseSettings), "ssl"))
    if "tls" in sec.values and "ssl" in sec.values:
        raise sec.error("ssl", "give either tls or ssl (its old name), not both")
    if "ssl" in sec.values:
        sec.warn(sec.key_pos("ssl"), "database.ssl is deprecated, use tls instead (read as tls)")
    tls = _optional_block(sec, "tls" if "tls" in sec.values else "ssl", TLSSettings)
    return decode_fields(DatabaseSettings, sec, tls=tls)


def _decode_stores(top: _Section) -> dict[str, StoreSettings]:
    stores: dict[str, StoreSettings] = {}
    for name, value, pos in top.group("store", 'store artifacts { type "file" path "/var/lib/djinn/artifacts" }'):
        if name not in STORES:
            top.warn(pos, f'unknown store {quoted(name)} ignored (known stores: {", ".join(STORES)})')
            continue
        sec = top.labelled_block("store", name, value, pos)
        sec.check_keys(config_keys(StoreSettings), unused=("name",))
        stores[name] = decode_fields(StoreSettings, sec, {"path": f"/var/lib/djinn/{name}"})
    return stores


#: The worker config's blocks, each decoded on its own; its plain keys are WorkerConfig's `setting` fields.
WORKER_BLOCKS = ("log", "provider", "crypto", "database", "redis", "smtp", "store")


def decode_worker(values: Mapping[str, Any], source: str = "<config>") -> WorkerConfig:
    """A WorkerConfig from parsed values; `source` names the file when values carry no positions."""
    if isinstance(values, ConfigDict):
        source = values.pos.file if source == "<config>" else source
    warnings: list[str] = []
    top = _top(values, source, warnings)
    top.check_keys((*config_keys(WorkerConfig), *WORKER_BLOCKS))
    stores = _decode_stores(top)
    config = decode_fields(
        WorkerConfig,
        top,
        source=source,
        log=_decode_log(top),
        providers=_decode_providers(top),
        crypto=_optional_block(top, "crypto", CryptoSettings),
        database=_decode_database(top),
        redis=_optional_block(top, "redis", RedisSettings) or RedisSettings(),
        smtp=_optional_block(top, "smtp", SMTPSettings),
        artifacts=stores.get("artifacts", WorkerConfig.artifacts),
        objects=stores.get("objects", WorkerConfig.objects),
        images=stores.get("images"),
    )
    return dataclasses.replace(config, warnings=tuple(warnings))  # with those its plain keys gave


# Keys upstream's driver blocks know that this worker takes from the manifest instead.
_DRIVER_UNUSED: dict[str, tuple[str, ...]] = {"docker": ("image", "workspace"), "qemu": ("arch", "image"), "ssh": ("addr",), "os": ()}
_DRIVER_SETTINGS: dict[str, type] = {"docker": DockerSettings, "qemu": QemuSettings, "ssh": SSHSettings, "os": OSSettings}


def _decode_driver_block(name: str, sec: _Section) -> Any:
    cls = _DRIVER_SETTINGS[name]
    sec.check_keys(config_keys(cls), unused=_DRIVER_UNUSED[name])
    return decode_fields(cls, sec)


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
        if name not in _DRIVER_SETTINGS:
            top.warn(pos, f'unknown driver {quoted(label)} ignored (known drivers: {", ".join(DRIVERS)})')
            continue
        found[name] = _decode_driver_block(name, top.labelled_block("driver", name, value, pos))
    return DriverConfig(source=source, warnings=tuple(warnings), **found)


def load_worker_config(path: str | os.PathLike[str]) -> WorkerConfig:
    """Parse and decode a djinn-worker.conf."""
    return decode_worker(parse_file(path), os.fspath(path))


def load_driver_config(path: str | os.PathLike[str]) -> DriverConfig:
    """Parse and decode a djinn-driver.conf."""
    return decode_driver(parse_file(path), os.fspath(path))
