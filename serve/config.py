"""The service's settings: one dataclass, filled by `sdrt serve`'s options or a Ray Serve config."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def parse_auth(text: str | None) -> dict[str, str]:
    """A1111's --api-auth: "user:pass[,user2:pass2]" -> {user: pass}. The password may hold ':'."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--api-auth: each entry must be user:password, got {item.strip()!r}")
        out[user] = password
    return out


@dataclass
class ServeConfig:
    """Everything `sdrt serve` can be told. Limits keep one request from taking the service down."""

    model: str | None = None  # one model folder; None with models_dir None: the embedded default model
    models_dir: str | None = None  # a folder of model folders, switchable by name (sd_model_checkpoint)
    default_model: str | None = None  # with models_dir: the one loaded first (default: first by name)
    provider: str = "auto"
    threads: int | None = None  # ONNX Runtime intra-op threads per graph (default: physical cores)
    host: str = "127.0.0.1"
    port: int = 7860
    api_auth: dict[str, str] = field(default_factory=dict)
    max_queue: int = 16  # requests waiting (not running) before new ones get 503
    request_timeout: float = 300.0  # seconds from arrival to answer; then 504 (interrupted if running)
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 4096 * 4096  # decoded size of an input image (decompression bombs)
    max_width: int = 2048
    max_height: int = 2048
    max_images: int = 16  # batch_size * n_iter (* init images) per request
    max_steps: int = 150
    max_prompt_chars: int = 20_000
    max_batch_images: int = 8  # images in one micro-batched UNet call (1: no micro-batching)
    batch_wait_ms: float = 10.0  # how long a request waits for compatible ones to batch with
    max_loaded_models: int = 2
    warmup: bool = True
    shutdown_grace: float = 60.0  # seconds SIGTERM waits for requests in flight

    def __post_init__(self):
        if isinstance(self.api_auth, str):
            self.api_auth = parse_auth(self.api_auth)
        if self.model is not None and self.models_dir is not None:
            raise ValueError("give --model DIR or --models-dir DIR, not both")
        checks = {
            "max_queue": (self.max_queue, 0), "max_batch_images": (self.max_batch_images, 1),
            "max_images": (self.max_images, 1), "max_steps": (self.max_steps, 1), "max_width": (self.max_width, 8),
            "max_height": (self.max_height, 8), "max_body_bytes": (self.max_body_bytes, 1024),
            "max_image_pixels": (self.max_image_pixels, 64), "max_loaded_models": (self.max_loaded_models, 1),
            "max_prompt_chars": (self.max_prompt_chars, 1),
        }
        for name, (value, lo) in checks.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer of at least {lo}, got {value!r}")
        for name in ("request_timeout", "batch_wait_ms", "shutdown_grace"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a number of at least 0, got {value!r}")
        if self.request_timeout == 0:
            raise ValueError("request_timeout must be above 0 seconds")
        for name in ("model", "models_dir"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise ValueError(f"--{name.replace('_', '-')} {value}: not a folder")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeConfig":
        """From a mapping (a Ray Serve config's args): unknown keys are an error naming them."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown serve setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**d)

    def check_credentials(self, user: str, password: str) -> bool:
        """Constant-time: every configured entry is compared, whatever matches."""
        ok = False
        for u, p in self.api_auth.items():
            ok |= secrets.compare_digest(u.encode(), user.encode()) & secrets.compare_digest(p.encode(), password.encode())
        return ok
