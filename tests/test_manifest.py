import pytest

from djinn.errors import ManifestError
from djinn.manifest import Passthrough, Source, load_manifest, parse_manifest

GOOD = """
namespace: team/app@alice
driver:
  type: docker
  image: debian:stable
  workspace: /go/src/app
env:
  - PLAIN=value
  - WITH_EQUALS=a=b=c
  - WITH_SPACES=hello big world
objects:
  - config.json
  - certs/ca.pem => /etc/ssl/ca.pem
sources:
  - https://github.com/org/repo.git
  - https://github.com/org/other v1.2 => src/other
stages: [build, test]
allow_failures: [test]
jobs:
  - stage: build
    commands: [make]
    artifacts:
      - bin/app
      - bin/app.sha => checksum
  - stage: test
    name: unit tests
    commands: [make test]
"""


def problems(text):
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "m.yml")
    return info.value.problems


def test_parses_every_key():
    m = parse_manifest(GOOD)
    assert m.namespace == "team/app@alice"
    assert m.driver == {"type": "docker", "image": "debian:stable", "workspace": "/go/src/app"}
    assert m.env == (("PLAIN", "value"), ("WITH_EQUALS", "a=b=c"), ("WITH_SPACES", "hello big world"))
    assert m.objects == (Passthrough("config.json", "config.json"), Passthrough("certs/ca.pem", "/etc/ssl/ca.pem"))
    assert m.sources == (
        Source("https://github.com/org/repo.git", None, "repo"),
        Source("https://github.com/org/other", "v1.2", "src/other"),
    )
    assert m.stages == ("build", "test")
    assert m.allow_failures == ("test",)
    assert m.jobs[0].artifacts == (Passthrough("bin/app", "app"), Passthrough("bin/app.sha", "checksum"))
    assert m.jobs[1].name == "unit tests"
    assert m.text == GOOD


def test_ssh_addr_alias():
    m = parse_manifest("driver: {type: ssh, addr: '127.0.0.1:22'}\n")
    assert m.driver == {"type": "ssh", "address": "127.0.0.1:22"}


def test_unknown_driver_type_names_key_and_line():
    (p,) = problems("stages: [a]\ndriver:\n  type: podman\n")
    assert p == "line 3: driver.type: unknown driver type 'podman' (expected one of: docker, qemu, ssh, os)"


def test_missing_driver():
    (p,) = problems("stages: [a]\n")
    assert "driver: is required" in p


def test_missing_image_and_workspace():
    ps = problems("driver:\n  type: docker\n")
    assert any("driver.image: is required for the docker driver" in p for p in ps)
    assert any("driver.workspace: is required for the docker driver" in p for p in ps)
    (p,) = problems("driver:\n  type: qemu\n")
    assert "driver.image: is required for the qemu driver" in p
    (p,) = problems("driver:\n  type: ssh\n")
    assert "driver.address: is required for the ssh driver" in p


def test_qemu_arch():
    (p,) = problems("driver: {type: qemu, image: debian/12, arch: arm64}\n")
    assert "driver.arch: unsupported arch 'arm64'" in p


def test_job_stage_not_declared_is_rejected():
    (p,) = problems("driver: {type: os}\nstages: [build]\njobs:\n  - stage: deploy\n    commands: [x]\n")
    assert p == "line 4: jobs[0].stage: stage 'deploy' is not declared in stages"


def test_allow_failures_must_name_a_stage():
    (p,) = problems("driver: {type: os}\nstages: [build]\nallow_failures: [lint]\n")
    assert p == "line 3: allow_failures[0]: 'lint' names no stage in stages"


def test_duplicate_stage():
    (p,) = problems("driver: {type: os}\nstages:\n  - build\n  - build\n")
    assert p == "line 4: stages[1]: duplicate stage 'build'"


def test_job_without_commands():
    ps = problems("driver: {type: os}\nstages: [a]\njobs:\n  - stage: a\n  - stage: a\n    commands: []\n")
    assert len(ps) == 2
    assert all("commands: job has no commands" in p for p in ps)


def test_empty_side_of_arrow():
    ps = problems(
        "driver: {type: os}\nobjects: ['a =>']\nstages: [a]\njobs:\n  - stage: a\n    commands: [x]\n    artifacts: ['=> b']\n"
        "sources: ['https://x/y.git =>']\n"
    )
    assert len(ps) == 3
    assert all("has an empty side of '=>'" in p for p in ps)
    assert ps[0].startswith("line 2: objects[0]")


def test_non_string_values():
    ps = problems("driver: {type: os, cpus: 4}\nenv: [A=1, 5]\nstages: [a]\njobs:\n  - stage: a\n    commands: [true, 'ok']\n")
    assert "line 1: driver.cpus: must be a string, not a number (4)" in ps
    assert "line 2: env[1]: must be a string, not a number (5)" in ps
    assert "line 6: jobs[0].commands[0]: must be a string, not a boolean (true)" in ps


def test_env_must_be_key_value():
    (p,) = problems("driver: {type: os}\nenv: [NOVALUE]\n")
    assert "env[0]: 'NOVALUE' is not KEY=VALUE" in p


def test_unknown_top_level_key_is_a_warning_naming_key_and_line():
    """Upstream ignores keys it does not know (e.g. build_timeout): the build runs, the user is told."""
    m = parse_manifest("driver: {type: os}\nbuild_timeout: 10m\nstages: [a]\njobs: [{stage: a, commands: [x]}]\n")
    (warning,) = m.warnings
    assert warning.startswith("line 2: build_timeout: unknown key, ignored")
    assert m.stages == ("a",) and m.jobs[0].commands == ("x",)
    assert parse_manifest(GOOD).warnings == ()


def test_unknown_job_key_is_still_refused():
    (p,) = problems("driver: {type: os}\nstages: [a]\njobs: [{stage: a, comands: [x], commands: [y]}]\n")
    assert p.startswith("line 3: jobs[0].comands: unknown key")


def test_all_problems_reported_together():
    ps = problems("driver: {type: nope}\nstages: [a, a]\nallow_failures: [b]\n")
    assert len(ps) == 3


def test_yaml_syntax_error_has_line():
    (p,) = problems("driver:\n  type: os\njobs: [\n  - x\n")
    assert p.startswith("line ")
    assert "invalid YAML" in p


def test_error_message_names_file(tmp_path):
    path = tmp_path / ".djinn.yml"
    path.write_text("driver: {type: nope}\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert str(info.value).startswith(f"{path}: line 1: driver.type")


def test_missing_file():
    with pytest.raises(ManifestError) as info:
        load_manifest("/nonexistent/.djinn.yml")
    assert "no such file" in str(info.value)
