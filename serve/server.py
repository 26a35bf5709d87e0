"""Run the app with uvicorn: JSON logs, and a graceful SIGTERM (requests in flight finish, new
ones are answered 503 until the listening socket is closed)."""

from __future__ import annotations

from .app import create_app
from .config import ServeConfig
from .engine import Registry
from .observability import log, setup_logging


def run(cfg: ServeConfig, log_level: str = "info") -> None:
    import uvicorn

    Registry(cfg).check()  # no model to serve: one error line now, not a server that never gets ready
    setup_logging(log_level)
    app = create_app(cfg)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            state = app.state.sdrt
            if state.engine is not None:
                state.engine.drain()  # from now on: 503 for new generation requests, /readyz 503
            log.info("shutting down", extra={"fields": {"signal": int(sig)}})
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=cfg.shutdown_grace, log_level=log_level)
    log.info("listening", extra={"fields": {"url": f"http://{cfg.host}:{cfg.port}", "docs": f"http://{cfg.host}:{cfg.port}/docs",
                                            "auth": bool(cfg.api_auth)}})
    Server(config).run()
