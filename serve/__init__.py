"""sdrt.serve: sdrt as an HTTP service that speaks AUTOMATIC1111's API (/sdapi/v1/...), on FastAPI.

    sdrt serve --model path/to/model --port 7860            # needs the serve extra: pip install 'sdrt[serve]'

    from sdrt.serve import ServeConfig, create_app
    app = create_app(ServeConfig(models_dir="models/"))    # an ASGI app for any server

Ray Serve replicas of the same app: sdrt.serve.ray_app (the `ray` extra).
"""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app", "run"]


def __getattr__(name):  # FastAPI loads on first use, not on `import sdrt.serve`
    if name == "ServeConfig":
        from .config import ServeConfig

        return ServeConfig
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "run":
        from .server import run

        return run
    raise AttributeError(name)
