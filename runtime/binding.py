"""IO binding: a graph runs on input and output buffers that stay put from one call to the next.

On CUDA the buffers live on the device: a call copies its inputs into them (an input marked
`keep`, such as the text embeddings of a denoising loop, only when it is a different array than
last time), runs, and copies the requested outputs back to the host. Nothing is allocated after
the first call of a given input shape. The same code runs on the CPU provider with CPU buffers,
which is how it is tested without a GPU.

CUDA graphs (UNet only, `max_graphs` > 0): ONNX Runtime captures the kernels of one run and
replays them, one captured graph per input shape, chosen by the `gpu_graph_id` run option. A
captured graph reads and writes fixed addresses, so each shape keeps its own buffers for as long
as its graph lives. The first call of a new shape runs without a graph (cuDNN picks its
convolution algorithms there, and the output buffers are allocated); later calls use the graph
(ONNX Runtime captures it on the first of them). At most `max_graphs` shapes hold a graph; the
least recently used one is evicted beyond that. ONNX Runtime cannot drop one captured graph, so
an evicted graph's id is never used again, and once as many ids have been retired as graphs are
allowed, `needs_reset` asks the owner to create the session anew (which frees them all).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

NO_GRAPH = -1  # ONNX Runtime's gpu_graph_id for "run without a CUDA graph"
MAX_SLOTS = 8  # input shapes that keep buffers, per graph (graph-less slots are cheap to rebuild)


class _Slot:
    """Buffers and binding of one input signature."""

    def __init__(self, session, device: str, device_id: int):
        self.binding = session.io_binding()
        self.inputs: dict[str, Any] = {}  # name -> OrtValue
        self.outputs: dict[str, Any] = {}  # name -> OrtValue (bound after the first run)
        self.held: dict[str, np.ndarray] = {}  # name -> the host array last copied (for `keep`)
        self.graph_id = NO_GRAPH
        self.runs = 0


class BoundSession:
    """Runs one ONNX Runtime session through IO binding with reusable buffers (thread-safe:
    calls are serialised, since they share the buffers)."""

    def __init__(self, session, device: str = "cpu", device_id: int = 0, max_graphs: int = 0,
                 log: Callable[[str], None] | None = None):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.device = device
        self.device_id = device_id
        self.max_graphs = max_graphs
        self.log = log or (lambda msg: None)
        self.input_types = {i.name: _numpy_type(i.type) for i in session.get_inputs()}
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.next_graph_id = 0
        self.retired_graphs = 0
        self.allocations = 0  # OrtValues this object allocated (tests check it stays put)
        self.copied: Counter[str] = Counter()  # input name -> host-to-buffer copies
        self.graphs_disabled = False

    # ------------------------------------------------------------------------------ bookkeeping
    @property
    def needs_reset(self) -> bool:
        """True once the retired CUDA graphs (still held by ONNX Runtime) reach max_graphs."""
        return self.max_graphs > 0 and self.retired_graphs >= self.max_graphs

    def graph_ids(self) -> dict[tuple, int]:
        """Input signature -> CUDA graph id, for the shapes that hold a graph (LRU order)."""
        return {k: s.graph_id for k, s in self._slots.items() if s.graph_id != NO_GRAPH}

    def disable_graphs(self, reason: str) -> None:
        """Run every later call without CUDA graphs (capture failed or is impossible)."""
        if not self.graphs_disabled and self.max_graphs:
            self.log(f"CUDA graphs off, plain runs from now on: {reason}")
        self.graphs_disabled = True
        for s in self._slots.values():
            s.graph_id = NO_GRAPH

    def _slot(self, key: tuple, specs: dict[str, tuple]) -> _Slot:
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        slot = _Slot(self.session, self.device, self.device_id)
        for name, (shape, dtype) in specs.items():
            ov = self._ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device, self.device_id)
            self.allocations += 1
            slot.binding.bind_ortvalue_input(name, ov)
            slot.inputs[name] = ov
        self._slots[key] = slot
        self._evict()
        return slot

    def _evict(self) -> None:
        """Keep at most max_graphs slots holding a graph and MAX_SLOTS slots in all (LRU)."""
        while True:
            with_graph = [k for k, s in self._slots.items() if s.graph_id != NO_GRAPH]
            if len(with_graph) > self.max_graphs:
                victim = with_graph[0]
            elif len(self._slots) > max(MAX_SLOTS, self.max_graphs):
                victim = next(iter(self._slots))
            else:
                return
            slot = self._slots.pop(victim)
            if slot.graph_id != NO_GRAPH:
                self.retired_graphs += 1

    def _assign_graph(self, key: tuple, slot: _Slot) -> None:
        if self.max_graphs <= 0 or self.graphs_disabled or slot.graph_id != NO_GRAPH or slot.runs < 1:
            return
        slot.graph_id = self.next_graph_id
        self.next_graph_id += 1
        self._evict()

    # ------------------------------------------------------------------------------------- run
    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str], keep: Sequence[str] = ()) -> list[np.ndarray]:
        """Copy `feeds` into the bound inputs, run, return `outputs` as host arrays.

        `keep`: inputs whose host array, when it is the very object copied last time, is not
        copied again (the caller promises not to have changed it in place)."""
        specs = {k: (np.shape(v), np.dtype(self.input_types.get(k) or np.asarray(v).dtype)) for k, v in feeds.items()}
        key = tuple((k, shape, dtype.str) for k, (shape, dtype) in sorted(specs.items())) + (tuple(outputs),)
        with self._lock:
            slot = self._slot(key, specs)
            for name, value in feeds.items():
                if name in keep and slot.held.get(name) is value:
                    continue  # the caller's very array (before any type conversion) is on the device already
                slot.inputs[name].update_inplace(_typed(value, specs[name][1]))
                self.copied[name] += 1
                slot.held[name] = value if name in keep else None
            self._assign_graph(key, slot)
            if not slot.outputs:
                for name in outputs:
                    slot.binding.bind_output(name, self.device, self.device_id)
            ro = self._ort.RunOptions()
            if self.max_graphs > 0:
                ro.add_run_config_entry("gpu_graph_id", str(slot.graph_id))
            try:
                # Host-to-device copies of pageable memory may still be in flight when update_inplace
                # returns, and ONNX Runtime's CUDA stream does not wait for the default stream.
                slot.binding.synchronize_inputs()
                self.session.run_with_iobinding(slot.binding, ro)
                slot.binding.synchronize_outputs()
            except Exception as e:
                if slot.graph_id == NO_GRAPH:
                    raise
                self.disable_graphs(str(e).splitlines()[0])
                raise _GraphCaptureFailed(str(e)) from None
            if not slot.outputs:
                # The first run allocated the outputs: keep those buffers bound from now on.
                for name, ov in zip(outputs, slot.binding.get_outputs()):
                    slot.outputs[name] = ov
                    slot.binding.bind_ortvalue_output(name, ov)
                    self.allocations += 1
            slot.runs += 1
            out = [slot.outputs[name].numpy() for name in outputs]
            # A CPU OrtValue's numpy() is a view of the buffer the next call overwrites.
            return [a.copy() for a in out] if self.device == "cpu" else out


class _GraphCaptureFailed(RuntimeError):
    """A run with a CUDA graph failed; the caller retries without graphs (already switched off)."""


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _numpy_type(ort_type: str):
    return _ORT_TYPES.get(ort_type, np.float32)


def _typed(v, dtype) -> np.ndarray:
    """The array as the graph's input type, C-contiguous (0-d arrays stay 0-d)."""
    a = np.asarray(v, dtype=dtype)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)
