"""The CI client: `signgate sign`, `signgate requests ...` and `signgate verify`.

A pipeline hashes its artifact locally (the artifact never leaves the runner), opens a signing
request carrying the digest and where the request comes from, and waits on the server's
long-poll until people approve it; the approved request carries the signature. Every outcome
has its own exit code so a pipeline can tell "rejected" from "nobody answered in time".

cli/main.py imports this module, which adds its commands to the `signgate` app (`register`).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cli.ci_env import OriginFormatError, ci_system, detect_origin, parse_origin_options, run_url

API_PREFIX = "/api/v1"
SIGNING_EXECUTABLE = "signgate-cli"
DEFAULT_WAIT_SECONDS = 3600
MAX_POLL_SECONDS = 60.0
TERMINAL_STATUSES = frozenset({"approved", "rejected", "cancelled", "expired"})
# A 500 is retried too: safe for GETs and for POSTs carrying an Idempotency-Key.
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
RETRY_DELAYS = (0.5, 1.0, 2.0)
PLAIN_HEARTBEAT_SECONDS = 300.0
CMS_SUFFIXES = frozenset({".p7s", ".p7m", ".p7"})

Format = Literal["raw", "cms"]


class ExitCode(IntEnum):
    OK = 0
    VERIFICATION_FAILED = 1
    USAGE = 2
    API_ERROR = 3
    REJECTED = 4
    CANCELLED = 5
    EXPIRED = 6
    WAIT_TIMED_OUT = 7
    SIGNING_FAILED = 8
    INTERRUPTED = 130


EXIT_CODES_HELP = (
    "Exit codes: 0 signed; 2 usage or configuration error (SIGNGATE_URL or SIGNGATE_TOKEN missing, "
    "unknown signer, bad --origin); 3 API error or signgate unreachable; 4 rejected; 5 cancelled; "
    "6 expired; 7 --wait ran out while the request is still open (resume with --resume ID); "
    "8 approved but the server could not sign."
)


def client_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("signgate")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


# --- errors -------------------------------------------------------------------------------------


class ClientError(Exception):
    """A failure shown to the user as one line, ending the command with `exit_code`."""

    exit_code: ExitCode = ExitCode.API_ERROR

    def __init__(self, message: str, *, exit_code: ExitCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ClientError):
    exit_code = ExitCode.USAGE


class Unreachable(ClientError):
    """The server did not answer (refused, timed out, broken connection): worth retrying."""


class ApiError(ClientError):
    """A non-2xx answer, described by the contract's `error_description`."""

    def __init__(self, status: int, code: str, description: str) -> None:
        hint = " (check SIGNGATE_TOKEN)" if status == 401 else ""
        super().__init__(f"{description}{hint} [{status} {code}]")
        self.status = status
        self.code = code
        self.description = description

    @property
    def transient(self) -> bool:
        return self.status in TRANSIENT_STATUSES


# --- configuration and HTTP ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    url: str
    token: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ClientConfig:
        url = environ.get("SIGNGATE_URL", "").strip()
        token = environ.get("SIGNGATE_TOKEN", "").strip()
        if not url:
            raise UsageError(
                "SIGNGATE_URL is not set (the server's address, e.g. https://signgate.example.com)"
            )
        if not token:
            raise UsageError("SIGNGATE_TOKEN is not set (a token of an identity with codesign:request)")
        return cls(url=normalize_url(url), token=token)


