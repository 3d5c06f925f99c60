"""Commit statuses on GitHub and GitLab for pull-request builds (SPEC section 7).

The task posts the build's status *as it is when the task runs*, under a lock
on the build's `status` marker row: a start status delayed past the build's end
then posts the final status (or nothing, when that was already posted), so a
provider never ends up showing `pending` for a finished build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from djinn.config.settings import DEFAULT_PROVIDER_ENDPOINTS
from djinn.db.engine import transaction
from djinn.db.models import Build, BuildNotification, BuildTrigger, Provider, ProviderRepo
from djinn.notify import http
from djinn.notify.common import NotifyContext, build_url, host, log
from djinn.status import Status

CONTEXT = "continuous-integration/djinn-ci"
STATUS = "status"

GITHUB_STATES = {
    Status.QUEUED: "pending",
    Status.RUNNING: "pending",
    Status.PASSED: "success",
    Status.PASSED_WITH_FAILURES: "success",
    Status.FAILED: "failure",
    Status.KILLED: "failure",
    Status.TIMED_OUT: "failure",
}
GITLAB_STATES = {
    Status.QUEUED: "pending",
    Status.RUNNING: "running",
    Status.PASSED: "success",
    Status.PASSED_WITH_FAILURES: "success",
    Status.FAILED: "failed",
    Status.KILLED: "canceled",
    Status.TIMED_OUT: "canceled",
}
# Upstream's provider.StatusDescriptions.
DESCRIPTIONS = {
    Status.QUEUED: "Build is queued.",
    Status.RUNNING: "Build is running.",
    Status.PASSED: "Build has passed.",
    Status.PASSED_WITH_FAILURES: "Build has passed with failures.",
    Status.FAILED: "Build has failed.",
    Status.KILLED: "Build was killed.",
    Status.TIMED_OUT: "Build has timed out.",
}


class StatusRetry(Exception):
    """The provider could not take the status now (no answer, 5xx, rate limit): try again later."""


@dataclass(frozen=True)
class StatusRequest:
    url: str
    headers: dict[str, str]
    body: dict[str, Any]


def status_request(
    provider: str, endpoint: str, token: str, repo: ProviderRepo, sha: str, status: Status, target_url: str
) -> StatusRequest:
    """The POST that sets `status` on commit `sha` of `repo`, as upstream's provider clients send it."""
    endpoint = endpoint.rstrip("/")
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "Djinn-CI",
    }
    body: dict[str, Any] = {
        "state": "",
        "target_url": target_url,
        "description": DESCRIPTIONS[status],
        "context": CONTEXT,
    }
    if provider == "github":
        headers["Accept"] = "application/vnd.github+json"
        body["state"] = GITHUB_STATES[status]
        return StatusRequest(f"{endpoint}/repos/{repo.name}/statuses/{sha}", headers, body)
    if provider == "gitlab":
        body = {"id": repo.repo_id, "sha": sha, **body, "state": GITLAB_STATES[status]}
        return StatusRequest(f"{endpoint}/projects/{repo.repo_id}/statuses/{sha}", headers, body)
    raise ValueError(f"unknown provider {provider!r}")


def wants_status(trigger: BuildTrigger | None) -> bool:
    """Only builds of a pull request get commit statuses (SPEC section 7)."""
    return (
        trigger is not None
        and trigger.type == "pull"
        and trigger.provider_id is not None
        and trigger.repo_id is not None
        and bool((trigger.data or {}).get("sha"))
    )


def set_commit_status(ctx: NotifyContext, build_id: int) -> str:
    """Post the build's current status to its pull request's commit; says what happened.

    Raises StatusRetry while the provider cannot be reached or answers 5xx.
    """
    with transaction(ctx.sessions) as session:
        build = session.get(Build, build_id)
        trigger = build.trigger if build is not None else None
        if build is None or trigger is None or not wants_status(trigger):
            return "nothing to do: not a pull request build"
        provider = session.get(Provider, trigger.provider_id)
        repo = session.get(ProviderRepo, trigger.repo_id)
        if provider is None or repo is None:
            return "nothing to do: the trigger's provider or repository is gone"
        if provider.name not in ("github", "gitlab"):
            return f"nothing to do: unknown provider {provider.name!r}"
        if not provider.access_token:
            return f"nothing to do: the {provider.name} provider has no token"
        if ctx.cipher is None:
            log.error("build %s: cannot decrypt the %s token: the worker config has no crypto block", build_id, provider.name)
            return "failed: no crypto block to decrypt the provider token"
        token = ctx.cipher.decrypt(provider.access_token).decode()

        # One status post per build at a time; whoever holds the lock posts the latest status.
        session.execute(
            insert(BuildNotification)
            .values(build_id=build_id, kind=STATUS, state="")
            .on_conflict_do_nothing(index_elements=["build_id", "kind"])
        )
        marker = session.scalars(
            select(BuildNotification)
            .where(BuildNotification.build_id == build_id, BuildNotification.kind == STATUS)
            .with_for_update()
        ).one()
        session.refresh(build)
        status = Status(build.status)
        if marker.state == status.value:
            return f"nothing to do: {status} was already posted"

        configured = ctx.config.providers.get(provider.name)
        endpoint = configured.endpoint if configured is not None else DEFAULT_PROVIDER_ENDPOINTS[provider.name]
        username = build.user.username if build.user is not None else str(build.user_id)
        request = status_request(
            provider.name,
            endpoint,
            token,
            repo,
            str(trigger.data["sha"]),
            status,
            build_url(host(ctx.config), username, build.number),
        )
        response = http.post(request.url, json.dumps(request.body).encode(), request.headers)
        marker.attempts += 1
        marker.updated_at = func.now()
        if response.ok:
            marker.state = status.value
            marker.sent_at = func.now()
            marker.error = None
            return f"{provider.name} status {request.body['state']} set"
        if response.retryable:
            raise StatusRetry(f"{provider.name} status for build {build_id}: {response.describe()}")
        marker.error = response.describe()
        log.error("build %s: %s refused the commit status: %s", build_id, provider.name, response.describe())
        return f"failed: {response.describe()}"
