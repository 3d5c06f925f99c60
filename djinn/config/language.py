"""The configuration language of djinn-worker.conf and djinn-driver.conf.

It is upstream's language (github.com/andrewpillar/config, an NGINX-like
syntax) so existing Djinn CI config files keep working, and so a file written
for this worker also works with the Go original:

    # comment
    pidfile "/var/run/djinn/worker.pid"     # name value
    log info "/var/log/djinn/worker.log"    # name label value
    provider github                         # bare label: an empty block
    store artifacts {                       # name label block
        path  "/var/lib/djinn/artifacts"

        # comments inside a block go on their own line (see below)
        limit 50MB
    }
    include ["smtp.conf", "db.conf"]

Values: strings in double quotes, integers, floats, `true`/`false`, arrays
`[a, b]` (may span lines after `[` or a comma, trailing comma allowed),
blocks `{ ... }`, durations and sizes.

What is accepted is exactly what upstream's scanner and parser accept, except
where upstream silently reads something other than what was written (then it
is an error here, saying why). Each rule below is upstream's:

- Durations: a number and units `h`, `m`, `s`, `ms`, combined Go style
  (`500ms`, `30s`, `1h30m`, `1.5h`). Upstream's scanner has no `d`, `ns` or
  `us`. At most 2562047h (Go's time.Duration); they become timedelta.
- Sizes: a whole number and one of `B KB MB GB TB`, 1024-based (`50MB` =
  52428800 bytes), at most 2**63-1 bytes. No `PB`. Upstream reads `1.5MB` as
  0, so fractions are refused. They become `Size`, an `int` of bytes.
- Integers fit in 64 bits; numbers start with a digit or `-` (not `.`).
- Names are letters, `_` and ASCII digits, not starting with a digit; no `-`
  (upstream reads `qemu-x86_64` as three tokens).
- A line break ends a parameter only after a value, a name, `}` or `]`;
  elsewhere it is blank space. So inside an array the line may break after
  `[` or a comma, never before a comma or `]`. Inside a block parameters are
  separated by line breaks or `;`; at the top level they need no separator.
- A `#` comment runs to the end of the line and, after a value, takes that
  line break with it (upstream's scanner does). A comment after a value
  inside a block is therefore an error unless `}` or a blank line follows;
  a file must not end inside a comment (upstream never stops reading it).
- `${VAR}` (or `${env:VAR}`) inside a string is the environment variable,
  empty when unset. Other prefixes (upstream lets programs register e.g.
  `vault:`) are errors. The only escape is `\\"`; upstream drops the backslash
  of any other (`\\n` reads as `n`), so those are errors here.
- `include` takes a string or an array of strings, at the top level only,
  not expanded (no `${VAR}`). A relative path is tried against the including
  file's directory, then against the working directory (upstream's only
  rule). Including a file that is already included is an error, as upstream.
- A repeated key replaces the earlier value (a block as a whole), a repeated
  labelled key adds or replaces that label.
- NUL bytes, form feeds and other control characters are errors. Blocks and
  arrays nest at most MAX_DEPTH deep.

Parsing gives a `ConfigDict`: a plain `dict` of plain Python values that also
remembers the file and line of each key, so the typed decoders can name the
line of a bad value. Every problem raises `djinn.errors.ConfigError` with a
message `FILE:LINE: message`.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Mapping

from djinn.errors import ConfigError

__all__ = [
    "ConfigDict",
    "Pos",
    "Size",
    "MAX_DEPTH",
    "SIZE_UNITS",
    "config_error",
    "parse_duration",
    "parse_file",
    "parse_size",
    "parse_text",
]


@dataclass(frozen=True)
class Pos:
    """Where something was written; `line` is None when unknown (values built in code)."""

    file: str
    line: int | None = None

    def __str__(self) -> str:
        return self.file if self.line is None else f"{self.file}:{self.line}"


def config_error(pos: Pos, message: str) -> ConfigError:
    """A ConfigError reading `FILE:LINE: message`, with `.file` and `.line` set for callers."""
    err = ConfigError(f"{pos}: {message}")
    err.file = pos.file  # type: ignore[attr-defined]
    err.line = pos.line  # type: ignore[attr-defined]
    return err


class Size(int):
    """A size literal (`50MB`) in bytes; an int, tagged so decoders can tell it from a plain count."""

    def __repr__(self) -> str:
        return f"Size({int(self)})"


class ConfigDict(dict[str, Any]):
    """A block's parameters as a plain dict, plus where each key was written.

    `positions[key]` is the Pos of the key; `labelled` holds the keys written
    with labels (`store artifacts {...}`), whose value is a ConfigDict keyed by
    label; `pos` is where the block itself starts.
    """

    def __init__(self, pos: Pos | None = None) -> None:
        super().__init__()
        self.pos = pos or Pos("<string>")
        self.positions: dict[str, Pos] = {}
        self.labelled: set[str] = set()

    def position(self, key: str) -> Pos:
        """Where `key` was written, or the block's own position when unknown."""
        return self.positions.get(key, self.pos)

    def line(self, key: str) -> int | None:
        return self.position(key).line