def normalize_url(url: str) -> str:
    """The server's root URL, accepted with or without a trailing `/api/v1`."""
    url = url.rstrip("/")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)].rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise UsageError(f"SIGNGATE_URL {url!r} is not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise UsageError(f"SIGNGATE_URL must be an http:// or https:// URL, got {url!r}")
    return url


class SigngateClient:
    """The public API over HTTP; safe requests and requests with an Idempotency-Key are retried."""

    def __init__(self, config: ClientConfig, *, transport: httpx.BaseTransport | None = None) -> None:
        self.url = config.url
        self._http = httpx.Client(
            base_url=config.url + API_PREFIX,
            headers={
                "Authorization": f"Bearer {config.token}",
                "User-Agent": f"{SIGNING_EXECUTABLE}/{client_version()}",
                "Accept": "application/json",
            },
            timeout=httpx.Timeout(30.0),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def api_url(self, path: str) -> str:
        return f"{self.url}{API_PREFIX}{path}"

    def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str | int] | None = None,
        idempotent: bool = False,
        timeout: float | None = None,
        retry: bool = True,
    ) -> httpx.Response:
        """One API call; transport failures and 5xx answers are retried when that is safe.

        POSTs are retried only with an Idempotency-Key, which the server uses to answer a
        repeated create with the request it opened the first time.
        """
        headers = {"Idempotency-Key": str(uuid.uuid4())} if idempotent else {}
        may_retry = retry and (method == "GET" or idempotent)
        delays = RETRY_DELAYS if may_retry else ()
        attempt = 0
        while True:
            try:
                response = self._send(method, path, json_body, params, headers, timeout)
                if response.is_success:
                    return response
                error: ClientError = self._api_error(response)
                if not (isinstance(error, ApiError) and error.transient):
                    raise error
            except Unreachable as exc:
                error = exc
            if attempt >= len(delays):
                raise error
            time.sleep(delays[attempt])
            attempt += 1

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"signgate answered {path} with something that is not JSON") from None

    def _send(
        self,
        method: str,
        path: str,
        json_body: Any,
        params: Mapping[str, str | int] | None,
        headers: dict[str, str],
        timeout: float | None,
    ) -> httpx.Response:
        try:
            return self._http.request(
                method,
                path,
                json=json_body,
                params=params,
                headers=headers,
                timeout=httpx.Timeout(30.0, read=timeout) if timeout else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.ConnectError as exc:
            raise Unreachable(f"cannot reach signgate at {self.url}: {_reason(exc)}") from None
        except httpx.TimeoutException:
            raise Unreachable(f"signgate at {self.url} did not answer in time") from None
        except httpx.UnsupportedProtocol:
            raise UsageError(f"SIGNGATE_URL {self.url!r} is not an http(s) URL") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"request to signgate at {self.url} failed: {_reason(exc)}") from None

    @staticmethod
    def _api_error(response: httpx.Response) -> ApiError:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body:
            return ApiError(
                response.status_code, str(body["error"]), str(body.get("error_description") or body["error"])
            )
        text = " ".join(response.text.split())[:200] or response.reason_phrase
        return ApiError(response.status_code, "http_error", text)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


# --- output -------------------------------------------------------------------------------------


class Reporter:
    """Messages on stderr (a spinner on a terminal, plain lines in CI logs); data on stdout."""

    def __init__(self) -> None:
        self.err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
        self.out = Console(highlight=False, soft_wrap=True, emoji=False)
        # A CI runner that allocates a terminal still wants log lines, not a spinner.
        self.interactive = sys.stderr.isatty() and not os.environ.get("CI")

    def say(self, message: str, *, style: str | None = None) -> None:
        self.err.print(message, style=style if self.interactive else None, markup=False)

    def error(self, message: str) -> None:
        self.err.print(f"signgate: error: {message}", style="red" if self.interactive else None, markup=False)

    def data(self, text: str) -> None:
        self.out.print(text, markup=False)

    @contextmanager
    def progress(self, text: str) -> Iterator[Callable[[str], None]]:
        """A status line to update while waiting; plain mode prints changes and a heartbeat."""
        if self.interactive:
            with self.err.status(escape(text)) as status:
                yield lambda new_text: status.update(escape(new_text))
            return
        last_text, last_at = text, time.monotonic()
        self.say(text)

        def update(new_text: str) -> None:
            nonlocal last_text, last_at
            now = time.monotonic()
            if new_text != last_text or now - last_at >= PLAIN_HEARTBEAT_SECONDS:
                self.say(new_text)
                last_text, last_at = new_text, now

        yield update


P = ParamSpec("P")
R = TypeVar("R")


