"""The HTTP protocol the API processes serve with: uvicorn's httptools protocol, with the app's
bare routes (the sign call) answered without the ASGI machinery.

For a request to a bare route (`SigngateApp.match_bare`) that carries no proxy headers, the
protocol reads the body from its own request cycle, asks the route for the answer
(`BareRoute.answer`) and writes the response bytes itself. Everything uvicorn's cycle keeps
(keep-alive, pipelined requests queued behind it, flow control, a client that goes away,
graceful shutdown) is uvicorn's own: the request still gets a `RequestResponseCycle`, only its
ASGI task is replaced. What is skipped costs more than an ECDSA signature: the proxy-headers
middleware, the ASGI messages and their checks, a receive event per body.

Any other request, and a bare-route request with X-Forwarded-For or X-Forwarded-Proto (which
the proxy-headers middleware may have to apply), goes through the app as usual.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from api.errors import internal_error_response

log = logging.getLogger("signgate.api")

_PROXY_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto"})
_UNKNOWN = object()
_JSON = b"content-type: application/json\r\n"
_CLOSE = b"connection: close\r\n"


BareAnswer = tuple[int, bytes, tuple[tuple[bytes, bytes], ...]]  # status, JSON body, extra headers


class BareRoute(Protocol):
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


class SigngateHttpProtocol(HttpToolsProtocol):
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
        head = [STATUS_LINE[status]]
        for name, value in cycle.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [_JSON, b"content-length: ", str(len(content)).encode(), b"\r\n"]
        for name, value in extra:
            head += [name, b": ", value, b"\r\n"]
        if not cycle.keep_alive:
            head.append(_CLOSE)
        head += [b"\r\n", content]
        cycle.response_started = cycle.response_complete = True
        cycle.waiting_for_100_continue = False
        cycle.transport.write(b"".join(head))
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()
