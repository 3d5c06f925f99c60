"""The configuration language of djinn-worker.conf and djinn-driver.conf.

It is upstream's language (github.com/andrewpillar/config, an NGINX-like
syntax) so existing Djinn CI config files keep working:

    # comment
    pidfile "/var/run/djinn/worker.pid"     # name value
    log info "/var/log/djinn/worker.log"    # name label value
    provider github                         # bare label: an empty block
    store artifacts {                       # name label block
        path  "/var/lib/djinn/artifacts"
        limit 50MB
    }
    include ["smtp.conf", "db.conf"]

Values: strings in double quotes, integers, floats, `true`/`false`, arrays
`[a, b]` (may span lines, trailing comma allowed), blocks `{ ... }`,
durations and sizes.

Decisions, with upstream's behaviour where it has one:

- Durations are a number followed by units, Go style: `500ms`, `30s`, `1h30m`,
  `1.5h`; units `ns us µs ms s m h d` (`d` is 24h, documented by upstream's
  readme). They become `datetime.timedelta`.
- Sizes are a number and one of `B KB MB GB TB PB`, 1024-based as upstream
  (`1KB` = 1024 bytes, `50MB` = 52428800). They become `Size`, an `int` of
  bytes that remembers it was written as a size.
- `${VAR}` (or `${env:VAR}`, upstream's explicit form) inside a string is
  replaced by the environment variable; an unset variable expands to the empty
  string, like upstream (Go's os.Getenv). Other prefixes (upstream lets
  programs register e.g. `vault:`) are errors here. `\\$` gives a literal `$`.
- String escapes: `\\"` `\\\\` `\\n` `\\t` `\\r` `\\$`; any other escape is an
  error (upstream silently drops the backslash, which hides typos).
- `include` takes a string or an array of strings, only at the top level of a
  file. Relative paths are resolved against the including file's directory
  (upstream uses the process's working directory, which breaks as soon as the
  worker is started from elsewhere). An include cycle is an error; including
  the same file twice from different places is allowed.
- A repeated key replaces the earlier value (upstream does the same), so a
  file can include defaults and then override some of them. A repeated
  labelled key adds or replaces that label.

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
from pathlib import Path
from typing import Any, Iterator, Mapping

from djinn.errors import ConfigError

__all__ = [
    "ConfigDict",
    "Pos",
    "Size",
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


class ConfigDict(dict):
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


# Go's time.ParseDuration units, plus upstream's documented `d`.
_DURATION_UNITS = {
    "ns": datetime.timedelta(microseconds=0.001),
    "us": datetime.timedelta(microseconds=1),
    "µs": datetime.timedelta(microseconds=1),
    "ms": datetime.timedelta(milliseconds=1),
    "s": datetime.timedelta(seconds=1),
    "m": datetime.timedelta(minutes=1),
    "h": datetime.timedelta(hours=1),
    "d": datetime.timedelta(days=1),
}
SIZE_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "PB": 1 << 50}

_NUM = r"(?:\d+(?:\.\d+)?)"
_DURATION_PART = re.compile(rf"({_NUM})(ns|us|µs|ms|s|m|h|d)")
_DURATION_RE = re.compile(rf"-?(?:{_NUM}(?:ns|us|µs|ms|s|m|h|d))+")
_SIZE_RE = re.compile(rf"(-?{_NUM})(B|KB|MB|GB|TB|PB)")
_INT_RE = re.compile(r"-?\d+")
_FLOAT_RE = re.compile(rf"-?{_NUM}")


def parse_duration(text: str) -> datetime.timedelta:
    """`30m`, `1h30m`, `500ms` as a timedelta; a lone `0` is zero. Raises ConfigError."""
    text = text.strip()
    if text in ("0", "-0"):
        return datetime.timedelta(0)
    if not _DURATION_RE.fullmatch(text):
        raise ConfigError(f"invalid duration {text!r} (expected e.g. 90s, 30m, 1h30m, 500ms)")
    total = datetime.timedelta(0)
    for number, unit in _DURATION_PART.findall(text):
        total += _DURATION_UNITS[unit] * float(number)
    return -total if text.startswith("-") else total


def parse_size(text: str) -> Size:
    """`50MB` as a number of bytes (1024-based units, like upstream). Raises ConfigError."""
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ConfigError(f"invalid size {text!r} (expected e.g. 512KB, 50MB, 2GB)")
    return Size(round(float(m.group(1)) * SIZE_UNITS[m.group(2)]))


# --- tokens ---------------------------------------------------------------

_NAME, _STRING, _INT, _FLOAT, _DURATION, _SIZE = "name", "string", "integer", "float", "duration", "size"
_NEWLINE, _EOF = "newline", "end of file"
_PUNCT = {"{", "}", "[", "]", ","}
_LITERALS = {_STRING, _INT, _FLOAT, _DURATION, _SIZE}


@dataclass
class _Token:
    kind: str
    value: Any
    line: int
    text: str = ""

    def describe(self) -> str:
        if self.kind in _PUNCT:
            return f'"{self.kind}"'
        if self.kind in (_NEWLINE, _EOF):
            return self.kind
        return f"{self.kind} {self.text}"


def _is_name_start(ch: str) -> bool:
    return ch == "_" or ch.isalpha()


def _is_name_char(ch: str) -> bool:
    # `-` inside names (not first) as upstream djinn allowed: `driver qemu-x86_64 {}`.
    return ch == "_" or ch == "-" or ch.isalnum()


_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r", "$": "$"}
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Lexer:
    def __init__(self, text: str, name: str, env: Mapping[str, str]) -> None:
        self.text = text
        self.name = name
        self.env = env
        self.i = 0
        self.line = 1

    def error(self, line: int, message: str) -> ConfigError:
        return config_error(Pos(self.name, line), message)

    def tokens(self) -> Iterator[_Token]:
        text, n = self.text, len(self.text)
        while True:
            # Whitespace other than newlines, and comments.
            while self.i < n:
                ch = text[self.i]
                if ch in " \t\r\f\v":
                    self.i += 1
                elif ch == "#":
                    while self.i < n and text[self.i] != "\n":
                        self.i += 1
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
                yield _Token(_NEWLINE, None, line, "newline" if ch == "\n" else ";")
            elif ch in _PUNCT:
                self.i += 1
                yield _Token(ch, ch, line, ch)
            elif ch == '"':
                yield self._string()
            elif ch.isdigit() or (ch in "-." and self.i + 1 < n and (text[self.i + 1].isdigit() or text[self.i + 1] == ".")):
                yield self._number()
            elif _is_name_start(ch):
                start = self.i
                while self.i < n and _is_name_char(text[self.i]):
                    self.i += 1
                word = text[start : self.i]
                yield _Token(_NAME, word, line, word)
            else:
                raise self.error(line, f"unexpected character {ch!r}")

    def _number(self) -> _Token:
        text, n, start, line = self.text, len(self.text), self.i, self.line
        self.i += 1
        while self.i < n and (text[self.i].isalnum() or text[self.i] in "._µ"):
            self.i += 1
        word = text[start : self.i]
        if _INT_RE.fullmatch(word):
            return _Token(_INT, int(word), line, word)
        if _FLOAT_RE.fullmatch(word):
            return _Token(_FLOAT, float(word), line, word)
        if _DURATION_RE.fullmatch(word):
            return _Token(_DURATION, parse_duration(word), line, word)
        if _SIZE_RE.fullmatch(word):
            return _Token(_SIZE, parse_size(word), line, word)
        if word == "-":
            raise self.error(line, "unexpected character '-'")
        raise self.error(
            line,
            f"invalid number {word!r} (a duration needs units ns, us, ms, s, m, h or d, "
            "a size B, KB, MB, GB, TB or PB)",
        )

    def _string(self) -> _Token:
        text, n, line = self.text, len(self.text), self.line
        start = self.i
        self.i += 1
        out: list[str] = []
        while True:
            if self.i >= n or text[self.i] == "\n":
                raise self.error(line, "unterminated string (strings cannot span lines)")
            ch = text[self.i]
            if ch == '"':
                self.i += 1
                break
            if ch == "\\":
                if self.i + 1 >= n or text[self.i + 1] == "\n":
                    raise self.error(line, "unterminated string (strings cannot span lines)")
                esc = text[self.i + 1]
                if esc not in _ESCAPES:
                    raise self.error(line, f"unknown escape sequence \\{esc} in string")
                out.append(_ESCAPES[esc])
                self.i += 2
                continue
            if ch == "$" and text.startswith("${", self.i):
                end = text.find("}", self.i + 2)
                newline = text.find("\n", self.i + 2)
                quote = text.find('"', self.i + 2)
                if end < 0 or (0 <= newline < end) or (0 <= quote < end):
                    raise self.error(line, "unterminated ${ in string")
                out.append(self._expand(text[self.i + 2 : end], line))
                self.i = end + 1
                continue
            out.append(ch)
            self.i += 1
        return _Token(_STRING, "".join(out), line, text[start : self.i])

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


class _Parser:
    def __init__(
        self,
        text: str,
        name: str,
        base_dir: str,
        env: Mapping[str, str],
        stack: tuple[str, ...],
    ) -> None:
        self.name = name
        self.base_dir = base_dir
        self.env = env
        self.stack = stack
        self.toks = list(_Lexer(text, name, env).tokens())
        self.k = 0

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

    @staticmethod
    def ends_param(tok: _Token) -> bool:
        return tok.kind in (_NEWLINE, _EOF, "}")

    # grammar
    def parse_into(self, target: ConfigDict) -> None:
        """Top level: parameters and includes until end of file."""
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
                raise self.error(tok, f"expected a parameter name, got {tok.describe()}")

    def block(self) -> ConfigDict:
        open_tok = self.advance()  # "{"
        block = ConfigDict(self.pos(open_tok))
        while True:
            tok = self.peek()
            if tok.kind == _NEWLINE:
                self.advance()
            elif tok.kind == "}":
                self.advance()
                return block
            elif tok.kind == _EOF:
                raise self.error(open_tok, 'block opened here is never closed (missing "}")')
            elif tok.kind == _NAME and tok.value == "include":
                raise self.error(tok, "include is only allowed at the top level of a file")
            elif tok.kind == _NAME:
                self.param(block)
            else:
                raise self.error(tok, f"expected a parameter name, got {tok.describe()}")

    def param(self, target: ConfigDict) -> None:
        name_tok = self.advance()
        name = name_tok.value
        label: str | None = None
        tok = self.peek()
        if tok.kind == _NAME:
            if self.ends_param(self.peek(1)):
                self.advance()
                if tok.value in ("true", "false"):
                    self.set(target, name, None, tok.value == "true", name_tok)
                else:
                    # `provider github`: a label with no value is an empty block.
                    self.set(target, name, tok.value, ConfigDict(self.pos(tok)), name_tok)
                self.end_param(name)
                return
            label = self.advance().value
        elif self.ends_param(tok):
            raise self.error(name_tok, f'missing value for "{name}"')
        value = self.operand()
        self.set(target, name, label, value, name_tok)
        self.end_param(name)

    def end_param(self, name: str) -> None:
        tok = self.peek()
        if tok.kind == _NEWLINE:
            self.advance()
        elif tok.kind not in (_EOF, "}"):
            raise self.error(tok, f'unexpected {tok.describe()} after the value of "{name}" (one parameter per line)')

    def operand(self) -> Any:
        tok = self.peek()
        if tok.kind in _LITERALS:
            return self.advance().value
        if tok.kind == _NAME:
            if tok.value in ("true", "false"):
                self.advance()
                return tok.value == "true"
            raise self.error(tok, f"unexpected name {tok.value!r} where a value was expected (strings need double quotes)")
        if tok.kind == "{":
            return self.block()
        if tok.kind == "[":
            return self.array()
        raise self.error(tok, f"expected a value, got {tok.describe()}")

    def array(self) -> list[Any]:
        open_tok = self.advance()  # "["
        items: list[Any] = []
        while True:
            while self.peek().kind == _NEWLINE:
                self.advance()
            tok = self.peek()
            if tok.kind == "]":
                self.advance()
                return items
            if tok.kind == _EOF:
                raise self.error(open_tok, 'array opened here is never closed (missing "]")')
            items.append(self.operand())
            while self.peek().kind == _NEWLINE:
                self.advance()
            tok = self.peek()
            if tok.kind == ",":
                self.advance()
            elif tok.kind == _EOF:
                raise self.error(open_tok, 'array opened here is never closed (missing "]")')
            elif tok.kind != "]":
                raise self.error(tok, f'expected "," or "]" in array, got {tok.describe()}')

    def set(self, target: ConfigDict, name: str, label: str | None, value: Any, name_tok: _Token) -> None:
        pos = self.pos(name_tok)
        if label is None:
            if name in target.labelled:
                raise self.error(name_tok, f'"{name}" is written with a label at {target.positions[name]}, so it needs one here too')
            target[name] = value
            target.positions[name] = pos
            return
        group = target.get(name)
        if name not in target:
            group = ConfigDict(pos)
            target[name] = group
            target.positions[name] = pos
            target.labelled.add(name)
        elif name not in target.labelled:
            raise self.error(name_tok, f'"{name}" is written without a label at {target.positions[name]}, so it cannot take label "{label}"')
        group[label] = value
        group.positions[label] = pos

    def include(self, target: ConfigDict) -> None:
        inc_tok = self.advance()
        tok = self.peek()
        if tok.kind == _STRING:
            files = [self.advance().value]
        elif tok.kind == "[":
            items = self.array()
            if not all(isinstance(item, str) for item in items):
                raise self.error(tok, "include takes a string or an array of strings")
            files = items
        else:
            raise self.error(inc_tok, "include takes a string or an array of strings")
        self.end_param("include")
        for file in files:
            self.include_file(target, file, inc_tok)

    def include_file(self, target: ConfigDict, file: str, inc_tok: _Token) -> None:
        if not file:
            raise self.error(inc_tok, "include of an empty path")
        path = file if os.path.isabs(file) else os.path.join(self.base_dir, file)
        real = os.path.realpath(path)
        if real in self.stack:
            chain = " -> ".join([*self.stack[self.stack.index(real) :], real])
            raise self.error(inc_tok, f"include cycle: {chain}")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise self.error(inc_tok, f"cannot include {file!r}: {exc}") from None
        sub = _Parser(text, path, os.path.dirname(path), self.env, (*self.stack, real))
        sub.parse_into(target)


def _parse(text: str, name: str, base_dir: str, env: Mapping[str, str] | None, real: str | None) -> ConfigDict:
    stack = (real,) if real else ()
    result = ConfigDict(Pos(name, 1))
    _Parser(text, name, base_dir, os.environ if env is None else env, stack).parse_into(result)
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
    """Parse a config file, following its includes relative to its own directory."""
    name = os.fspath(path)
    try:
        text = Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read config file: {exc}") from None
    return _parse(text, name, os.path.dirname(name) or ".", env, os.path.realpath(name))
