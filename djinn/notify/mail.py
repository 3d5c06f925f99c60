"""Failure mail (SPEC section 6): composed from the build's rows, sent over SMTP exactly once.

Exactly once, with crashes anywhere, rests on one row per build in
`build_notifications` (kind `mail`) and these states:

    pending --claim--> sending --SMTP accepted--> sent
       ^                  |
       +---SMTP failed----+            (skipped: no SMTP / nobody to mail;
                                        failed: retries exhausted)

- The row is created (INSERT .. ON CONFLICT DO NOTHING) by the build task's
  failure hook, and by the sweep (djinn.notify.sweep) for failed builds that have
  none: a worker that died between the build's final write and its failure
  hook, or a build abandoned after too many attempts. So no failed build is
  left without one; the sweep only looks at builds finished in the last day, and
  the migration marks older failures `skipped`.
- Sending claims the row first (pending -> sending in one UPDATE), so two tasks
  for one build (a duplicate message, the sweep's re-queue) never both send.
- A send that fails puts the row back to pending and the task retries with
  backoff. A worker that dies while `sending` leaves the row to the sweep, which
  gives it back to pending after SENDING_STALE.
- The row is marked sent right after the server accepted the message. The one
  window left is a crash between that acceptance and the UPDATE (milliseconds):
  the sweep would then send again. Claiming *after* sending instead would lose
  the mail in the same window, which the issue forbids; a duplicate is the
  lesser harm, and the fixed Message-ID lets mail software drop it.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import smtplib
import socket
import ssl
import time
from email.message import EmailMessage
from typing import Any, Callable, Iterable

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from djinn.config import SMTPSettings, split_address
from djinn.db.engine import rowcount, transaction
from djinn.db.models import Build, BuildJobOutput, BuildKey, BuildNotification, BuildTrigger, BuildVariable, NamespaceCollaborator, User
from djinn.notify.common import NotifyContext, build_url, host, log
from djinn.runner.output import Masker

MAIL = "mail"
PENDING, SENDING, SENT, SKIPPED, FAILED_STATE = "pending", "sending", "sent", "skipped", "failed"
TAIL_LINES = 15
# How much of the end of the output is read to find the last lines.
TAIL_CHARS = 64 * 1024
SMTP_TIMEOUT = 30.0
SMTPS_PORT = 465


# -- composing ------------------------------------------------------------------


def recipients(session: Session, build: Build) -> list[str]:
    """The build's owner and the namespace's collaborators that have an address, each once."""
    found: list[str] = []
    if build.user is not None and build.user.email:
        found.append(build.user.email)
    if build.namespace_id is not None:
        found += session.scalars(
            select(User.email)
            .join(NamespaceCollaborator, NamespaceCollaborator.user_id == User.id)
            .where(NamespaceCollaborator.namespace_id == build.namespace_id, User.email.is_not(None), User.email != "")
            .order_by(NamespaceCollaborator.id)
        )
    seen: set[str] = set()
    unique = []
    for address in found:
        # Owners `djinn-worker submit` made without an address have one under .invalid (RFC 2606).
        if address.lower().endswith(".invalid"):
            continue
        if address.lower() not in seen:
            seen.add(address.lower())
            unique.append(address)
    return unique


def describe_trigger(trigger: BuildTrigger | None, owner: str) -> str:
    """What started the build, in upstream's words, then the trigger's comment."""
    if trigger is None:
        return f"Submitted by {owner}"
    data = trigger.data or {}
    if trigger.type == "push":
        line = f"Committed {str(data.get('id') or data.get('sha') or '')[:7]} to {data.get('ref', '')}"
    elif trigger.type == "pull":
        line = f"{str(data.get('action') or 'opened').title()} pull request to {data.get('ref', '')}"
    elif trigger.type == "schedule":
        line = "Scheduled build" + (f" {data['name']}" if data.get("name") else "")
    else:
        line = f"Submitted by {data.get('username') or owner}"
    comment = (trigger.comment or "").strip()
    return f"{line.rstrip()}\n\n{comment}" if comment else line.rstrip()


def output_tail(session: Session, build_id: int, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines of the build's output, read from its end only."""
    text = session.scalar(select(func.right(Build.output, TAIL_CHARS)).where(Build.id == build_id))
    if text is None:
        # Output too large for the column stays in build_job_output (djinn.db.recorder).
        chunks: list[str] = []
        size = 0
        for data in session.scalars(
            select(BuildJobOutput.data).where(BuildJobOutput.build_id == build_id).order_by(BuildJobOutput.id.desc()).limit(200)
        ):
            chunks.append(data)
            size += len(data)
            if size >= TAIL_CHARS:
                break
        text = "".join(reversed(chunks))[-TAIL_CHARS:]
    return "\n".join(text.splitlines()[-lines:])