# The units upstream's scanner lets through to Go's time.ParseDuration, in nanoseconds.
_DURATION_UNITS_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
MAX_INT = (1 << 63) - 1  # Go's int64: the largest integer, size or duration (in ns) upstream can hold
MAX_DEPTH = 64  # blocks and arrays nested deeper than this are refused, not a RecursionError

_NUM = r"(?:\d+(?:\.\d*)?)"
_DURATION_PART = re.compile(rf"({_NUM})(ms|s|m|h)", re.ASCII)
_DURATION_RE = re.compile(rf"-?(?:{_NUM}(?:ms|s|m|h))+", re.ASCII)
_SIZE_RE = re.compile(r"(-?\d+(?:\.\d*)?)(B|KB|MB|GB|TB)", re.ASCII)
_INT_RE = re.compile(r"-?\d+", re.ASCII)
_FLOAT_RE = re.compile(r"-?\d*\.\d*", re.ASCII)
# Units people write that upstream's config language does not have.
_FOREIGN_UNITS = re.compile(r"-?\d+(?:\.\d*)?(d|ns|us|µs|PB|EB|w|y)", re.ASCII)


def parse_duration(text: str) -> datetime.timedelta:
    """`30m`, `1h30m`, `500ms` as a timedelta; a lone `0` is zero. Raises ConfigError."""
    text = text.strip()
    if text in ("0", "-0"):
        return datetime.timedelta(0)
    if not _DURATION_RE.fullmatch(text):
        foreign = _FOREIGN_UNITS.fullmatch(text)
        if foreign and foreign.group(1) in ("d", "ns", "us", "µs", "w", "y"):
            raise ConfigError(
                f"invalid duration {text!r}: unit {foreign.group(1)!r} is not in upstream's config language "
                "(units: h, m, s, ms; e.g. 48h for two days)"
            )
        raise ConfigError(f"invalid duration {text!r} (expected e.g. 90s, 30m, 1h30m, 500ms)")
    total_ns = Fraction(0)
    for number, unit in _DURATION_PART.findall(text):
        if len(number) > 40:
            raise ConfigError(f"duration {text[:40]}... is out of range (at most 2562047h, about 292 years)")
        total_ns += Fraction(number if not number.endswith(".") else number[:-1]) * _DURATION_UNITS_NS[unit]
    if total_ns > MAX_INT:
        raise ConfigError(f"duration {text} is out of range (at most 2562047h, about 292 years)")
    delta = datetime.timedelta(microseconds=int(total_ns / 1000))
    return -delta if text.startswith("-") else delta


def format_duration(seconds: float) -> str:
    """Seconds as the config language writes a duration, to a tenth: 90.25 -> "1m30.2s"."""
    minutes, secs = divmod(round(seconds, 1), 60)
    return f"{int(minutes)}m{secs:g}s" if minutes else f"{secs:g}s"


def parse_size(text: str) -> Size:
    """`50MB` as a number of bytes (1024-based units, like upstream). Raises ConfigError."""
    text = text.strip()
    m = _SIZE_RE.fullmatch(text)
    if not m:
        foreign = _FOREIGN_UNITS.fullmatch(text)
        if foreign and foreign.group(1) in ("PB", "EB"):
            raise ConfigError(f"invalid size {text!r}: unit {foreign.group(1)} is not in upstream's config language (units: B, KB, MB, GB, TB)")
        raise ConfigError(f"invalid size {text!r} (expected e.g. 512KB, 50MB, 2GB)")
    number, unit = m.groups()
    if "." in number:
        raise ConfigError(f"invalid size {text!r}: sizes are whole numbers (upstream reads {text} as 0); e.g. 1536KB")
    if len(number) > 25 or abs(int(number)) * SIZE_UNITS[unit] > MAX_INT:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise ConfigError(f"size {shown} is out of range (at most 8388607TB)")
    return Size(int(number) * SIZE_UNITS[unit])


