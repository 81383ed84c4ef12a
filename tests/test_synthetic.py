"""The synthetic demo weights (vitlens.synthetic, ``load_model(..., "synthetic")``, ``--weights synthetic``).

Tiny DINOv2-style models (6 blocks, 64 channels) built at the demo's 224 px: grid 16x16, so
the planted cells are exactly ``DEMO_CELLS`` and the planted block is 3.
"""
import json

import numpy as np
import pytest
import torch

from vitlens.analysis.outliers import layer_outliers
from vitlens.capture import capture
from vitlens.errors import WeightsError
from vitlens.images import input_shape
from vitlens.models import load_model, resolve_spec, weights_fingerprint
from vitlens.synthetic import DEMO_CELLS, SYNTHETIC_SIDE, demo_cells, demo_layer, plant_outliers

DEMO_ARGS = dict(depth=6, embed_dim=64, num_heads=4)


def _cells(mask: np.ndarray) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in np.argwhere(mask)}


def _outliers(loaded, height: int = SYNTHETIC_SIDE, width: int = SYNTHETIC_SIDE, seed: int = 0):
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))
    return layer_outliers(capture(loaded, pixels)[0], None)


def test_demo_plants_its_cells_from_the_middle_block_of_the_model_without_registers():
    loaded = load_model("vit_small_patch14_dinov2", "synthetic", model_args=DEMO_ARGS)
    assert loaded.weights == "synthetic" and loaded.native_size == (SYNTHETIC_SIDE, SYNTHETIC_SIDE)
    layer = demo_layer(6)
    assert layer == 3 and demo_cells((16, 16)) == DEMO_CELLS
    found = _outliers(loaded)
    assert found.counts.tolist() == [0] * layer + [len(DEMO_CELLS)] * (6 - layer)
    for block in range(layer, 6):
        assert _cells(found.masks[block]) == set(DEMO_CELLS)
    assert found.norm_max[layer] > 4 * found.norm_max[layer - 1]  # the jump is at the planted block


def test_the_twin_with_registers_stays_clean():
    found = _outliers(load_model("vit_small_patch14_reg4_dinov2", "synthetic", model_args=DEMO_ARGS))
    assert not found.masks.any()


DEMO_MODELS = {  # tiny versions of a patch-14 and two patch-16 preset architectures
    "vit_small_patch14_dinov2": (112, 224, 518),
    "deit3_base_patch16_224": (112, 224, 512),  # no_embed_class, LayerScale
    "vit_base_patch16_clip_224": (112, 224, 512),  # pre-norm before the blocks, QuickGELU
}
ASPECTS = {"portrait": (200, 300), "landscape": (300, 200), "square": (300, 300)}  # (width, height) of the picture


@pytest.fixture(scope="module", params=list(DEMO_MODELS))
def demo_model(request):
    return load_model(request.param, "synthetic", model_args=DEMO_ARGS)


@pytest.mark.parametrize("aspect", list(ASPECTS))
@pytest.mark.parametrize("size", [0, 1, 2], ids=["small", "native", "large"])
def test_the_planted_cells_are_the_same_at_every_side_and_aspect(demo_model, aspect, size):
    """The demo's promise: whatever the picture, side and aspect, the high-norm tokens are
    ``demo_cells(grid)`` (four distinct cells on any grid of at least 2 x 2) from the middle block on."""
    side = DEMO_MODELS[demo_model.spec.arch][size]
    height, width = input_shape(ASPECTS[aspect], side, demo_model.patch_size)
    trace = capture(demo_model, torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(size)))[0]
    grid = trace.layout.grid
    cells = demo_cells(grid)
    assert len(set(cells)) == len(DEMO_CELLS)
    planted = np.zeros(grid, dtype=bool)
    planted[tuple(np.array(cells).T)] = True
    norms = trace.patch_norms()  # [layer, row, col]
    layer = demo_layer(6)
    for block in range(layer, 6):
        median = np.median(norms[block][~planted])
        assert norms[block][planted].min() > 5 * median, (block, grid)
        assert norms[block][~planted].max() < 2 * median, (block, grid)
    assert norms[layer - 1].max() < 2 * np.median(norms[layer - 1])  # nothing before the planted block
    found = layer_outliers(trace, None)
    assert _cells(found.masks[-1]) == set(cells), grid


@pytest.mark.parametrize("grid, distinct", [((2, 2), 4), ((2, 9), 4), ((9, 2), 4), ((1, 1), 1), ((37, 25), 4)])
def test_demo_cells_on_small_and_odd_grids(grid, distinct):
    cells = demo_cells(grid)
    assert len(cells) == distinct == len(set(cells))
    assert all(0 <= row < grid[0] and 0 <= col < grid[1] for row, col in cells)


def test_weights_are_deterministic_and_fingerprinted_apart_from_random():
    first = load_model("vit_small_patch14_dinov2", "synthetic", model_args=DEMO_ARGS)
    second = load_model("vit_small_patch14_dinov2", "synthetic", model_args=DEMO_ARGS)
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    spec = resolve_spec("vit_small_patch14_dinov2")
    assert weights_fingerprint(spec, "synthetic", DEMO_ARGS) == first.fingerprint
    assert first.fingerprint.startswith("synthetic:") and first.fingerprint != weights_fingerprint(spec, "random", DEMO_ARGS)


def test_a_model_that_cannot_be_planted_says_why():
    with pytest.raises(WeightsError, match="absolute position embeddings"):
        load_model("vit_small_patch14_dinov2", "synthetic", model_args=dict(DEMO_ARGS, pos_embed="none"))
    loaded = load_model("vit_small_patch14_dinov2", "random", model_args=DEMO_ARGS)
    with pytest.raises(WeightsError, match="has 6 blocks"):
        plant_outliers(loaded, [(0, 0)], 6)


def test_cli_inspect_with_synthetic_weights(tmp_path, capsys):
    from PIL import Image

    from vitlens.cli import main

    image = tmp_path / "flat.png"
    Image.new("RGB", (300, 300), (120, 130, 140)).save(image)
    assert main(["inspect", str(image), "--model", "dinov2_vits14", "--weights", "synthetic", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["weights"] == "synthetic" and summary["grid"] == [16, 16]
    counts = [layer["num_outliers"] for layer in summary["layers"]]
    assert counts == [0] * 6 + [4] * 6
    assert {tuple(cell) for cell in summary["layers"][6]["outliers"]} == set(DEMO_CELLS)