def handles_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Every expected failure ends as one line on stderr and its exit code, never a traceback."""

    @wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        reporter = Reporter()
        try:
            return command(*args, **kwargs)
        except ClientError as exc:
            reporter.error(exc.message)
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            reporter.error("interrupted")
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None

    return wrapper


@contextmanager
def connected() -> Iterator[SigngateClient]:
    client = SigngateClient(ClientConfig.from_environ(os.environ))
    try:
        yield client
    finally:
        client.close()


# --- signers and algorithms ---------------------------------------------------------------------


def find_signer(client: SigngateClient, name: str) -> dict[str, Any]:
    """The signer called `name` among those the token sees (its memberships; all for an admin)."""
    offset = 0
    while True:
        page = client.json("GET", "/pki/signers", params={"name": name, "limit": 500, "offset": offset})
        items = page.get("items") or []
        for signer in items:
            if signer.get("name") == name:
                return dict(signer)
        offset += len(items)
        if not items or offset >= int(page.get("total", 0)):
            raise UsageError(
                f"no signer named {name!r} among the signers this token may use "
                "(an identity sees the signers it is a member of)"
            )


def choose_algorithm(signer: Mapping[str, Any], requested: str | None) -> str:
    """The requested algorithm if the signer's key supports it, else SHA-256 in the key's family."""
    supported = [str(a) for a in signer.get("supportedAlgorithms") or []]
    if requested:
        algorithm = requested.strip().upper()
        if algorithm not in supported:
            raise UsageError(
                f"signer {signer['name']!r} ({signer.get('keyAlgorithm')}) does not support {algorithm}; "
                f"it supports {', '.join(supported) or 'nothing'}"
            )
        return algorithm
    key_algorithm = str(signer.get("keyAlgorithm", ""))
    preferred = "ECDSA_SHA256" if key_algorithm.startswith("EC_") else "RSASSA_PKCS1_V1_5_SHA256"
    if preferred in supported:
        return preferred
    if supported:
        return supported[0]
    raise UsageError(f"signer {signer['name']!r} offers no signing algorithm")


def file_digest(path: Path, hash_name: str) -> bytes:
    """Streamed in 1 MiB chunks, so an artifact of any size needs constant memory."""
    from pki.signing import digest_file

    try:
        return digest_file(path, hash_name)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def hash_of(signing_algorithm: str) -> str:
    from pki.algorithms import hash_name
    from pki.errors import UnsupportedAlgorithm

    try:
        return hash_name(signing_algorithm)
    except UnsupportedAlgorithm as exc:
        raise UsageError(str(exc)) from None


# --- describing requests ------------------------------------------------------------------------


def describe_state(request: Mapping[str, Any]) -> str:
    """One line on where an open request stands, for the progress display."""
    status = request.get("status")
    if status != "open":
        return f"request {request['id']} is {status}"
    steps = request.get("steps") or []
    index = request.get("currentStep")
    if not steps or index is None or not 0 <= index < len(steps):
        return "waiting for approval"
    step = steps[index]
    approved = sum(1 for a in step.get("approvals") or [] if a.get("decision") == "approved")
    return (
        f"waiting for approval: step {index + 1}/{len(steps)} {step.get('name')!r}, "
        f"{approved}/{step.get('requiredApprovals')} approvals"
    )


def rejection_note(request: Mapping[str, Any]) -> str:
    for step in request.get("steps") or []:
        for approval in step.get("approvals") or []:
            if approval.get("decision") == "rejected":
                comment = approval.get("comment")
                who = approval.get("approverName") or approval.get("approverId")
                return f" by {who}" + (f": {comment}" if comment else "")
    return ""


def _short_time(value: Any) -> str:
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def request_summary(request: Mapping[str, Any]) -> list[tuple[str, str]]:
    artifact = request.get("artifact") or {}
    rows = [
        ("id", str(request.get("id"))),
        ("status", str(request.get("status"))),
        ("signer", str(request.get("signerName"))),
        ("requester", str(request.get("requesterName"))),
        ("policy", str(request.get("signingPolicyName") or "-")),
        ("justification", str(request.get("justification") or "-")),
    ]
    if artifact:
        rows += [
            ("artifact", f"{artifact.get('name') or '-'} ({artifact.get('format')})"),
            ("digest", f"{artifact.get('digestAlgorithm')} {_hex(artifact.get('digest'))}"),
            ("algorithm", str(artifact.get("signingAlgorithm"))),
        ]
    for key, value in (request.get("origin") or {}).items():
        rows.append((f"origin.{key}", str(value)))
    for number, step in enumerate(request.get("steps") or [], start=1):
        decisions = ", ".join(
            f"{a.get('approverName')} {a.get('decision')}"
            + (f" ({a['comment']})" if a.get("comment") else "")
            for a in step.get("approvals") or []
        )
        rows.append(
            (
                f"step {number}",
                f"{step.get('name')}: {step.get('status')}, needs {step.get('requiredApprovals')}"
                + (f"; {decisions}" if decisions else ""),
            )
        )
    rows += [
        ("created", _short_time(request.get("createdAt"))),
        ("expires", _short_time(request.get("expiresAt"))),
        ("closed", _short_time(request.get("closedAt"))),
    ]
    if request.get("signingError"):
        rows.append(("signing error", str(request["signingError"])))
    if request.get("originalRequestId"):
        rows.append(("resubmission of", str(request["originalRequestId"])))
    return rows


def _hex(digest_b64: Any) -> str:
    try:
        return base64.b64decode(str(digest_b64)).hex()
    except ValueError:
        return str(digest_b64)


def print_request(reporter: Reporter, request: Mapping[str, Any]) -> None:
    rows = request_summary(request)
    if reporter.interactive:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for key, value in rows:
            table.add_row(escape(key), escape(value))
        reporter.out.print(table)
    else:
        for key, value in rows:
            reporter.data(f"{key}: {value}")


def print_approval_hints(reporter: Reporter, client: SigngateClient, request: Mapping[str, Any]) -> None:
    request_id = request["id"]
    reporter.say(f"Approve with:  signgate requests approve {request_id}")
    reporter.say(f"Request:       {client.api_url(f'/pki/signing-requests/{request_id}')}")


# --- the sign command ---------------------------------------------------------------------------


class WaitTimedOut(ClientError):
    exit_code = ExitCode.WAIT_TIMED_OUT


def wait_for_result(
    client: SigngateClient,
    request: dict[str, Any],
    *,
    deadline: float,
    reporter: Reporter,
    resume_hint: str,
) -> dict[str, Any]:
    """Long-poll `.../result` in slices of at most a minute until the request closes or time runs out.

    A broken connection or a 5xx answer while waiting is retried with back-off: a pipeline that
    waits an hour for people should not fail on a proxy's hiccup.
    """
    request_id = request["id"]
    waiting_since = time.monotonic()
    failures = 0
    last_error: ClientError | None = None
    with reporter.progress(describe_state(request)) as update:
        while request.get("status") not in TERMINAL_STATUSES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if last_error is not None:
                    raise last_error
                waited = time.monotonic() - waiting_since
                raise WaitTimedOut(
                    f"request {request_id} is still open after waiting {waited:.0f}s "
                    f"({describe_state(request)}); resume with: {resume_hint}"
                )
            poll = min(remaining, MAX_POLL_SECONDS)
            started = time.monotonic()
            try:
                request = client.json(
                    "GET",
                    f"/pki/signing-requests/{request_id}/result",
                    params={"waitSeconds": f"{poll:.1f}"},
                    timeout=poll + 30.0,
                    retry=False,
                )
            except (Unreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and not exc.transient:
                    raise
                last_error = exc
                failures += 1
                update(f"{exc.message}; retrying")
                time.sleep(max(0.0, min(2.0 ** min(failures, 5), deadline - time.monotonic())))
                continue
            failures, last_error = 0, None
            if request.get("status") in TERMINAL_STATUSES:
                break
            update(describe_state(request))
            if time.monotonic() - started < 1.0:
                # The server answered at once although asked to wait: do not hammer it.
                time.sleep(max(0.0, min(2.0, deadline - time.monotonic())))
    return request


def finish_signing(request: Mapping[str, Any], *, out: Path, reporter: Reporter) -> None:
    """Turn a closed request into a signature file, or the exit code of why there is none."""
    request_id = request["id"]
    status = request.get("status")
    if status == "rejected":
        raise ClientError(
            f"request {request_id} was rejected{rejection_note(request)}", exit_code=ExitCode.REJECTED
        )
    if status == "cancelled":
        raise ClientError(f"request {request_id} was cancelled", exit_code=ExitCode.CANCELLED)
    if status == "expired":
        raise ClientError(
            f"request {request_id} expired at {_short_time(request.get('expiresAt'))} before it was approved",
            exit_code=ExitCode.EXPIRED,
        )
    if status != "approved":  # pragma: no cover - callers wait for a terminal status
        raise ClientError(f"request {request_id} is {status}")
    signature = request.get("signature")
    if not signature:
        reason = request.get("signingError") or "the approved request carries no signature"
        raise ClientError(
            f"request {request_id} was approved, but signing failed: {reason}",
            exit_code=ExitCode.SIGNING_FAILED,
        )
    try:
        signature_bytes = base64.b64decode(signature, validate=True)
    except ValueError:
        raise ClientError(f"request {request_id} carries a signature that is not base64") from None
    write_atomically(out, signature_bytes)
    reporter.say(f"Request {request_id} approved; signature written to {out}", style="green")


def write_atomically(path: Path, content: bytes) -> None:
    """A reader never sees half a signature, and a failed run leaves no stale one behind."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def github_output(**values: str) -> None:
    """Step outputs for later steps of a GitHub Actions job (`steps.<id>.outputs.<name>`)."""
    target = os.environ.get("GITHUB_OUTPUT")
    if not target:
        return
    try:
        with open(target, "a", encoding="utf-8") as handle:
            for name, value in values.items():
                handle.write(f"{name}={value}\n")
    except OSError:
        pass