# --- tokens ---------------------------------------------------------------

_NAME, _STRING, _INT, _FLOAT, _DURATION, _SIZE = "name", "string", "integer", "float", "duration", "size"
_NEWLINE, _EOF = "newline", "end of file"
_PUNCT = {"{", "}", "[", "]", ","}
_LITERALS = {_STRING, _INT, _FLOAT, _DURATION, _SIZE}
# After these a line break ends the parameter; after anything else it is blank space.
_ENDS_LINE = {_NAME, *_LITERALS, "}", "]"}


@dataclass
class _Token:
    kind: str
    value: Any
    line: int
    text: str = ""
    expands: bool = False  # a string that had ${...} or an escape (include paths must not)

    def describe(self) -> str:
        if self.kind in _PUNCT:
            return f'"{self.kind}"'
        if self.kind == _NEWLINE:
            return '";"' if self.text == ";" else "a line break"
        if self.kind == _EOF:
            return "end of file"
        text = self.text if len(self.text) <= 40 else self.text[:40] + "..."
        return f"{self.kind} {text}"


def _is_name_start(ch: str) -> bool:
    return ch == "_" or ch.isalpha()


def _is_name_char(ch: str) -> bool:
    # Upstream: Unicode letters, "_" and ASCII digits only (no "-", no other digits).
    return ch == "_" or ch.isalpha() or "0" <= ch <= "9"


_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_CHARS = frozenset("0123456789.abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_µ")
_COMMENT_HINT = (
    " (a # comment after a value takes the line break with it in upstream's config language: "
    "put the comment on its own line)"
)


