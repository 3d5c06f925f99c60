"""Failure mail, commit statuses and webhooks (issue 6) against real receivers and real worker processes.

SMTP is aiosmtpd on loopback (notify_support), GitHub/GitLab/webhook receivers a
recording HTTP server; builds run in real `djinn-worker` processes on the
tests' PostgreSQL and Redis.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import smtplib
import ssl
import time

import pytest
from notify_support import (
    add_collaborator,
    add_namespace,
    add_user,
    cipher,
    insert,
    submit_build,
)
from ops_support import wait_job_running
from waiting import wait_for

from djinn.config import SMTPSettings
from djinn.notify import mail
from djinn.notify.common import DEFAULT_HOST

FAILING = """
namespace: team/app
driver: {type: os}
stages: [build, never]
jobs:
  - stage: build
    commands:
      - for i in $(seq 1 30); do echo "line $i"; done
      - echo "token is $TOKEN"
      - printf 'nul:\\0:end\\n'
      - exit 3
  - stage: never
    commands: ["echo never runs"]
"""

SLEEPY = """
namespace: team/app
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands: ['for i in $(seq 1 20); do echo "line $i"; done', "echo token $TOKEN", "sleep 60"]
"""

PASSING = """
namespace: team/app
driver: {type: os}
stages: [a]
jobs:
  - stage: a
    commands: ["echo all good"]
