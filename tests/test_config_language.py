"""The config language: upstream's syntax, plain values out, FILE:LINE on every error."""

from __future__ import annotations

import datetime
import os

import pytest

from djinn.config import ConfigDict, Size, parse_duration, parse_file, parse_size, parse_text
from djinn.errors import ConfigError

td = datetime.timedelta


def error_of(text: str, name: str = "test.conf", **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        parse_text(text, name, **kwargs)
    return str(info.value)


# --- values ----------------------------------------------------------------


def test_scalars_of_every_type():
    values = parse_text(
        'name "djinn"\n'
        "count 42\n"
        "negative -7\n"
        "ratio 0.25\n"
        "on true\n"
        "off false\n"
    )
    assert values == {"name": "djinn", "count": 42, "negative": -7, "ratio": 0.25, "on": True, "off": False}
    assert type(values["count"]) is int
    assert values["on"] is True and values["off"] is False


def test_comments_full_line_and_inline_and_tabs():
    values = parse_text(
        "# a full-line comment\n"
        "\tparallelism\t4   # inline comment\n"
        "  \t# indented comment\n"
        'driver\t\t"docker"\t# another\n'
    )
    assert values == {"parallelism": 4, "driver": "docker"}


def test_hash_inside_string_is_not_a_comment():
    assert parse_text('password "p#ss # word" # real comment\n') == {"password": "p#ss # word"}


def test_the_only_string_escape_is_a_quote():
    assert parse_text(r'a "say \"hi\""' "\n") == {"a": 'say "hi"'}


@pytest.mark.parametrize("escape", ["\\\\", "\\n", "\\t", "\\$", "\\q"])
def test_other_escapes_are_errors_because_upstream_drops_the_backslash(escape):
    # Upstream reads "a\nb" as "anb" and "a\\b" as "ab": refused so no file means two things.
    message = error_of(f'a 1\nb "x{escape}y"\n')
    assert message.startswith(f"test.conf:2: escape {escape} in a string: upstream's config language drops the backslash")


def test_semicolon_separates_parameters():
    assert parse_text('a 1; b "two"') == {"a": 1, "b": "two"}


def test_crlf_line_endings():
    assert parse_text('a 1\r\nb {\r\n  c 2\r\n}\r\n') == {"a": 1, "b": {"c": 2}}


def test_utf8_labels_and_strings():
    values = parse_text('block 标签 {\n\tstrings ["细绳"]\n}\n')
    assert values == {"block": {"标签": {"strings": ["细绳"]}}}


# --- durations and sizes ---------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("30m", td(minutes=30)),
        ("1h30m", td(hours=1, minutes=30)),
        ("60s", td(seconds=60)),
        ("500ms", td(milliseconds=500)),
        ("1.5h", td(minutes=90)),
        ("1m30s", td(seconds=90)),
    ],
)
def test_duration_literals(text, expected):
    value = parse_text(f"timeout {text}")["timeout"]
    assert isinstance(value, datetime.timedelta)
    assert value == expected
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("1B", 1), ("1KB", 1024), ("2KB", 2048), ("50MB", 52428800), ("3MB", 3 * 1024**2), ("2GB", 2 * 1024**3), ("1TB", 1024**4)],
)
def test_size_literals_are_1024_based_bytes(text, expected):
    value = parse_text(f"limit {text}")["limit"]
    assert isinstance(value, Size) and isinstance(value, int)
    assert value == expected
    assert parse_size(text) == expected


def test_durations_and_sizes_in_arrays():
    values = parse_text("durations [1s, 2m, 3h]\nsizes [1B, 2KB, 3MB, 4GB, 5TB]\n")
    assert values["durations"] == [td(seconds=1), td(minutes=2), td(hours=3)]
    assert values["sizes"] == [1, 2048, 3145728, 4294967296, 5497558138880]


@pytest.mark.parametrize("bad", ["10x", "5M", "1.2.3", "3mb"])
def test_bad_number_literals_report_line(bad):
    message = error_of(f"a 1\n\nvalue {bad}\n")
    assert message.startswith("test.conf:3: invalid number")
    assert repr(bad) in message


def test_parse_duration_rejects_garbage():
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration("soon")
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration("30")
    assert parse_duration("0") == td(0)


# --- arrays ----------------------------------------------------------------


def test_arrays_inline_multiline_trailing_comma_nested_and_of_blocks():
    values = parse_text(
        'strings ["one", "two"]\n'
        "empty []\n"
        "multi [\n"
        "\t1,\n"
        "\t2,\n"
        "\n"
        "\t3,\n"
        "]\n"
        "nested [[1, 2], [3]]\n"
        "bools [true, false]\n"
        'blocks [{\n\tname "foo"\n}, {\n\tname "bar"\n}]\n'
    )
    assert values["strings"] == ["one", "two"]
    assert values["empty"] == []
    assert values["multi"] == [1, 2, 3]
    assert values["nested"] == [[1, 2], [3]]
    assert values["bools"] == [True, False]
    assert values["blocks"] == [{"name": "foo"}, {"name": "bar"}]


