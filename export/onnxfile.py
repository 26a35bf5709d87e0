"""Writing ONNX files: tensors in one external file when a graph would pass protobuf's 2 GB."""

from __future__ import annotations

from pathlib import Path

TWO_GB = 2**31
# Tensor bytes from which a graph is written with external data (protobuf's limit, with headroom).
EXTERNAL_DATA_FROM = TWO_GB - (64 << 20)


def _tensor_bytes(model) -> int:
    """Bytes of the graph's initializers (ByteSize() itself fails on protos past 2 GB)."""
    from onnx import external_data_helper

    return sum(
        len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
        for t in external_data_helper._get_all_tensors(model)
    )


def save_onnx(model, path: Path) -> None:
    """Save an onnx ModelProto, with its tensors in `model.onnx_data` when it would pass 2 GB."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + "_data")
    if data.exists():
        data.unlink()
    if _tensor_bytes(model) >= EXTERNAL_DATA_FROM:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=1024
        )
    else:
        onnx.save_model(model, str(path))
