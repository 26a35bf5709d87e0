"""ONNX Runtime transformer-optimizer fusions and fp16 conversion for the exported graphs.

Order matters (ONNX Runtime's own Stable Diffusion stack does the same): the fusions run on the
fp32 graph first, then the fused graph is converted to fp16, because the fusion patterns only
match fp32 graphs. GroupNorm gamma/beta stay fp32 (ONNX Runtime's float16 converter keeps them).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx

from .onnxfile import (
    EXTERNAL_DATA_FROM,
    INLINE_BELOW,
    ScratchWeights,
    is_external,
    load_graph,
    tensor_bytes,
    tensor_nbytes,
    write_graph,
)

# Graph name -> the model type of onnxruntime.transformers.optimizer.
MODEL_TYPES = {"text_encoder": "clip", "text_encoder_2": "clip", "unet": "unet", "vae_encoder": "vae", "vae_decoder": "vae"}

# Fused ops the CPU provider has no kernel for: they are turned off for the cpu target.
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)

# The sinusoidal timestep embedding stays fp32 (diffusers computes it in fp32 even in fp16
# pipelines); fractional timesteps would lose their fraction in fp16 otherwise. So does SDXL's
# embedding of its size/crop micro-conditioning (time_ids: sines of values up to the image size).
TIME_PROJ_PREFIX = "/unet/time_proj/"
# fp32 inputs of an fp16 UNet -> the prefix of the sinusoidal projection each feeds.
FP32_INPUTS = {"timestep": TIME_PROJ_PREFIX, "time_ids": "/unet/add_time_proj/"}


def timestep_nodes(graph) -> list[str]:
    """Names of the nodes from each FP32_INPUTS input up to the end of its sinusoidal projection."""
    names: set[str] = set()
    for name, prefix in FP32_INPUTS.items():
        names.update(_projection_nodes(graph, name, prefix))
    return sorted(names)


def _projection_nodes(graph, input_name: str, prefix: str) -> list[str]:
    """Names of the nodes from the input `input_name` up to the end of the projection at `prefix`."""
    proj = [n for n in graph.node if n.name.startswith(prefix)]
    if not proj or not any(i.name == input_name for i in graph.input):
        return []
    producer = {o: n for n in graph.node for o in n.output}
    ancestors, stack = set(), [i for n in proj for i in n.input]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.name not in ancestors:
            ancestors.add(node.name)
            stack.extend(node.input)
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    descendants, stack = set(), [input_name]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.name not in descendants:
                descendants.add(node.name)
                stack.extend(node.output)
    return sorted((ancestors & descendants) | {n.name for n in proj})


@contextlib.contextmanager
def quiet_logs():
    loggers = [logging.getLogger(n) for n in ("onnxruntime", "onnxruntime.transformers", "fusion_base", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _keep_vae_attention_biases() -> None:
    """ONNX Runtime's VAE attention fusion replaces the q/k/v biases with zeros ("No bias, use
    zeros" in fusion_attention_vae.py), which changes the output of every VAE whose attention has
    biases (SD's does). Put the real biases into the fused node's bias initializer."""
    import numpy as np
    from onnx import numpy_helper
    from onnxruntime.transformers import optimizer  # noqa: F401  (puts its folder on sys.path)

    # The optimizer imports its modules by their bare names; patch the class it uses.
    import fusion_attention_vae as fav

    original = fav.FusionAttentionVae.create_attention_node
    if getattr(original, "keeps_biases", False):
        return

    def create_attention_node(self, q_matmul, q_add, k_matmul, k_add, v_matmul, v_add, *args, **kwargs):
        node = original(self, q_matmul, q_add, k_matmul, k_add, v_matmul, v_add, *args, **kwargs)
        if node is not None:
            biases = []
            for add in (q_add, k_add, v_add):
                t = self.model.get_initializer(add.input[1]) or self.model.get_initializer(add.input[0])
                biases.append(numpy_helper.to_array(t).astype(np.float32).reshape(-1))
            bias = self.model.get_initializer(node.input[2])
            bias.CopyFrom(numpy_helper.from_array(np.concatenate(biases), bias.name))
        return node

    create_attention_node.keeps_biases = True
    fav.FusionAttentionVae.create_attention_node = create_attention_node


def fusion_options(graph: str, target: str, precision: str):
    from onnxruntime.transformers.fusion_options import FusionOptions

    model_type = MODEL_TYPES[graph]
    opts = FusionOptions(model_type)
    if target == "cpu":
        for name in CUDA_ONLY_FUSIONS:
            if hasattr(opts, name):
                setattr(opts, name, False)
    elif model_type == "unet" and precision != "fp16":
        # Packed QKV/KV kernels exist only for fp16 (ONNX Runtime's pipeline does the same).
        opts.enable_packed_qkv = False
        opts.enable_packed_kv = False
    if model_type == "clip":
        opts.enable_embed_layer_norm = False
    return opts


@contextlib.contextmanager
def weights_on_disk(base: Path, scratch: ScratchWeights):
    """Let ONNX Runtime's optimizer and float16 converter work on a graph whose large tensors are
    external-data references into the folder `base` (see onnxfile.load_graph), without loading them all.

    Most passes need only names, shapes and types. Those that read values (attention fusions pack
    the q/k/v weights, NhwcConv transposes convolution weights, constant lookups) go through
    onnx.numpy_helper.to_array, which here reads a referenced tensor from its file. Tensors the
    passes create are appended to `scratch` once they are large, and the float16 converter
    converts a referenced tensor by reading it, converting it exactly as it converts an inline
    one, and appending the result to `scratch`.
    """
    from onnx import numpy_helper
    from onnxruntime.transformers import optimizer  # noqa: F401  (puts its folder on sys.path)

    import float16
    import onnx_model

    folder = str(base)
    to_array = numpy_helper.to_array
    add_initializer = onnx_model.OnnxModel.add_initializer
    convert_tensor = float16.convert_tensor_float_to_float16

    def read(tensor, base_dir: str = ""):
        return to_array(tensor, base_dir or folder)

    def add(self, tensor, graph_name=None):
        if not is_external(tensor) and tensor_nbytes(tensor) >= INLINE_BELOW:
            scratch.put(tensor)
        return add_initializer(self, tensor, graph_name)

    def convert(tensor, min_positive_val=5.96e-08, max_finite_val=65504.0):
        from onnx import TensorProto

        if not (is_external(tensor) and tensor.data_type == TensorProto.FLOAT):
            return convert_tensor(tensor, min_positive_val, max_finite_val)
        half = float16.convert_np_to_float16(read(tensor).reshape(-1), min_positive_val, max_finite_val)
        tensor.data_type = TensorProto.FLOAT16
        scratch.put(tensor, half.tobytes())
        return tensor

    numpy_helper.to_array = read
    onnx_model.OnnxModel.add_initializer = add
    float16.convert_tensor_float_to_float16 = convert
    try:
        yield
    finally:
        numpy_helper.to_array = to_array
        onnx_model.OnnxModel.add_initializer = add_initializer
        float16.convert_tensor_float_to_float16 = convert_tensor
        scratch.close()


def optimize_graph(src: Path, dst: Path, graph: str, target: str, precision: str, fp32_ops: tuple[str, ...] = (),
                   external_copy: Path | None = None) -> dict:
    """Fuse the fp32 graph at `src` for `target`, convert to fp16 if asked, save to `dst`.

    The weights stay in `src`'s external data while the graph is transformed (weights_on_disk);
    the result is written tensor by tensor. Returns the fused-operator counts
    (e.g. {"MultiHeadAttention": 4, "GroupNorm": 30}).

    external_copy: a path in `src`'s folder where the same graph is also written with external
    data, when `dst` holds its tensors inline: ONNX Runtime reads an inline file whole and copies
    the weights out of it (about twice their size in memory), an external one at their size, so
    checks run on the copy.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    _keep_vae_attention_biases()
    base = src.parent
    scratch = ScratchWeights(base, f"{dst.parent.name}.scratch")
    try:
        with quiet_logs(), weights_on_disk(base, scratch):
            m = optimize_model(
                load_graph(src),
                model_type=MODEL_TYPES[graph],
                num_heads=0,
                hidden_size=0,
                opt_level=0,
                optimization_options=fusion_options(graph, target, precision),
                use_gpu=target == "cuda",
            )
            if precision == "fp16":
                keep = [i.name for i in m.model.graph.input if i.name in FP32_INPUTS]
                m.convert_float_to_float16(
                    keep_io_types=keep,
                    op_block_list=list(fp32_ops),
                    node_block_list=timestep_nodes(m.model.graph),
                )
            counts = {k: v for k, v in m.get_fused_operator_statistics().items() if v}
            if target == "cpu":
                moved = attention_to_mha(m.model)
                if moved:
                    counts["Attention"] -= moved
                    counts["MultiHeadAttention"] = counts.get("MultiHeadAttention", 0) + moved
                    counts = {k: v for k, v in counts.items() if v}
            m.prune_graph()
            m.topological_sort()
            domains = {n.domain for n in m.model.graph.node if n.domain}
            present = {o.domain for o in m.model.opset_import}
            for d in sorted(domains - present):
                m.model.opset_import.append(onnx.helper.make_opsetid(d, 1))
            if external_copy is not None:
                if external_copy.parent != base:
                    raise ValueError("the external copy must sit in the source graph's folder")
                if tensor_bytes(m.model) < EXTERNAL_DATA_FROM:
                    write_graph(m.model, base, external_copy, external=True)
            write_graph(m.model, base, dst)
    finally:
        scratch.remove()
    return counts


def attention_to_mha(model) -> int:
    """Rewrite each fused self-attention `Attention` node as MatMul (+ bias) + Split + MultiHeadAttention.

    For the CPU provider: its `Attention` kernel materialises the whole (batch, heads, S, S)
    probability matrix (1 GiB per UNet call at 512x512, where S = 4096), while its
    `MultiHeadAttention` kernel has a flash-attention path that does not (one 4096-token SD 1.5
    layer: 0.30 s instead of 0.38 s on two cores). The Attention node's packed weight is
    [hidden, 3 * hidden] with Q, K and V side by side, so the split is exact. Returns the count.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    nodes, moved = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        if (
            node.op_type != "Attention"
            or node.domain != "com.microsoft"
            or any(node.input[3:])  # mask, past or attention bias
            or len(node.output) != 1
            or weight is None
            or len(weight.dims) != 2
            or weight.dims[1] % 3
            or attrs.get("unidirectional", 0)
            or "qkv_hidden_sizes" in attrs
        ):
            nodes.append(node)
            continue
        base = node.name or node.output[0]
        hidden = weight.dims[1] // 3
        qkv = f"{base}/qkv"
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]], [qkv], name=f"{base}/MatMul_qkv"))
        bias = node.input[2] if len(node.input) > 2 else ""
        if bias and (bias not in inits or numpy_helper.to_array(inits[bias]).any()):
            nodes.append(helper.make_node("Add", [qkv, bias], [qkv + "_biased"], name=f"{base}/Add_qkv_bias"))
            qkv += "_biased"
        q, k, v = (f"{base}/{x}" for x in "qkv")
        if opset >= 13:
            sizes = f"{base}/split_sizes"
            graph.initializer.append(numpy_helper.from_array(np.array([hidden] * 3, np.int64), sizes))
            nodes.append(helper.make_node("Split", [qkv, sizes], [q, k, v], name=f"{base}/Split_qkv", axis=-1))
        else:
            nodes.append(helper.make_node("Split", [qkv], [q, k, v], name=f"{base}/Split_qkv", axis=-1, split=[hidden] * 3))
        mha = {"num_heads": attrs["num_heads"], **({"scale": attrs["scale"]} if "scale" in attrs else {})}
        nodes.append(helper.make_node("MultiHeadAttention", [q, k, v], list(node.output), name=f"{base}/MultiHeadAttention",
                                      domain="com.microsoft", **mha))
        moved += 1
    if moved:
        del graph.node[:]
        graph.node.extend(nodes)
    return moved
