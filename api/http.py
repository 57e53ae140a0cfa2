"""The HTTP protocol the API processes serve with: uvicorn's httptools protocol, with the app's
bare routes (the sign call) answered without the ASGI machinery.

A bare-route request that arrives whole in one read (the rule for a client's small sign call)
is read here, without the parser: its head is checked against a strict subset of HTTP/1.1
(`_read_whole`), handed to the route (`BareRoute.submit`) and answered from its callback, with
no request cycle, no task and no parser callbacks. Anything outside that subset (another
method or path, HTTP/1.0, a query, a percent-encoded path, a body in pieces, Transfer-Encoding,
Expect, Connection, Upgrade, proxy headers, a malformed or duplicated header, a connection
with a request of the parser's in progress) goes to uvicorn as it arrived, so its rules and
its error answers stay uvicorn's. While such a call waits for its answer, whatever else the
connection sends waits too, and is read once the answer is written: answers stay in request
order.

A bare-route request that goes through the parser and carries no proxy headers gets a request
cycle, but its ASGI task is replaced: the protocol reads the body from the cycle, asks the
route for the answer (`BareRoute.answer`) and writes the response bytes itself. Everything
uvicorn's cycle keeps (keep-alive, pipelined requests queued behind it, flow control, a client
that goes away, graceful shutdown) is uvicorn's own. What is skipped costs more than an ECDSA
signature: the proxy-headers middleware, the ASGI messages and their checks, a receive event
per body.

Any other request, and a bare-route request with X-Forwarded-For or X-Forwarded-Proto (which
the proxy-headers middleware may have to apply), goes through the app as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from api.errors import internal_error_response

log = logging.getLogger("signgate.api")

_PROXY_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto"})
_UNKNOWN = object()
_JSON = b"content-type: application/json\r\n"
_CLOSE = b"connection: close\r\n"
# Headers that take a request off the whole-request path (`_read_whole`): they change how the
# request is framed or kept, or what the proxy-headers middleware makes of it.
_NOT_WHOLE = _PROXY_HEADERS | {b"transfer-encoding", b"expect", b"connection", b"upgrade"}
# What the whole-request path takes (`_read_whole`), checked with bytes.translate: the bytes of
# a request head (visible ASCII, obs-text, space, tab, and CR LF ending its lines), of a
# header's name (a token) and of a path (the path characters of RFC 3986 but "%").
_HEAD_BYTES = bytes([9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0x100)])
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_PATH_BYTES = b"/!$&'()*+,-.:;=@_~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_MAX_HEADERS = 64
# Bytes a connection may send while its whole-request call waits, before reading it pauses.
_BACKLOG_LIMIT = 64 * 1024


BareAnswer = tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]  # status, JSON body, extra headers


class BareRoute(Protocol):
    def submit(
        self,
        app: Any,
        path_params: dict[str, str],
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: str | None,
        on_answer: Callable[[BareAnswer], None],
    ) -> None:
        """Take one request; `on_answer` gets its answer on the event loop, now or later."""
        ...

    async def answer(
        self,
        app: Any,
        path_params: dict[str, str],
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: str | None,
    ) -> BareAnswer:
        """The answer to one request, from what the protocol read of it."""
        ...


def _signgate_app(app: Any) -> Any:
    """The SigngateApp under uvicorn's wrappers (proxy headers, message logger), if any."""
    from api.main import SigngateApp

    for _ in range(8):
        if isinstance(app, SigngateApp):
            return app
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class _Whole:
    """A bare-route request read whole from one read (`SigngateHttpProtocol._read_whole`)."""

    __slots__ = ("app", "body", "headers", "path", "path_params", "rest", "route")

    def __init__(
        self,
        app: Any,
        route: BareRoute,
        path_params: dict[str, str],
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        path: str,
        rest: bytes,
    ) -> None:
        self.app, self.route, self.path_params, self.headers = app, route, path_params, headers
        self.body, self.path, self.rest = body, path, rest


