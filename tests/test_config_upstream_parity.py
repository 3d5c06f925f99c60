"""The config language accepts what upstream's (andrewpillar/config) accepts and refuses what it refuses.

Each row was checked against upstream's decoder (its scanner, parser and
decoder at the commit djinn-ci/djinn builds with): the same text is accepted
with the same values, or refused at the same line. Where upstream accepts a
text but silently reads something else than what is written, this worker
refuses it with the reason (third table), so no file means two things.
"""

from __future__ import annotations

import datetime

import pytest

from djinn.config import parse_text
from djinn.errors import ConfigError

td = datetime.timedelta

# text -> the values upstream decodes it to
UPSTREAM_ACCEPTS = [
    ("t 1h30m\nblk {\n t 500ms\n}\n", {"t": td(minutes=90), "blk": {"t": td(milliseconds=500)}}),
    ("t 1.5h\n", {"t": td(minutes=90)}),
    ("t 2562047h\n", {"t": td(hours=2562047)}),
    ("s 2TB\n", {"s": 2 << 40}),
    ("a 9223372036854775807\n", {"a": 9223372036854775807}),
    ('l [\n "a",\n "b",\n]\n', {"l": ["a", "b"]}),
    ("l []\n", {"l": []}),
    ("f 1.\nf2 -.5\n", {"f": 1.0, "f2": -0.5}),
    ('blk {\n a 1 # c\n\n b "x"\n}\n', {"blk": {"a": 1, "b": "x"}}),
    ("blk {\n a 1 # c\n}\n", {"blk": {"a": 1}}),
    ('a 1 # c\nb "x"\n', {"a": 1, "b": "x"}),
    ("blk {\n # c\n a 1\n}\n", {"blk": {"a": 1}}),
    ('a 1 b "x"\n', {"a": 1, "b": "x"}),
    ('blk { a 1; b "x" }\n', {"blk": {"a": 1, "b": "x"}}),
    ('b "x\\"y"\n', {"b": 'x"y'}),
    ("lab x\nlab y\n", {"lab": {"x": {}, "y": {}}}),
]

# text -> (line, start of this worker's message); upstream refuses each of them too
UPSTREAM_REJECTS = [
    ("a 1\nt 2d\n", 2, "invalid duration '2d': unit 'd' is not in upstream's config language"),
    ("a 1\nt 10ns\n", 2, "invalid duration '10ns': unit 'ns'"),
    ("a 1\nt 10us\n", 2, "invalid duration '10us': unit 'us'"),
    ("a 1\ns 1PB\n", 2, "invalid size '1PB': unit PB is not in upstream's config language"),
    ('l [\n "a"\n , "b"]\n', 2, 'line break before "," or "]" in an array'),
    ('l ["a",\n "b"\n]\n', 2, 'line break before "," or "]" in an array'),
    ("a 1\nblk-x {\n}\n", 2, 'names cannot contain "-"'),
    ("a² 1\n", 1, "unexpected character '²'"),
    ("f .5\n", 1, "unexpected character '.'"),
    ('blk {\n a 1 # c\n b "x"\n}\n', 3, 'expected a line break or "}" before name b (one parameter per line) (a # comment'),
    ("lab x # c\nlab y\n", 2, "unexpected name 'lab' where a value was expected"),
    ("a 1\nlab x", 2, '"lab x" needs a line break after it'),
    ("blk { lab x }\n", 1, '"lab x" needs a line break after it'),
    ('blk { a 1 b "x" }\n', 1, 'expected a line break or "}" before name b'),
    ('blk {\n a 1;;\n b "x"\n}\n', 2, 'expected a parameter name, got ";"'),
    ('b "x\0y"\n', 1, "NUL byte in a string"),
    ('a 1\n\fb "x"\n', 2, "unexpected character '\\x0c'"),
    ("a 1\nt 99999999999999999999h\n", 2, "duration 99999999999999999999h is out of range"),
    ("t 2562048h\n", 1, "duration 2562048h is out of range"),
    # Upstream never finishes reading this one (its comment loop waits for a line break).
    ("a 1 # c", 1, "the file ends inside a comment"),
]

# Upstream accepts these but reads something else than written: refused here, saying so.
UPSTREAM_MISREADS = [
    ("s 1.5MB\n", 1, "invalid size '1.5MB': sizes are whole numbers (upstream reads 1.5MB as 0)"),  # upstream: 0
    ('b "x\\ny"\n', 1, "escape \\n in a string: upstream's config language drops the backslash"),  # upstream: "xny"
    ("a 99999999999999999999\n", 1, "integer 99999999999999999999 is out of range"),  # upstream: clamps to int64 max
    ("s 9999999TB\n", 1, "size 9999999TB is out of range (at most 8388607TB)"),  # upstream: wraps negative
]


@pytest.mark.parametrize("text, expected", UPSTREAM_ACCEPTS, ids=[t for t, _ in UPSTREAM_ACCEPTS])
def test_what_upstream_accepts_is_accepted_with_the_same_values(text, expected):
    assert parse_text(text, "f.conf", env={}) == expected


@pytest.mark.parametrize("text, line, message", UPSTREAM_REJECTS + UPSTREAM_MISREADS)
def test_what_upstream_refuses_or_misreads_is_refused_at_its_line(text, line, message):
    with pytest.raises(ConfigError) as info:
        parse_text(text, "f.conf", env={})
    assert str(info.value).startswith(f"f.conf:{line}: {message}")
    assert "\n" not in str(info.value)