"""

SECRET = "tok-s3cret-value"


def team(env) -> dict[str, int]:
    """alice owns team/app; bob (with an address) and carol (without) collaborate on it."""
    ids = {"alice": add_user(env, "alice", "alice@team.test")}
    ids["ns"] = add_namespace(env, ids["alice"], "team/app")
    ids["bob"] = add_user(env, "bob", "bob@team.test")
    ids["carol"] = add_user(env, "carol", None)
    add_collaborator(env, ids["ns"], ids["bob"])
    add_collaborator(env, ids["ns"], ids["carol"])
    return ids


def submit(env, manifest: str, *extra: str) -> int:
    return env.submit(manifest, "-user", "alice", "-email", "alice@team.test", "-secret", f"TOKEN={SECRET}",
                      "-comment", "Fix the frobnicator\n\nIt was frobbing.", *extra)


def mail_row(env, build_id: int):
    rows = env.sql("SELECT state, attempts, error FROM build_notifications WHERE build_id = :id AND kind = 'mail'", id=build_id)
    return rows[0] if rows else None


def wait_mail_state(env, build_id: int, state: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = mail_row(env, build_id)
        if row is not None and row[0] == state:
            return row
        time.sleep(0.2)
    raise AssertionError(f"mail row of build {build_id}: {mail_row(env, build_id)}; log:\n{env.log_tail()}")


def check_failure_mail(env, received, build_id: int, status: str, *, number: int = 1, host: str = DEFAULT_HOST) -> None:
    """Subject, From, recipients, link, trigger and the masked 15-line tail of SPEC section 6."""
    msg = received.message
    assert msg["Subject"] == f"Djinn CI - Build #{number} {status}"
    assert msg["From"] == "djinn@ci.test"
    assert received.mail_from == "djinn@ci.test"
    assert received.rcpt_tos == ["alice@team.test", "bob@team.test"]
    assert msg["To"] == "alice@team.test, bob@team.test"
    assert msg["Message-ID"] == f"<djinn-build-{build_id}-{status}@ci.test>"

    (output,) = env.sql("SELECT output FROM builds WHERE id = :id", id=build_id)[0]
    expected_tail = "\n".join(output.splitlines()[-15:])
    assert received.body == (
        f"Build: {host}/b/alice/{number}\n"
        "\n-----\n"
        "Submitted by alice\n\nFix the frobnicator\n\nIt was frobbing.\n"
        "-----\n\n"
        f"{expected_tail}\n"
    )
    assert len(expected_tail.splitlines()) == min(15, len(output.splitlines()))
    assert SECRET not in received.body


def test_failed_build_mails_owner_and_collaborators_once(worker_env, smtp_servers):
    smtp = smtp_servers()
    team(worker_env)
    worker_env.write_config(extra=smtp.config() + '\nhost "https://ci.example.test/"\n')
    worker_env.start_worker()
    build_id = submit(worker_env, FAILING)
    assert worker_env.wait_status(build_id)["status"] == "failed"

    (received,) = smtp.wait(1)
    check_failure_mail(worker_env, received, build_id, "failed", host="https://ci.example.test")
    assert len(received.body.split("-----\n\n", 1)[1].splitlines()) == 15
    body = received.body
    assert "token is xxxxxx" in body
    assert "nul:NUL:end" in body and "\0" not in body
    assert "line 30" in body and "+ exit 3" in body
    assert "line 1\n" not in body  # only the last 15 lines
    assert wait_mail_state(worker_env, build_id, "sent")[1] == 1
    # The killed worker's build message stays unacknowledged: wait on the mail tasks alone.
    wait_for(lambda: worker_env.broker_idle("djinn.send_failure_mail"), 30, "every mail task to be over")
    assert len(smtp.messages) == 1


@pytest.mark.parametrize("outcome", ["killed", "timed_out"])
def test_killed_and_timed_out_builds_mail_once(worker_env, smtp_servers, outcome):
    smtp = smtp_servers()
    team(worker_env)
    worker_env.write_config(extra=smtp.config(), timeout="3s" if outcome == "timed_out" else "5m")
    worker_env.start_worker()
    build_id = submit(worker_env, SLEEPY)
    if outcome == "killed":
        wait_job_running(worker_env, build_id)
        worker_env.cli("kill", str(build_id))
    assert worker_env.wait_status(build_id, timeout=30)["status"] == outcome

    (received,) = smtp.wait(1)
    check_failure_mail(worker_env, received, build_id, outcome)
    assert len(received.body.split("-----\n\n", 1)[1].splitlines()) == 15
    assert "token xxxxxx" in received.body
    wait_mail_state(worker_env, build_id, "sent")
    # The killed worker's build message stays unacknowledged: wait on the mail tasks alone.
    wait_for(lambda: worker_env.broker_idle("djinn.send_failure_mail"), 30, "every mail task to be over")
    assert len(smtp.messages) == 1


def test_passing_build_sends_no_mail(worker_env, smtp_servers):
    smtp = smtp_servers()
    team(worker_env)
    worker_env.write_config(extra=smtp.config())
    worker_env.start_worker()
    build_id = submit(worker_env, PASSING)
    assert worker_env.wait_status(build_id)["status"] == "passed"
    # A failing build after it is mailed: by then the passing one would have been too.
    failing = submit(worker_env, FAILING)
    assert worker_env.wait_status(failing)["status"] == "failed"
    (received,) = smtp.wait(1)
    assert received.message["Subject"] == "Djinn CI - Build #2 failed"
    # The killed worker's build message stays unacknowledged: wait on the mail tasks alone.
    wait_for(lambda: worker_env.broker_idle("djinn.send_failure_mail"), 30, "every mail task to be over")
    assert len(smtp.messages) == 1
    assert mail_row(worker_env, build_id) is None


# How long the SMTP server stays away (a parameter: longer runs see the backoff reach its cap).
SMTP_DOWN_SECONDS = float(os.environ.get("DJINN_TEST_SMTP_DOWN_SECONDS", "20"))


def test_mail_arrives_once_when_smtp_comes_up_later(worker_env, smtp_servers):
    smtp = smtp_servers(start=False)  # nothing listens on its port yet
    team(worker_env)
    worker_env.write_config(extra=smtp.config())
    worker_env.start_worker()
    build_id = submit(worker_env, FAILING)
    assert worker_env.wait_status(build_id)["status"] == "failed"
    down_since = time.monotonic()
    # The mail is composed when it is sent, and masks secrets itself: a value that
    # reached the stored output (an old row, a bug) is still hidden.
    worker_env.sql("UPDATE builds SET output = output || :extra WHERE id = :id", extra=f"leaked {SECRET} here\n", id=build_id)

    _, _, error = wait_for(lambda: _retried(worker_env, build_id, 2), 30, "a second failed attempt")
    assert "Connection refused" in error

    time.sleep(max(0.0, SMTP_DOWN_SECONDS - (time.monotonic() - down_since)))  # the outage itself
    smtp.start()
    up_at = time.monotonic()
    (received,) = smtp.wait(1, timeout=60)
    print(f"mail arrived {received.at - up_at:.1f}s after the SMTP server came up")
    assert received.message["Subject"] == "Djinn CI - Build #1 failed"
    assert received.body.endswith("leaked xxxxxx here\n")
    assert SECRET not in received.body
    state, attempts, _ = wait_mail_state(worker_env, build_id, "sent")
    assert attempts >= 4
    wait_for(worker_env.broker_idle, 30, "every mail task and retry to be over")  # a second copy would come from one
    assert len(smtp.messages) == 1


def _retried(env, build_id: int, attempts: int):
    """The row once `attempts` sends have failed: attempts counts at the claim, so `sending` is one still trying."""
    row = mail_row(env, build_id)
    return row if row is not None and row[0] == "pending" and row[1] >= attempts else None


def test_worker_mails_over_starttls_with_auth(worker_env, smtp_servers, certs):
    smtp = smtp_servers(tls="starttls", certs=certs, users={"djinn-bot": "hunter2"})
    team(worker_env)
    worker_env.write_config(extra=smtp.config(ca=certs.ca, username="djinn-bot", password="hunter2"))
    worker_env.start_worker()
    build_id = submit(worker_env, FAILING)
    assert worker_env.wait_status(build_id)["status"] == "failed"
    (received,) = smtp.wait(1)
    assert received.tls and received.login == "djinn-bot" and received.mechanism == "PLAIN"
    check_failure_mail(worker_env, received, build_id, "failed")


# -- SMTP settings, straight against the server ------------------------------------------


def _send(settings: SMTPSettings, **connect) -> None:
    msg = mail.message(settings, ["x@team.test"], "Djinn CI - Build #9 failed", "body\n")
    client = mail.connect(settings, **connect)
    try:
        client.send_message(msg, from_addr=settings.admin, to_addrs=["x@team.test"])
    finally:
        client.quit()


def test_smtp_login_mechanism_when_plain_is_not_offered(smtp_servers, certs):
    smtp = smtp_servers(tls="starttls", certs=certs, users={"bot": "pw"}, exclude_auth=("PLAIN",))
    _send(SMTPSettings(addr=smtp.addr, admin="djinn@ci.test", ca=str(certs.ca), username="bot", password="pw"))
    (received,) = smtp.wait(1, timeout=10)
    assert (received.tls, received.login, received.mechanism) == (True, "bot", "LOGIN")


def test_smtp_implicit_tls(smtp_servers, certs):
    smtp = smtp_servers(tls="implicit", certs=certs, users={"bot": "pw"})
    _send(SMTPSettings(addr=smtp.addr, admin="djinn@ci.test", ca=str(certs.ca), username="bot", password="pw"), implicit_tls=True)
    (received,) = smtp.wait(1, timeout=10)
    assert (received.tls, received.login, received.mechanism) == (True, "bot", "PLAIN")


def test_smtp_with_ca_never_falls_back_to_plain_text(smtp_servers, certs, tmp_path):
    plain = smtp_servers()
    with pytest.raises(smtplib.SMTPNotSupportedError, match="does not offer STARTTLS"):
        _send(SMTPSettings(addr=plain.addr, admin="djinn@ci.test", ca=str(certs.ca)))
    # A server whose certificate the configured CA did not sign is refused.
    other = tmp_path / "other-ca"
    from notify_support import make_certs

    stranger = make_certs(other)
    tls = smtp_servers(tls="starttls", certs=certs)
    with pytest.raises(ssl.SSLCertVerificationError):
        _send(SMTPSettings(addr=tls.addr, admin="djinn@ci.test", ca=str(stranger.ca)))
    # Wrong password: refused by the server, nothing delivered.
    auth = smtp_servers(tls="starttls", certs=certs, users={"bot": "pw"})
    with pytest.raises(smtplib.SMTPAuthenticationError):
        _send(SMTPSettings(addr=auth.addr, admin="djinn@ci.test", ca=str(certs.ca), username="bot", password="nope"))
    assert plain.messages == tls.messages == auth.messages == []


# -- crashes: never lost, never twice ---------------------------------------------------------


def test_worker_killed_mid_build_the_rerun_mails_once(worker_env, smtp_servers):
    smtp = smtp_servers()
    team(worker_env)
    worker_env.write_config(extra=smtp.config())
    first = worker_env.start_worker(name="first")
    build_id = submit(worker_env, "namespace: team/app\ndriver: {type: os}\nstages: [a]\njobs:\n"
                                  "  - {stage: a, commands: ['echo attempt', 'sleep 3', 'exit 1']}\n")
    wait_job_running(worker_env, build_id)
    worker_env.kill_group(first)
    worker_env.start_worker(name="second")
    info = worker_env.wait_status(build_id, timeout=60)
    assert info["status"] == "failed" and info["tags"] == ["orphaned"]
    (received,) = smtp.wait(1)
    check_failure_mail(worker_env, received, build_id, "failed")
    wait_mail_state(worker_env, build_id, "sent")
    # The killed worker's build message stays unacknowledged: wait on the mail tasks alone.
    wait_for(lambda: worker_env.broker_idle("djinn.send_failure_mail"), 30, "every mail task to be over")
    assert len(smtp.messages) == 1


def test_failure_the_worker_died_before_reporting_is_swept_and_mailed_once(worker_env, smtp_servers):
    """A worker that died between the build's final write and its failure hook leaves no mail row."""
    from celery import Celery

    smtp = smtp_servers()
    team(worker_env)
    worker_env.write_config(extra=smtp.config())
    build_id = submit(worker_env, PASSING)
    old = submit(worker_env, PASSING)
    # As the dead worker left them: final rows written, nothing else.
    worker_env.sql("UPDATE builds SET status = 'failed', started_at = now() - interval '2 minutes', "
                   "finished_at = now() - interval '1 minute', output = 'the last line\n' WHERE id = :id", id=build_id)
    worker_env.sql("UPDATE builds SET status = 'failed', finished_at = now() - interval '2 days' WHERE id = :id", id=old)
    worker_env.start_worker()  # its start-up sweep finds the build
    (received,) = smtp.wait(1, timeout=30)
    assert received.message["Subject"] == "Djinn CI - Build #1 failed"
    assert received.body.endswith("-----\n\nthe last line\n")
    wait_mail_state(worker_env, build_id, "sent")

    # Duplicate sends of the same mail (re-delivered messages, a second sweep) do nothing.
    app = Celery(broker=worker_env.redis.url)
    for _ in range(3):
        app.send_task("djinn.send_failure_mail", args=[build_id], queue="builds_os")
    wait_for(worker_env.broker_idle, 30, "the duplicate sends to be over")
    assert len(smtp.messages) == 1
    assert mail_row(worker_env, old) is None  # older than the sweep's horizon: not mailed now


