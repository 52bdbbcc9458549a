"""``RouterHost``: the one HTTP host of a router app, used by ``shoal serve``, ``shoal launch``'s router
and the Ray router actors.

Start (the readiness contract): bind **and listen** first, so a client that connects early waits in
the backlog and is never refused; run the app under uvicorn (its lifespan starts the worker pool);
wait until the pool can serve (a worker that generates is healthy); only then is the host ready:
``/ready`` answers 200 and :meth:`start` returns, after which the caller announces it (a stdout
line, an etcd key). ``/health`` answers from the moment uvicorn runs: it is liveness, not readiness.

Stop (the drain): ``/ready`` turns 503 and new generation requests get 503 with ``Retry-After``
while in-flight requests get up to ``drain_timeout_s`` to finish; whatever is still running then
ends with an error (an SSE error event before ``[DONE]``, or a 503 body), and uvicorn closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Awaitable, Callable

from fastapi import FastAPI

from .context import RouterContext
from .errors import ApiError


class StartupError(ValueError):
    """The host cannot start (port in use, no worker became ready): one clear line for the user."""


def bind_socket(host: str, port: int, *, flag: str = "--port") -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one). ``flag`` names the option that
    chose the port in the error a user sees when it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns TCP_NODELAY on only for such sockets, and without it a stream's
    # first chunk waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        reason = "the address is already in use" if e.errno == 98 else e.strerror or str(e)
        raise StartupError(f"cannot listen on {host}:{port}: {reason} (choose another with {flag})") from None
    sock.set_inheritable(True)
    return sock


class _HeaderTimer:
    """The timer of one connection: armed when a request begins, disarmed when its headers are in."""

    def __init__(self, loop, timeout_s: float, transport) -> None:
        self.loop, self.timeout_s, self.transport = loop, timeout_s, transport
        self.handle = None

    def arm(self) -> None:
        if self.handle is None:
            self.handle = self.loop.call_later(self.timeout_s, self._late)

    def disarm(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _late(self) -> None:
        self.handle = None
        if not self.transport.is_closing():
            self.transport.close()


def _header_timeout_protocol(timeout_s: float):
    """uvicorn's HTTP protocol (httptools when installed, else h11: what uvicorn itself picks), closing
    a connection whose request headers take longer than ``timeout_s`` to arrive (from connect, or from
    the first byte of a later request on it): a few slow-header clients must not hold the server.
    Slow *bodies* are the app's (``body_timeout_s``)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn's h11 protocol
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol

        class H11HeaderTimeout(H11Protocol):
            def connection_made(self, transport) -> None:
                super().connection_made(transport)
                self.header_timer = _HeaderTimer(self.loop, timeout_s, transport)
                self.header_timer.arm()

            def data_received(self, data: bytes) -> None:
                idle_before = self.conn.their_state is h11.IDLE
                super().data_received(data)
                if self.conn.their_state is not h11.IDLE:  # h11 has the request line and headers
                    self.header_timer.disarm()
                elif idle_before and data:
                    self.header_timer.arm()

            def connection_lost(self, exc) -> None:
                self.header_timer.disarm()
                super().connection_lost(exc)

        return H11HeaderTimeout

    class HttpToolsHeaderTimeout(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.header_timer = _HeaderTimer(self.loop, timeout_s, transport)
            self.header_timer.arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.header_timer.arm()

        def on_headers_complete(self) -> None:
            self.header_timer.disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self.header_timer.disarm()
            super().connection_lost(exc)

    return HttpToolsHeaderTimeout


def _uvicorn_server(app: FastAPI, graceful_s: float, header_timeout_s: float):
    """uvicorn for ``app``; the app writes its own access log (router/middleware.py), uvicorn none."""
    import uvicorn

    class Server(uvicorn.Server):
        # The process that owns the host owns SIGINT / SIGTERM: uvicorn must not take them (it would
        # re-raise SIGTERM after its own shutdown and kill the process before the workers stop).
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False,
                                 http=_header_timeout_protocol(header_timeout_s),
                                 timeout_graceful_shutdown=graceful_s))


