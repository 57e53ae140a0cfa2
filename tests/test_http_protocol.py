"""The API processes' HTTP protocol (`api.http.SigngateHttpProtocol`) over a real socket: the
sign call answered without the ASGI machinery (read whole, or through uvicorn's request cycle),
with uvicorn's HTTP behaviour intact."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from sqlalchemy import Engine

from api.http import SigngateHttpProtocol
from tests.conftest import Api, Ident
from tests.test_fastsign import DIGEST, operations_of

SIGN_BODY = json.dumps({"data": DIGEST, "signingAlgorithm": "ECDSA_SHA256", "isDigest": True}).encode()


@pytest.fixture
async def served(app: Any, request: pytest.FixtureRequest) -> AsyncIterator[tuple[int, list[str]]]:
    """The app on 127.0.0.1 behind uvicorn with the signgate protocol; and the log of the bare
    answers: "whole" (read without the parser) or "cycle" (through a request cycle)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = uvicorn.Config(app, http=SigngateHttpProtocol, lifespan="off", log_config=None)
    server = uvicorn.Server(config)
    bare: list[str] = []
    respond, answer_whole = SigngateHttpProtocol._respond, SigngateHttpProtocol._answer_whole

    def recording(self: Any, cycle: Any, status: int, content: bytes, extra: Any) -> None:
        bare.append("cycle")
        respond(self, cycle, status, content, extra)

    def recording_whole(self: Any, answer: Any) -> None:
        bare.append("whole")
        answer_whole(self, answer)

    SigngateHttpProtocol._respond = recording  # type: ignore[method-assign]
    SigngateHttpProtocol._answer_whole = recording_whole  # type: ignore[method-assign]
    request.node.uvicorn_server = server
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1], bare
    finally:
        SigngateHttpProtocol._respond = respond  # type: ignore[method-assign]
        SigngateHttpProtocol._answer_whole = answer_whole  # type: ignore[method-assign]
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def sign_request(signer_id: str, token: str | None, *, extra: str = "", body: bytes = SIGN_BODY) -> bytes:
    head = (
        f"POST /api/v1/pki/signers/{signer_id}/sign HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    )
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    return (head + extra + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split()[1]), headers, body


async def member_and_signer(api: Api) -> tuple[Ident, dict[str, Any]]:
    member = await api.identity(scopes=["codesign:sign"])
    return member, await api.signer(members=[member])


async def test_pipelined_sign_calls_are_answered_in_order_on_one_connection(
    api: Api, engine: Engine, served: tuple[int, list[str]]
) -> None:
    port, bare = served
    member, signer = await member_and_signer(api)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # Three requests in one write: a good one, one with a bad token, a good one; then GET
        # of another route on the same connection.
        writer.write(
            sign_request(signer["id"], member.token)
            + sign_request(signer["id"], "sg_not-a-token")
            + sign_request(signer["id"], member.token)
            + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        await writer.drain()
        answers = [await read_answer(reader) for _ in range(4)]
    finally:
        writer.close()
    assert [status for status, _, _ in answers] == [200, 401, 200, 200]
    first, unauthorized, third, health = answers
    assert set(json.loads(first[2])) == {
        "signature",
        "signingAlgorithm",
        "signerId",
        "grantId",
        "operationId",
    }
    assert first[1]["content-type"] == "application/json" and "date" in first[1]
    assert unauthorized[1]["www-authenticate"] == "Bearer"
    assert json.loads(unauthorized[2])["error"] == "unauthorized"
    assert json.loads(first[2])["operationId"] != json.loads(third[2])["operationId"]
    assert json.loads(health[2]) == {"status": "ok"}
    assert bare == ["whole"] * 3  # the sign calls, not /healthz
    assert [op.ip_address for op in operations_of(engine, signer["id"])] == ["127.0.0.1"] * 2


async def test_a_forwarded_sign_call_goes_through_the_proxy_headers_middleware(
    api: Api, engine: Engine, served: tuple[int, list[str]]
) -> None:
    port, bare = served
    member, signer = await member_and_signer(api)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(sign_request(signer["id"], member.token, extra="X-Forwarded-For: 192.0.2.44\r\n"))
        await writer.drain()
        status, _, _ = await read_answer(reader)
    finally:
        writer.close()
    assert status == 200 and bare == []
    # uvicorn trusts 127.0.0.1 by default: the operation records the forwarded client.
    assert [op.ip_address for op in operations_of(engine, signer["id"])] == ["192.0.2.44"]


async def test_connection_close_and_a_body_in_pieces(api: Api, served: tuple[int, list[str]]) -> None:
    port, bare = served
    member, signer = await member_and_signer(api)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = sign_request(signer["id"], member.token, extra="Connection: close\r\n")
        split = len(request) - len(SIGN_BODY) // 2
        writer.write(request[:split])
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(request[split:])
        await writer.drain()
        status, headers, _ = await read_answer(reader)
        assert (status, headers["connection"]) == (200, "close")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the server closed it
    finally:
        writer.close()
    assert bare == ["cycle"]


async def test_an_unexpected_error_is_the_contracts_500(
    api: Api, served: tuple[int, list[str]], monkeypatch: Any
) -> None:
    from api.routes.signers import FastSignEndpoint

    def broken(self: Any, *args: Any) -> Any:
        raise RuntimeError("boom")

    port, _ = served
    member, signer = await member_and_signer(api)
    monkeypatch.setattr(FastSignEndpoint, "submit", broken)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(sign_request(signer["id"], member.token) + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        status, _, body = await read_answer(reader)
        health, _, _ = await read_answer(reader)  # the connection still serves
    finally:
        writer.close()
    assert status == 500
    assert json.loads(body) == {"error": "internal_error", "error_description": "an internal error occurred"}
    assert health == 200


async def test_a_request_in_pieces_after_a_whole_one(
    api: Api, engine: Engine, served: tuple[int, list[str]]
) -> None:
    port, bare = served
    member, signer = await member_and_signer(api)
    second = sign_request(signer["id"], member.token)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # One read holds a whole sign call and the start of the next; the rest comes later.
        writer.write(sign_request(signer["id"], member.token) + second[:40])
        await writer.drain()
        first = await read_answer(reader)
        await asyncio.sleep(0.05)
        writer.write(second[40:])
        await writer.drain()
        then = await read_answer(reader)
    finally:
        writer.close()
    assert (first[0], then[0]) == (200, 200)
    assert bare == ["whole", "cycle"]
    assert len(operations_of(engine, signer["id"])) == 2


@pytest.mark.parametrize(
    ("name", "change", "status", "path"),
    [
        ("chunked body", lambda r: _chunked(r), 200, ["cycle"]),
        ("HTTP/1.0", lambda r: r.replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1), 200, ["cycle"]),
        ("a query", lambda r: r.replace(b"/sign HTTP/1.1", b"/sign?x=1 HTTP/1.1", 1), 200, ["cycle"]),
        ("a percent-encoded path", lambda r: r.replace(b"/sign HTTP", b"/%73ign HTTP", 1), 200, ["cycle"]),
        ("duplicate Content-Length", lambda r: _add_header(r, b"Content-Length: 3"), 400, []),
        ("a space in a header name", lambda r: _add_header(r, b"Bad Name: x"), 400, []),
        ("a control byte in a value", lambda r: _add_header(r, b"X-A: a\x01b"), 400, []),
    ],
)
async def test_requests_outside_the_whole_subset_get_uvicorns_answer(
    api: Api,
    engine: Engine,
    served: tuple[int, list[str]],
    name: str,
    change: Any,
    status: int,
    path: list[str],
) -> None:
    """What the whole-request path does not take is read by uvicorn's parser, whose answer it
    gets: served through a request cycle, or refused as malformed with nothing recorded."""
    port, bare = served
    member, signer = await member_and_signer(api)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(change(sign_request(signer["id"], member.token)))
        await writer.drain()
        answer = await read_answer(reader)
    finally:
        writer.close()
    assert answer[0] == status, (name, answer)
    assert bare == path
    assert len(operations_of(engine, signer["id"])) == (1 if status == 200 else 0)


def _add_header(request: bytes, line: bytes) -> bytes:
    return request.replace(b"\r\n", b"\r\n" + line + b"\r\n", 1)


def _chunked(request: bytes) -> bytes:
    head, _, body = request.partition(b"\r\n\r\n")
    head = b"\r\n".join(line for line in head.split(b"\r\n") if not line.startswith(b"Content-Length"))
    chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    return head + b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks


async def test_a_failed_batch_is_the_contracts_500_on_both_paths(
    api: Api, served: tuple[int, list[str]], monkeypatch: Any
) -> None:
    from store.fastsign import SignBatcher

    def failing(self: Any, call: Any, on_outcome: Any) -> None:
        on_outcome(RuntimeError("the batch failed"))

    port, bare = served
    member, signer = await member_and_signer(api)
    monkeypatch.setattr(SignBatcher, "submit", failing)
    request = sign_request(signer["id"], member.token)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        whole = await read_answer(reader)
        writer.write(request[:40])  # in pieces: through a request cycle
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(request[40:])
        await writer.drain()
        cycle = await read_answer(reader)
    finally:
        writer.close()
    internal = {"error": "internal_error", "error_description": "an internal error occurred"}
    assert [(whole[0], json.loads(whole[2])), (cycle[0], json.loads(cycle[2]))] == [(500, internal)] * 2
    assert bare == ["whole", "cycle"]


async def test_shutdown_closes_a_connection_once_its_waiting_call_is_answered(
    api: Api, served: tuple[int, list[str]], monkeypatch: Any, request: pytest.FixtureRequest
) -> None:
    from core.errors import Forbidden
    from store.fastsign import SignBatcher

    held: list[Any] = []
    monkeypatch.setattr(SignBatcher, "submit", lambda self, call, on_outcome: held.append(on_outcome))
    port, bare = served
    member, signer = await member_and_signer(api)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(sign_request(signer["id"], member.token))
        await writer.drain()
        while not held:
            await asyncio.sleep(0.01)
        for connection in list(request.node.uvicorn_server.server_state.connections):
            connection.shutdown()
        await asyncio.sleep(0.05)
        assert not reader.at_eof()  # still waiting for its answer
        held[0](Forbidden("no"))
        status, headers, _ = await read_answer(reader)
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()
    assert (status, headers["connection"]) == (403, "close")
    assert bare == ["whole"]
