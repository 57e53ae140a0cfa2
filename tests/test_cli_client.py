"""The CI client as a pipeline runs it: the real `signgate` command in a subprocess against the
API served over HTTP by uvicorn, with the session's worker processing the request workflows.

Signatures are checked with openssl, not with our own code.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from cli.ci_env import OriginFormatError, detect_origin, parse_origin_options
from cli.client import ExitCode, UsageError, choose_algorithm, normalize_url
from tests.conftest import Api, Ident, assert_eventually

SIGNGATE = Path(sys.executable).parent / "signgate"
CI_PREFIXES = ("SIGNGATE_", "GITHUB_", "GITLAB_", "CI_")
CLI_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def live_url(settings: Any, engine: Any, temporal_env: Any) -> Iterator[str]:
    """The API over real HTTP, in a thread with its own event loop and its own Temporal client.

    The session app's Temporal client belongs to the test loop, so this app connects lazily in
    its lifespan to the same dev server; the session worker runs the workflows it starts.
    """
    from api.main import create_app

    live_settings = settings.model_copy(
        update={"temporal_address": temporal_env.client.service_client.config.target_host}
    )
    app = create_app(live_settings, engine=engine)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="signgate-live-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live API did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)


def cli_env(url: str | None, token: str | None, **extra: str) -> dict[str, str]:
    """The environment of a CI job: nothing of ours or of a CI system leaks in from outside."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CI_PREFIXES)}
    env.pop("GITHUB_ACTIONS", None)
    env.pop("GITLAB_CI", None)
    if url is not None:
        env["SIGNGATE_URL"] = url
    if token is not None:
        env["SIGNGATE_TOKEN"] = token
    env.update(extra)
    return env


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    def assert_clean(self) -> None:
        assert "Traceback" not in self.stderr, self.stderr
        assert "Traceback" not in self.stdout, self.stdout


