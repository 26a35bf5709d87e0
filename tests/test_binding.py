"""IO binding and the CUDA-graph bookkeeping, exercised on the CPU provider (the same code runs
on CUDA): bound runs equal plain runs bit for bit, buffers are allocated once per input shape
and reused at every step, and the graph cache keeps one id per shape with LRU eviction."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime import load
from sdrt.runtime.binding import NO_GRAPH, BoundSession, _GraphCaptureFailed
from sdrt.runtime import bench

PROMPT, NEGATIVE = "a red circle on a white background", "blurry"


def _pipes(folder):
    return load(folder, provider="cpu"), load(folder, provider="cpu", io_binding=True)


def _calls(img, mask):
    """Requests of every kind, sizes and batches changing between them (rebinding)."""
    return [
        ("img2img", dict(image=img, prompt=PROMPT, negative_prompt=NEGATIVE, strength=0.7, steps=4, seed=3,
                         sampler="DPM++ 2M Karras")),
        ("txt2img", dict(prompt=PROMPT, steps=3, seed=5, width=96, height=64, batch_size=2, sampler="Euler a")),
        ("inpaint", dict(image=img, mask=mask, prompt=PROMPT, strength=0.8, steps=3, seed=7, mask_blur=2)),
        ("img2img", dict(image=img, prompt=PROMPT, strength=0.5, steps=4, seed=3, batch_size=3, guidance=1.0,
                         sampler="EulerDiscreteScheduler")),
        ("img2img", dict(image=img, prompt=PROMPT, negative_prompt=NEGATIVE, strength=0.7, steps=4, seed=3,
                         sampler="DPM++ 2M Karras")),
    ]


@pytest.mark.parametrize("kind", ["tiny-sd1", "tiny-inpaint"])
def test_bound_loop_equals_plain_loop(models, kind):
    plain, bound = _pipes(models.exported(kind))
    img, mask = bench.test_image(64), bench.test_mask(64)
    for mode, kw in _calls(img, mask):
        if kind == "tiny-inpaint" and mode == "img2img":  # a 9-channel model inpaints
            mode, kw = "inpaint", {**kw, "mask": mask}
        want = getattr(plain, mode)(output="np", **kw).arrays
        got = getattr(bound, mode)(output="np", **kw).arrays
        assert np.array_equal(got, want), (mode, kw.get("batch_size"))
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert bound.graphs[name].bound is not None and plain.graphs[name].bound is None


def test_buffers_are_allocated_once_per_shape(models):
    """No per-step allocation: the UNet's buffers depend on the input shape, not the step count;
    the output buffer stays at one address; the embeddings cross once per call."""
    pipe = load(models.exported("tiny-sd1"), provider="cpu", io_binding=True)
    img = bench.test_image(64)
    unet = pipe.graphs["unet"].bound
    pipe.img2img(img, PROMPT, strength=1.0, steps=2, seed=1, sampler="Euler")
    after_first = unet.allocations
    (slot,) = unet._slots.values()
    out_ptr = slot.outputs["out_sample"].data_ptr()
    in_ptr = slot.inputs["sample"].data_ptr()
    copies = dict(unet.copied)
    pipe.img2img(img, PROMPT, strength=1.0, steps=9, seed=2, sampler="Euler")
    assert unet.allocations == after_first == 4  # sample, timestep, embeddings in; out_sample out
    assert slot.outputs["out_sample"].data_ptr() == out_ptr and slot.inputs["sample"].data_ptr() == in_ptr
    assert unet.copied["sample"] - copies["sample"] == 9 and unet.copied["timestep"] - copies["timestep"] == 9
    assert unet.copied["encoder_hidden_states"] - copies["encoder_hidden_states"] == 1


def _unet_feeds(n, h, w, seed=0):
    r = np.random.default_rng(seed)
    return {"sample": r.standard_normal((n, 4, h, w), dtype=np.float32), "timestep": np.array(500.5, np.float32),
            "encoder_hidden_states": r.standard_normal((n, 77, 32), dtype=np.float32)}


def test_graph_ids_per_shape_with_lru_eviction(models):
    """One graph id per (batch, height, width), given after a plain warm-up run of that shape;
    at most max_graphs shapes hold one (least recently used evicted, its id never reused);
    reset asked for once as many ids are retired; results always equal a plain session run."""
    g = load(models.exported("tiny-sd1"), provider="cpu").graphs["unet"].load()
    b = BoundSession(g.session, "cpu", max_graphs=2)
    seen = []

    def run(shape):
        f = _unet_feeds(*shape)
        out = b.run(f, ["out_sample"])[0]
        assert np.array_equal(out, g.session.run(["out_sample"], f)[0])
        seen.append({k[1][1]: v for k, v in b.graph_ids().items()})  # sample shape -> id

    A, B, C = (2, 8, 8), (2, 8, 16), (4, 8, 8)
    SA, SB, SC = (2, 4, 8, 8), (2, 4, 8, 16), (4, 4, 8, 8)
    run(A)
    assert seen[-1] == {}  # warm-up: no graph yet
    run(A)
    ptr = next(iter(b._slots.values())).inputs["sample"].data_ptr()
    run(A)
    assert seen[-1] == {SA: 0} and next(iter(b._slots.values())).inputs["sample"].data_ptr() == ptr
    run(B), run(B)
    assert seen[-1] == {SA: 0, SB: 1}
    run(A)  # A becomes the most recently used
    run(C), run(C)
    assert seen[-1] == {SA: 0, SC: 2} and b.retired_graphs == 1 and not b.needs_reset  # B evicted
    run(B), run(B)  # B again: a new id, never 1 again
    assert seen[-1] == {SC: 2, SB: 3} and b.retired_graphs == 2 and b.needs_reset
    assert b.next_graph_id == 4


class _FailingGraphs:
    """A CPU session whose runs with a CUDA graph id fail, as a failed capture does."""

    def __init__(self, session):
        self._s = session

    def __getattr__(self, name):
        return getattr(self._s, name)

    def run_with_iobinding(self, binding, ro=None):
        try:
            graph_id = int(ro.get_run_config_entry("gpu_graph_id"))
        except (AttributeError, RuntimeError):  # no run options, or no graph id in them
            graph_id = NO_GRAPH
        if graph_id != NO_GRAPH:
            raise RuntimeError("CUDA failure 901: operation not permitted when stream is capturing\nmore")
        return self._s.run_with_iobinding(binding, ro)


def test_failed_capture_falls_back_to_plain_runs(models):
    g = load(models.exported("tiny-sd1"), provider="cpu").graphs["unet"].load()
    logs = []
    b = BoundSession(_FailingGraphs(g.session), "cpu", max_graphs=2, log=logs.append)
    f = _unet_feeds(2, 8, 8)
    want = g.session.run(["out_sample"], f)[0]
    assert np.array_equal(b.run(f, ["out_sample"])[0], want)  # warm-up, plain
    with pytest.raises(_GraphCaptureFailed):
        b.run(f, ["out_sample"])
    assert b.graphs_disabled and b.graph_ids() == {}
    assert logs == ["CUDA graphs off, plain runs from now on: CUDA failure 901: operation not permitted when stream is capturing"]
    for _ in range(2):
        assert np.array_equal(b.run(f, ["out_sample"])[0], want)
    assert len(logs) == 1


def test_graph_retries_a_failed_capture_without_graphs(models, monkeypatch):
    """The Graph owning the session creates it anew without CUDA graphs and reruns the call."""
    import sdrt.runtime.sessions as sessions

    class Failing(BoundSession):
        def __init__(self, session, *a, **kw):
            super().__init__(_FailingGraphs(session), *a, **kw)

    monkeypatch.setattr(sessions, "BoundSession", Failing)
    pipe = load(models.exported("tiny-sd1"), provider="cpu", io_binding=True)
    g = pipe.graphs["unet"]
    g.cuda_graphs = 2  # what the CUDA provider would have; the CPU provider ignores graph ids
    g._recreate(2)
    f = _unet_feeds(2, 8, 8)
    want = g.session.run(["out_sample"], f)[0]
    for _ in range(3):
        assert np.array_equal(g.run(f, ["out_sample"])[0], want)
    assert g.cuda_graphs == 0 and g.bound.max_graphs == 0


def test_cuda_graphs_need_io_binding(models):
    from sdrt.runtime import InputError

    with pytest.raises(InputError, match="cuda_graphs needs io_binding"):
        load(models.exported("tiny-sd1"), provider="cpu", io_binding=False, cuda_graphs=2)
    for bad in (-1, 65, 1.5, "4"):
        with pytest.raises(InputError, match="cuda_graphs must be"):
            load(models.exported("tiny-sd1"), provider="cpu", io_binding=True, cuda_graphs=bad)



def test_kept_input_crosses_once_even_when_converted(models):
    """A kept input that needs a type conversion (as fp32 embeddings going into an fp16 graph
    do) is recognised by the caller's own array: copied once, not at every step."""
    g = load(models.exported("tiny-sd1"), provider="cpu").graphs["unet"].load()
    b = BoundSession(g.session, "cpu")
    f = _unet_feeds(2, 8, 8)
    emb64 = f["encoder_hidden_states"].astype(np.float64)  # the graph takes float32: converted on the way
    for step in range(4):
        f["sample"] = f["sample"] * 0.9
        got = b.run(dict(f, encoder_hidden_states=emb64), ["out_sample"], keep=("encoder_hidden_states",))[0]
        assert np.array_equal(got, g.session.run(["out_sample"], f)[0])
    assert b.copied["encoder_hidden_states"] == 1 and b.copied["sample"] == 4


def test_provider_options_reach_every_session(models):
    from sdrt.runtime.sessions import provider_list

    (name, opts), cpu = provider_list("cuda", cuda_graph=True, options={"cudnn_conv_use_max_workspace": "0",
                                                                         "arena_extend_strategy": "kNextPowerOfTwo"})
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert opts["cudnn_conv_use_max_workspace"] == "0" and opts["arena_extend_strategy"] == "kNextPowerOfTwo"
    assert opts["enable_cuda_graph"] is True and opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    pipe = load(models.exported("tiny-sd1"), provider="cpu", provider_options={"x": "1"})
    assert {g.provider_options["x"] for g in pipe.graphs.values()} == {"1"}