def test_array_missing_comma_is_an_error():
    assert error_of("a [1 2]\n") == 'test.conf:1: expected "," or "]" in array, got integer 2'


def test_unclosed_array_reports_where_it_opened():
    assert error_of('x 1\nlist [\n  "a",\n  "b",\n') == 'test.conf:2: array opened here is never closed (missing "]")'


# --- blocks and labels -----------------------------------------------------


def test_nested_blocks():
    values = parse_text(
        "database {\n"
        '\taddr "localhost:5432"\n'
        "\tssl {\n"
        '\t\tca "/ca.crt"\n'
        "\t\tinner {\n"
        "\t\t\tdeep true\n"
        "\t\t}\n"
        "\t}\n"
        "}\n"
    )
    assert values == {"database": {"addr": "localhost:5432", "ssl": {"ca": "/ca.crt", "inner": {"deep": True}}}}
    assert isinstance(values["database"], ConfigDict)


def test_one_line_block():
    assert parse_text('redis { addr "localhost:6379" }') == {"redis": {"addr": "localhost:6379"}}


def test_repeated_labels_group_under_the_name():
    values = parse_text(
        'provider github {\n\tendpoint "https://api.github.com"\n}\n'
        'provider gitlab {\n\tendpoint "https://gitlab.com/api/v4"\n}\n'
    )
    assert values == {
        "provider": {
            "github": {"endpoint": "https://api.github.com"},
            "gitlab": {"endpoint": "https://gitlab.com/api/v4"},
        }
    }
    assert values.labelled == {"provider"}


def test_empty_block_and_bare_label_are_both_empty_blocks():
    values = parse_text("provider github {}\nprovider gitlab\nprovider other { }\n")
    assert values == {"provider": {"github": {}, "gitlab": {}, "other": {}}}
    assert all(isinstance(v, dict) for v in values["provider"].values())


def test_bare_label_inside_block_needs_its_line_break():
    assert parse_text("outer {\n\tprovider github\n}\n") == {"outer": {"provider": {"github": {}}}}
    # Upstream reads a bare label only when the line ends after it.
    assert error_of("x { provider gitlab }\n").startswith('test.conf:1: "provider gitlab" needs a line break after it')
    assert error_of('a 1\nprovider github').startswith('test.conf:2: "provider github" needs a line break after it')


def test_label_with_literal_value():
    values = parse_text('log info "/var/log/djinn/worker.log"\nports open ["8080", "8443"]\nports close ["80"]\n')
    assert values == {"log": {"info": "/var/log/djinn/worker.log"}, "ports": {"open": ["8080", "8443"], "close": ["80"]}}


def test_name_followed_by_bool_is_a_value_not_a_label():
    assert parse_text("debug true\nquiet false\n") == {"debug": True, "quiet": False}


def test_names_cannot_contain_dashes_as_upstream():
    # Upstream scans qemu-x86_64 as qemu, -, x86_64 and fails to decode it.
    assert error_of("a 1\ndriver qemu-x86_64 {}\n").startswith('test.conf:2: names cannot contain "-"')


def test_repeated_key_last_value_wins():
    values = parse_text("timeout 10m\ntimeout 20m\nstore a { path \"x\" }\nstore a { path \"y\" }\n")
    assert values["timeout"] == td(minutes=20)
    assert values["store"] == {"a": {"path": "y"}}
    assert values.line("timeout") == 2


def test_mixing_labelled_and_unlabelled_is_an_error():
    assert error_of('log "x"\nlog info "y"\n') == (
        'test.conf:2: "log" is written without a label at test.conf:1, so it cannot take label "info"'
    )


def test_positions_are_remembered_for_keys_and_labels():
    values = parse_text('\n\npidfile "/run/x.pid"\n\nstore artifacts {\n\tpath "/a"\n\n\tlimit 1KB\n}\nstore objects\n', "w.conf")
    assert values.line("pidfile") == 3
    assert str(values.position("pidfile")) == "w.conf:3"
    assert values.line("store") == 5
    store = values["store"]
    assert store.line("artifacts") == 5
    assert store.line("objects") == 10
    assert store["artifacts"].line("path") == 6
    assert store["artifacts"].line("limit") == 8


# --- syntax errors: exact FILE:LINE ----------------------------------------


def test_unterminated_string():
    assert error_of('a 1\nb "never closed\nc 2\n') == "test.conf:2: unterminated string (strings cannot span lines)"


def test_unclosed_block_reports_the_opening_line():
    assert error_of('a 1\n\ndatabase {\n\taddr "x"\n') == 'test.conf:3: block opened here is never closed (missing "}")'


