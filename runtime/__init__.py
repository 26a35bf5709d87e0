"""sdrt.runtime: load a model folder and run img2img, inpainting and txt2img. No PyTorch.

    from sdrt.runtime import load
    pipe = load("path/to/model", provider="auto")     # or load() for the embedded default model
    r = pipe.img2img("in.png", "a red circle on a white background", strength=0.7, seed=1)
    r.images[0].save("out.png"); print(r.infotext)
"""

from __future__ import annotations

__all__ = ["load", "Pipeline", "Result", "InputError", "ModelFolderError", "ProviderError"]


def __getattr__(name):  # keep `import sdrt.runtime` light: the pipeline loads on first use
    if name in ("load", "Pipeline", "Result"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "InputError":
        from .errors import InputError

        return InputError
    if name == "ModelFolderError":
        from .modelfolder import ModelFolderError

        return ModelFolderError
    if name == "ProviderError":
        from .sessions import ProviderError

        return ProviderError
    raise AttributeError(name)
