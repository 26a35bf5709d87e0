"""ONNX Runtime sessions for the four graphs of a model folder: providers, options, typed inputs."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .binding import BoundSession, _GraphCaptureFailed, _numpy_type, _typed
from .errors import InputError
from .modelfolder import ModelInfo

PROVIDERS = ("auto", "cpu", "cuda")

class ProviderError(RuntimeError):
    """The requested execution provider cannot run here, or cannot run this model folder."""


def physical_cores() -> int:
    """Physical cores available to this process (ONNX Runtime's best intra-op thread count)."""
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = os.cpu_count() or 1
    cores = set()
    try:
        for cpu in os.sched_getaffinity(0):
            p = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(((p / "physical_package_id").read_text().strip(), (p / "core_id").read_text().strip()))
    except (OSError, AttributeError):
        return avail
    return max(1, min(avail, len(cores) or avail))


def logical_cores() -> int:
    """Logical CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def check_threads(threads) -> int | None:
    """threads=None (one per physical core), or a whole number from 1 to the logical cores: more
    threads than cores only slow ONNX Runtime down, and each costs memory (a stack per thread)."""
    if threads is None:
        return None
    n = logical_cores()
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= n:
        raise InputError(f"threads must be a whole number from 1 to {n} (the logical cores this process may use), "
                         f"or None for one per physical core; got {threads!r}")
    return int(threads)


def resolve_provider(provider: str, info: ModelInfo | None = None) -> str:
    """'auto' -> 'cuda' when ONNX Runtime has a usable CUDA provider (and the model allows), else 'cpu'."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ProviderError(f"provider {provider!r} is not known; accepted: {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if provider == "auto":
        provider = "cuda" if has_cuda and (info is None or info.target != "cpu") else "cpu"
        if provider == "cpu" and info is not None and info.target == "cuda" and "fp16" in info.precision.values():
            raise ProviderError(
                f"model folder {info.path} holds fp16 graphs fused for CUDA, and this onnxruntime has no CUDA provider "
                f"(providers: {', '.join(available)}); {gpu_install_hint()}, or export the "
                "model with --target cpu"
            )
    if provider == "cuda" and not has_cuda:
        raise ProviderError(
            "CUDA was asked for, but this onnxruntime has no CUDA provider "
            f"(onnxruntime {ort.__version__}, providers: {', '.join(available)}); "
            f"{gpu_install_hint()} on a machine with an NVIDIA GPU, or use provider='cpu'"
        )
    if provider == "cpu" and info is not None and info.target == "cuda" and "fp16" in info.precision.values():
        raise ProviderError(
            f"model folder {info.path} holds fp16 graphs fused for CUDA; the CPU provider cannot run them. "
            "Export the model with --target cpu for CPU use"
        )
    return provider


def onnxruntime_distributions() -> list[str]:
    """The installed distributions that provide the `onnxruntime` package (one is right)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return found


def gpu_install_hint() -> str:
    dists = onnxruntime_distributions()
    if len(dists) > 1:
        return (f"{' and '.join(dists)} are both installed and overwrite each other's files: "
                "pip uninstall -y onnxruntime onnxruntime-gpu, then SDRT_ONNXRUNTIME=gpu pip install sdrt")
    return "install sdrt with the CUDA build of ONNX Runtime (SDRT_ONNXRUNTIME=gpu pip install sdrt, see the README)"


# ONNX Runtime's session option for exact int8 products on x86-64 CPUs without VNNI.
X64_QUANT_PRECISION = "session.x64quantprecision"


def session_options(provider: str, threads: int | None = None):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # failures are reported as exceptions, not log lines
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if provider == "cpu":
        so.intra_op_num_threads = threads or physical_cores()
        so.inter_op_num_threads = 1
        # Peak memory: the graphs run one after another, so their activations share one CPU arena
        # (the largest graph's peak, not the sum); weights stay out of it; and no memory pattern,
        # whose block is allocated beside the chunks of the first run instead of reusing them.
        so.enable_cpu_mem_arena = True
        so.enable_mem_pattern = False
        if _shared_cpu_arena():
            so.add_session_config_entry("session.use_env_allocators", "1")
        so.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        # int8 weights beyond +-64 (sdrt int8 folders written before they were kept within it) would
        # saturate ONNX Runtime's uint8 x int8 kernels on x86-64 CPUs without VNNI: there it is told to
        # convert such weights to uint8 and use its exact, slower uint8 x uint8 kernels. Only there:
        # ONNX Runtime applies the option on every x86-64 CPU with AVX2, VNNI or not (3x slower
        # convolutions with full-range weights, measured). Weights within +-64 are never converted.
        from .cpu import cpu_features

        if cpu_features().int8_products_saturate() is not False:
            so.add_session_config_entry(X64_QUANT_PRECISION, "1")
    return so


_arena_lock = threading.Lock()
_arena: list[bool] = []


def _shared_cpu_arena() -> bool:
    """Register one CPU arena with ONNX Runtime's environment, once per process."""
    import onnxruntime as ort

    with _arena_lock:
        if not _arena:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
                _arena.append(True)
            except Exception:  # the application registered one already, or none can be: each session keeps its own
                _arena.append(False)
        return _arena[0]


@functools.lru_cache(maxsize=None)
def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip packages when that is how they are installed
    (onnxruntime-gpu[cuda,cudnn], or beside PyTorch); a system-wide CUDA is found without it."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:  # nothing to preload: the libraries come from the system's library path
            pass


def _release_freed_heap() -> None:
    """Hand the heap pages freed after a graph load back to the OS (glibc keeps them otherwise):
    ONNX Runtime reads a graph with inline weights whole and copies the weights out of it."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except Exception:  # not glibc
        pass


def provider_list(provider: str, device_id: int = 0, cuda_graph: bool = False,
                  options: dict[str, Any] | None = None) -> list[Any]:
    """The providers of a session; `options` override sdrt's CUDA provider options."""
    if provider == "cuda":
        cuda = {
            "device_id": device_id,
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
            "do_copy_in_default_stream": True,
            **(options or {}),
        }
        if cuda_graph:
            cuda["enable_cuda_graph"] = True
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Graph:
    """One graph of a model folder, its session created on first use (thread-safe).

    io_binding: run through a BoundSession (buffers that stay put; on the device for CUDA).
    cuda_graphs: with io_binding on CUDA, how many input shapes may hold a captured CUDA graph
    (0: none). A session that cannot capture falls back to plain runs with a one-line log."""

    def __init__(self, name: str, path: Path, provider: str, threads: int | None = None, *, io_binding: bool = False,
                 cuda_graphs: int = 0, provider_options: dict[str, Any] | None = None,
                 log: Callable[[str], None] | None = None,
                 gate: Callable[[], None] | None = None, on_load: Callable[["Graph", Any], None] | None = None):
        self.name = name
        self.path = path
        self.provider = provider
        self.threads = check_threads(threads)
        # gate(): called before the first run until it returns (the folder's file check);
        # on_load(graph, session): checks a new session before it is used (raises to refuse it).
        self._gate = gate
        self._on_load = on_load
        self.io_binding = io_binding
        self.cuda_graphs = cuda_graphs if io_binding and provider == "cuda" else 0
        self.provider_options = provider_options
        self.log = log or _log
        self._session = None
        self._bound: BoundSession | None = None
        self._lock = threading.Lock()
        # Initializers that replace the graph's own (merged LoRA weights), and their key.
        self.initializers_key: Any = None
        self._initializers: dict[str, np.ndarray] = {}
        self.input_types: dict[str, type] = {}
        self.input_ranks: dict[str, int] = {}
        self.output_names: list[str] = []
        # Time spent inside ONNX Runtime for this graph (read by benchmarks; reset freely).
        self.calls = 0
        self.seconds = 0.0

    @property
    def session(self):
        if self._session is None:
            with self._lock:
                if self._session is None:
                    self._session = self._create()
        return self._session

    def _create(self):
        import onnxruntime as ort

        if self.provider == "cuda":
            _preload_cuda_libraries()

        def create(cuda_graph: bool):
            so = session_options(self.provider, self.threads)
            # The arrays (self._initializers) and their OrtValues stay referenced: ONNX Runtime
            # uses their memory for the session's life.
            self._initializer_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self._initializers.values()]
            for name, value in zip(self._initializers, self._initializer_values):
                so.add_initializer(name, value)
            return ort.InferenceSession(str(self.path), so,
                                        providers=provider_list(self.provider, cuda_graph=cuda_graph,
                                                                options=self.provider_options),
                                        disabled_optimizers=_disabled_optimizers(self._initializers))

        try:
            try:
                sess = create(self.cuda_graphs > 0)
            except Exception as e:
                if not self.cuda_graphs:
                    raise
                self.log(f"{self.name}: CUDA graphs off, plain runs: {str(e).splitlines()[0]}")
                self.cuda_graphs = 0
                sess = create(False)
        except Exception as e:  # ORT raises its own exception types; say which file failed
            if self._gate is not None:
                self._gate()  # a damaged file is the cause to report, when it is one
            raise ProviderError(f"cannot load the {self.name} graph {self.path}: {str(e).splitlines()[0]}") from None
        if self.provider == "cpu":
            _release_freed_heap()
        if self.provider == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
            raise ProviderError(
                f"the CUDA provider failed to start for {self.path} (CUDA/cuDNN libraries missing or no GPU visible)"
            )
        for i in sess.get_inputs():
            self.input_types[i.name] = _numpy_type(i.type)
            self.input_ranks[i.name] = len(i.shape)
        self.output_names = [o.name for o in sess.get_outputs()]
        if self._on_load is not None:
            self._on_load(self, sess)
        if self.io_binding:
            self._bound = BoundSession(sess, self.provider, 0, max_graphs=self.cuda_graphs,
                                       log=lambda m: self.log(f"{self.name}: {m}"))
        return sess

    def load(self) -> "Graph":
        self.session  # noqa: B018 (creates it)
        return self

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def set_initializers(self, key: Any, arrays: dict[str, np.ndarray]) -> None:
        """Replace initializers of the graph by `arrays` (name -> array in the graph's dtype and
        shape), identified by `key`: the session is released now and created again on next use
        when the key changes (the old one is gone before the new one loads)."""
        with self._lock:
            if key == self.initializers_key:
                return
            self._session, self._bound = None, None
            self._initializers = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            self.initializers_key = key
        if self.provider == "cpu":
            _release_freed_heap()

    def _recreate(self, cuda_graphs: int) -> None:
        """A new session (frees every CUDA graph the old one captured)."""
        with self._lock:
            self._session, self._bound = None, None
            self.cuda_graphs = cuda_graphs
        self.load()

    @property
    def bound(self) -> BoundSession | None:
        """The IO-binding runner (None without io_binding)."""
        self.load()
        return self._bound

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None,
            keep: Sequence[str] = ()) -> list[np.ndarray]:
        """Run on `feeds`; `keep` names inputs the caller passes again unchanged (IO binding
        copies them to the device only when the array object changes)."""
        if self._gate is not None:
            self._gate()  # raises while the folder is damaged; passes for good once it returned
            self._gate = None
        sess = self.session
        t = time.perf_counter()
        try:
            if self._bound is not None:
                out = self._run_bound(feeds, list(outputs) if outputs else self.output_names, keep)
            else:
                typed = {k: _typed(v, self.input_types.get(k)) for k, v in feeds.items()}
                out = sess.run(list(outputs) if outputs else None, typed)
        except ProviderError:
            raise
        except Exception as e:
            shapes = ", ".join(f"{k} {tuple(np.shape(v))} {np.asarray(v).dtype}" for k, v in feeds.items())
            raise RuntimeError(f"the {self.name} graph failed on inputs [{shapes}]: {str(e).splitlines()[0]}") from None
        with self._lock:
            self.calls += 1
            self.seconds += time.perf_counter() - t
        return out

    def _run_bound(self, feeds, outputs, keep):
        if self._bound.needs_reset:
            self._recreate(self.cuda_graphs)
        try:
            return self._bound.run(feeds, outputs, keep)
        except _GraphCaptureFailed:
            # A failed capture may leave the session unusable: a new one, without graphs.
            self._recreate(0)
            return self._bound.run(feeds, outputs, keep)


def _disabled_optimizers(initializers: dict[str, np.ndarray]) -> list[str]:
    """ONNX Runtime transformers that read a weight from the graph file and ignore a replacement
    given with SessionOptions.add_initializer (measured: the output is the original weight's):
    the NCHWc transformer (CPU convolutions in blocked layout) converts convolution weights, and
    FuseFp16InitializerToFp32NodeTransformer (the CPU provider running an fp16 graph in fp32)
    turns fp16 weights into fp32 ones. With such replaced weights they are off."""
    off = []
    if any(a.ndim == 4 for a in initializers.values()):
        off.append("NchwcTransformer")
    if any(a.dtype == np.float16 for a in initializers.values()):
        off.append("FuseFp16InitializerToFp32NodeTransformer")
    return off


def _log(msg: str) -> None:
    logging.getLogger("sdrt.runtime").warning(msg)
