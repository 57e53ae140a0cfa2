"""Where a signing request comes from, read from the CI system's environment.

Approvers decide on a request by what it says about its origin (which repository, commit and
pipeline run asked for a signature), so the client fills it in without the pipeline having to.
Only well-known, non-secret variables are read; values are passed on as the CI system sets them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

MAX_ORIGIN_VALUE_CHARS = 1000

# (origin key, environment variable), in the order a person reads them.
_GITHUB_ACTIONS: tuple[tuple[str, str], ...] = (
    ("repository", "GITHUB_REPOSITORY"),
    ("commit", "GITHUB_SHA"),
    ("ref", "GITHUB_REF"),
    ("workflow", "GITHUB_WORKFLOW"),
    ("event", "GITHUB_EVENT_NAME"),
    ("actor", "GITHUB_ACTOR"),
    ("runId", "GITHUB_RUN_ID"),
    ("runAttempt", "GITHUB_RUN_ATTEMPT"),
    ("job", "GITHUB_JOB"),
)
_GITLAB_CI: tuple[tuple[str, str], ...] = (
    ("repository", "CI_PROJECT_PATH"),
    ("commit", "CI_COMMIT_SHA"),
    ("ref", "CI_COMMIT_REF_NAME"),
    ("tag", "CI_COMMIT_TAG"),
    ("actor", "GITLAB_USER_LOGIN"),
    ("pipelineId", "CI_PIPELINE_ID"),
    ("pipelineUrl", "CI_PIPELINE_URL"),
    ("pipelineSource", "CI_PIPELINE_SOURCE"),
    ("jobId", "CI_JOB_ID"),
    ("jobName", "CI_JOB_NAME"),
    ("jobUrl", "CI_JOB_URL"),
)


class OriginFormatError(ValueError):
    """An `--origin` argument that is not KEY=VALUE."""


def _copy(environ: Mapping[str, str], names: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {key: environ[var][:MAX_ORIGIN_VALUE_CHARS] for key, var in names if environ.get(var)}


def ci_system(environ: Mapping[str, str]) -> str | None:
    """The CI system running this process, by the marker variable each one sets."""
    if environ.get("GITHUB_ACTIONS") == "true":
        return "github-actions"
    if environ.get("GITLAB_CI") == "true":
        return "gitlab-ci"
    return None


def detect_origin(environ: Mapping[str, str]) -> dict[str, str]:
    """Origin metadata of the current CI job; empty outside a known CI system."""
    system = ci_system(environ)
    if system == "github-actions":
        origin = {"ci": system, **_copy(environ, _GITHUB_ACTIONS)}
        server = environ.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/")
        if origin.get("repository") and origin.get("runId"):
            origin["runUrl"] = f"{server}/{origin['repository']}/actions/runs/{origin['runId']}"
        return origin
    if system == "gitlab-ci":
        return {"ci": system, **_copy(environ, _GITLAB_CI)}
    return {}


def parse_origin_options(values: Iterable[str]) -> dict[str, str]:
    """`--origin KEY=VALUE` arguments as a mapping; later ones win, as on most command lines."""
    origin: dict[str, str] = {}
    for value in values:
        key, sep, text = value.partition("=")
        key = key.strip()
        if not sep or not key:
            raise OriginFormatError(f"--origin expects KEY=VALUE, got {value!r}")
        origin[key] = text
    return origin


def run_url(origin: Mapping[str, str]) -> str | None:
    """The link to the CI run or job that asked, for people reading a request."""
    return origin.get("runUrl") or origin.get("jobUrl") or origin.get("pipelineUrl")