def secret_values(ctx: NotifyContext, session: Session, build_id: int) -> list[str]:
    """The build's masked variable values and key material, decrypted, to mask again in mail."""
    cipher = ctx.cipher
    if cipher is None:
        return []
    values = []
    for value in session.scalars(select(BuildVariable.value).where(BuildVariable.build_id == build_id, BuildVariable.masked.is_(True))):
        try:
            values.append(cipher.decrypt_text(value))
        except Exception as exc:  # the output itself was masked when written; this is a second line of defence
            log.warning("build %s: cannot decrypt a masked variable for the mail: %s", build_id, exc)
    for key in session.scalars(select(BuildKey.key).where(BuildKey.build_id == build_id)):
        try:
            values.append(cipher.decrypt(key).decode())
        except Exception as exc:
            log.warning("build %s: cannot decrypt a key for the mail: %s", build_id, exc)
    return values


def failure_body(link: str, trigger: str, tail: str) -> str:
    """SPEC section 6: the link, -----, the trigger, -----, the output's last lines (upstream's layout)."""
    return f"Build: {link}\n\n-----\n{trigger}\n-----\n\n{tail}\n"


def message(settings: SMTPSettings, to: Iterable[str], subject: str, body: str, message_id: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = settings.admin
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=False)
    domain = settings.admin.rpartition("@")[2] or "djinn"
    msg["Message-ID"] = f"<{message_id}@{domain}>" if message_id else email.utils.make_msgid(domain=domain)
    long_lines = any(len(line) > 900 for line in body.splitlines())
    msg.set_content(body, cte="7bit" if body.isascii() and not long_lines else "quoted-printable")
    return msg


def compose_failure_mail(
    ctx: NotifyContext, session: Session, build_id: int, link_host: str | None = None
) -> tuple[EmailMessage, list[str]] | None:
    """The failure mail for the build, or None when it has no one to go to.

    `link_host`: the Djinn server the build came from (a curlyq payload's Host),
    linked instead of the config's `host`.
    """
    build = session.get(Build, build_id)
    smtp = ctx.config.smtp
    if build is None or smtp is None:  # no SMTP block: the worker sends no mail
        return None
    to = recipients(session, build)
    if not to:
        return None
    username = build.user.username if build.user is not None else str(build.user_id)
    tail = output_tail(session, build_id)
    masker = Masker(secret_values(ctx, session, build_id))
    tail = masker.mask(tail.encode()).decode("utf-8", "replace")
    base = link_host.rstrip("/") if link_host else host(ctx.config)
    body = failure_body(build_url(base, username, build.number), describe_trigger(build.trigger, username), tail)
    msg = message(
        smtp,
        to,
        f"Djinn CI - Build #{build.number} {build.status}",
        body,
        message_id=f"djinn-build-{build.id}-{build.status}",
    )
    return msg, to


# -- sending --------------------------------------------------------------------


