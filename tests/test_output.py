"""The masker against what real shells print: bash and dash on this host, split at every byte.

busybox ash is covered through the docker driver (tests/test_docker_driver.py),
whose test image is busybox.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from djinn.drivers.environment import shell_exports
from djinn.runner.output import MASK, Masker

SHELLS = ["bash", "dash"]


def traced(shell: str, value: str, script: str = ': "$S"') -> bytes:
    """What `shell -x` writes for `script` run with S=value."""
    env = {"S": value, "PATH": os.environ.get("PATH", os.defpath)}
    return subprocess.run([shell, "-xc", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=True).stdout


def masked_in_pieces(masker_values, data: bytes, step: int) -> bytes:
    masker = Masker(masker_values)
    return b"".join(masker.feed(data[i:i + step]) for i in range(0, len(data), step)) + masker.flush()


# Values a shell quotes in every way it knows: quotes alone, in runs, at the ends; $, \, tab, newline,
# bytes bash writes as $'\001', and a multi-byte character.
HOSTILE = [
    "Pa55'w0rd",
    "'leading and trailing'",
    "two''quotes'''three",
    "dollar $HOME and `tick`",
    "back\\slash\ttab",
    "multi\nline\nvalue",
    "ctl\x01\x1b\x7fbytes",
    "caf\u00e9 cr\r",
    "#hash~tilde",
]

BASH_SCRIPT = ': "$S"; X="<$S>"; printf "%s|%q\\n" "$S" "$S"; echo "${S@Q}"'


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("value", HOSTILE)
def test_every_traced_form_is_masked_at_any_split(shell, value):
    script = BASH_SCRIPT if shell == "bash" else ': "$S"; X="<$S>"; printf "%s\\n" "$S"'
    out = traced(shell, value, script)
    whole = Masker([value]).mask(out)
    words = [w for w in value.replace("'", " ").split() if len(w) >= 3 and w.isalnum()]
    for word in words:
        assert word.encode() not in whole, (word, whole)
    for step in (1, 2, 3, 5, 64):
        assert masked_in_pieces([value], out, step) == whole


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), min_size=4, max_size=24))
def test_bash_and_dash_traces_of_any_value_are_masked_whole(value):
    """The traced word is exactly the mask, inside whatever quotes the shell put around it."""
    for shell in SHELLS:
        out = traced(shell, value)
        assert Masker([value]).mask(out) in (b"+ : " + MASK + b"\n", b"+ : '" + MASK + b"'\n", b"+ : $'" + MASK + b"'\n"), (
            shell,
            out,
        )


def test_output_without_a_secret_prefix_is_not_held_back():
    masker = Masker(["hunter2"])
    assert masker.feed(b"plain output\n") == b"plain output\n"
    assert masker.feed(b"ends with hun") == b"ends with "
    assert masker.feed(b"gry\n") == b"hungry\n"


def test_exports_quote_values_and_refuse_names_a_shell_cannot_set():
    exports, refused = shell_exports({"A": "it's $x", "B_2": "a\nb", "not-a-name": "v", "9X": "v"})
    assert refused == ["not-a-name", "9X"]
    out = subprocess.run(["dash", "-c", exports.decode() + 'printf "%s|%s" "$A" "$B_2"'], capture_output=True, check=True).stdout
    assert out == b"it's $x|a\nb"