def test_stray_closing_brace():
    assert error_of("a 1\n}\n") == 'test.conf:2: unexpected "}" with no open block'


def test_missing_value():
    assert error_of("a 1\ntimeout\n") == 'test.conf:2: missing value for "timeout"'


def test_unquoted_string_value():
    # A second name is a label; a third one cannot be a value.
    assert parse_text('driver docker "x"') == {"driver": {"docker": "x"}}
    message = error_of("a 1\nlog info debug\n")
    assert message == "test.conf:2: unexpected name 'debug' where a value was expected (strings need double quotes)"


def test_two_values_on_one_line():
    assert error_of("a 1\nb 2 3\n") == "test.conf:2: expected a parameter name, got integer 3"
    assert error_of("a {\n b 2 c 3\n}\n") == 'test.conf:2: expected a line break or "}" before name c (one parameter per line)'
    # At the top level upstream needs no separator between parameters.
    assert parse_text('a 1 b "two"\n') == {"a": 1, "b": "two"}


def test_unexpected_character():
    assert error_of("a 1\nb = 2\n") == "test.conf:2: unexpected character '='"


def test_value_in_key_position():
    assert error_of('a 1\n  "orphan"\n') == 'test.conf:2: expected a parameter name, got string "orphan"'


def test_error_line_counts_comments_and_blank_lines():
    text = "# one\n\n# three\nblock {\n\t# five\n\n\tok 1\n\tbad @\n}\n"
    assert error_of(text) == "test.conf:8: unexpected character '@'"


def test_default_name_for_parse_text():
    with pytest.raises(ConfigError, match=r"^<string>:1: "):
        parse_text("a [")


def test_error_has_file_and_line_attributes():
    with pytest.raises(ConfigError) as info:
        parse_text("a 1\nb {\n", "x.conf")
    assert info.value.file == "x.conf"
    assert info.value.line == 2


# --- environment variables -------------------------------------------------


def test_env_expansion_in_strings():
    env = {"DB_USER": "djinn", "DB_PASSWORD": "s3cret", "HOST": "db"}
    values = parse_text(
        'username "${DB_USER}"\npassword "${env:DB_PASSWORD}"\naddr "${HOST}:5432"\nplain "$HOST and $"\n',
        env=env,
    )
    assert values == {"username": "djinn", "password": "s3cret", "addr": "db:5432", "plain": "$HOST and $"}


def test_unset_env_var_expands_to_empty_string():
    assert parse_text('password "x${DJINN_TEST_SURELY_UNSET}y"', env={}) == {"password": "xy"}


def test_env_expansion_uses_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("DJINN_TEST_CONFIG_VAR", "from-env")
    assert parse_text('a "${DJINN_TEST_CONFIG_VAR}"') == {"a": "from-env"}


def test_env_expansion_in_nested_blocks_and_arrays():
    values = parse_text('db {\n\tpassword "${P}"\n\tlist ["${P}", "x"]\n}\n', env={"P": "pw"})
    assert values == {"db": {"password": "pw", "list": ["pw", "x"]}}


def test_bad_env_references():
    assert error_of('a 1\nb "${vault:/secret}"\n', env={}).startswith("test.conf:2: unknown expansion ${vault:/secret}")
    assert error_of('b "${NOT CLOSED"\n', env={}) == "test.conf:1: unterminated ${ in string"
    assert error_of('b "${}"\n', env={}) == "test.conf:1: invalid variable reference ${}"


# --- includes --------------------------------------------------------------