def test_unexpected_worker_error_mails_the_admin_a_traceback(worker_env, smtp_servers):
    smtp = smtp_servers()
    team(worker_env)
    worker_env.write_config(extra=smtp.config(admin="ops@ci.test"))
    build_id = submit(worker_env, PASSING)
    # A row the worker cannot make sense of: a bug path, not a failed build.
    worker_env.sql("UPDATE build_drivers SET config = '[1, 2]' WHERE build_id = :id", id=build_id)
    worker_env.start_worker()
    received = smtp.wait(1, timeout=30)[0]
    msg = received.message
    assert received.rcpt_tos == ["ops@ci.test"] and msg["To"] == "ops@ci.test" and msg["From"] == "ops@ci.test"
    assert msg["Subject"] == f"Djinn CI - Worker error in build #1 (id {build_id})"
    body = received.body
    assert "Traceback (most recent call last)" in body
    assert "TypeError" in body and 'djinn/db/load.py", line' in body and "in decode" in body
    assert f"Build: {DEFAULT_HOST}/b/alice/1" in body


def test_runner_error_mails_the_admin(worker_env, smtp_servers):
    """on_worker_error (djinn.worker.execute calls it with runner.error) reaches `admin` through the worker."""
    from djinn import notify
    from djinn.worker.context import WorkerContext

    smtp = smtp_servers()
    team(worker_env)
    worker_env.write_config(extra=smtp.config(admin="ops@ci.test"))
    worker_env.start_worker()
    build_id = submit(worker_env, PASSING)
    worker_env.wait_status(build_id)
    ctx = WorkerContext.from_files(worker_env.config, worker_env.driver_config)
    try:
        raise RuntimeError("driver exploded")
    except RuntimeError as exc:
        notify.on_worker_error(ctx, build_id, exc)
    finally:
        ctx.close()
    (received,) = smtp.wait(1, timeout=30)
    assert received.rcpt_tos == ["ops@ci.test"]
    assert "RuntimeError: driver exploded" in received.body and "test_runner_error_mails_the_admin" in received.body


