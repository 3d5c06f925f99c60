"""The manifest parser on hostile and careless input: one clear ManifestError, never a traceback.

Both `djinn` and `djinn-worker submit` call the parser; they print the error's
lines and exit 2, so every problem here must surface as ManifestError.
"""

from __future__ import annotations

import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from djinn.errors import ManifestError
from djinn.manifest import MAX_JOB_SLUG, Manifest, load_manifest, manifest_from_nodes, parse_manifest
from djinn.plan import plan_build


@pytest.fixture(params=["libyaml", "python"])
def loader(request, monkeypatch):
    """Both YAML parsers the manifest may be read with (libyaml is used when installed)."""
    if request.param == "python":
        monkeypatch.setattr("djinn.manifest._LOADER", yaml.SafeLoader)
    return request.param


def problems(text) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "m.yml")
    return info.value.problems


def test_yaml_nested_ten_thousand_deep_is_an_error_not_a_recursion_error(loader):
    for text in ("[" * 10_000 + "]" * 10_000, "".join(" " * i + "a:\n" for i in range(10_000)), "- " * 10_000 + "x\n"):
        (p,) = problems(text)
        assert "nest" in p, p


def test_non_utf8_manifest_names_line_and_byte(tmp_path):
    path = tmp_path / ".djinn.yml"
    path.write_bytes(b"driver: {type: os}\nstages: [caf\xe9]\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value) == f"{path}: line 2: the manifest is not UTF-8 text (byte 0xe9 at offset 31)"
    (p,) = problems(b"\xff\xfe")
    assert "not UTF-8" in p


def test_lone_surrogate_escape_in_a_command_is_refused_at_validation(loader):
    (p,) = problems('driver: {type: os}\nstages: [a]\njobs:\n  - stage: a\n    commands: ["echo \\ud800"]\n')
    # libyaml refuses the escape itself; the pure Python parser accepts it and validation refuses it.
    assert p == {
        "libyaml": "line 5: invalid YAML: found invalid Unicode character escape code",
        "python": "line 5: jobs[0].commands[0]: contains \\ud800, a lone surrogate that is not a character; remove it",
    }[loader]
    (p,) = problems('driver: {type: os}\nenv: ["A=\\0"]\n')
    assert p == "line 2: env[0]: contains a NUL byte; remove it"
    (p,) = problems("driver: {type: os}\nstages: [\ud800]\n")  # a str the caller built, not read from a file
    assert "\\ud800" in p


def test_job_names_that_cannot_name_a_file_are_refused_naming_the_line():
    long = "x" * 300
    ps = problems(
        "driver: {type: os}\n"
        f"stages: [a, {'s' * 300}]\n"
        "jobs:\n"
        f"  - {{stage: a, name: {long}, commands: [x]}}\n"
        "  - {stage: a, name: '///', commands: [x]}\n"
        "  - {stage: a, name: '..', commands: [x]}\n"
        f"  - {{stage: {'s' * 300}, commands: [x]}}\n"
        f"  - {{stage: a, name: '{'y' * MAX_JOB_SLUG}', commands: [x]}}\n"
    )
    assert ps == [
        f"line 4: jobs[0].name: job name '{long}' is 300 characters as a job name; at most {MAX_JOB_SLUG} fit a file name",
        "line 5: jobs[1].name: job name '///' has no letters or digits to name the job by; use another name",
        "line 6: jobs[2].name: job name '..' has no letters or digits to name the job by; use another name",
        f"line 7: jobs[3].stage: the job's default name '{'s' * 300}.1' is 302 characters as a job name; "
        f"at most {MAX_JOB_SLUG} fit a file name",
    ]


def _many_stages(n: int) -> str:
    stages = "\n".join(f"  - s{i}" for i in range(n))
    failures = "\n".join(f"  - s{i}" for i in range(0, n, 2))
    jobs = "\n".join(f"  - {{stage: s{i}, commands: [x]}}" for i in range(n))
    return f"driver: {{type: os}}\nstages:\n{stages}\nallow_failures:\n{failures}\njobs:\n{jobs}\n"


def _cpu_seconds(text: str) -> float:
    """Validating and planning only (the YAML parser is libyaml's), best of three, in CPU time of this process."""
    root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        plan_build(manifest_from_nodes(root, text))
        best = min(best, time.process_time() - start)
    return best


def test_validation_and_planning_scale_linearly_with_the_number_of_stages():
    """10x the stages costs about 10x (7.5x measured); the quadratic checks cost 100x (98x measured): 30x is the bar."""
    small, big = _cpu_seconds(_many_stages(1_000)), _cpu_seconds(_many_stages(10_000))
    assert big < 30 * small, (small, big)


# --- any input: parses, or raises ManifestError ------------------------------


def _outcome(data) -> None:
    try:
        m = parse_manifest(data, "m.yml")
    except ManifestError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
        return
    assert isinstance(m, Manifest)
    plan_build(m)  # what parses also plans


yaml_ish = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20,
)
keys = st.sampled_from(["driver", "env", "objects", "sources", "stages", "allow_failures", "jobs", "namespace", "other"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_any_text_parses_or_is_a_manifest_error(text):
    _outcome(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_are_a_manifest_error(data):
    _outcome(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, yaml_ish, max_size=6), st.sampled_from(["docker", "os", "ssh", "qemu", "x"]))
def test_any_manifest_shaped_structure_parses_or_is_a_manifest_error(top, kind):
    import json

    top.setdefault("driver", {"type": kind, "image": "i", "workspace": "/w", "address": "h:1"})
    # JSON is YAML: a structure with any strings (quotes, escapes, surrogates) in any place.
    _outcome(json.dumps(top, ensure_ascii=True))
    _outcome(json.dumps(top, ensure_ascii=False))
