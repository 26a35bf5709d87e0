"""Where requests run: the models (loaded from the folder listing only), a bounded queue, one
dispatcher, and dynamic micro-batching of the UNet.

Micro-batching: the dispatcher takes a request and, within `batch_wait_ms`, every queued request
with the same key (model, size, steps, sampler, schedule, guidance, strength, mode) up to
`max_batch_images` images per UNet call. Each request of such a group runs the ordinary public
pipeline call in its own thread; the model's UNet graph is wrapped so that the threads of a group
meet at every UNet call and one ONNX Runtime call runs on their inputs stacked along the batch
axis, its output split back. Inputs that do not stack (another timestep, latent size, prompt
length) run as separate calls at the same meeting, so a group is never wrong, only less batched.
Each image keeps its own seeded generators in sdrt, and ONNX Runtime computes every batch row
independently, so a request returns the same images batched or alone (tests/test_serve.py checks
this against requests run one at a time).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .a1111 import Plan, RequestError
from .config import ServeConfig


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in about {retry_after} s")
        self.retry_after = retry_after


class Draining(Exception):
    pass


class Stopped(Exception):
    """A running request stopped by /interrupt or its timeout."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------ UNet batching
_local = threading.local()


class _Slot:
    __slots__ = ("graph", "feeds", "outputs", "kw", "out", "error", "done")

    def __init__(self, graph, feeds, outputs, kw):
        self.graph = graph
        self.feeds = feeds
        self.outputs = outputs
        self.kw = kw
        self.out = None
        self.error = None
        self.done = False


class BatchGroup:
    """The threads of one micro-batch: every UNet call waits until each thread still running has
    made its call, then the calls run as one."""

    def __init__(self, members: int, on_call: Callable[[int], None] | None = None):
        self.cond = threading.Condition()
        self.active = members
        self.waiting: list[_Slot] = []
        self.on_call = on_call

    def run(self, graph, feeds, outputs=None, kw=None):
        slot = _Slot(graph, feeds, outputs, kw or {})
        with self.cond:
            self.waiting.append(slot)
            batch = self._take()
        if batch:
            self._execute(batch)
        with self.cond:
            while not slot.done:
                self.cond.wait()
        if slot.error is not None:
            raise slot.error
        return [slot.out]

    def leave(self) -> None:
        with self.cond:
            self.active -= 1
            batch = self._take()
        if batch:
            self._execute(batch)

    def _take(self):
        if self.waiting and len(self.waiting) >= self.active:
            batch, self.waiting = self.waiting, []
            return batch
        return None

    @staticmethod
    def _key(slot):
        feeds = slot.feeds
        n = feeds["sample"].shape[0]
        parts = [("", "graph", id(slot.graph), tuple(slot.outputs or ()))]
        for k in sorted(feeds):
            v = np.asarray(feeds[k])
            if v.ndim > 0 and v.shape[0] == n:
                parts.append((k, "rows", v.shape[1:], v.dtype.str))
            else:
                parts.append((k, "same", v.shape, v.dtype.str, v.tobytes()))
        return tuple(parts)

    def _execute(self, batch: list[_Slot]) -> None:
        parts: dict[Any, list[_Slot]] = collections.defaultdict(list)
        for s in batch:
            parts[self._key(s)].append(s)
        for key, slots in parts.items():
            graph = slots[0].graph
            try:
                if len(slots) == 1:
                    slots[0].out = graph.run(slots[0].feeds, slots[0].outputs, **slots[0].kw)[0]
                else:
                    feeds = {}
                    for k, how, *_ in key[1:]:
                        vals = [np.asarray(s.feeds[k]) for s in slots]
                        feeds[k] = np.concatenate(vals) if how == "rows" else vals[0]
                    out = graph.run(feeds, slots[0].outputs)[0]  # stacked inputs are new arrays: nothing to keep
                    i = 0
                    for s in slots:
                        n = s.feeds["sample"].shape[0]
                        s.out = out[i : i + n]
                        i += n
                if self.on_call is not None:
                    self.on_call(sum(s.feeds["sample"].shape[0] for s in slots))
            except BaseException as e:  # noqa: BLE001 - handed to every thread of the call
                for s in slots:
                    s.error = e
        with self.cond:
            for s in batch:
                s.done = True
            self.cond.notify_all()


class BatchingGraph:
    """Stands in for a pipeline's UNet graph: a call from a thread of a BatchGroup goes through the
    group, any other call straight to the graph."""

    def __init__(self, graph):
        self._graph = graph

    def __getattr__(self, name):
        return getattr(self._graph, name)

    def load(self):
        self._graph.load()
        return self

    def run(self, feeds, outputs=None, **kw):
        group = getattr(_local, "group", None)
        if group is None or "sample" not in feeds:
            return self._graph.run(feeds, outputs, **kw)
        return group.run(self._graph, feeds, outputs, kw)


# ------------------------------------------------------------------------------------ models
@dataclass
class ModelEntry:
    name: str
    path: Path
    info: Any = None  # ModelInfo, read on listing


