"""The household dashboard: a read-only web page that shows the cluster live.

One agent serves it (usually every agent does; the leader's page has the placement and the
request log). The server knows nothing about the cluster: it calls ``snapshot()`` — normally
``HomeAgent.snapshot`` — and pushes the result to browsers over Server-Sent Events whenever
``notify`` is called (the leader's listener hook) and at least every ``push_interval_s``.

    async with Dashboard(agent.snapshot, host="0.0.0.0", port=8080, layouts=model_layouts(agent.catalog)) as dash:
        agent.add_listener(dash.notify)

Routes (GET only; there is nothing to change from the page):

* ``/``            the page (static HTML/JS/CSS in ``static/``, no CDN, works offline)
* ``/api/state``   the snapshot as JSON (plus ``layouts``: each model's layer kinds)
* ``/api/events``  Server-Sent Events, ``event: state`` with the same JSON
* ``/healthz``     ``ok <role>`` (the Docker healthcheck), 503 if the snapshot fails
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from detransformer_edge.errors import DetransformerError

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
Snapshot = Callable[[], Mapping[str, Any]]

# The page runs only our own files: no inline script, no third-party origin.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


class DashboardError(DetransformerError):
    """The dashboard cannot start (address in use, bad bind address)."""


def model_layouts(catalog: Any) -> dict[str, dict[str, Any]]:
    """Each catalog model's shape for the placement picture: task, layer kinds, sub-blocks per
    decoupled layer. Models whose config cannot be built here are left out (the page then infers
    the columns from the holdings)."""
    out: dict[str, dict[str, Any]] = {}
    for name in catalog.names:
        served = catalog.get(name)
        try:
            cfg = served.config()
        except Exception as exc:  # noqa: BLE001 - a broken model entry must not hide the page
            log.debug("no layout for model %s: %s", name, exc)
            continue
        out[name] = {"task": served.task, "layers": list(cfg.layer_kinds), "nd": int(cfg.nd)}
    return out


def _json_safe(value: Any) -> Any:
    """JSON the browser can parse: NaN/inf become null, tuples lists, unknown objects strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


class Dashboard:
    """aiohttp server for the dashboard; an async context manager (``start``/``stop``)."""

    def __init__(
        self,
        snapshot: Snapshot,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        layouts: Mapping[str, Mapping[str, Any]] | None = None,
        push_interval_s: float = 2.0,
        coalesce_s: float = 0.1,
    ) -> None:
        if not 0 <= port <= 65535:
            raise DashboardError(f"dashboard port must be 0..65535, got {port}")
        self.snapshot = snapshot
        self.host = host
        self.port = port  # 0 binds a free port; the bound one is set by start()
        self.layouts = dict(layouts or {})
        self.push_interval_s = push_interval_s
        self.coalesce_s = coalesce_s  # bursts of events (every device turning ready) push once
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._streams: dict[asyncio.Task[Any], asyncio.Event] = {}  # every open SSE handler -> its wake-up
        self._closing = asyncio.Event()
        self._event_ids = itertools.count(1)
        self.events_seen = 0

    # --- lifetime ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}/"

    def app(self) -> web.Application:
        app = web.Application()
        app.on_response_prepare.append(_security_headers)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/healthz", self._health)
        return app

    async def start(self) -> Dashboard:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closing = asyncio.Event()
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise DashboardError(
                f"dashboard cannot listen on {self.host}:{self.port}: {exc.strerror or exc} "
                "(set dashboard_port to a free port, or 0 to disable the dashboard)"
            ) from None
        self._runner = runner
        if runner.addresses:
            self.port = int(runner.addresses[0][1])
        log.info("dashboard on %s", self.url)
        return self

    async def stop(self) -> None:
        """End every event stream, then the server."""
        self._closing.set()
        for wake in self._streams.values():
            wake.set()
        tasks = list(self._streams)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Dashboard:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- events ------------------------------------------------------------------------------------

    @property
    def clients(self) -> int:
        return len(self._streams)

    def notify(self, kind: str = "", data: Mapping[str, Any] | None = None) -> None:
        """Leader listener: something changed, push a fresh snapshot to every browser. Safe to
        call from any thread (placement is planned in a worker thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            self._wake_all()
        else:
            with contextlib.suppress(RuntimeError):  # loop closing
                loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self) -> None:
        self.events_seen += 1
        for wake in self._streams.values():
            wake.set()

    # --- handlers ----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The snapshot plus model layouts, JSON-ready."""
        data = dict(self.snapshot())
        data["layouts"] = self.layouts
        data["server_time"] = time.time()
        return _json_safe(data)

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return _file_response(STATIC_DIR / "index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = STATIC_DIR / name
        if "/" in name or name.startswith(".") or path.suffix not in _STATIC_TYPES or not path.is_file():
            raise web.HTTPNotFound()
        return _file_response(path)

    async def _state(self, request: web.Request) -> web.Response:
        try:
            state = self.state()
        except Exception:  # noqa: BLE001 - report, never crash the page server
            log.exception("dashboard snapshot failed")
            return web.json_response({"error": "snapshot failed; see the agent's log"}, status=500)
        return web.json_response(state, dumps=_dumps)

    async def _health(self, request: web.Request) -> web.Response:
        try:
            role = str(self.snapshot().get("role", "unknown"))
        except Exception as exc:  # noqa: BLE001
            return web.Response(text=f"unhealthy: {type(exc).__name__}\n", status=503)
        return web.Response(text=f"ok {role}\n")

    async def _events(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        wake = asyncio.Event()
        self._streams[task] = wake
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        try:
            await resp.prepare(request)
            await resp.write(b"retry: 2000\n\n")  # browser reconnect delay after the agent restarts
            while not self._closing.is_set():
                wake.clear()  # before the snapshot: an event during the write below is not lost
                try:
                    payload = _dumps(self.state())
                except Exception:  # noqa: BLE001
                    log.exception("dashboard snapshot failed")
                    payload = _dumps({"error": "snapshot failed; see the agent's log"})
                await resp.write(f"id: {next(self._event_ids)}\nevent: state\ndata: {payload}\n\n".encode())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), self.push_interval_s)
                if wake.is_set() and not self._closing.is_set():
                    await asyncio.sleep(self.coalesce_s)
        except ConnectionResetError:  # the browser went away
            return resp
        finally:
            self._streams.pop(task, None)
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await resp.write_eof()
        return resp


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _file_response(path: Path) -> web.Response:
    return web.Response(body=path.read_bytes(), content_type=_STATIC_TYPES[path.suffix], charset="utf-8")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for key, value in _SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)


class DashboardPlugin:
    """The plug-in: serve the dashboard of this agent's home while the agent runs."""

    name = "dashboard"

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.dashboard: Dashboard | None = None

    async def start(self, home: Any) -> None:
        layouts = await asyncio.to_thread(model_layouts, home.catalog)
        self.dashboard = await Dashboard(home.snapshot, host=self.host, port=self.port, layouts=layouts).start()
        home.add_listener(self.dashboard.notify)
        log.warning("agent %s: dashboard on %s", home.id, self.dashboard.url)

    async def stop(self) -> None:
        if self.dashboard is not None:
            await self.dashboard.stop()
            self.dashboard = None