def default_justification(file: Path, origin: Mapping[str, str]) -> str:
    parts = [f"sign {file.name}"]
    if origin.get("repository"):
        where = origin["repository"]
        if origin.get("ref"):
            where += f" {origin['ref']}"
        if origin.get("commit"):
            where += f" @ {origin['commit'][:12]}"
        parts.append(f"from {where}")
    link = run_url(origin)
    if link:
        parts.append(f"({link})")
    return " ".join(parts)


def default_out(file: Path, artifact_format: str) -> Path:
    return file.with_name(file.name + (".p7s" if artifact_format == "cms" else ".sig"))


def open_artifact_request(
    client: SigngateClient,
    *,
    file: Path,
    signer_name: str,
    algorithm: str | None,
    artifact_format: Format,
    justification: str | None,
    origin: dict[str, str],
) -> dict[str, Any]:
    signer = find_signer(client, signer_name)
    signing_algorithm = choose_algorithm(signer, algorithm)
    digest_algorithm = hash_of(signing_algorithm)
    digest = file_digest(file, digest_algorithm)
    system = ci_system(os.environ)
    body = {
        "signerId": signer["id"],
        "justification": justification or default_justification(file, origin),
        "artifact": {
            "name": file.name,
            "digest": base64.b64encode(digest).decode("ascii"),
            "digestAlgorithm": digest_algorithm,
            "signingAlgorithm": signing_algorithm,
            "format": artifact_format,
        },
        "origin": origin,
        "clientMetadata": {
            "signingExecutable": SIGNING_EXECUTABLE,
            "clientVersion": client_version(),
            "hostname": socket.gethostname(),
            "fileSize": file.stat().st_size,
            **({"ci": system} if system else {}),
        },
    }
    request: dict[str, Any] = client.json("POST", "/pki/signing-requests", json_body=body, idempotent=True)
    return request