def connect(settings: SMTPSettings, *, timeout: float = SMTP_TIMEOUT, implicit_tls: bool | None = None) -> smtplib.SMTP:
    """A logged-in SMTP session as the config asks.

    With `ca`, the connection is TLS verified against that file: implicit TLS on
    port 465 (or when asked), STARTTLS otherwise (and a server that does not offer
    it is an error, never a silent fallback to plain text). Without `ca`, plain
    SMTP, as upstream. With `username` and `password`, AUTH PLAIN or else LOGIN.
    """
    host_, port = split_address(settings.addr, 25)  # checked when the config was read
    context = ssl.create_default_context(cafile=settings.ca) if settings.ca else None
    if implicit_tls is None:
        implicit_tls = context is not None and port == SMTPS_PORT
    if implicit_tls:
        client: smtplib.SMTP = smtplib.SMTP_SSL(host_, port, timeout=timeout, context=context or ssl.create_default_context())
    else:
        client = smtplib.SMTP(host_, port, timeout=timeout)
    try:
        client.ehlo_or_helo_if_needed()
        if context is not None and not implicit_tls:
            if not client.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError(f"{settings.addr} does not offer STARTTLS, but smtp.ca asks for TLS")
            client.starttls(context=context)
            client.ehlo()
        if settings.username and settings.password:
            mechanisms = client.esmtp_features.get("auth", "").upper().split()
            client.user, client.password = settings.username, settings.password
            if "PLAIN" in mechanisms:
                client.auth("PLAIN", client.auth_plain)
            elif "LOGIN" in mechanisms:
                client.auth("LOGIN", client.auth_login, initial_response_ok=False)
            else:
                raise smtplib.SMTPNotSupportedError(f"{settings.addr} offers neither AUTH PLAIN nor LOGIN")
        return client
    except BaseException:
        client.close()
        raise


def send(settings: SMTPSettings, msg: EmailMessage, to: list[str], *, after_accept: Callable[[], None] | None = None) -> None:
    """Deliver `msg`; `after_accept` runs once the server accepted it, before QUIT."""
    client = connect(settings)
    try:
        refused = client.send_message(msg, from_addr=settings.admin, to_addrs=to)
        if refused:
            log.warning("mail %s: the server refused %s", msg["Subject"], ", ".join(refused))
        if after_accept is not None:
            after_accept()
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()


# -- exactly once -----------------------------------------------------------------


def owe_failure_mail(ctx: NotifyContext, build_id: int) -> bool:
    """Record that the build's failure mail is owed; True when a send should be queued.

    Without SMTP the row is recorded as skipped, so nothing mails it later.
    """
    state = PENDING if ctx.config.smtp is not None else SKIPPED
    with transaction(ctx.sessions) as session:
        session.execute(
            insert(BuildNotification)
            .values(build_id=build_id, kind=MAIL, state=state, error=None if state == PENDING else "no smtp block in the worker config")
            .on_conflict_do_nothing(index_elements=["build_id", "kind"])
        )
        current = session.scalar(
            select(BuildNotification.state).where(BuildNotification.build_id == build_id, BuildNotification.kind == MAIL)
        )
    return current == PENDING


def _set_state(ctx: NotifyContext, build_id: int, state: str, *, error: str | None = None, sent: bool = False, only_from: str | None = None) -> None:
    values: dict[str, Any] = {"state": state, "updated_at": func.now(), "error": error}
    if sent:
        values["sent_at"] = func.now()
    query = update(BuildNotification).where(BuildNotification.build_id == build_id, BuildNotification.kind == MAIL)
    if only_from is not None:
        query = query.where(BuildNotification.state == only_from)
    with transaction(ctx.sessions) as session:
        session.execute(query.values(**values))


def _claim(ctx: NotifyContext, build_id: int) -> bool:
    with transaction(ctx.sessions) as session:
        result = session.execute(
            update(BuildNotification)
            .where(BuildNotification.build_id == build_id, BuildNotification.kind == MAIL, BuildNotification.state == PENDING)
            .values(state=SENDING, attempts=BuildNotification.attempts + 1, updated_at=func.now())
        )
        return rowcount(result) == 1


def _mark_sent(ctx: NotifyContext, build_id: int, tries: int = 30) -> None:
    """Record the send; the database may be restarting, and forgetting would mean a second mail."""
    for attempt in range(tries):
        try:
            _set_state(ctx, build_id, SENT, sent=True)
            return
        except Exception as exc:
            if attempt == tries - 1:
                log.error("build %s: mail sent but not recorded (%s); the sweep may send it again", build_id, exc)
                return
            time.sleep(min(2.0, 0.1 * 2**attempt))


