"""X/Y/Z grids: cell count, labels on the image, every cell equal to the single run it stands for."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.torch import save_file

from sdrt.runtime import InputError, load
from sdrt.runtime.grid import parse_axis, run_grid
from sdrt.runtime.infotext import parse_infotext, read_infotext
from test_lora import make_lora
from test_pipeline_parity import _image

PROMPT = "a red circle on a white background"
BASE = {"prompt": PROMPT, "steps": 3, "sampler": "Euler a", "seed": 42}


@pytest.fixture(scope="module")
def tiny(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid-loras")
    save_file(make_lora(models.source("tiny-sd1"), "kohya", seed=9, scale=0.2), str(folder / "style.safetensors"))
    return load(models.exported("tiny-sd1"), provider="cpu", lora_dir=folder)


def _find(grid: np.ndarray, cell: np.ndarray) -> list[tuple[int, int]]:
    """Every (top, left) where `cell` appears exactly in `grid`."""
    win = sliding_window_view(grid, cell.shape)[:, :, 0]
    hits = np.all(win == cell, axis=(2, 3, 4))
    return [tuple(int(v) for v in p) for p in np.argwhere(hits)]


def _check_cells(pipe, g, base, axes):
    grid = np.asarray(g.image)
    n = int(np.prod([len(a.values) for a in axes]))
    assert len(g.cells) == n
    places = {}
    for r, idx in g.cells:
        kw = dict(base)
        for a, i in zip(axes, idx):
            kw = a.apply(kw, a.values[i])
        single = np.asarray(pipe.img2img(_image(), **kw).images[0])
        assert np.array_equal(np.asarray(r.images[0]), single), idx
        found = _find(grid, single)
        assert len(found) == 1, (idx, found)
        places[idx] = found[0]
    # X grows to the right, Y downwards, Z sub-grids to the right of each other.
    for (x, y, z), (top, left) in places.items():
        if (x + 1, y, z) in places:
            assert places[x + 1, y, z] == (top, left + 32)
        if (x, y + 1, z) in places:
            assert places[x, y + 1, z] == (top + 32, left)
        if (x, y, z + 1) in places:
            assert places[x, y, z + 1][0] == top and places[x, y, z + 1][1] > left
    return grid, places


def test_grid_cells_labels_and_parameters(tiny):
    axes = [parse_axis("strength=0.3,0.6,0.9"), parse_axis("lora:style=0,1")]
    base = {**BASE, "image": _image()}
    g = run_grid(tiny, "img2img", base, axes)
    grid, places = _check_cells(tiny, g, {k: v for k, v in base.items() if k != "image"}, axes)
    # Labels: ink above each column and left of each row, different for each value.
    columns = [grid[: places[x, 0, 0][0], places[x, 0, 0][1]: places[x, 0, 0][1] + 32] for x in range(3)]
    rows = [grid[places[0, y, 0][0]: places[0, y, 0][0] + 32, : places[0, y, 0][1]] for y in range(2)]
    for area in columns + rows:
        assert (area < 128).any()
    assert not np.array_equal(columns[0], columns[1]) and not np.array_equal(rows[0], rows[1])
    # The LoRA axis changed the image (weight 0 is the model's own).
    assert not np.array_equal(np.asarray(g.cells[0][0].images[0]), np.asarray(g.cells[3][0].images[0]))
    _, _, params = parse_infotext(g.infotext)
    assert params["Script"] == "X/Y/Z plot" and params["X Type"] == "Denoising" and params["Y Type"] == "LoRA style"
    assert params["X Values"] == "0.3, 0.6, 0.9" and params["Seed"] == "42"


def test_grid_z_axis_and_prompt_search_replace(tiny):
    axes = [parse_axis('sampler="Euler a","DPM++ 2M Karras"'), parse_axis("prompt S/R=red,blue"),
            parse_axis("cfg=3,9")]
    base = {**BASE, "strength": 0.6}
    g = run_grid(tiny, "img2img", {**base, "image": _image()}, axes)
    _check_cells(tiny, g, base, axes)
    assert {parse_infotext(r.infotexts[0])[0] for r, _ in g.cells} == {PROMPT, PROMPT.replace("red", "blue")}


def test_grid_same_seed_unless_seed_axis(tiny):
    g = run_grid(tiny, "img2img", {**BASE, "seed": None, "image": _image()}, [parse_axis("cfg=3,9")])
    assert len({r.seeds[0] for r, _ in g.cells}) == 1
    g = run_grid(tiny, "img2img", {**BASE, "image": _image()}, [parse_axis("seed=1,2")])
    assert [r.seeds[0] for r, _ in g.cells] == [1, 2]


BAD_AXES = ["strength", "=1,2", "colour=1,2", "strength=", "strength=a,b", "steps=1.5", "cfg=1,,2", "lora:=1",
            "seed=x", "cfg=nan", "strength=0.5,inf", 'sampler="unclosed', "steps=" + ",".join(["1"] * 1001)]


@pytest.mark.parametrize("spec", BAD_AXES)
def test_bad_axis_is_one_clear_line(spec):
    with pytest.raises(InputError) as e:
        parse_axis(spec)
    assert "grid axis" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("axes,expect", [
    (["strength=0.5,2"], "strength"),
    (["sampler=Euler a,Nope"], "Nope"),
    (["lora:missing=0.5,1"], "missing"),
    (["cfg=1,2", "cfg=3,4"], "differ"),
])
def test_bad_cell_refuses_the_whole_grid(tiny, axes, expect):
    ran = []
    with pytest.raises(InputError) as e:
        run_grid(tiny, "img2img", {**BASE, "image": _image(), "progress": lambda i, n: ran.append(i)},
                 [parse_axis(a) for a in axes])
    assert expect in str(e.value) and ran == []


def test_cli_grid_writes_grid_and_cells(tiny, tmp_path):
    from typer.testing import CliRunner

    from sdrt.cli.app import app

    src = tmp_path / "in.png"
    _image().save(src)
    out = tmp_path / "g.png"
    r = CliRunner().invoke(app, ["grid", str(src), "-p", PROMPT, "--x", "seed=1,2", "--y", "prompt S/R=circle,square",
                                 "-m", str(tiny.info.path), "--steps", "2", "-o", str(out), "--provider", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    cells = sorted((tmp_path / "g-cells").glob("*.png"))
    assert len(cells) == 4
    texts = [parse_infotext(read_infotext(c)) for c in cells]
    assert [(t[0], t[2]["Seed"]) for t in texts] == [(PROMPT, "1"), (PROMPT, "2"),
                                                      (PROMPT.replace("circle", "square"), "1"),
                                                      (PROMPT.replace("circle", "square"), "2")]
    assert parse_infotext(read_infotext(out))[2]["Y Type"] == "Prompt S/R"
    r = CliRunner().invoke(app, ["grid", str(src), "-p", PROMPT, "--x", "seed=1,2", "-m", str(tiny.info.path),
                                 "-o", str(out), "--provider", "cpu", "-q"])
    assert r.exit_code != 0 and "already exists" in r.output
