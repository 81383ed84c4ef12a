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


def test_a_landscape_picture_keeps_every_planted_cell():
    """224 x 154 px (grid 11 x 16, as a 3:2 photograph): the resampled cells still fire, one each."""
    found = _outliers(load_model("vit_small_patch14_dinov2", "synthetic", model_args=DEMO_ARGS), height=154)
    assert found.counts[-1] == len(DEMO_CELLS)
    assert {col for _, col in _cells(found.masks[-1])} == {col for _, col in DEMO_CELLS}


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