def deliver_failure_mail(ctx: NotifyContext, build_id: int, link_host: str | None = None) -> str:
    """Send the build's failure mail unless it was sent (or is being sent); says what happened.

    Raises OSError / smtplib.SMTPException while the SMTP server cannot take the
    mail; the row is back to pending by then, for the task's retry.
    """
    settings = ctx.config.smtp
    if settings is None:
        _set_state(ctx, build_id, SKIPPED, error="no smtp block in the worker config", only_from=PENDING)
        return "skipped: no smtp configured"
    if not _claim(ctx, build_id):
        return "nothing to do: already sent, being sent, or not owed"
    try:
        with ctx.sessions() as session:
            composed = compose_failure_mail(ctx, session, build_id, link_host)
        if composed is None:
            _set_state(ctx, build_id, SKIPPED, error="no recipient has a mail address")
            return "skipped: nobody to mail"
        msg, to = composed
        send(settings, msg, to, after_accept=lambda: _mark_sent(ctx, build_id))
    except (smtplib.SMTPRecipientsRefused, smtplib.SMTPResponseException) as exc:
        if not _permanent(exc):
            _release(ctx, build_id, exc)
            raise
        # The server will say the same next time: keep the reason rather than retry for hours.
        _set_state(ctx, build_id, FAILED_STATE, error=f"{type(exc).__name__}: {exc}", only_from=SENDING)
        log.error("build %s: the SMTP server refused the failure mail: %s", build_id, exc)
        return f"failed: {exc}"
    except BaseException as exc:
        if not isinstance(exc, (OSError, smtplib.SMTPException)):
            log.exception("build %s: failure mail", build_id)
        _release(ctx, build_id, exc)
        raise
    return f"sent to {', '.join(to)}"


def _permanent(exc: smtplib.SMTPException) -> bool:
    """Every recipient, or the message itself, refused for good (5xx): retrying cannot help.

    A refused login or sender is a worker config problem instead: retried, so the
    mail still goes once the operator fixes the config and restarts the worker.
    """
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(500 <= code < 600 for code, _ in exc.recipients.values())
    return isinstance(exc, smtplib.SMTPDataError) and 500 <= exc.smtp_code < 600


def _release(ctx: NotifyContext, build_id: int, exc: BaseException) -> None:
    """Give a claim that did not get the mail accepted back to pending, for the retry."""
    try:
        if _current_state(ctx, build_id) == SENDING:
            _set_state(ctx, build_id, PENDING, error=f"{type(exc).__name__}: {exc}", only_from=SENDING)
    except Exception as db_exc:  # left `sending`: the sweep gives it back after SENDING_STALE
        log.warning("build %s: cannot release the mail claim: %s", build_id, db_exc)


def _current_state(ctx: NotifyContext, build_id: int) -> str | None:
    with ctx.sessions() as session:
        return session.scalar(
            select(BuildNotification.state).where(BuildNotification.build_id == build_id, BuildNotification.kind == MAIL)
        )


def give_up_failure_mail(ctx: NotifyContext, build_id: int, error: str) -> None:
    """Retries are exhausted: record why, so the sweep leaves the row alone."""
    _set_state(ctx, build_id, FAILED_STATE, error=error, only_from=PENDING)
    log.error("build %s: failure mail given up: %s", build_id, error)


# -- the operator's mail ------------------------------------------------------------


def send_admin_mail(ctx: NotifyContext, subject: str, body: str) -> str:
    """Mail the operator (`smtp.admin`) about a worker problem."""
    settings = ctx.config.smtp
    if settings is None:
        return "skipped: no smtp configured"
    send(settings, message(settings, [settings.admin], subject, body), [settings.admin])
    return f"sent to {settings.admin}"


def worker_error_mail(ctx: NotifyContext, build_id: int | None, traceback_text: str) -> tuple[str, str]:
    """Subject and body telling the operator a build hit a bug in the worker."""
    where = f"build {build_id}" if build_id is not None else "a task"
    link = ""
    if build_id is not None:
        try:
            with ctx.sessions() as session:
                build = session.get(Build, build_id)
                if build is not None:
                    username = build.user.username if build.user is not None else str(build.user_id)
                    where = f"build #{build.number} (id {build.id})"
                    link = build_url(host(ctx.config), username, build.number)
        except Exception as exc:  # the database may be the problem; the traceback matters more
            log.warning("cannot read build %s for the error mail: %s", build_id, exc)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    body = (
        f"The Djinn CI worker {ctx.name} on {socket.gethostname()} hit an unexpected error in {where} at {now}.\n"
        + (f"Build: {link}\n" if link else "")
        + "\nThis is a bug in the worker, not a failed build.\n\n-----\n"
        + traceback_text.rstrip()
        + "\n"
    )
    return f"Djinn CI - Worker error in {where}", body