def load_request_to_resume(
    client: SigngateClient, request_id: str, *, file: Path, signer_name: str | None
) -> dict[str, Any]:
    """The request a timed-out run opened, checked to be about this very file."""
    request: dict[str, Any] = client.json("GET", f"/pki/signing-requests/{request_id}")
    artifact = request.get("artifact")
    if not artifact:
        raise UsageError(f"request {request_id} carries no artifact to sign")
    if signer_name and request.get("signerName") != signer_name:
        raise UsageError(
            f"request {request_id} is for signer {request.get('signerName')!r}, not {signer_name!r}"
        )
    digest = file_digest(file, str(artifact["digestAlgorithm"]))
    if base64.b64encode(digest).decode("ascii") != artifact["digest"]:
        raise UsageError(f"{file} is not the artifact of request {request_id} (its digest differs)")
    return request


FileArgument = Annotated[
    Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The file to sign.")
]


@handles_errors
def sign(
    file: FileArgument,
    signer: Annotated[
        str | None, typer.Option("--signer", "-s", help="Name of the signer.", show_default=False)
    ] = None,
    algorithm: Annotated[
        str | None,
        typer.Option(help=r"Signing algorithm \[default: ECDSA_SHA256 or RSASSA_PKCS1_V1_5_SHA256 by key]"),
    ] = None,
    format: Annotated[
        Format, typer.Option("--format", "-f", help="raw signature bytes, or a detached DER CMS (.p7s).")
    ] = "raw",
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help=r"Signature file \[default: FILE.sig, FILE.p7s for cms]"),
    ] = None,
    wait: Annotated[
        int, typer.Option(min=0, help="Seconds to wait for approval; 0 opens the request and returns.")
    ] = DEFAULT_WAIT_SECONDS,
    justification: Annotated[
        str | None, typer.Option(help=r"Why this needs signing \[default: from the CI origin]")
    ] = None,
    origin: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="Origin metadata, repeatable; added to what the CI sets."),
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option(metavar="REQUEST_ID", help="Wait on a request an earlier run opened for FILE."),
    ] = None,
) -> None:
    """Hash FILE locally, open a signing request, wait for approval and write the signature.

    The request's id and how to approve it are printed at once.

    Origin metadata (repository, commit, ref, run URL) is read from GitHub Actions or GitLab CI.
    """
    reporter = Reporter()
    try:
        request_origin = {**detect_origin(os.environ), **parse_origin_options(origin or [])}
    except OriginFormatError as exc:
        raise UsageError(str(exc)) from None
    if resume is None and not signer:
        raise UsageError("--signer NAME is required (or --resume REQUEST_ID)")
    deadline = time.monotonic() + wait
    with connected() as client:
        if resume is not None:
            request = load_request_to_resume(client, resume, file=file, signer_name=signer)
            reporter.say(f"Resuming signing request {request['id']} ({request.get('status')})")
        else:
            assert signer is not None
            request = open_artifact_request(
                client,
                file=file,
                signer_name=signer,
                algorithm=algorithm,
                artifact_format=format,
                justification=justification,
                origin=request_origin,
            )
            artifact = request.get("artifact") or {}
            reporter.say(
                f"Opened signing request {request['id']} for {file.name} with signer "
                f"{request.get('signerName')} ({artifact.get('signingAlgorithm')}, {artifact.get('format')})"
            )
        github_output(**{"request-id": request["id"]})
        artifact_format = str((request.get("artifact") or {}).get("format") or format)
        target = out or default_out(file, artifact_format)
        if request.get("status") == "open":
            print_approval_hints(reporter, client, request)
        resume_hint = f"signgate sign {file} --resume {request['id']}" + (f" --out {out}" if out else "")
        try:
            request = wait_for_result(
                client, request, deadline=deadline, reporter=reporter, resume_hint=resume_hint
            )
        except KeyboardInterrupt:
            raise ClientError(
                f"interrupted; request {request['id']} stays open: resume with `{resume_hint}` "
                f"or cancel with `signgate requests cancel {request['id']}`",
                exit_code=ExitCode.INTERRUPTED,
            ) from None
        finish_signing(request, out=target, reporter=reporter)
        github_output(signature=str(target))
        reporter.data(str(target))