async def start_cli(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    # Asynchronous on purpose: the session worker runs on this event loop and must keep going.
    return await asyncio.create_subprocess_exec(
        str(SIGNGATE),
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> Run:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    run = Run(proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode())
    run.assert_clean()
    return run


async def run_cli(*args: str, env: dict[str, str]) -> Run:
    return await finish(await start_cli(*args, env=env))


@dataclass
class Setup:
    requester: Ident
    approver: Ident
    signer: dict[str, Any]


async def setup_signer(api: Api, *, key_algorithm: str = "EC_P256", **policy_extra: Any) -> Setup:
    requester = await api.identity()
    approver = await api.identity()
    policy = await api.policy([([approver], 1)], **policy_extra)
    signer = await api.signer(members=[requester], policy_id=policy["id"], key_algorithm=key_algorithm)
    return Setup(requester, approver, signer)


async def opened_request(api: Api, setup: Setup, proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """The request the running `signgate sign` opened, once the API lists it."""
    found: list[dict[str, Any]] = []

    async def listed() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"signgate sign ended early with {proc.returncode}")
        r = await api.call(
            "GET", f"/pki/signing-requests?signerId={setup.signer['id']}", setup.requester, expect=200
        )
        found[:] = r.json()["items"]
        return bool(found)

    await assert_eventually(listed, timeout=30, interval=0.1)
    assert len(found) == 1, "a create retried with its Idempotency-Key opens one request"
    return found[0]


async def signer_chain(api: Api, setup: Setup, path: Path) -> Path:
    r = await api.call("GET", f"/pki/signers/{setup.signer['id']}/certificate", setup.requester, expect=200)
    path.write_text(r.text)
    return path


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)


def artifact_file(path: Path, size: int = 2 * 1024 * 1024 + 12345) -> Path:
    """Larger than one 1 MiB hashing chunk, and not a multiple of it."""
    block = hashlib.sha256(path.name.encode()).digest() * 64
    path.write_bytes((block * (size // len(block) + 1))[:size])
    return path


async def test_sign_cms_waits_for_approval_and_openssl_verifies_it(
    api: Api, live_url: str, tmp_path: Path
) -> None:
    setup = await setup_signer(api, key_algorithm="RSA_2048")
    artifact = artifact_file(tmp_path / "app-1.0.tar.gz")
    env = cli_env(live_url, setup.requester.token)
    proc = await start_cli(
        "sign", str(artifact), "--signer", setup.signer["name"], "--format", "cms",
        "--wait", "120", "--justification", "release 1.0",
        env=env,
    )  # fmt: skip
    request = await opened_request(api, setup, proc)
    assert request["status"] == "open"
    assert request["justification"] == "release 1.0"
    assert request["artifact"] == {
        "name": "app-1.0.tar.gz",
        "digest": base64.b64encode(hashlib.sha256(artifact.read_bytes()).digest()).decode(),
        "digestAlgorithm": "SHA256",
        "signingAlgorithm": "RSASSA_PKCS1_V1_5_SHA256",
        "format": "cms",
    }
    assert request["clientMetadata"]["signingExecutable"] == "signgate-cli"
    assert request["clientMetadata"]["fileSize"] == artifact.stat().st_size
    await api.call(
        "POST", f"/pki/signing-requests/{request['id']}/approve", setup.approver, json={}, expect=200
    )
    run = await finish(proc)
    assert run.returncode == 0, run.stderr
    p7s = tmp_path / "app-1.0.tar.gz.p7s"
    assert run.stdout.strip() == str(p7s)
    assert request["id"] in run.stderr
    assert f"signgate requests approve {request['id']}" in run.stderr
    assert f"{live_url}/api/v1/pki/signing-requests/{request['id']}" in run.stderr

    chain = await signer_chain(api, setup, tmp_path / "cert.pem")
    checked = openssl(
        "cms", "-verify", "-binary", "-inform", "DER", "-in", str(p7s), "-content", str(artifact),
        "-CAfile", str(chain), "-purpose", "any", "-out", os.devnull,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr

    run = await run_cli("verify", str(artifact), str(p7s), "--signer", setup.signer["name"], env=env)
    assert (run.returncode, run.stderr.strip()) == (0, "Verified OK")
    tampered = tmp_path / "tampered.tar.gz"
    tampered.write_bytes(artifact.read_bytes()[:-1] + b"!")
    run = await run_cli("verify", str(tampered), str(p7s), "--signer", setup.signer["name"], env=env)
    assert (run.returncode, run.stderr.strip()) == (1, "Verification failed")


async def test_sign_raw_under_a_pre_approval_and_openssl_pkeyutl_verifies_it(
    api: Api, live_url: str, tmp_path: Path
) -> None:
    setup = await setup_signer(api, key_algorithm="EC_P256")
    await api.call(
        "POST",
        "/pki/pre-approvals",
        setup.approver,
        json={
            "signerId": setup.signer["id"],
            "identityId": setup.requester.id,
            "comment": "nightly builds from the CLI",
            "signingExecutable": "signgate-cli",
        },
        expect=201,
    )
    artifact = artifact_file(tmp_path / "tool.bin", size=3000)
    signature = tmp_path / "out" / "tool.sig"
    signature.parent.mkdir()
    # The URL is accepted with the API prefix and a trailing slash too.
    env = cli_env(f"{live_url}/api/v1/", setup.requester.token)
    run = await run_cli(
        "sign", str(artifact), "--signer", setup.signer["name"], "--out", str(signature), "--wait", "60",
        env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(signature)
    listed = await api.call(
        "GET", f"/pki/signing-requests?signerId={setup.signer['id']}", setup.requester, expect=200
    )
    assert listed.json()["items"][0]["preApprovalId"], "approved by the pre-approval, nobody else"

    chain = await signer_chain(api, setup, tmp_path / "cert.pem")
    public_key = tmp_path / "pub.pem"
    extracted = openssl("x509", "-in", str(chain), "-pubkey", "-noout", "-out", str(public_key))
    assert extracted.returncode == 0, extracted.stderr
    digest = tmp_path / "digest.bin"
    digest.write_bytes(hashlib.sha256(artifact.read_bytes()).digest())
    checked = openssl(
        "pkeyutl", "-verify", "-pubin", "-inkey", str(public_key), "-in", str(digest),
        "-sigfile", str(signature), "-pkeyopt", "digest:sha256",
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr

    run = await run_cli("verify", str(artifact), str(signature), "--signer", setup.signer["name"], env=env)
    assert (run.returncode, run.stderr.strip()) == (0, "Verified OK")
    artifact.write_bytes(artifact.read_bytes() + b"\n")
    run = await run_cli("verify", str(artifact), str(signature), "--signer", setup.signer["name"], env=env)
    assert (run.returncode, run.stderr.strip()) == (1, "Verification failed")


async def test_rejected_request_exits_4_with_who_and_why(api: Api, live_url: str, tmp_path: Path) -> None:
    setup = await setup_signer(api)
    artifact = artifact_file(tmp_path / "app.zip", size=100)
    proc = await start_cli(
        "sign", str(artifact), "--signer", setup.signer["name"], "--wait", "120",
        env=cli_env(live_url, setup.requester.token),
    )  # fmt: skip
    request = await opened_request(api, setup, proc)
    await api.call(
        "POST",
        f"/pki/signing-requests/{request['id']}/reject",
        setup.approver,
        json={"comment": "not a release build"},
        expect=200,
    )
    run = await finish(proc)
    assert run.returncode == 4
    assert f"request {request['id']} was rejected by {setup.approver.name}: not a release build" in run.stderr
    assert not (tmp_path / "app.zip.sig").exists()


async def test_cancelled_request_exits_5(api: Api, live_url: str, tmp_path: Path) -> None:
    setup = await setup_signer(api)
    artifact = artifact_file(tmp_path / "app.zip", size=100)
    env = cli_env(live_url, setup.requester.token)
    proc = await start_cli("sign", str(artifact), "--signer", setup.signer["name"], env=env)
    request = await opened_request(api, setup, proc)
    cancelled = await run_cli("requests", "cancel", request["id"], "--comment", "wrong tag", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"Request {request['id']} is cancelled" in cancelled.stderr
    run = await finish(proc)
    assert run.returncode == 5
    assert f"request {request['id']} was cancelled" in run.stderr


async def test_expired_request_exits_6(api: Api, live_url: str, tmp_path: Path) -> None:
    setup = await setup_signer(api, requestTtlSeconds=1)
    artifact = artifact_file(tmp_path / "app.zip", size=100)
    run = await run_cli(
        "sign", str(artifact), "--signer", setup.signer["name"], "--wait", "60",
        env=cli_env(live_url, setup.requester.token),
    )  # fmt: skip
    assert run.returncode == 6, run.stderr
    assert "expired" in run.stderr and "before it was approved" in run.stderr


GITHUB_ENV = {
    "GITHUB_ACTIONS": "true",
    "GITHUB_REPOSITORY": "acme/widget",
    "GITHUB_SHA": "0123456789abcdef0123456789abcdef01234567",
    "GITHUB_REF": "refs/tags/v1.2.3",
    "GITHUB_RUN_ID": "987654321",
    "GITHUB_SERVER_URL": "https://github.example.com",
    "GITHUB_WORKFLOW": "release",
    "GITHUB_ACTOR": "octocat",
}


async def test_timed_out_wait_exits_7_with_github_origin_and_resumes_after_approval(
    api: Api, live_url: str, tmp_path: Path
) -> None:
    setup = await setup_signer(api)
    other = await api.signer(members=[setup.requester])
    artifact = artifact_file(tmp_path / "widget.tar.gz", size=5000)
    outputs = tmp_path / "github_output"
    env = cli_env(live_url, setup.requester.token, **GITHUB_ENV, GITHUB_OUTPUT=str(outputs))
    run = await run_cli(
        "sign", str(artifact), "--signer", setup.signer["name"], "--wait", "1",
        "--origin", "buildNumber=42", "--origin", "actor=release-bot",
        env=env,
    )  # fmt: skip
    assert run.returncode == 7, run.stderr
    listed = (
        await api.call(
            "GET", f"/pki/signing-requests?signerId={setup.signer['id']}", setup.requester, expect=200
        )
    ).json()["items"]
    assert len(listed) == 1
    request = listed[0]
    assert request["status"] == "open"
    assert f"request {request['id']} is still open" in run.stderr
    assert f"--resume {request['id']}" in run.stderr
    assert request["origin"] == {
        "ci": "github-actions",
        "repository": "acme/widget",
        "commit": GITHUB_ENV["GITHUB_SHA"],
        "ref": "refs/tags/v1.2.3",
        "workflow": "release",
        "actor": "release-bot",  # --origin wins over what the CI sets
        "runId": "987654321",
        "runUrl": "https://github.example.com/acme/widget/actions/runs/987654321",
        "buildNumber": "42",
    }
    assert request["clientMetadata"]["ci"] == "github-actions"
    assert "acme/widget refs/tags/v1.2.3 @ 0123456789ab" in request["justification"]
    assert f"request-id={request['id']}" in outputs.read_text()

    # An approver inspects and approves it with the same command line.
    approver_env = cli_env(live_url, setup.approver.token)
    shown = await run_cli("requests", "show", request["id"], "--json", env=approver_env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["origin"]["repository"] == "acme/widget"
    listed_open = await run_cli(
        "requests", "list", "--status", "open", "--signer", setup.signer["name"], "--json", env=approver_env
    )
    assert listed_open.returncode == 0, listed_open.stderr
    assert [r["id"] for r in json.loads(listed_open.stdout)["items"]] == [request["id"]]
    approved = await run_cli(
        "requests", "approve", request["id"], "-m", "tag v1.2.3 checked", env=approver_env
    )
    assert approved.returncode == 0, approved.stderr
    assert f"Request {request['id']} is approved" in approved.stderr

    # The same job, re-run with --resume, collects the signature of the approved request.
    run = await run_cli("sign", str(artifact), "--resume", request["id"], "--wait", "60", env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "widget.tar.gz.sig").stat().st_size > 0
    assert f"signature={tmp_path / 'widget.tar.gz.sig'}" in outputs.read_text()
    run = await run_cli(
        "verify", str(artifact), str(tmp_path / "widget.tar.gz.sig"), "-s", setup.signer["name"], env=env
    )
    assert run.returncode == 0, run.stderr

    # --resume refuses another file than the one the request is about.
    other_file = artifact_file(tmp_path / "other.bin", size=10)
    run = await run_cli("sign", str(other_file), "--resume", request["id"], env=env)
    assert run.returncode == 2 and "its digest differs" in run.stderr

    # Resubmitting the approved request for another signer opens a new request (no policy: approved).
    run = await run_cli("requests", "resubmit", request["id"], "--signer", other["name"], env=env)
    assert run.returncode == 0, run.stderr
    new_id = run.stdout.strip()
    table = await run_cli("requests", "list", "--signer", other["name"], env=env)
    assert table.returncode == 0 and new_id in table.stdout
    detail = (await api.call("GET", f"/pki/signing-requests/{new_id}", setup.requester, expect=200)).json()
    assert detail["originalRequestId"] == request["id"]
    assert detail["origin"] == request["origin"]


async def test_approved_but_signing_failed_exits_8(api: Api, live_url: str, tmp_path: Path) -> None:
    setup = await setup_signer(api)
    artifact = artifact_file(tmp_path / "app.zip", size=100)
    proc = await start_cli(
        "sign", str(artifact), "--signer", setup.signer["name"], "--wait", "120",
        env=cli_env(live_url, setup.requester.token),
    )  # fmt: skip
    request = await opened_request(api, setup, proc)
    # The signer is disabled after the request was opened: approval succeeds, signing cannot.
    await api.call(
        "PATCH", f"/pki/signers/{setup.signer['id']}", api.admin, json={"status": "disabled"}, expect=200
    )
    await api.call(
        "POST", f"/pki/signing-requests/{request['id']}/approve", setup.approver, json={}, expect=200
    )
    run = await finish(proc)
    assert run.returncode == 8, run.stderr
    assert f"request {request['id']} was approved, but signing failed" in run.stderr
    assert not (tmp_path / "app.zip.sig").exists()


async def test_configuration_and_api_errors_are_one_line_with_their_exit_code(
    api: Api, live_url: str, tmp_path: Path
) -> None:
    setup = await setup_signer(api)
    artifact = artifact_file(tmp_path / "app.zip", size=10)
    sign = ("sign", str(artifact), "--signer", setup.signer["name"], "--wait", "5")

    run = await run_cli(*sign, env=cli_env(None, setup.requester.token))
    assert (run.returncode, run.stderr.strip()) == (
        2,
        "signgate: error: SIGNGATE_URL is not set (the server's address, e.g. https://signgate.example.com)",
    )
    run = await run_cli(*sign, env=cli_env(live_url, None))
    assert run.returncode == 2 and "SIGNGATE_TOKEN is not set" in run.stderr
    run = await run_cli(*sign, env=cli_env("ftp://example.com", "x"))
    assert run.returncode == 2 and "http:// or https://" in run.stderr
    run = await run_cli(*sign, "--origin", "no-equals-sign", env=cli_env(live_url, setup.requester.token))
    assert run.returncode == 2 and "--origin expects KEY=VALUE" in run.stderr
    run = await run_cli(
        "sign", str(artifact), "--signer", "no-such-signer", env=cli_env(live_url, setup.requester.token)
    )
    assert run.returncode == 2 and "no signer named 'no-such-signer'" in run.stderr
    run = await run_cli(*sign, "--algorithm", "ECDSA_SHA512", "--format", "cms", env=cli_env(live_url, "x"))
    assert run.returncode == 3 and "check SIGNGATE_TOKEN" in run.stderr and "[401 " in run.stderr
    run = await run_cli(
        *sign, "--algorithm", "RSASSA_PSS_SHA256", env=cli_env(live_url, setup.requester.token)
    )
    assert run.returncode == 2 and "does not support RSASSA_PSS_SHA256" in run.stderr
    run = await run_cli("requests", "show", "no-such-request", env=cli_env(live_url, setup.requester.token))
    assert run.returncode == 3 and run.stderr.startswith("signgate: error: ") and "[404 " in run.stderr
    run = await run_cli(*sign, env=cli_env(f"http://127.0.0.1:{free_port()}", "x"))
    assert run.returncode == 3 and "cannot reach signgate at http://127.0.0.1:" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


# --- units: no server needed ---------------------------------------------------------------------


def test_github_actions_origin_with_run_url() -> None:
    origin = detect_origin({**GITHUB_ENV, "GITHUB_SERVER_URL": "https://github.com/"})
    assert origin["runUrl"] == "https://github.com/acme/widget/actions/runs/987654321"
    assert origin["ci"] == "github-actions" and origin["commit"] == GITHUB_ENV["GITHUB_SHA"]


def test_gitlab_ci_origin() -> None:
    origin = detect_origin(
        {
            "GITLAB_CI": "true",
            "CI_PROJECT_PATH": "group/project",
            "CI_COMMIT_SHA": "abc",
            "CI_COMMIT_REF_NAME": "main",
            "CI_PIPELINE_ID": "77",
            "CI_PIPELINE_URL": "https://gitlab.example.com/group/project/-/pipelines/77",
            "CI_JOB_URL": "https://gitlab.example.com/group/project/-/jobs/5",
            "CI_COMMIT_TAG": "",
        }
    )
    assert origin == {
        "ci": "gitlab-ci",
        "repository": "group/project",
        "commit": "abc",
        "ref": "main",
        "pipelineId": "77",
        "pipelineUrl": "https://gitlab.example.com/group/project/-/pipelines/77",
        "jobUrl": "https://gitlab.example.com/group/project/-/jobs/5",
    }


def test_no_ci_no_origin_and_origin_options() -> None:
    assert detect_origin({"GITHUB_REPOSITORY": "acme/widget"}) == {}
    assert parse_origin_options(["a=1", "b=x=y", "a=2", "empty="]) == {"a": "2", "b": "x=y", "empty": ""}
    for bad in ("novalue", "=value"):
        with pytest.raises(OriginFormatError):
            parse_origin_options([bad])


def test_url_normalization() -> None:
    assert normalize_url("https://signgate.example.com/api/v1/") == "https://signgate.example.com"
    assert normalize_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert normalize_url("https://example.com/signgate/api/v1") == "https://example.com/signgate"
    with pytest.raises(UsageError):
        normalize_url("127.0.0.1:8000")


def test_default_algorithm_follows_the_key() -> None:
    ec = {"name": "ec", "keyAlgorithm": "EC_P384", "supportedAlgorithms": ["ECDSA_SHA256", "ECDSA_SHA384"]}
    rsa = {
        "name": "rsa",
        "keyAlgorithm": "RSA_3072",
        "supportedAlgorithms": ["RSASSA_PSS_SHA256", "RSASSA_PKCS1_V1_5_SHA256"],
    }
    assert choose_algorithm(ec, None) == "ECDSA_SHA256"
    assert choose_algorithm(rsa, None) == "RSASSA_PKCS1_V1_5_SHA256"
    assert choose_algorithm(ec, "ecdsa_sha384") == "ECDSA_SHA384"
    with pytest.raises(UsageError):
        choose_algorithm(ec, "RSASSA_PSS_SHA256")


def test_exit_codes_are_the_documented_ones() -> None:
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0,
        "VERIFICATION_FAILED": 1,
        "USAGE": 2,
        "API_ERROR": 3,
        "REJECTED": 4,
        "CANCELLED": 5,
        "EXPIRED": 6,
        "WAIT_TIMED_OUT": 7,
        "SIGNING_FAILED": 8,
        "INTERRUPTED": 130,
    }