class _Lexer:
    """Upstream's scanner: a line break is a token only where it can end a parameter."""

    def __init__(self, text: str, name: str, env: Mapping[str, str]) -> None:
        self.text = text
        self.name = name
        self.env = env
        self.i = 0
        self.line = 1
        # Lines whose line break a trailing comment swallowed, for error hints.
        self.swallowed: set[int] = set()

    def error(self, line: int, message: str) -> ConfigError:
        return config_error(Pos(self.name, line), message)

    def tokens(self) -> Iterator[_Token]:
        text, n = self.text, len(self.text)
        ends_line = False  # upstream's nlsemi
        while True:
            while self.i < n:
                ch = text[self.i]
                if ch in " \t\r":
                    self.i += 1
                elif ch == "\n" and not ends_line:
                    self.i += 1
                    self.line += 1
                elif ch == "#":
                    end = text.find("\n", self.i)
                    if end < 0:
                        raise self.error(
                            self.line,
                            "the file ends inside a comment: add a line break at the end "
                            "(upstream's djinn-worker never finishes reading such a file)",
                        )
                    if "\0" in text[self.i : end]:
                        raise self.error(self.line, "NUL byte in a comment")
                    if ends_line:
                        self.swallowed.add(self.line)
                    self.i = end + 1
                    self.line += 1
                else:
                    break
            if self.i >= n:
                yield _Token(_EOF, None, self.line)
                return
            ch = text[self.i]
            line = self.line
            if ch == "\n" or ch == ";":
                self.i += 1
                if ch == "\n":
                    self.line += 1
                ends_line = False
                yield _Token(_NEWLINE, None, line, ch)
                continue
            if ch in _PUNCT:
                self.i += 1
                tok = _Token(ch, ch, line, ch)
            elif ch == '"':
                tok = self._string()
            elif "0" <= ch <= "9" or ch == "-":
                tok = self._number()
            elif _is_name_start(ch):
                start = self.i
                while self.i < n and _is_name_char(text[self.i]):
                    self.i += 1
                word = text[start : self.i]
                if self.i < n and text[self.i] == "-":
                    raise self.error(
                        line,
                        f"names cannot contain \"-\" (upstream reads {word}-... as separate tokens)"
                        + ("; the qemu driver block is: driver qemu { ... }" if word == "qemu" else ""),
                    )
                tok = _Token(_NAME, word, line, word)
            elif ch == "\0":
                raise self.error(line, "NUL byte in the file")
            else:
                raise self.error(line, f"unexpected character {ch!r}")
            ends_line = tok.kind in _ENDS_LINE
            yield tok

    def _number(self) -> _Token:
        text, n, start, line = self.text, len(self.text), self.i, self.line
        self.i += 1
        while self.i < n and text[self.i] in _NUMBER_CHARS:
            self.i += 1
        word = text[start : self.i]
        try:
            if _INT_RE.fullmatch(word):
                if len(word) > 20 or abs(int(word)) > MAX_INT:
                    shown = word if len(word) <= 40 else word[:40] + "..."
                    raise self.error(line, f"integer {shown} is out of range (at most {MAX_INT})")
                return _Token(_INT, int(word), line, word)
            if _FLOAT_RE.fullmatch(word) and any(c.isdigit() for c in word):
                return _Token(_FLOAT, float(word), line, word)
            if _DURATION_RE.fullmatch(word):
                return _Token(_DURATION, parse_duration(word), line, word)
            if _SIZE_RE.fullmatch(word):
                return _Token(_SIZE, parse_size(word), line, word)
            foreign = _FOREIGN_UNITS.fullmatch(word)
            if foreign:
                # Both raise, naming the unit upstream lacks.
                parse_size(word) if foreign.group(1) in ("PB", "EB") else parse_duration(word)
        except ConfigError as exc:
            if getattr(exc, "line", None) is not None:
                raise
            raise self.error(line, str(exc)) from None
        if word == "-":
            raise self.error(line, "unexpected character '-'")
        shown = word if len(word) <= 40 else word[:40] + "..."
        raise self.error(
            line,
            f"invalid number {shown!r} (a duration needs units h, m, s or ms, a size B, KB, MB, GB or TB)",
        )

    def _string(self) -> _Token:
        text, n, line = self.text, len(self.text), self.line
        start = self.i
        self.i += 1
        out: list[str] = []
        expands = False
        while True:
            if self.i >= n or text[self.i] == "\n":
                raise self.error(line, "unterminated string (strings cannot span lines)")
            ch = text[self.i]
            if ch == '"':
                self.i += 1
                break
            if ch == "\0":
                raise self.error(line, "NUL byte in a string")
            if ch == "\\":
                esc = text[self.i + 1] if self.i + 1 < n else ""
                if esc == '"':
                    out.append('"')
                    expands = True
                    self.i += 2
                    continue
                if esc in ("", "\n"):
                    raise self.error(line, "unterminated string (strings cannot span lines)")
                raise self.error(
                    line,
                    f"escape \\{esc} in a string: upstream's config language drops the backslash "
                    f"(reads {esc!r}), so the only escape is \\\"",
                )
            if ch == "$" and text.startswith("${", self.i):
                end = text.find("}", self.i + 2)
                newline = text.find("\n", self.i + 2)
                quote = text.find('"', self.i + 2)
                if end < 0 or (0 <= newline < end) or (0 <= quote < end):
                    raise self.error(line, "unterminated ${ in string")
                out.append(self._expand(text[self.i + 2 : end], line))
                expands = True
                self.i = end + 1
                continue
            out.append(ch)
            self.i += 1
        return _Token(_STRING, "".join(out), line, text[start : self.i], expands)

    def _expand(self, ref: str, line: int) -> str:
        name = ref
        if ":" in ref:
            prefix, name = ref.split(":", 1)
            if prefix != "env":
                raise self.error(line, f"unknown expansion ${{{ref}}}: only ${{VAR}} and ${{env:VAR}} are supported")
        if not _VAR_NAME.fullmatch(name):
            raise self.error(line, f"invalid variable reference ${{{ref}}}")
        return self.env.get(name, "")


# --- parser ---------------------------------------------------------------


class _Includes:
    """Every file read in one parse: upstream refuses to include a file twice."""

    def __init__(self) -> None:
        self.seen: dict[str, Pos | None] = {}  # realpath -> where it was included (None: the top file)