# --- requests -----------------------------------------------------------------------------------

requests_app = typer.Typer(
    help="List, inspect and decide signing requests.", no_args_is_help=True, add_completion=False
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")]
CommentOption = Annotated[str | None, typer.Option("--comment", "-m", help="A note for the record.")]


def print_json(reporter: Reporter, value: Any) -> None:
    reporter.data(json.dumps(value, indent=2, sort_keys=False))


@requests_app.command("list")
@handles_errors
def list_requests(
    status: Annotated[
        list[str] | None,
        typer.Option(help="open, approved, rejected, cancelled or expired; repeatable or comma-separated."),
    ] = None,
    signer: Annotated[str | None, typer.Option(help="Only requests for this signer.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many, newest first.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """Requests the token may see: its own, or all of them for approvers and auditors."""
    reporter = Reporter()
    statuses = [s.strip() for value in status or [] for s in value.split(",") if s.strip()]
    params: dict[str, str | int] = {"limit": limit}
    if statuses:
        params["status"] = ",".join(statuses)
    with connected() as client:
        signer_name_filter = None
        if signer:
            try:
                params["signerId"] = find_signer(client, signer)["id"]
            except UsageError:
                # Approvers need not be members of the signers they approve for.
                signer_name_filter = signer
                params["limit"] = 500
        page = client.json("GET", "/pki/signing-requests", params=params)
    items = [r for r in page.get("items") or [] if signer_name_filter in (None, r.get("signerName"))]
    if signer_name_filter is not None:
        page = {"items": items[:limit], "total": len(items)}
        items = items[:limit]
    if as_json:
        print_json(reporter, page)
        return
    columns = ("ID", "STATUS", "SIGNER", "REQUESTER", "ARTIFACT", "STEP", "CREATED")
    rows = [
        (
            str(r.get("id")),
            str(r.get("status")),
            str(r.get("signerName")),
            str(r.get("requesterName")),
            str((r.get("artifact") or {}).get("name") or "-"),
            _step_cell(r),
            _short_time(r.get("createdAt")),
        )
        for r in items
    ]
    if reporter.interactive:
        table = Table(*columns, box=None, header_style="bold")
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        reporter.out.print(table)
        reporter.say(f"{len(rows)} of {page.get('total', len(rows))} requests")
    else:
        reporter.data("\t".join(columns))
        for row in rows:
            reporter.data("\t".join(row))


def _step_cell(request: Mapping[str, Any]) -> str:
    steps = request.get("steps") or []
    index = request.get("currentStep")
    if request.get("status") != "open" or index is None or not steps:
        return "-"
    return f"{index + 1}/{len(steps)}"


@requests_app.command("show")
@handles_errors
def show_request(request_id: str, as_json: JsonOption = False) -> None:
    """One request: artifact, origin, approval steps and decisions."""
    reporter = Reporter()
    with connected() as client:
        request = client.json("GET", f"/pki/signing-requests/{request_id}")
    if as_json:
        print_json(reporter, request)
    else:
        print_request(reporter, request)


def _decide(action: str, request_id: str, comment: str | None) -> None:
    reporter = Reporter()
    with connected() as client:
        request = client.json(
            "POST",
            f"/pki/signing-requests/{request_id}/{action}",
            json_body={"comment": comment} if comment else {},
            idempotent=True,
        )
    status = request.get("status")
    detail = f" ({describe_state(request)})" if status == "open" else ""
    reporter.say(f"Request {request_id} is {status}{detail}", style="green" if status != "open" else None)


@requests_app.command("approve")
@handles_errors
def approve_request(request_id: str, comment: CommentOption = None) -> None:
    """Approve the current step of a request (needs codesign:approve and a place among its approvers)."""
    _decide("approve", request_id, comment)


@requests_app.command("reject")
@handles_errors
def reject_request(request_id: str, comment: CommentOption = None) -> None:
    """Reject a request; one rejection ends it."""
    _decide("reject", request_id, comment)


@requests_app.command("cancel")
@handles_errors
def cancel_request(request_id: str, comment: CommentOption = None) -> None:
    """Cancel an open request (its requester or an admin)."""
    _decide("cancel", request_id, comment)


@requests_app.command("resubmit")
@handles_errors
def resubmit_request(
    request_id: str,
    signer: Annotated[str, typer.Option("--signer", "-s", help="Signer of the new request.")],
    justification: Annotated[str | None, typer.Option(help=r"\[default: the original's]")] = None,
) -> None:
    """Open a new request with an approved request's artifact and origin, for another signer."""
    reporter = Reporter()
    with connected() as client:
        signer_id = find_signer(client, signer)["id"]
        body: dict[str, Any] = {"signerId": signer_id}
        if justification is not None:
            body["justification"] = justification
        request = client.json(
            "POST", f"/pki/signing-requests/{request_id}/resubmit", json_body=body, idempotent=True
        )
        reporter.say(f"Opened signing request {request['id']} ({request.get('status')}) for signer {signer}")
        if request.get("status") == "open":
            print_approval_hints(reporter, client, request)
    reporter.data(str(request["id"]))


# --- verify -------------------------------------------------------------------------------------


def verify_raw(chain_pem: str, signing_algorithm: str, digest: bytes, signature: bytes) -> bool:
    from pki.certificates import parse_chain_pem
    from pki.errors import PkiError
    from pki.signing import verify
    from pki.verification import certificate_public_key

    try:
        public_key = certificate_public_key(parse_chain_pem(chain_pem)[0])
        return verify(public_key, signing_algorithm, digest, signature, is_digest=True)
    except PkiError as exc:
        raise ClientError(f"cannot verify with the signer's certificate: {exc.message}") from None


def verify_cms(file: Path, signature_file: Path, chain_pem: str) -> bool:
    """Let openssl check the detached CMS against FILE, trusting the signer's certificate chain."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise UsageError("verifying a cms signature needs the openssl command on PATH")
    with tempfile.TemporaryDirectory(prefix="signgate-verify-") as directory:
        chain_file = Path(directory) / "signer.pem"
        chain_file.write_text(chain_pem, encoding="utf-8")
        command = [openssl, "cms", "-verify", "-binary", "-inform", "DER"]
        command += ["-in", str(signature_file), "-content", str(file), "-out", os.devnull]
        command += ["-CAfile", str(chain_file), "-partial_chain", "-purpose", "any"]
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
        )
    return result.returncode == 0


@handles_errors
def verify(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="The signed file.")
    ],
    signature: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="Its signature file.")
    ],
    signer: Annotated[str, typer.Option("--signer", "-s", help="Name of the signer.")],
    algorithm: Annotated[
        str | None, typer.Option(help=r"Signing algorithm of a raw signature \[default: as for sign]")
    ] = None,
    format: Annotated[
        Format | None,
        typer.Option("--format", "-f", help=r"\[default: cms for .p7s/.p7m files, raw otherwise]"),
    ] = None,
) -> None:
    """Check SIG over FILE locally against the signer's certificate; exit 0 if valid, 1 if not."""
    reporter = Reporter()
    signature_format = format or ("cms" if signature.suffix.lower() in CMS_SUFFIXES else "raw")
    with connected() as client:
        signer_row = find_signer(client, signer)
        chain_pem = client.call("GET", f"/pki/signers/{signer_row['id']}/certificate").text
    if signature_format == "cms":
        valid = verify_cms(file, signature, chain_pem)
    else:
        signing_algorithm = choose_algorithm(signer_row, algorithm)
        try:
            signature_bytes = signature.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {signature}: {exc.strerror or exc}") from None
        valid = verify_raw(
            chain_pem, signing_algorithm, file_digest(file, hash_of(signing_algorithm)), signature_bytes
        )
    if valid:
        reporter.say("Verified OK", style="green")
        return
    reporter.say("Verification failed", style="red")
    raise typer.Exit(int(ExitCode.VERIFICATION_FAILED))


# --- registration -------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add the client's commands to the `signgate` app (once, however often it is called)."""
    if any(info.name == "sign" for info in app.registered_commands):
        return
    app.command("sign", epilog=EXIT_CODES_HELP)(sign)
    app.command(
        "verify", epilog="Exit codes: 0 valid; 1 invalid; 2 usage or configuration error; 3 API error."
    )(verify)
    app.add_typer(requests_app, name="requests")


def _register_on_main_app() -> None:
    from cli.main import app

    register(app)


_register_on_main_app()
