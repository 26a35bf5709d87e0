"""Prometheus metrics and one-line JSON logs."""

from __future__ import annotations

import json
import logging
import sys
import time

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    """The service's metrics, in a registry of its own (several apps can live in one process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sdrt_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("sdrt_request_seconds", "Time from request to response, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("sdrt_images", "Images generated, by endpoint", ["endpoint"], registry=r)
        self.errors = Counter("sdrt_errors", "Requests refused or failed, by kind (ValidationError, QueueFull, "
                              "Timeout, Interrupted, Unauthorized, InternalError, ...)", ["kind"], registry=r)
        self.queue_depth = Gauge("sdrt_queue_depth", "Requests waiting to run", registry=r)
        self.in_flight = Gauge("sdrt_in_flight", "Requests running now", registry=r)
        self.unet_batch = Histogram("sdrt_unet_batch_rows", "Rows (images x CFG) per micro-batched UNet call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.ready = Gauge("sdrt_ready", "1 once the default model is loaded and warmed up", registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's `fields` (extra={"fields": {...}})."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}) or {})
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc_type"] = record.exc_info[0].__name__
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str = "info") -> None:
    """Every log line of the process (sdrt's, uvicorn's) as one JSON object on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("sdrt", "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level.upper())
        log.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # sdrt writes its own access line


log = logging.getLogger("sdrt.serve")