class RouterHost:
    """One router app on uvicorn in the running event loop: :meth:`start`, then :meth:`stop`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None,
                 drain_timeout_s: float = 30.0, header_timeout_s: float = 10.0, port_flag: str = "--port",
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """``sock``: a socket :func:`bind_socket` already made (so a caller can fail on a taken port
        before it loads anything); else :meth:`start` binds ``host:port``."""
        if drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
        self.app, self.host, self.port = app, host, port
        if header_timeout_s <= 0:
            raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s}")
        self.drain_timeout_s, self.header_timeout_s, self.port_flag = drain_timeout_s, header_timeout_s, port_flag
        self.ctx: RouterContext = app.state.ctx
        self._sock = sock
        self.bound: tuple[str, int] | None = sock.getsockname()[:2] if sock is not None else None
        self._sleep = sleep
        self._server = None
        self._task: asyncio.Task | None = None

    # -- start ----------------------------------------------------------------------------------

    async def start(self, ready_timeout_s: float = 600.0, *, need_workers: bool = True) -> None:
        """:meth:`listen`, then :meth:`become_ready`; raises :class:`StartupError` (and leaves nothing
        listening) when it cannot."""
        await self.listen(ready_timeout_s)
        try:
            await self.become_ready(ready_timeout_s if need_workers else None)
        except BaseException:
            await self.close()
            raise

    async def listen(self, timeout_s: float = 60.0) -> None:
        """Bind (unless given a socket), listen and run the app: ``/health`` answers, ``/ready`` is
        503 until :meth:`become_ready`."""
        self.ctx.phase = "starting"
        sock, self._sock = self._sock or bind_socket(self.host, self.port, flag=self.port_flag), None
        self.bound = sock.getsockname()[:2]
        self._server = _uvicorn_server(self.app, graceful_s=5.0, header_timeout_s=self.header_timeout_s)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        try:
            await self._until(lambda: self._server.started, timeout_s, "the HTTP server did not start")
        except BaseException:
            await self.close()
            sock.close()  # uvicorn closes it at shutdown, but not when its startup failed
            raise

    async def become_ready(self, timeout_s: float | None = 600.0) -> None:
        """Wait until a worker that generates is healthy (``timeout_s`` None: do not wait for one),
        then serve: ``/ready`` answers 200."""
        if timeout_s is not None:
            await self._until(self.ctx.pool.has_healthy, timeout_s,
                              f"no worker became healthy within {timeout_s:g} s")
        self.ctx.phase = "serving"

    async def _until(self, ok: Callable[[], bool], timeout_s: float, message: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not ok():
            if self._task.done():
                error = self._task.exception()
                raise StartupError(f"the router stopped while starting: {error or 'uvicorn exited'}")
            if loop.time() > deadline:
                raise StartupError(message)
            await self._sleep(0.02)

    # -- state ----------------------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """``http://host:port`` as bound (the OpenAI API is under ``/v1``); None before start."""
        if self.bound is None:
            return None
        host = self.bound[0]
        return f"http://[{host}]:{self.bound[1]}" if ":" in host else f"http://{host}:{self.bound[1]}"

    @property
    def serving(self) -> bool:
        """uvicorn runs and the host has not begun to drain."""
        task = self._task
        return (task is not None and not task.done() and self._server.started
                and self.ctx.phase == "serving")

    async def wait(self) -> None:
        """Until uvicorn exits (after :meth:`stop`, or on its own)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # -- stop -----------------------------------------------------------------------------------

    async def stop(self) -> int:
        """Drain, then close; -> how many requests were still running at the drain deadline and were
        ended with an error. Safe before :meth:`start` and twice."""
        if self._task is None:
            return 0
        self.ctx.phase = "draining"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        while self.ctx.num_active() and loop.time() < deadline and not self._task.done():
            await self._sleep(0.02)
        cut = self.ctx.interrupt_all(ApiError(503, "the server is shutting down", code="server_shutting_down",
                                              retry_after=self.ctx.config.retry_after_s))
        # The interrupted streams write their error event and [DONE], then end on their own.
        grace = loop.time() + 5.0
        while self.ctx.num_active() and loop.time() < grace and not self._task.done():
            await self._sleep(0.02)
        await self.close()
        return cut

    async def close(self) -> None:
        """Stop uvicorn now (its lifespan closes the pool)."""
        task, server = self._task, self._server
        if task is None:
            return
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        self._task = None