class _Parser:
    def __init__(
        self,
        text: str,
        name: str,
        base_dir: str,
        env: Mapping[str, str],
        includes: _Includes,
    ) -> None:
        self.name = name
        self.base_dir = base_dir
        self.env = env
        self.includes = includes
        self.lexer = _Lexer(text, name, env)
        self.toks = list(self.lexer.tokens())
        self.k = 0
        self.depth = 0

    # token helpers
    def peek(self, ahead: int = 0) -> _Token:
        return self.toks[min(self.k + ahead, len(self.toks) - 1)]

    def advance(self) -> _Token:
        tok = self.toks[self.k]
        if tok.kind != _EOF:
            self.k += 1
        return tok

    def pos(self, tok: _Token) -> Pos:
        return Pos(self.name, tok.line)

    def error(self, tok: _Token, message: str) -> ConfigError:
        return config_error(self.pos(tok), message)

    def hint(self) -> str:
        """Why a separator before the next token is missing, when a trailing comment swallowed it."""
        return _COMMENT_HINT if self.k > 0 and self.toks[self.k - 1].line in self.lexer.swallowed else ""

    def nest(self, tok: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(tok, f"blocks and arrays are nested more than {MAX_DEPTH} deep")

    # grammar (upstream's)
    def parse_into(self, target: ConfigDict) -> None:
        """Top level: parameters and includes until end of file; no separator needed between them."""
        while True:
            tok = self.peek()
            if tok.kind == _NEWLINE:
                self.advance()
            elif tok.kind == _EOF:
                return
            elif tok.kind == _NAME and tok.value == "include":
                self.include(target)
            elif tok.kind == _NAME:
                self.param(target)
            elif tok.kind == "}":
                raise self.error(tok, 'unexpected "}" with no open block')
            else:
                raise self.error(tok, f"expected a parameter name, got {tok.describe()}{self.hint()}")

    def block(self) -> ConfigDict:
        open_tok = self.advance()  # "{"
        self.nest(open_tok)
        block = ConfigDict(self.pos(open_tok))
        while self.peek().kind not in ("}", _EOF):
            tok = self.peek()
            if tok.kind == _NAME and tok.value == "include":
                raise self.error(tok, "include is only allowed at the top level of a file")
            if tok.kind != _NAME:
                raise self.error(tok, f"expected a parameter name, got {tok.describe()}")
            self.param(block)
            after = self.peek()
            if after.kind == _NEWLINE:
                self.advance()
            elif after.kind not in ("}", _EOF):
                raise self.error(
                    after,
                    f"expected a line break or \"}}\" before {after.describe()} (one parameter per line)"
                    + self.hint(),
                )
        if self.advance().kind != "}":
            raise self.error(open_tok, 'block opened here is never closed (missing "}")')
        self.depth -= 1
        return block

    def param(self, target: ConfigDict) -> None:
        name_tok = self.advance()
        name = name_tok.value
        label: str | None = None
        tok = self.peek()
        if tok.kind == _NAME:
            if self.peek(1).kind == _NEWLINE:
                self.advance()
                if tok.value in ("true", "false"):
                    self.set(target, name, None, tok.value == "true", name_tok)
                else:
                    # `provider github`: a label with no value is an empty block.
                    self.set(target, name, tok.value, ConfigDict(self.pos(tok)), name_tok)
                return
            if self.peek(1).kind in (_EOF, "}"):
                raise self.error(
                    self.peek(1),
                    f'"{name} {tok.value}" needs a line break after it (upstream reads a label with no value '
                    "only when the line ends there)",
                )
            label = self.advance().value
        elif tok.kind in (_NEWLINE, _EOF, "}"):
            raise self.error(name_tok, f'missing value for "{name}"')
        value = self.operand()
        self.set(target, name, label, value, name_tok)

    def operand(self) -> Any:
        tok = self.peek()
        if tok.kind in _LITERALS:
            return self.advance().value
        if tok.kind == _NAME:
            if tok.value in ("true", "false"):
                self.advance()
                return tok.value == "true"
            raise self.error(
                tok,
                f"unexpected name {tok.value!r} where a value was expected (strings need double quotes)"
                + self.hint(),
            )
        if tok.kind == "{":
            return self.block()
        if tok.kind == "[":
            return self.array()
        raise self.error(tok, f"expected a value, got {tok.describe()}")

    def array(self) -> list[Any]:
        open_tok = self.advance()  # "["
        self.nest(open_tok)
        items: list[Any] = []
        while self.peek().kind not in ("]", _EOF):
            items.append(self.operand())
            tok = self.peek()
            if tok.kind == ",":
                self.advance()
            elif tok.kind == _NEWLINE and tok.text == "\n":
                raise self.error(
                    tok,
                    'line break before "," or "]" in an array: upstream\'s config language ends the '
                    'value there; break the line after a comma instead',
                )
            elif tok.kind not in ("]", _EOF):
                raise self.error(tok, f'expected "," or "]" in array, got {tok.describe()}')
        if self.advance().kind != "]":
            raise self.error(open_tok, 'array opened here is never closed (missing "]")')
        self.depth -= 1
        return items

    def set(self, target: ConfigDict, name: str, label: str | None, value: Any, name_tok: _Token) -> None:
        pos = self.pos(name_tok)
        if label is None:
            if name in target.labelled:
                raise self.error(name_tok, f'"{name}" is written with a label at {target.positions[name]}, so it needs one here too')
            target[name] = value
            target.positions[name] = pos
            return
        if name not in target:
            group = ConfigDict(pos)
            target[name] = group
            target.positions[name] = pos
            target.labelled.add(name)
        elif name not in target.labelled:
            raise self.error(name_tok, f'"{name}" is written without a label at {target.positions[name]}, so it cannot take label "{label}"')
        else:
            group = target[name]
        group[label] = value
        group.positions[label] = pos

    def include(self, target: ConfigDict) -> None:
        inc_tok = self.advance()
        tok = self.peek()
        if tok.kind == _STRING:
            strings = [self.advance()]
        elif tok.kind == "[":
            start = self.k
            items = self.array()
            if not all(isinstance(item, str) for item in items):
                raise self.error(tok, "include takes a string or an array of strings")
            strings = [t for t in self.toks[start : self.k] if t.kind == _STRING]
        else:
            raise self.error(inc_tok, "include takes a string or an array of strings")
        for string in strings:
            if string.expands:
                raise self.error(
                    string,
                    f"include {string.text}: upstream does not expand ${{...}} or escapes in include paths; write the path itself",
                )
        for string in strings:
            self.include_file(target, string.value, string)

    def resolve(self, file: str) -> str | None:
        """The included file: against the including file's directory, then the working directory."""
        if os.path.isabs(file):
            return file if os.path.exists(file) else None
        for base in (self.base_dir, os.getcwd()):
            candidate = os.path.join(base, file)
            if os.path.exists(candidate):
                return candidate
        return None

    def include_file(self, target: ConfigDict, file: str, tok: _Token) -> None:
        if not file:
            raise self.error(tok, "include of an empty path")
        path = self.resolve(file)
        if path is None:
            where = "" if os.path.isabs(file) else f" (looked in {self.base_dir or '.'} and in the working directory {os.getcwd()})"
            raise self.error(tok, f"cannot include {file!r}: no such file{where}")
        real = os.path.realpath(path)
        if real in self.includes.seen:
            earlier = self.includes.seen[real]
            how = "it is the file being read" if earlier is None else f"it is already included at {earlier}"
            raise self.error(tok, f"cannot include {file!r}: {how} (upstream refuses a file included twice)")
        self.includes.seen[real] = self.pos(tok)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise self.error(tok, f"cannot include {file!r}: {_read_problem(exc)}") from None
        sub = _Parser(text, path, os.path.dirname(path), self.env, self.includes)
        sub.parse_into(target)


def _read_problem(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {exc.start})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _parse(text: str, name: str, base_dir: str, env: Mapping[str, str] | None, real: str | None) -> ConfigDict:
    includes = _Includes()
    if real:
        includes.seen[real] = None
    result = ConfigDict(Pos(name, 1))
    _Parser(text, name, base_dir, os.environ if env is None else env, includes).parse_into(result)
    return result


def parse_text(
    text: str,
    name: str = "<string>",
    *,
    base_dir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> ConfigDict:
    """Parse config text; `name` is used in error messages, `base_dir` resolves relative includes.

    `env` replaces os.environ for `${VAR}` expansion (tests, or a controlled environment).
    """
    return _parse(text, name, os.fspath(base_dir) if base_dir is not None else os.getcwd(), env, None)


def parse_file(path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None) -> ConfigDict:
    """Parse a config file, following its includes (its own directory first, then the working directory)."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read config file: {_read_problem(exc)}") from None
    return _parse(text, name, os.path.dirname(name) or ".", env, os.path.realpath(name))