# -- commit statuses ---------------------------------------------------------------------------


def provider_rows(env, provider: str, *, owner: int, token: str = "tok-provider") -> tuple[int, int]:
    provider_id = insert(env, "providers", user_id=owner, name=provider, access_token=cipher().encrypt(token.encode()),
                         connected=True, main_account=True)
    repo_id = insert(env, "provider_repos", user_id=owner, provider_id=provider_id, repo_id=4242, provider_name=provider,
                     name="team/app", href=f"https://{provider}.test/team/app", enabled=True)
    return provider_id, repo_id


def pull_trigger(provider_id: int, repo_id: int, sha: str):
    from djinn.db.submit import Trigger

    return Trigger(type="pull", comment="Add frobnication", provider_id=provider_id, repo_id=repo_id,
                   data={"sha": sha, "ref": "feature", "action": "opened"})


SLOW_FAIL = "namespace: team/app\ndriver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['sleep 2', 'exit 1']}\n"
SLOW_PASS = "namespace: team/app\ndriver: {type: os}\nstages: [a]\njobs:\n  - {stage: a, commands: ['sleep 2']}\n"


def test_github_commit_status_for_pull_request_builds(worker_env, http_recorder):
    ids = team(worker_env)
    provider_id, repo_id = provider_rows(worker_env, "github", owner=ids["alice"])
    worker_env.write_config(extra=f'provider github {{\n    endpoint "{http_recorder.url}"\n}}\n')
    worker_env.start_worker()
    # One build at a time: a status task queued behind running builds posts the build's
    # status as it is by then, not `pending` (test_late_status_posts_the_final_state_once).
    sha = "0123456789abcdef0123456789abcdef01234567"
    failed = submit_build(worker_env, SLOW_FAIL, username="alice", trigger=pull_trigger(provider_id, repo_id, sha))
    worker_env.wait_status(failed)
    path = f"/repos/team/app/statuses/{sha}"
    requests = http_recorder.wait(2, path)
    passed = submit_build(worker_env, SLOW_PASS, username="alice", trigger=pull_trigger(provider_id, repo_id, sha[::-1]))
    worker_env.wait_status(passed)
    manual = submit_build(worker_env, SLOW_PASS, username="alice")
    worker_env.wait_status(manual)

    assert [r.json() for r in requests] == [
        {"state": "pending", "target_url": f"{DEFAULT_HOST}/b/alice/1", "description": "Build is running.",
         "context": "continuous-integration/djinn-ci"},
        {"state": "failure", "target_url": f"{DEFAULT_HOST}/b/alice/1", "description": "Build has failed.",
         "context": "continuous-integration/djinn-ci"},
    ]
    for request in requests:
        assert request.headers["Authorization"] == "Bearer tok-provider"
        assert request.headers["Accept"] == "application/vnd.github+json"
        assert request.headers["Content-Type"] == "application/json; charset=utf-8"
    other = http_recorder.wait(2, f"/repos/team/app/statuses/{sha[::-1]}")
    assert [r.json()["state"] for r in other] == ["pending", "success"]
    wait_for(worker_env.notifications_settled, 60, "every status to be sent")
    assert len(http_recorder.received()) == 4  # the manual build sets no status
    assert worker_env.sql("SELECT state FROM build_notifications WHERE build_id = :id AND kind = 'status'", id=failed) == [("failed",)]


