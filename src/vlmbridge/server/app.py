"""The app factory: `create_app(settings, models)` wires routes, limits, auth, metrics and error mapping.

No module-level state: everything the routes need lives on `app.state.vlm` (an AppState), created here and
torn down by the lifespan.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from vlmbridge import __version__
from vlmbridge.engine.threads import side_thread
from vlmbridge.media.inflight import PixelGate
from vlmbridge.media.limits import in_flight_limit
from vlmbridge.pool import EngineSlot, ModelPool
from vlmbridge.server.auth import AuthMiddleware
from vlmbridge.server.convert import ImageLoader, VideoLoader
from vlmbridge.server.errors import install_error_handlers
from vlmbridge.server.limits import BodySizeLimit, DrainGate
from vlmbridge.server.metrics import Metrics, MetricsMiddleware
from vlmbridge.server.openapi import install_openapi
from vlmbridge.server.routes import admin, chat, info, tokenize
from vlmbridge.server.state import AppState, Lifecycle
from vlmbridge.settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings, models: EngineSlot | ModelPool, *, load_image: ImageLoader | None = None) -> FastAPI:
    """An ASGI app serving one model (a slot) or a pool of them. `load: startup` models start loading when the
    app starts (lifespan)."""
    pool = models if isinstance(models, ModelPool) else ModelPool([models])
    metrics = Metrics()
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from vlmbridge.media.sources import ImageSources, policy_from_settings
        from vlmbridge.media.video_sources import VideoSources

        # to_thread's threads prepare requests for an engine in this process (engine_worker: thread): they must
        # not start torch pools of their own beside the engine's (engine/threads.py).
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(thread_name_prefix="vlmbridge-front", initializer=side_thread)
        )
        sources = None
        if load_image is None:
            sources = ImageSources(policy_from_settings(settings))
        loader: ImageLoader = load_image or (lambda url, param: sources.load(url, param=param))  # type: ignore[union-attr]
        clips = VideoSources.from_settings(settings, policy_from_settings(settings))
        video_loader: VideoLoader = lambda url, param: clips.load(url, param=param)  # noqa: E731
        gate = PixelGate(in_flight_limit(settings))
        app.state.vlm = AppState(
            settings=settings, pool=pool, metrics=metrics, load_image=loader, lifecycle=lifecycle, pixel_gate=gate,
            load_video=video_loader,
        )  # fmt: skip
        app.state.started_at = time.time()
        metrics.bind_pool(pool)
        pool.start()
        try:
            yield
        finally:
            if sources is not None:
                await sources.aclose()
            await clips.aclose()
            await asyncio.to_thread(pool.shutdown)

    app = FastAPI(
        title="vlmbridge",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    install_error_handlers(app)
    install_openapi(app, settings)  # /openapi.json: the statuses, error envelope and event stream really sent
    app.include_router(chat.router)
    app.include_router(info.router)
    app.include_router(tokenize.router)
    if settings.admin_key is not None:  # without an admin key the admin routes do not exist
        app.include_router(admin.router)
    # Outermost last: metrics see every answer; then the drain gate, auth and the body limit, all before a route
    # reads a byte of the body.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    # /admin checks its own key (a client key must not open it), so the client-key check leaves it alone.
    app.add_middleware(AuthMiddleware, keys=settings.api_keys, public_metrics=settings.public_metrics)
    app.add_middleware(DrainGate, lifecycle=lifecycle)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.lifecycle = lifecycle  # the runner's SIGTERM handler drains through it
    return app
