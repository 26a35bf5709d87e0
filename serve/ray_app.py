"""The same service as Ray Serve replicas: each replica builds the FastAPI app (so loads its model
once, and warms it up before Serve routes to it) and Ray's HTTP proxy spreads requests over them.
The HTTP API is unchanged.

    sdrt serve --ray --replicas 2 --port 7860                 # a local Ray instance
    serve run sdrt.serve.ray_app:build_app replicas=2 models_dir=/models   # Ray's own CLI, or a config file

Needs the ray extra: pip install 'sdrt[ray]'.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from typing import Any

from .config import ServeConfig


def deployment(cfg: ServeConfig, replicas: int = 1, replica_cpus: float = 1.0):
    """A bound Ray Serve application of `replicas` copies of the app. The app is built on each
    replica (a builder function, so nothing but the settings travels)."""
    from ray import serve

    from .app import create_app

    settings = dataclasses.asdict(cfg)
    if settings["threads"] is None:  # replicas share the machine's cores instead of each taking them all
        settings["threads"] = max(1, (os.cpu_count() or 2) // max(1, replicas))

    def build():
        return create_app(ServeConfig(**settings), load_in_background=False)

    cls = serve.ingress(build)()
    dep = serve.deployment(
        name="sdrt",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": replica_cpus},
        # Requests beyond a replica's own queue and batch wait in Ray's proxy, not in the replica.
        max_ongoing_requests=cfg.max_queue + cfg.max_batch_images,
        graceful_shutdown_timeout_s=cfg.shutdown_grace,
    )(cls)
    return dep.bind()


def _coerce(args: dict[str, Any]) -> dict[str, Any]:
    """`serve run module:build_app key=value` passes strings: convert them to the settings' types."""
    types = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
    out = {}
    for k, v in args.items():
        default = types.get(k)
        if isinstance(v, str) and k in types:
            if isinstance(default, bool):
                v = v.lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int) or k in ("threads",):
                v = int(v)
            elif isinstance(default, float):
                v = float(v)
        out[k] = v
    return out


def build_app(args: dict[str, Any]):
    """Application builder for Ray's `serve run` / `serve deploy` (config file `args:`): any
    ServeConfig setting (model, models_dir, api_auth, max_queue, ...) plus `replicas` and
    `replica_cpus`. Host and port are Ray's (http_options in the config), not these settings."""
    args = dict(args or {})
    replicas = int(args.pop("replicas", 1))
    replica_cpus = float(args.pop("replica_cpus", 1.0))
    cfg = ServeConfig.from_dict(_coerce(args))
    return deployment(cfg, replicas, replica_cpus)


def run_ray(cfg: ServeConfig, replicas: int = 1, log_level: str = "info") -> None:
    """`sdrt serve --ray`: start a local Ray instance, deploy, serve until SIGTERM/SIGINT."""
    import ray
    from ray import serve

    from .observability import log, setup_logging

    from .engine import Registry

    Registry(cfg).check()
    setup_logging(log_level)
    cores = os.cpu_count() or 2
    ray.init(num_cpus=max(cores, replicas), include_dashboard=False, logging_level=log_level.upper(),
             configure_logging=False, log_to_driver=True)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(deployment(cfg, replicas, replica_cpus=min(1.0, cores / replicas)), name="sdrt", route_prefix="/")
    log.info("listening", extra={"fields": {"url": f"http://{cfg.host}:{cfg.port}", "replicas": replicas, "ray": True}})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down", extra={"fields": {"ray": True}})
    serve.shutdown()
    ray.shutdown()