def test_statuses_and_webhooks_do_not_wait_behind_builds(worker_env, http_recorder):
    """With every pool slot taken by a long build, its start status and webhook still go out at once."""
    from celery import Celery

    ids = team(worker_env)
    provider_id, repo_id = provider_rows(worker_env, "github", owner=ids["alice"])
    insert(worker_env, "namespace_webhooks", user_id=ids["alice"], author_id=ids["alice"], namespace_id=ids["ns"],
           payload_url=f"{http_recorder.url}/hooks/app", secret=None, ssl=True, events=(1 << 1) | (1 << 2), active=True)
    worker_env.write_config(parallelism=1, extra=f'provider github {{\n    endpoint "{http_recorder.url}"\n}}\n')
    worker_env.start_worker()
    sha = "abcabcabcabcabcabcabcabcabcabcabcabcabca"
    build_id = submit_build(worker_env, SLEEPY, username="alice", trigger=pull_trigger(provider_id, repo_id, sha),
                            secrets={"TOKEN": SECRET})
    path = f"/repos/team/app/statuses/{sha}"
    (status,) = http_recorder.wait(1, path, timeout=60)
    (hook,) = http_recorder.wait(1, "/hooks/app", timeout=60)
    # Both arrived while the build (sleep 60) still holds the only pool slot.
    assert worker_env.status(build_id)["status"] == "running"
    assert status.json()["state"] == "pending" and hook.json()["status"] == "running"
    worker_env.cli("kill", str(build_id))
    assert worker_env.wait_status(build_id)["status"] == "killed"
    statuses = http_recorder.wait(2, path)
    assert [r.json()["state"] for r in statuses] == ["pending", "failure"]
    hooks = http_recorder.wait(2, "/hooks/app")
    assert [r.headers["X-Djinn-CI-Event"] for r in hooks] == ["build.started", "build.finished"]
    assert wait_outbox(worker_env, build_id, lambda rows: rows and all(r[2] == "sent" for r in rows)) == [
        ("status", "build.started", "sent", 1), ("status", "build.finished", "sent", 1),
        ("webhook", "build.started", "sent", 1), ("webhook", "build.finished", "sent", 1),
    ]
    # Status tasks an older worker queued (or duplicates) post nothing new.
    app = Celery(broker=worker_env.redis.url)
    for _ in range(2):
        app.send_task("djinn.set_commit_status", args=[build_id], queue="builds_os")
    deadline = time.monotonic() + 30
    while (worker_env.root / "worker.log").read_text().count("nothing to do: killed was already posted") < 2:
        assert time.monotonic() < deadline, worker_env.log_tail()
        time.sleep(0.2)
    assert len(http_recorder.received(path)) == 2


