"""Convert an A1111 textual-inversion embedding from .pt to .safetensors, which the runtime reads.

    python -m sdrt.export.embedding IN.pt OUT.safetensors

A .pt file is a pickle: it is read with PyTorch's weights-only loader (no code runs; a file that
needs more is refused). Accepted: A1111's layout ({"string_to_param": {"*": [n, width]}, ...})
and diffusers' ({"<token>": [width] or [n, width]}). The output holds one tensor, "emb_params",
[n, width] float32, as A1111 writes .safetensors embeddings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class EmbeddingError(ValueError):
    pass


def load_pt(path: Path):
    """The [n, width] vectors of a .pt embedding, through torch.load(weights_only=True)."""
    import pickle

    import torch

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise EmbeddingError(f"{path.name} cannot be read with PyTorch's weights-only loader "
                             f"({str(e).splitlines()[0]}); sdrt does not unpickle it otherwise") from None
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        params = list(data["string_to_param"].values())
        if len(params) != 1:
            raise EmbeddingError(f"{path.name} holds {len(params)} embeddings in string_to_param; one is accepted")
        vec = params[0]
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        vec = next(iter(data.values()))
    else:
        raise EmbeddingError(f"{path.name} is not an A1111 or diffusers embedding (no string_to_param, not one tensor)")
    vec = vec.detach().float()
    return vec[None] if vec.ndim == 1 else vec


def convert(src: Path, dst: Path) -> Path:
    from safetensors.torch import save_file

    vec = load_pt(src)
    if vec.ndim != 2:
        raise EmbeddingError(f"{src.name}: the embedding has shape {list(vec.shape)}, not [vectors, width]")
    tmp = dst.with_name(dst.name + ".partial")
    save_file({"emb_params": vec.contiguous()}, str(tmp))
    tmp.replace(dst)
    return dst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    a = ap.parse_args(argv)
    try:
        convert(a.src, a.dst)
    except (EmbeddingError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(a.dst)


if __name__ == "__main__":
    main()