class SigngateHttpProtocol(HttpToolsProtocol):
    # Whole-request path: a request of the parser's is under way (between its first bytes and
    # its end); a whole request waits for its answer (its path, for the access log); what the
    # connection sent meanwhile; close once that answer is written (graceful shutdown).
    _in_message = False
    _waiting: str | None = None
    _backlog = b""
    _close_after = False

    def on_message_begin(self) -> None:
        self._in_message = True
        super().on_message_begin()

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    def data_received(self, data: bytes) -> None:
        if self._waiting is not None:
            self._backlog += data
            if len(self._backlog) > _BACKLOG_LIMIT:
                self.flow.pause_reading()
            return
        if (
            data.startswith(b"POST /")
            and not self._in_message
            and not self.pipeline
            and (self.cycle is None or self.cycle.response_complete)
            and self.limit_concurrency is None
        ):
            whole = self._read_whole(data)
            if whole is not None:
                self._serve_whole(whole)
                return
        super().data_received(data)

    def _read_whole(self, data: bytes) -> _Whole | None:
        """The bare-route request at the start of `data` if it is all there and inside the
        strict subset this path serves (see the module's docstring); else None, and uvicorn's
        parser reads it."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = data[:end]
        if head.translate(None, _HEAD_BYTES):
            return None
        lines = head.split(b"\r\n")
        if (
            len(lines) > _MAX_HEADERS + 1
            or head.count(b"\r") != len(lines) - 1
            or head.count(b"\n") != len(lines) - 1
        ):
            return None  # too many headers, or a CR or LF alone
        method, _, rest = lines[0].partition(b" ")
        target, _, version = rest.partition(b" ")
        if (
            method != b"POST"
            or version != b"HTTP/1.1"
            or target[:1] != b"/"
            or target.translate(None, _PATH_BYTES)
        ):
            return None
        signgate: Any = self.__dict__.get("_signgate", _UNKNOWN)
        if signgate is _UNKNOWN:
            signgate = self._signgate = _signgate_app(self.app)
        if signgate is None:
            return None
        path = self.root_path + target.decode("ascii")
        found = signgate.match_bare("POST", path, self.root_path)
        if found is None:
            return None
        headers: list[tuple[bytes, bytes]] = []
        length = -1
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name.translate(None, _TOKEN_BYTES):
                return None
            name = name.lower()
            value = value.strip(b" \t")
            if name == b"content-length":
                if length >= 0 or not value.isdigit() or len(value) > 9:
                    return None
                length = int(value)
            elif name in _NOT_WHOLE:
                return None
            headers.append((name, value))
        start = end + 4
        if length < 0 or len(data) < start + length:
            return None
        return _Whole(
            signgate, found[0], found[1], headers, data[start : start + length], path, data[start + length :]
        )

    def _serve_whole(self, whole: _Whole) -> None:
        self._unset_keepalive_if_required()
        self._waiting = whole.path
        self._backlog = whole.rest
        client = self.client
        try:
            whole.route.submit(
                whole.app,
                whole.path_params,
                whole.headers,
                whole.body,
                client[0] if client else None,
                self._answer_whole,
            )
        except Exception:
            log.exception("unexpected error on POST %s", whole.path)
            if self._waiting is not None:
                self._answer_whole((500, bytes(internal_error_response().body), ()))

    def _answer_whole(self, answer: BareAnswer) -> None:
        """Write a whole request's answer, then read what the connection sent meanwhile."""
        path, self._waiting = self._waiting, None
        if path is None or self.transport.is_closing():
            return
        status, content, extra = answer
        if self.access_log:
            self.access_logger.info(
                '%s - "POST %s HTTP/1.1" %d',
                f"{self.client[0]}:{self.client[1]}" if self.client else "-",
                path,
                status,
            )
        self.transport.write(
            _head(self.server_state.default_headers, status, content, extra, not self._close_after)
        )
        self.server_state.total_requests += 1
        if self._close_after:
            self.transport.close()
            return
        self.flow.resume_reading()
        if self._backlog:
            # On the loop's next turn: a backlog of requests answered at once must not recurse.
            self.loop.call_soon(self._read_backlog)
        else:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _read_backlog(self) -> None:
        backlog, self._backlog = self._backlog, b""
        if backlog and not self.transport.is_closing():
            self.data_received(backlog)

    def shutdown(self) -> None:
        if self._waiting is not None:
            self._close_after = True  # once its answer is written
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._backlog = b""
        super().connection_lost(exc)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        found = self._bare_route(cycle)
        if found is None:
            super()._start_asgi_task(cycle, app)
            return
        task = self.loop.create_task(self._serve_bare(cycle, *found))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _bare_route(self, cycle: RequestResponseCycle) -> tuple[Any, BareRoute, dict[str, str]] | None:
        scope: Any = cycle.scope
        if cycle.waiting_for_100_continue:
            return None
        signgate: Any = self.__dict__.get("_signgate", _UNKNOWN)
        if signgate is _UNKNOWN:
            signgate = self._signgate = _signgate_app(self.app)
        if signgate is None:
            return None
        found = signgate.match_bare(scope["method"], scope["path"], scope.get("root_path", ""))
        if found is None:
            return None
        for name, _ in scope["headers"]:
            if name in _PROXY_HEADERS:
                return None
        scope["app"] = signgate
        return signgate, found[0], found[1]

    async def _serve_bare(
        self, cycle: RequestResponseCycle, app: Any, route: BareRoute, path_params: dict[str, str]
    ) -> None:
        scope: Any = cycle.scope
        try:
            while cycle.more_body and not cycle.disconnected:
                cycle.flow.resume_reading()
                await cycle.message_event.wait()
                cycle.message_event.clear()
            if cycle.disconnected:
                return
            body = bytes(cycle.body)
            cycle.body = bytearray()
            client = scope.get("client")
            try:
                status, content, extra = await route.answer(
                    app, path_params, scope["headers"], body, client[0] if client else None
                )
            except Exception:
                log.exception("unexpected error on %s %s", scope["method"], scope["path"])
                status, content, extra = 500, bytes(internal_error_response().body), ()
            if cycle.disconnected:
                return
            self._respond(cycle, status, content, extra)
        finally:
            cycle.on_response = lambda: None

    def _respond(
        self, cycle: RequestResponseCycle, status: int, content: bytes, extra: tuple[tuple[bytes, bytes], ...]
    ) -> None:
        """The answer as uvicorn writes it: status line, its default headers (date, server),
        the content headers; then the request's cycle is complete."""
        if cycle.access_log:
            scope: Any = cycle.scope
            cycle.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(scope),
                scope["method"],
                get_path_with_query_string(scope),
                scope["http_version"],
                status,
            )
        head = _head(cycle.default_headers, status, content, extra, cycle.keep_alive)
        cycle.response_started = cycle.response_complete = True
        cycle.waiting_for_100_continue = False
        cycle.transport.write(head)
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()


def _head(
    default_headers: list[tuple[bytes, bytes]],
    status: int,
    content: bytes,
    extra: tuple[tuple[bytes, bytes], ...],
    keep_alive: bool,
) -> bytes:
    """A JSON answer as uvicorn writes it: status line, its default headers (date, server), the
    content headers, and the body."""
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [_JSON, b"content-length: ", str(len(content)).encode(), b"\r\n"]
    for name, value in extra:
        head += [name, b": ", value, b"\r\n"]
    if not keep_alive:
        head.append(_CLOSE)
    head += [b"\r\n", content]
    return b"".join(head)
