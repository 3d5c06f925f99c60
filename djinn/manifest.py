"""The build manifest (`.djinn.yml`): parsed from YAML nodes so every problem can name its line."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from djinn.config.settings import DRIVERS
from djinn.errors import ManifestError

# libyaml when present: several times faster on big manifests, and it refuses nesting deeper
# than 1,000 levels with a YAML error where the pure Python parser runs out of stack.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

DRIVER_TYPES = DRIVERS
QEMU_ARCHES = ("x86_64",)
KEYS = ("namespace", "driver", "env", "objects", "sources", "stages", "allow_failures", "jobs")
JOB_KEYS = ("stage", "name", "commands", "artifacts")
#: A job's slug names its script file (`<slug>.sh`, `<slug>.pid`): kept well under the 255-byte file name limit.
MAX_JOB_SLUG = 200


@dataclass(frozen=True)
class Passthrough:
    """One `src => dst` entry: an object copied in or an artifact copied out."""

    source: str
    destination: str


@dataclass(frozen=True)
class Source:
    """A git repository cloned in the setup stage."""

    url: str
    ref: str | None
    dir: str


@dataclass(frozen=True)
class Job:
    stage: str
    name: str | None
    commands: tuple[str, ...]
    artifacts: tuple[Passthrough, ...] = ()


@dataclass(frozen=True)
class Manifest:
    driver: dict[str, str]
    namespace: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    objects: tuple[Passthrough, ...] = ()
    sources: tuple[Source, ...] = ()
    stages: tuple[str, ...] = ()
    allow_failures: tuple[str, ...] = ()
    jobs: tuple[Job, ...] = ()
    text: str = field(default="", compare=False, repr=False)
    #: Things that do not stop the build but the user should hear of (unknown top-level keys), each naming its line.
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def driver_type(self) -> str:
        return self.driver["type"]


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at `path`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ManifestError(["no such file (pass the manifest with -manifest FILE)"], str(path)) from None
    except OSError as exc:
        raise ManifestError([f"cannot read: {exc.strerror or exc}"], str(path)) from None
    return parse_manifest(data, str(path))


def decode_text(data: bytes, what: str = "the manifest") -> str:
    """UTF-8 text of `data`; a ValueError naming the line and byte of the first invalid one."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"line {line}: {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def parse_manifest(text: str | bytes, path: str | None = None) -> Manifest:
    """Parse and validate manifest text (or UTF-8 bytes), raising ManifestError listing every problem."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = decode_text(bytes(text))
        except ValueError as exc:
            raise ManifestError([str(exc)], path) from None
    surrogate = _SURROGATE.search(text)
    if surrogate is not None:
        # Only a str the caller built can hold one: bytes and files are decoded strictly.
        line = text.count("\n", 0, surrogate.start()) + 1
        raise ManifestError([f"line {line}: the manifest holds \\u{ord(surrogate.group()):04x}, which is not a character"], path)
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ManifestError([f"{where}invalid YAML: {problem}"], path) from None
    except RecursionError:
        raise ManifestError(["the YAML is nested too deeply to be a manifest"], path) from None
    return manifest_from_nodes(root, text, path)


def manifest_from_nodes(root: yaml.Node | None, text: str = "", path: str | None = None) -> Manifest:
    """Validate a composed YAML node tree (`parse_manifest` without the YAML parsing), in time linear in its size."""
    return _Parser(text, path).parse(root)


def slugify(name: str) -> str:
    """Upstream's job slug: only [a-zA-Z0-9.], other runs become one '-', lower-cased."""
    slug = re.sub(r"[^a-zA-Z0-9.]+", "-", name.strip())
    return slug.strip("-").lower()


def parse_passthrough(entry: str, default_dest: bool = True) -> Passthrough:
    """Split `a => b`; b defaults to the basename of a. Raises ValueError on an empty side."""
    if "=>" in entry:
        src, _, dst = entry.partition("=>")
        src, dst = src.strip(), dst.strip()
        if not src or not dst:
            raise ValueError(f"{entry!r} has an empty side of '=>'")
        return Passthrough(src, dst)
    src = entry.strip()
    if not src:
        raise ValueError("entry is empty")
    return Passthrough(src, posixpath.basename(src.rstrip("/")) or src)


def parse_source(entry: str) -> Source:
    """Split `<url> [ref] [=> dir]`; dir defaults to the url's basename without `.git`."""
    spec, arrow, dir_ = entry.partition("=>")
    dir_ = dir_.strip()
    if arrow and not dir_:
        raise ValueError(f"{entry!r} has an empty side of '=>'")
    parts = spec.split()
    if not parts:
        raise ValueError(f"{entry!r} has no url")
    if len(parts) > 2:
        raise ValueError(f"{entry!r} should be '<url> [ref] [=> dir]'")
    url = parts[0]
    ref = parts[1] if len(parts) == 2 else None
    if not dir_:
        base = posixpath.basename(url.rstrip("/"))
        dir_ = base[: -len(".git")] if base.endswith(".git") else base
        if not dir_:
            raise ValueError(f"cannot derive a directory from {url!r}; add '=> dir'")
    return Source(url, ref, dir_)


class _Parser:
    """Walks the YAML node tree, collecting problems rather than stopping at the first."""

    def __init__(self, text: str, path: str | None) -> None:
        self.text = text
        self.path = path
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, node: yaml.Node | None, key: str, message: str) -> None:
        where = f"line {node.start_mark.line + 1}: " if node is not None else ""
        self.problems.append(f"{where}{key}: {message}")

    # -- node helpers -------------------------------------------------------

    def string(self, node: yaml.Node, key: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            self.problem(node, key, f"must be a string, not {_describe(node)}")
            return None
        bad = _UNUSABLE.search(node.value)
        if bad is not None:
            char = bad.group()
            what = "a NUL byte" if char == "\0" else f"\\u{ord(char):04x}, a lone surrogate that is not a character"
            self.problem(node, key, f"contains {what}; remove it")
            return None
        return str(node.value)

    def strings(self, node: yaml.Node, key: str) -> list[tuple[yaml.Node, str]]:
        if _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, key, f"must be a list of strings, not {_describe(node)}")
            return []
        out = []
        for i, item in enumerate(node.value):
            value = self.string(item, f"{key}[{i}]")
            if value is not None:
                out.append((item, value))
        return out

    def mapping(
        self, node: yaml.Node, key: str, allowed: tuple[str, ...] | None, warn_unknown: bool = False
    ) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, key, f"must be a mapping, not {_describe(node)}")
            return {}
        out: dict[str, yaml.Node] = {}
        for knode, vnode in node.value:
            name = knode.value if isinstance(knode, yaml.ScalarNode) else None
            label = f"{key}.{name}" if key else str(name)
            if name is None:
                self.problem(knode, key or "manifest", "keys must be strings")
            elif allowed is not None and name not in allowed and warn_unknown:
                # Said as errors are (djinn.errors.ManifestError): the file, the line, the key.
                where = f"{self.path}: " if self.path else ""
                where += f"line {knode.start_mark.line + 1}: "
                self.warnings.append(f"{where}{label}: unknown key, ignored (known keys: {', '.join(allowed)})")
            elif allowed is not None and name not in allowed:
                self.problem(knode, label, f"unknown key (expected one of: {', '.join(allowed)})")
            elif name in out:
                self.problem(knode, label, "given twice")
            else:
                out[name] = vnode
        return out

    # -- sections -----------------------------------------------------------

    def parse(self, root: yaml.Node | None) -> Manifest:
        if root is None:
            raise ManifestError(["manifest is empty"], self.path)
        top = self.mapping(root, "", KEYS, warn_unknown=True)
        if not isinstance(root, yaml.MappingNode):
            raise ManifestError(self.problems, self.path)

        namespace = None
        if "namespace" in top and not _is_null(top["namespace"]):
            namespace = self.string(top["namespace"], "namespace")

        driver = self.driver(top.get("driver"), root)
        env = self.env(top.get("env"))
        objects = self.passthroughs(top.get("objects"), "objects")
        sources = self.sources(top.get("sources"))
        stages = self.stages(top.get("stages"))
        allow_failures = self.allow_failures(top.get("allow_failures"), stages)
        jobs = self.jobs(top.get("jobs"), stages)

        if self.problems:
            raise ManifestError(self.problems, self.path)
        return Manifest(
            driver=driver,
            namespace=namespace,
            env=tuple(env),
            objects=tuple(objects),
            sources=tuple(sources),
            stages=tuple(stages),
            allow_failures=tuple(allow_failures),
            jobs=tuple(jobs),
            text=self.text,
            warnings=tuple(self.warnings),
        )

    def driver(self, node: yaml.Node | None, root: yaml.Node) -> dict[str, str]:
        if node is None or _is_null(node):
            self.problem(node or root, "driver", "is required (a mapping with at least 'type')")
            return {}
        fields = self.mapping(node, "driver", None)
        driver: dict[str, str] = {}
        for name, vnode in fields.items():
            value = self.string(vnode, f"driver.{name}")
            if value is not None:
                driver[name] = value
        if "addr" in driver:
            if "address" in driver:
                self.problem(fields["addr"], "driver.addr", "give either 'address' or its alias 'addr', not both")
            driver["address"] = driver.pop("addr")
        kind = driver.get("type")
        if "type" not in fields:
            self.problem(node, "driver.type", f"is required (one of: {', '.join(DRIVER_TYPES)})")
        elif kind is not None and kind not in DRIVER_TYPES:
            self.problem(fields["type"], "driver.type", f"unknown driver type {kind!r} (expected one of: {', '.join(DRIVER_TYPES)})")
        required = {"docker": ("image", "workspace"), "qemu": ("image",), "ssh": ("address",)}.get(kind or "", ())
        for name in required:
            if not driver.get(name) and not (name == "address" and "addr" in fields):
                self.problem(node, f"driver.{name}", f"is required for the {kind} driver")
        if kind == "qemu" and driver.get("arch", "x86_64") not in QEMU_ARCHES:
            self.problem(fields.get("arch"), "driver.arch", f"unsupported arch {driver['arch']!r} (expected one of: {', '.join(QEMU_ARCHES)})")
        return driver

    def env(self, node: yaml.Node | None) -> list[tuple[str, str]]:
        out = []
        for i, (item, value) in enumerate(self.strings(node, "env") if node is not None else []):
            key, eq, val = value.partition("=")
            if not eq or not key.strip():
                self.problem(item, f"env[{i}]", f"{value!r} is not KEY=VALUE")
                continue
            out.append((key.strip(), val))
        return out

    def passthroughs(self, node: yaml.Node | None, key: str) -> list[Passthrough]:
        out = []
        for i, (item, value) in enumerate(self.strings(node, key) if node is not None else []):
            try:
                out.append(parse_passthrough(value))
            except ValueError as exc:
                self.problem(item, f"{key}[{i}]", str(exc))
        return out

    def sources(self, node: yaml.Node | None) -> list[Source]:
        out = []
        for i, (item, value) in enumerate(self.strings(node, "sources") if node is not None else []):
            try:
                out.append(parse_source(value))
            except ValueError as exc:
                self.problem(item, f"sources[{i}]", str(exc))
        return out

    def stages(self, node: yaml.Node | None) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()
        for i, (item, value) in enumerate(self.strings(node, "stages") if node is not None else []):
            if not value.strip():
                self.problem(item, f"stages[{i}]", "stage name is empty")
            elif value in seen:
                self.problem(item, f"stages[{i}]", f"duplicate stage {value!r}")
            else:
                seen.add(value)
                out.append(value)
        return out

    def allow_failures(self, node: yaml.Node | None, stages: list[str]) -> list[str]:
        out = []
        declared = set(stages)
        for i, (item, value) in enumerate(self.strings(node, "allow_failures") if node is not None else []):
            if value not in declared:
                self.problem(item, f"allow_failures[{i}]", f"{value!r} names no stage in stages")
            else:
                out.append(value)
        return out

    def jobs(self, node: yaml.Node | None, stages: list[str]) -> list[Job]:
        if node is None or _is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, "jobs", f"must be a list of jobs, not {_describe(node)}")
            return []
        out = []
        declared = set(stages)
        previous, n = None, 0
        for i, jnode in enumerate(node.value):
            key = f"jobs[{i}]"
            fields = self.mapping(jnode, key, JOB_KEYS)
            if not isinstance(jnode, yaml.MappingNode):
                continue
            stage = self.string(fields["stage"], f"{key}.stage") if "stage" in fields else None
            if "stage" not in fields:
                self.problem(jnode, f"{key}.stage", "is required")
            elif stage is not None and stage not in declared:
                self.problem(fields["stage"], f"{key}.stage", f"stage {stage!r} is not declared in stages")
            name = None
            if "name" in fields and not _is_null(fields["name"]):
                name = self.string(fields["name"], f"{key}.name")
            commands = [v for _, v in self.strings(fields["commands"], f"{key}.commands")] if "commands" in fields else []
            if not commands and not (
                "commands" in fields and isinstance(fields["commands"], yaml.SequenceNode) and fields["commands"].value
            ):
                self.problem(fields.get("commands", jnode), f"{key}.commands", "job has no commands")
            artifacts = self.passthroughs(fields.get("artifacts"), f"{key}.artifacts")
            if stage is not None:
                # Numbered as the plan numbers unnamed jobs: by position in a run of one stage's jobs.
                n = n + 1 if stage == previous else 1
                previous = stage
                self.job_slug(fields["name"] if name is not None else fields["stage"], key, name, f"{stage}.{n}")
                out.append(Job(stage=stage, name=name, commands=tuple(commands), artifacts=tuple(artifacts)))
        return out

    def job_slug(self, node: yaml.Node, key: str, name: str | None, default: str) -> None:
        """A job's slug names files: refused when empty, '.'/'..' or too long for a file name."""
        slug = slugify(name if name is not None else default)
        label = f"{key}.name" if name is not None else f"{key}.stage"
        given = f"job name {name!r}" if name is not None else f"the job's default name {default!r}"
        if slug in ("", ".", ".."):
            self.problem(node, label, f"{given} has no letters or digits to name the job by; use another name")
        elif len(slug) > MAX_JOB_SLUG:
            self.problem(node, label, f"{given} is {len(slug)} characters as a job name; at most {MAX_JOB_SLUG} fit a file name")


# A lone surrogate (a "\ud800" escape) cannot be encoded for a shell; a NUL cannot be in a command or variable.
_UNUSABLE = re.compile("[\0\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = str(node.tag).rsplit(":", 1)[-1]
    return {"int": "a number", "float": "a number", "bool": "a boolean", "null": "null"}.get(kind, kind) + (
        f" ({node.value})" if kind not in ("null",) else ""
    )