def test_include_single_file_relative_to_including_file(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    (conf / "parts").mkdir(parents=True)
    (conf / "parts" / "smtp.conf").write_text('smtp {\n\taddr "smtp.example.com:587"\n}\n')
    (conf / "worker.conf").write_text('driver "docker"\ninclude "parts/smtp.conf"\nparallelism 2\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative includes must not depend on the cwd
    values = parse_file(conf / "worker.conf")
    assert values == {"driver": "docker", "smtp": {"addr": "smtp.example.com:587"}, "parallelism": 2}
    assert values.position("smtp").file == os.path.join(str(conf), "parts/smtp.conf")
    assert values.line("smtp") == 1
    assert values.line("parallelism") == 3


def test_include_array_of_files_in_order(tmp_path):
    (tmp_path / "a.conf").write_text("x 1\ny 1\n")
    (tmp_path / "b.conf").write_text("y 2\nprovider gitlab\n")
    (tmp_path / "main.conf").write_text('include [\n\t"a.conf",\n\t"b.conf",\n]\nprovider github {}\n')
    values = parse_file(tmp_path / "main.conf")
    assert values == {"x": 1, "y": 2, "provider": {"gitlab": {}, "github": {}}}


def test_include_absolute_path_and_nested_include(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "leaf.conf").write_text('leaf "yes"\n')
    (sub / "mid.conf").write_text('include "leaf.conf"\nmid 1\n')  # relative to sub/
    (tmp_path / "top.conf").write_text(f'include "{sub / "mid.conf"}"\n')
    assert parse_file(tmp_path / "top.conf") == {"leaf": "yes", "mid": 1}


def test_include_paths_are_not_expanded_as_upstream(tmp_path):
    (tmp_path / "extra.conf").write_text("extra true\n")
    message = error_of('a 1\ninclude "${DIR}/extra.conf"\n', env={"DIR": str(tmp_path)})
    assert message.startswith('test.conf:2: include "${DIR}/extra.conf": upstream does not expand ${...}')


def test_parse_text_includes_relative_to_base_dir(tmp_path):
    (tmp_path / "inc.conf").write_text("a 1\n")
    assert parse_text('include "inc.conf"', base_dir=tmp_path) == {"a": 1}


def test_include_cycle_is_rejected(tmp_path):
    (tmp_path / "a.conf").write_text('x 1\ninclude "b.conf"\n')
    (tmp_path / "b.conf").write_text('\n\ninclude "a.conf"\n')
    with pytest.raises(ConfigError) as info:
        parse_file(tmp_path / "a.conf")
    assert str(info.value) == f"{tmp_path / 'b.conf'}:3: cannot include 'a.conf': it is the file being read (upstream refuses a file included twice)"


def test_self_include_is_rejected(tmp_path):
    (tmp_path / "self.conf").write_text('include "self.conf"\n')
    with pytest.raises(ConfigError, match=r"self\.conf:1: cannot include 'self.conf': it is the file being read"):
        parse_file(tmp_path / "self.conf")


def test_same_file_included_twice_is_an_error_as_upstream(tmp_path):
    (tmp_path / "common.conf").write_text("common 1\n")
    (tmp_path / "a.conf").write_text('\ninclude "common.conf"\n')
    (tmp_path / "main.conf").write_text('include ["common.conf", "a.conf"]\n')
    with pytest.raises(ConfigError) as info:
        parse_file(tmp_path / "main.conf")
    assert str(info.value) == (
        f"{tmp_path / 'a.conf'}:2: cannot include 'common.conf': it is already included at "
        f"{tmp_path / 'main.conf'}:1 (upstream refuses a file included twice)"
    )


def test_missing_include_names_the_including_line(tmp_path):
    (tmp_path / "main.conf").write_text('a 1\ninclude "nope.conf"\n')
    with pytest.raises(ConfigError) as info:
        parse_file(tmp_path / "main.conf")
    assert str(info.value).startswith(f"{tmp_path / 'main.conf'}:2: cannot include 'nope.conf': ")


def test_syntax_error_in_included_file_names_that_file(tmp_path):
    (tmp_path / "bad.conf").write_text("ok 1\n\nbroken {\n")
    (tmp_path / "main.conf").write_text('include "bad.conf"\n')
    with pytest.raises(ConfigError) as info:
        parse_file(tmp_path / "main.conf")
    assert str(info.value) == f'{tmp_path / "bad.conf"}:3: block opened here is never closed (missing "}}")'


def test_include_inside_block_and_bad_include_values():
    assert error_of('db {\n\tinclude "x.conf"\n}\n') == "test.conf:2: include is only allowed at the top level of a file"
    assert error_of("include 5\n") == "test.conf:1: include takes a string or an array of strings"
    assert error_of('include ["a", 1]\n') == "test.conf:1: include takes a string or an array of strings"


def test_parse_file_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.conf: cannot read config file"):
        parse_file(tmp_path / "missing.conf")


def test_upstream_dist_worker_conf_parses():
    text = """

pidfile "/var/run/djinn/worker.pid"

log info "/var/log/djinn/worker.log"

# Set to 0 to use the number of CPU cores available.
parallelism 0

driver "qemu-x86_64"

timeout "30m"

provider github
provider gitlab

crypto {
\tblock "1a2b3c4d5e6f7g8h"
\tsalt "1a2b3c4d5e6f7g8h"
}

database {
\taddr "localhost:5432"
\tname "djinn"

\tusername "djinn_worker"
\tpassword "secret"
#\tssl {
#\t\tca   "/var/lib/ssl/ca.crt"
#\t}
}

store artifacts {
\ttype  "file"
\tpath  "/var/lib/djinn/artifacts"
\tlimit 52428800
}
"""
    values = parse_text(text, "worker.conf")
    assert values["provider"] == {"github": {}, "gitlab": {}}
    assert values["log"] == {"info": "/var/log/djinn/worker.log"}
    assert values["store"]["artifacts"]["limit"] == 52428800
    assert values.line("database") == 22