class Registry:
    """The models the service may load: one folder (--model), the embedded default, or the model
    folders inside --models-dir, by folder name. A request names a model; it never gives a path."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one model load at a time (two requests for a cold model load it once)
        self._loaded: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.current: str | None = None
        self.ready = False

    def listing(self) -> dict[str, ModelEntry]:
        from sdrt.runtime.modelfolder import read_model_folder

        if self.cfg.models_dir is None:
            if self.cfg.model is not None:
                path = Path(self.cfg.model).resolve()
            else:
                from sdrt.models import default_model_path

                path = default_model_path()
            return {path.name: ModelEntry(path.name, path, read_model_folder(path, verify="size"))}
        out = {}
        for p in sorted(Path(self.cfg.models_dir).iterdir()):
            if p.is_dir() and not p.name.startswith(".") and ((p / "sdrt.json").is_file() or (p / "model_index.json").is_file()):
                try:
                    out[p.name] = ModelEntry(p.name, p, read_model_folder(p, verify="size"))
                except Exception:  # noqa: BLE001 - a broken folder is left out of the listing
                    continue
        return out

    def resolve(self, name: str | None) -> str:
        """A model name from a request (folder name, A1111 title "name [hash]", or hash) -> folder name."""
        if name is None:
            if self.current is None:
                raise RequestError("no model is loaded", status=503, kind="NotReady")
            return self.current
        models = self.listing()
        for entry in models.values():
            h = entry.info.short_hash
            if name in (entry.name, f"{entry.name} [{h}]", h) and name:
                return entry.name
        raise RequestError(f"sd_model_checkpoint: model {name!r} not found; available: {', '.join(models) or 'none'}",
                           status=404, kind="ModelNotFound")

    def get(self, name: str | None = None):
        """The loaded pipeline of a model (loaded now if it is not), its UNet wrapped for batching."""
        name = self.resolve(name)
        with self._lock:
            pipe = self._loaded.get(name)
            if pipe is not None:
                self._loaded.move_to_end(name)
                return pipe
        with self._load_lock:
            return self._load(name)

    def _load(self, name: str):
        from sdrt.runtime import load

        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
        entry = self.listing()[name]
        pipe = load(entry.path, provider=self.cfg.provider, threads=self.cfg.threads)
        pipe.graphs["unet"] = BatchingGraph(pipe.graphs["unet"])
        with self._lock:
            pipe = self._loaded.setdefault(name, pipe)
            self._loaded.move_to_end(name)
            while len(self._loaded) > self.cfg.max_loaded_models:
                self._loaded.popitem(last=False)
        return pipe

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def switch(self, name: str, warm: bool = True) -> str:
        """Make `name` the model requests use by default (A1111's sd_model_checkpoint option)."""
        name = self.resolve(name)
        pipe = self.get(name)
        if warm:
            warm_up(pipe)
        self.current = name
        return name

    def check(self) -> str:
        """The model to load first; an error naming the folder when there is none."""
        models = self.listing()
        if not models:
            raise RuntimeError(f"--models-dir {self.cfg.models_dir} holds no model folders (folders with sdrt.json or model_index.json)")
        first = self.cfg.default_model or next(iter(models))
        if first not in models:
            raise RuntimeError(f"default model {first!r} is not in {self.cfg.models_dir}; available: {', '.join(models)}")
        return first

    def start(self) -> None:
        first = self.check()
        self.current = first
        pipe = self.get(first)
        pipe.load_graphs()
        if self.cfg.warmup:
            warm_up(pipe)
        self.ready = True


def warm_up(pipe) -> None:
    """One small generation through every graph, so the first request pays no session start-up."""
    from PIL import Image

    n = pipe.info.native_size
    img = Image.new("RGB", (n, n), (255, 255, 255))
    if pipe.info.is_inpainting_model:
        pipe.inpaint(img, Image.new("L", (n, n), 255), "", steps=1, seed=0, sampler="Euler")
    else:
        pipe.img2img(img, "", steps=2, strength=0.5, seed=0, sampler="Euler")


# ------------------------------------------------------------------------------------ engine
@dataclass
class Job:
    plan: Plan
    future: concurrent.futures.Future
    arrival: float
    state: str = "queued"  # queued | running | done
    stop_reason: str | None = None
    step: int = 0
    steps_total: int = 0
    started: float = 0.0
    unet_rows: int = 1  # images per UNet call (its share of a micro-batch)
    extra: dict = field(default_factory=dict)

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason


class Engine:
    """A bounded queue and one dispatcher that runs requests (alone or micro-batched)."""

    def __init__(self, cfg: ServeConfig, registry: Registry, metrics=None):
        self.cfg = cfg
        self.registry = registry
        self.metrics = metrics
        self.cond = threading.Condition()
        self.pending: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.accepting = True
        self._held = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, cfg.max_batch_images), thread_name_prefix="sdrt-batch")
        self._latency = collections.deque(maxlen=32)  # recent run times, for Retry-After
        self.unet_batches = collections.Counter()  # rows per micro-batched UNet call -> count

    # ----------------------------------------------------------------- queue
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sdrt-dispatch", daemon=True)
        self._thread.start()

    def submit(self, plan: Plan) -> Job:
        job = Job(plan, concurrent.futures.Future(), time.monotonic())
        job.unet_rows = max((c.kwargs.get("batch_size", 1) for c in plan.calls), default=1)
        job.steps_total = plan.steps * len(plan.calls)
        with self.cond:
            if not self.accepting:
                raise Draining()
            if len(self.pending) >= self.cfg.max_queue:
                raise QueueFull(self.retry_after())
            self.pending.append(job)
            self._gauges()
            self.cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Stop a request: taken off the queue, or stopped at its next step if running."""
        with self.cond:
            job.stop(reason)
            if job.state == "queued" and job in self.pending:
                self.pending.remove(job)
                job.state = "done"
                self._gauges()
                if not job.future.done():
                    job.future.set_exception(Stopped(reason))

    def interrupt(self) -> int:
        """A1111's /interrupt: stop what is running now (queued requests go on)."""
        with self.cond:
            for j in self.running:
                j.stop("interrupted")
            return len(self.running)

    def hold(self, held: bool = True) -> None:
        """Stop (or resume) starting queued requests; running ones go on. Requests keep queueing."""
        with self.cond:
            self._held = held
            self.cond.notify_all()

    def retry_after(self) -> int:
        per = (sum(self._latency) / len(self._latency)) if self._latency else 5.0
        return max(1, int(round(per * (len(self.pending) + 1) / max(1, self.cfg.max_batch_images))))

    def drain(self) -> None:
        with self.cond:
            self.accepting = False

    def close(self, wait: bool = True) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if wait and self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=wait)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.pending))
            self.metrics.in_flight.set(len(self.running))

    def progress(self) -> dict:
        """A1111's /progress: the first running request's step, as fraction and ETA."""
        with self.cond:
            job = self.running[0] if self.running else None
            queued = len(self.pending)
            running = len(self.running)
        state = {"skipped": False, "interrupted": bool(job and job.stop_reason == "interrupted"),
                 "job": "", "job_count": running + queued, "job_timestamp": "0", "job_no": 0,
                 "sampling_step": 0, "sampling_steps": 0, "queued": queued, "running": running}
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        total = max(1, job.steps_total)
        frac = min(1.0, job.step / total)
        elapsed = time.monotonic() - job.started
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        state.update(job=job.plan.endpoint, job_count=running + queued, sampling_step=job.step, sampling_steps=total,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S"))
        return {"progress": frac, "eta_relative": eta, "state": state, "current_image": None, "textinfo": None}

    # ----------------------------------------------------------------- dispatcher
    def _take_group(self) -> list[Job] | None:
        with self.cond:
            while (not self.pending or self._held) and not self._stop:
                self.cond.wait()
            if not self.pending:
                return None
            first = self.pending.popleft()
            group = [first]
            rows = first.unet_rows
            limit = self.cfg.max_batch_images
            until = time.monotonic() + self.cfg.batch_wait_ms / 1000.0
            while rows < limit:
                for j in list(self.pending):
                    if j.plan.key == first.plan.key and rows + j.unet_rows <= limit:
                        self.pending.remove(j)
                        group.append(j)
                        rows += j.unet_rows
                left = until - time.monotonic()
                if rows >= limit or left <= 0 or self._stop:
                    break
                self.cond.wait(timeout=left)
            for j in group:
                j.state = "running"
                j.started = time.monotonic()
            self.running = group
            self._gauges()
            return group

    def _loop(self) -> None:
        while True:
            group = self._take_group()
            if group is None:
                return
            t = time.monotonic()
            try:
                if len(group) == 1:
                    self._run(group[0], None)
                else:
                    bg = BatchGroup(len(group), on_call=self._count_batch)
                    futures = [self._pool.submit(self._run, j, bg) for j in group]
                    concurrent.futures.wait(futures)
            finally:
                self._latency.append((time.monotonic() - t) / len(group))
                with self.cond:
                    self.running = []
                    self._gauges()
                    self.cond.notify_all()

    def _count_batch(self, rows: int) -> None:
        self.unet_batches[rows] += 1
        if self.metrics is not None:
            self.metrics.unet_batch.observe(rows)

    def _run(self, job: Job, group: BatchGroup | None) -> None:
        _local.group = group
        try:
            if job.stop_reason is not None:
                raise Stopped(job.stop_reason)
            pipe = self.registry.get(job.plan.model)
            results = []
            n_calls = len(job.plan.calls)
            for k, call in enumerate(job.plan.calls):
                def progress(step, total, _k=k):
                    job.steps_total = total * n_calls  # the pipeline's own count (img2img runs fewer steps)
                    job.step = _k * total + step
                    if job.stop_reason is not None:
                        raise Stopped(job.stop_reason)

                results.append(getattr(pipe, call.method)(*call.args, **call.kwargs, progress=progress))
            job.extra["model_info"] = pipe.info
            job.future.set_result(results)
        except BaseException as e:  # noqa: BLE001 - every outcome goes to the waiting request
            if not job.future.done():
                job.future.set_exception(e)
        finally:
            job.state = "done"
            _local.group = None
            if group is not None:
                group.leave()
