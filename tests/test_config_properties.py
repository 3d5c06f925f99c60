"""Property tests: whatever the input, the config language, the settings decoders and both
commands' argument handling fail only with the project's error (one line, exit 2), never a traceback.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djinn.cli import offline, worker
from djinn.config import decode_driver, decode_worker, parse_text
from djinn.errors import ConfigError

PROPERTY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
CLI_PROPERTY = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Pieces of the language, so random text reaches past the first token.
TOKENS = [
    "driver", "pidfile", "log", "info", "debug", "parallelism", "timeout", "orphan_timeout", "provider", "github",
    "crypto", "block", "salt", "database", "ssl", "tls", "ca", "addr", "redis", "smtp", "admin", "store",
    "artifacts", "objects", "images", "limit", "path", "type", "metrics", "host", "docker", "qemu", "ssh", "os",
    "cpus", "memory", "disks", "accel", "user", "include", "true", "false",
    '"os"', '"docker"', '"file"', '"x"', '""', '"${HOME}"', '"${env:X}"', '"a\\"b"', '"0123456789abcdef"',
    "0", "1", "-1", "3", "1.5", "30m", "1h30m", "500ms", "2d", "50MB", "1.5MB", "7PB", "9" * 30, "9" * 5000,
    "99999999999999999999h", "{", "}", "[", "]", ",", ";", "\n", " ", "\t", "# c\n", "#", "-", ".", "\\",
]
config_text = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(TOKENS), max_size=60).map(" ".join),
    st.lists(st.sampled_from(TOKENS), max_size=60).map("".join),
    st.integers(min_value=1, max_value=20000).map(lambda n: "a " + "{" * n + "}" * n + "\n"),
    st.integers(min_value=1, max_value=20000).map(lambda n: "a " + "[" * n + "]" * n + "\n"),
)


def one_line_config_error(call) -> None:
    try:
        call()
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc).strip("\n"), repr(str(exc))


@PROPERTY
@given(config_text)
def test_any_text_parses_or_raises_config_error(tmp_path, text):
    one_line_config_error(lambda: parse_text(text, "p.conf", base_dir=tmp_path, env={"HOME": "/h"}))


@PROPERTY
@given(config_text)
def test_any_parsed_config_decodes_or_raises_config_error(tmp_path, text):
    def decode() -> None:
        values = parse_text('driver "os"\n' + text + "\n", "p.conf", base_dir=tmp_path, env={})
        decode_worker(values)
        decode_driver(values)

    one_line_config_error(decode)


def test_ten_thousand_nested_blocks_are_one_line_not_a_recursion_error():
    with pytest.raises(ConfigError) as info:
        parse_text("a " + "{ b " * 10000 + "}" * 10000 + "\n", "deep.conf")
    assert str(info.value) == "deep.conf:1: blocks and arrays are nested more than 64 deep"


values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=20,
)


@PROPERTY
@given(st.dictionaries(st.sampled_from(TOKENS[:40]) | st.text(max_size=8), values, max_size=8))
def test_any_plain_mapping_decodes_or_raises_config_error(mapping):
    one_line_config_error(lambda: decode_worker({"driver": "os", **mapping}, "inline"))
    one_line_config_error(lambda: decode_driver(mapping, "inline"))


FLAGS = [
    "-config", "--config", "-driver", "-check", "-manifest", "-objects", "-artifacts", "-stage", "-timeout",
    "-env", "-secret", "-key", "-user", "-email", "-json", "-f", "--", "-", "migrate", "submit", "status",
    "logs", "kill", "K=V", "KEY", "1", "0", "-1", "9" * 5000, "30m", "9999999999999d", "99999999999999999999h",
    "missing.conf", ".djinn.yml", "-bogus", "\udcff", "x=\udcff",
]
argv_lists = st.lists(st.sampled_from(FLAGS) | st.text(max_size=12), max_size=8)


def run_main(main, argv) -> int:
    """`main(argv)`'s exit status, with argparse's SystemExit as the status it carries."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
    assert "Traceback" not in err.getvalue()
    return code


@CLI_PROPERTY
@given(argv_lists)
def test_djinn_worker_arguments_end_in_a_status_not_a_traceback(tmp_path, monkeypatch, argv):
    # No config file in the working directory: every command stops at the config, before any service.
    monkeypatch.chdir(tmp_path)
    assert run_main(worker.main, argv) in (0, 2)


@CLI_PROPERTY
@given(argv_lists)
def test_djinn_arguments_end_in_a_status_not_a_traceback(tmp_path, monkeypatch, argv):
    # No manifest in the working directory: nothing is ever run.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert run_main(offline.main, argv) in (0, 2)