def outbox(env, build_id: int):
    return env.sql("SELECT kind, event, state, attempts FROM notification_outbox WHERE build_id = :id ORDER BY kind, id", id=build_id)


def wait_outbox(env, build_id: int, done, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = outbox(env, build_id)
        if done(rows):
            return rows
        time.sleep(0.2)
    raise AssertionError(f"outbox of build {build_id}: {outbox(env, build_id)}; log:\n{env.log_tail()}")


def test_status_and_webhook_survive_redis_down_when_the_build_finishes(worker_env, http_recorder, redis_server):
    """Recorded with the build's final write and sent from the record: the broker plays no part."""
    ids = team(worker_env)
    provider_id, repo_id = provider_rows(worker_env, "github", owner=ids["alice"])
    insert(worker_env, "namespace_webhooks", user_id=ids["alice"], author_id=ids["alice"], namespace_id=ids["ns"],
           payload_url=f"{http_recorder.url}/hooks/app", secret=cipher().encrypt(b"whsec-2"), ssl=True,
           events=1 << 2, active=True)
    worker_env.write_config(extra=f'provider github {{\n    endpoint "{http_recorder.url}"\n}}\n')
    worker_env.start_worker()
    sha = "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e"
    path = f"/repos/team/app/statuses/{sha}"
    build_id = submit_build(worker_env, "namespace: team/app\ndriver: {type: os}\nstages: [a]\njobs:\n"
                                        "  - {stage: a, commands: ['sleep 4', 'exit 1']}\n",
                            username="alice", trigger=pull_trigger(provider_id, repo_id, sha))
    http_recorder.wait(1, path, timeout=60)  # running
    http_recorder.answer("/hooks/app", 503)  # and the receiver fails once: retried from the record
    redis_server.stop()
    try:
        deadline = time.monotonic() + 60
        while worker_env.sql("SELECT status FROM builds WHERE id = :id", id=build_id)[0][0] != "failed":
            assert time.monotonic() < deadline, worker_env.log_tail()
            time.sleep(0.2)
        statuses = http_recorder.wait(2, path, timeout=60)
        hooks = http_recorder.wait(2, "/hooks/app", timeout=60)
    finally:
        redis_server.start()
    assert [r.json()["state"] for r in statuses] == ["pending", "failure"]
    assert [r.headers["X-Djinn-CI-Event"] for r in hooks] == ["build.finished", "build.finished"]
    assert hooks[0].body == hooks[1].body and json.loads(hooks[1].body)["status"] == "failed"
    assert hooks[1].headers["X-Djinn-CI-Signature"] == "sha256=" + hmac.new(b"whsec-2", hooks[1].body, hashlib.sha256).hexdigest()
    rows = wait_outbox(worker_env, build_id, lambda rows: len(rows) == 3 and all(r[2] == "sent" for r in rows))
    assert rows == [("status", "build.started", "sent", 1), ("status", "build.finished", "sent", 1),
                    ("webhook", "build.finished", "sent", 2)]
    # The worker goes on once the broker is back, and nothing is sent twice.
    after = submit_build(worker_env, PASSING.replace("namespace: team/app\n", ""), username="alice")  # no webhooks
    assert worker_env.wait_status(after, timeout=60)["status"] == "passed"
    assert len(http_recorder.received(path)) == 2 and len(http_recorder.received("/hooks/app")) == 2


def test_outbox_row_left_sending_by_a_dead_worker_is_sent_again(worker_env, http_recorder):
    """A worker that died mid-send leaves its row `sending`; another worker's dispatcher sends it later."""
    from djinn.notify import outbox as outbox_module

    ids = team(worker_env)
    hook = insert(worker_env, "namespace_webhooks", user_id=ids["alice"], author_id=ids["alice"], namespace_id=ids["ns"],
                  payload_url=f"{http_recorder.url}/hooks/app", secret=None, ssl=True, events=1 << 2, active=True)
    build_id = submit_build(worker_env, PASSING, username="alice")
    worker_env.sql("UPDATE builds SET status = 'passed', finished_at = now() WHERE id = :id", id=build_id)  # ran elsewhere
    stale = outbox_module.SENDING_STALE.total_seconds()
    worker_env.sql(
        "INSERT INTO notification_outbox (build_id, kind, event, webhook_id, event_id, body, state, attempts, updated_at) "
        "VALUES (:b, 'webhook', 'build.finished', :h, gen_random_uuid(), '{\"id\": 1}', 'sending', 1, "
        "now() - make_interval(secs => :stale + 1))",
        b=build_id, h=hook, stale=stale,
    )
    # Done rows are kept a week, then deleted.
    worker_env.sql("INSERT INTO notification_outbox (build_id, kind, event, state, updated_at) VALUES "
                   "(:b, 'status', 'build.started', 'sent', now() - interval '8 days'), "
                   "(:b, 'status', 'build.finished', 'failed', now() - interval '6 days')", b=build_id)
    worker_env.start_worker()
    (request,) = http_recorder.wait(1, "/hooks/app", timeout=60)
    assert request.body == b'{"id": 1}'
    assert worker_env.sql("SELECT event, state FROM notification_outbox WHERE kind = 'status'") == [("build.finished", "failed")]
    rows = wait_outbox(worker_env, build_id, lambda rows: any(r[0] == "webhook" and r[2] == "sent" for r in rows))
    assert ("webhook", "build.finished", "sent", 2) in rows
    (redelivery,) = worker_env.sql("SELECT redelivery FROM namespace_webhook_deliveries WHERE webhook_id = :h", h=hook)[0]
    assert redelivery is True


def test_gitlab_commit_status_states_and_retry(worker_env, http_recorder):
    ids = team(worker_env)
    provider_id, repo_id = provider_rows(worker_env, "gitlab", owner=ids["alice"], token="glpat-1")
    worker_env.write_config(extra=f'provider gitlab {{\n    endpoint "{http_recorder.url}/api/v4"\n}}\n')
    sha = "feedfacefeedfacefeedfacefeedfacefeedface"
    path = f"/api/v4/projects/4242/statuses/{sha}"
    http_recorder.answer(path, 201, 502)  # GitLab hiccups on the final status: retried
    worker_env.start_worker()
    build_id = submit_build(worker_env, SLEEPY, username="alice", trigger=pull_trigger(provider_id, repo_id, sha),
                            secrets={"TOKEN": SECRET})
    wait_job_running(worker_env, build_id)
    # The start status is posted by a task of its own: one still waiting when the build ends
    # posts the final status instead (djinn.notify.statuses), so the kill waits for it.
    http_recorder.wait(1, path, timeout=60)
    worker_env.cli("kill", str(build_id))
    assert worker_env.wait_status(build_id)["status"] == "killed"

    requests = http_recorder.wait(3, path, timeout=60)
    common = {"id": 4242, "sha": sha, "target_url": f"{DEFAULT_HOST}/b/alice/1", "context": "continuous-integration/djinn-ci"}
    assert [r.json() for r in requests] == [
        {**common, "state": "running", "description": "Build is running."},
        {**common, "state": "canceled", "description": "Build was killed."},
        {**common, "state": "canceled", "description": "Build was killed."},
    ]
    assert all(r.headers["Authorization"] == "Bearer glpat-1" for r in requests)
    wait_for(worker_env.notifications_settled, 60, "every status to be sent")
    assert len(http_recorder.received(path)) == 3


# -- namespace webhooks ----------------------------------------------------------------------------


def test_webhooks_started_and_finished_signed_recorded_and_retried(worker_env, http_recorder):
    ids = team(worker_env)
    started, finished = 1 << 1, 1 << 2
    signed = insert(worker_env, "namespace_webhooks", user_id=ids["alice"], author_id=ids["alice"], namespace_id=ids["ns"],
                    payload_url=f"{http_recorder.url}/hooks/signed", secret=cipher().encrypt(b"whsec-1"), ssl=True,
                    events=started | finished, active=True)
    plain = insert(worker_env, "namespace_webhooks", user_id=ids["alice"], author_id=ids["alice"], namespace_id=ids["ns"],
                   payload_url=f"{http_recorder.url}/hooks/plain", secret=None, ssl=True, events=finished, active=True)
    insert(worker_env, "namespace_webhooks", user_id=ids["alice"], author_id=ids["alice"], namespace_id=ids["ns"],
           payload_url=f"{http_recorder.url}/hooks/inactive", secret=None, ssl=True, events=started | finished, active=False)
    insert(worker_env, "namespace_webhooks", user_id=ids["alice"], author_id=ids["alice"], namespace_id=ids["ns"],
           payload_url=f"{http_recorder.url}/hooks/submitted-only", secret=None, ssl=True, events=1, active=True)
    http_recorder.answer("/hooks/plain", 500)  # the first delivery fails and is retried
    worker_env.start_worker()
    build_id = submit(worker_env, SLOW_FAIL)
    assert worker_env.wait_status(build_id)["status"] == "failed"

    signed_requests = http_recorder.wait(2, "/hooks/signed")
    plain_requests = http_recorder.wait(2, "/hooks/plain")
    assert [r.headers["X-Djinn-CI-Event"] for r in signed_requests] == ["build.started", "build.finished"]
    for request in signed_requests:
        assert request.headers["X-Djinn-CI-Hook-ID"] == str(signed)
        expected = "sha256=" + hmac.new(b"whsec-1", request.body, hashlib.sha256).hexdigest()
        assert request.headers["X-Djinn-CI-Signature"] == expected
        assert request.headers["Content-Type"] == "application/json; charset=utf-8"
        assert request.headers["User-Agent"] == "Djinn-CI-Hook"
    start, end = (r.json() for r in signed_requests)
    assert (start["id"], start["number"], start["status"]) == (build_id, 1, "running")
    assert start["started_at"] and start["finished_at"] is None
    assert end["status"] == "failed" and end["finished_at"] and end["url"] == f"{DEFAULT_HOST}/b/alice/1"
    assert end["namespace"]["path"] == "team/app" and end["user"]["username"] == "alice"
    assert end["trigger"]["comment"].startswith("Fix the frobnicator")
    assert SECRET not in end["output"] and "xxxxxx" not in end["output"]  # TOKEN is never printed here

    assert [r.headers["X-Djinn-CI-Event"] for r in plain_requests] == ["build.finished", "build.finished"]
    assert plain_requests[0].body == plain_requests[1].body
    assert all("X-Djinn-CI-Signature" not in r.headers for r in plain_requests)
    wait_for(worker_env.notifications_settled, 60, "every delivery to be over")
    assert http_recorder.received("/hooks/inactive") == [] and http_recorder.received("/hooks/submitted-only") == []

    deliveries = worker_env.sql(
        "SELECT webhook_id, event, response_code, redelivery, event_id, request_body, error FROM namespace_webhook_deliveries ORDER BY id"
    )
    by_hook = {hook: [d for d in deliveries if d[0] == hook] for hook in (signed, plain)}
    assert sorted((d[1], d[2], d[3]) for d in by_hook[signed]) == [(started, 201, False), (finished, 201, False)]
    assert [(d[1], d[2], d[3]) for d in by_hook[plain]] == [(finished, 500, False), (finished, 201, True)]
    assert by_hook[plain][0][4] == by_hook[plain][1][4]  # one event, two attempts
    assert json.loads(by_hook[plain][1][5])["status"] == "failed"
