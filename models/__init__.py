"""sdrt.models: small models and data that ship with sdrt (the embedded default model)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "shapes"


def default_model_path() -> Path:
    """The model folder `sdrt` uses when no --model is given."""
    path = HERE / DEFAULT_MODEL
    if not (path / "sdrt.json").is_file():
        raise FileNotFoundError(
            f"the embedded default model is not installed ({path}); pass a model folder, "
            "or export one with `sdrt export SRC OUT`"
        )
    return path


def examples_path() -> Path:
    """Example inputs that ship with the default model."""
    return HERE / "examples"
