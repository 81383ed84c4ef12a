"""Test-time registers, replacement ablations, massive activations and attention sinks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PLANTED_ARGS, PLANTED_CELLS, PLANTED_LAYER, TINY_ARGS, plant_outliers, random_pixels
from vitlens.analysis.outliers import layer_outliers
from vitlens.capture import capture
from vitlens.errors import OptionError
from vitlens.experiments import ablate, attention_sinks, massive_activations, register_cost, replacement_states
from vitlens.interventions import TestTimeRegister, _patch_replacement, apply_test_time_register
from vitlens.models import load_model
from vitlens.store import CaptureOptions, trace_key

PLANTED_NEURONS = ((PLANTED_LAYER, 0), (PLANTED_LAYER, 1))
COST_BOUND = 1e-4  # measured: 1 - cosine of the other patches is below 1e-14 on these models, of CLS below 2e-5


@pytest.mark.parametrize("init", ["zeros", "patch-mean"])
@pytest.mark.parametrize("patch_values", ["zero", "low-mean"])
def test_register_takes_the_outliers_over(planted, init, patch_values):
    loaded = planted.loaded
    pixels = random_pixels(loaded, batch=2)
    plain = capture(loaded, pixels)
    treated = capture(loaded, pixels, test_time_register=TestTimeRegister(PLANTED_NEURONS, init, patch_values))
    for before, after in zip(plain, treated):
        assert layer_outliers(before).counts[PLANTED_LAYER:].min() == len(PLANTED_CELLS)
        assert layer_outliers(after).counts.sum() == 0 and layer_outliers(after, threshold=20.0).counts.sum() == 0
        layout = after.layout
        assert layout.num_registers == before.layout.num_registers + 1 and layout.prefix_names()[-1] == "ttr0"
        register = after.norms[:, layout.num_prefix - 1]  # [layer]: the last prefix token is the new register
        assert (register[PLANTED_LAYER:] > 50).all() and (register[:PLANTED_LAYER] < 10).all()
        np.testing.assert_allclose(after.norms[:PLANTED_LAYER, :layout.num_prefix - 1],  # cls, trained registers
                                   before.norms[:PLANTED_LAYER, :before.layout.num_prefix], rtol=1e-2, atol=1e-4)
        assert after.attention.shape[2] == layout.num_prefix


def test_register_cost_is_small_away_from_the_planted_cells(planted):
    loaded = planted.loaded
    cost = register_cost(loaded, random_pixels(loaded), TestTimeRegister(PLANTED_NEURONS))
    assert set(map(tuple, np.argwhere(cost.excluded))) == set(PLANTED_CELLS)
    assert cost.patch_cosine.shape == (7,)  # 6 blocks and the final norm
    assert (1 - cost.patch_cosine_min).max() < COST_BOUND and (1 - cost.cls_cosine).max() < COST_BOUND


def test_hooks_are_removed_even_on_error(planted):
    loaded = planted.loaded
    pixels = random_pixels(loaded)
    with torch.inference_mode():
        before = loaded.model.forward_features(pixels)
    with pytest.raises(RuntimeError), apply_test_time_register(loaded.model, TestTimeRegister(PLANTED_NEURONS)):
        raise RuntimeError("boom")
    with torch.inference_mode():
        assert torch.equal(loaded.model.forward_features(pixels), before)


def test_low_mean_is_the_mean_of_the_lower_three_quarters():
    acts = torch.tensor([[[4.0], [1.0], [3.0], [2.0], [100.0], [0.0], [5.0], [6.0]]])  # [batch, patch, neuron]
    assert _patch_replacement(acts, "low-mean").item() == pytest.approx((0 + 1 + 2 + 3 + 4 + 5) / 6)
    assert _patch_replacement(acts, "zero").item() == 0


def test_bad_register_options_and_neurons(tiny_vit):
    with pytest.raises(OptionError):
        TestTimeRegister(((0, 1),), init="ones")
    with pytest.raises(OptionError):
        TestTimeRegister(())
    with pytest.raises(OptionError, match="out of range"):
        capture(tiny_vit, random_pixels(tiny_vit), test_time_register=TestTimeRegister(((0, 256),)))


def test_register_is_part_of_the_cache_key():
    register = TestTimeRegister(((1, 3),))
    plain, treated = CaptureOptions(), CaptureOptions(test_time_register=register)
    assert trace_key("m", "d", plain, "cpu") != trace_key("m", "d", treated, "cpu")
    assert trace_key("m", "d", treated, "cpu") != trace_key("m", "d", CaptureOptions(test_time_register=TestTimeRegister(((1, 4),))), "cpu")


# Replacement ablations against a float64 hand computation.

def _double_model(name: str, planted: bool = False):
    args = dict(PLANTED_ARGS if planted else TINY_ARGS, init_values=None)  # no LayerScale: blocks change the tokens
    loaded = load_model(name, "random", model_args=args)
    if planted:
        plant_outliers(loaded, PLANTED_CELLS, PLANTED_LAYER)
    with torch.no_grad():  # a random init barely mixes tokens: sharper attention and registers worth attending to
        generator = torch.Generator().manual_seed(0)
        for block in loaded.model.blocks:
            block.attn.qkv.weight *= 10
            block.attn.proj.weight *= 10
        if loaded.model.reg_token is not None:
            loaded.model.reg_token.copy_(torch.randn(loaded.model.reg_token.shape, generator=generator))
    loaded.model.double()
    return loaded


def _by_hand(model, pixels: torch.Tensor, layer: int, replace) -> tuple[torch.Tensor, torch.Tensor]:
    """Final features without and with ``replace`` applied to block ``layer``'s output."""
    with torch.inference_mode():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
        outputs = []
        for edit in (False, True):
            y = x
            for index, block in enumerate(model.blocks):
                y = block(y)
                if edit and index == layer:
                    y = replace(y)
            outputs.append(model.norm(y))
    return outputs[0], outputs[1]


def _cos(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()


def _registers(mode: str):
    def replace(y: torch.Tensor) -> torch.Tensor:
        y = y.clone()
        if mode == "zero":
            y[:, 1:5] = 0
        elif mode == "mean":
            y[:, 1:5] = y[:, 1:5].mean(dim=0, keepdim=True)
        else:
            y[:, 1:5] = torch.roll(y[:, 1:5], shifts=-1, dims=0)  # image i gets image i + 1's registers
        return y
    return replace


@pytest.mark.parametrize("mode", ["zero", "mean", "shuffle"])
def test_register_ablation_matches_float64_by_hand(mode):
    loaded = _double_model("vit_small_patch14_reg4_dinov2")
    pixels = random_pixels(loaded, batch=3).double()
    result = ablate(loaded, pixels, layer=1, target="registers", mode=mode)
    plain, changed = _by_hand(loaded.model, pixels, 1, _registers(mode))
    np.testing.assert_allclose(1 - result.patch_cosine.reshape(3, -1), 1 - _cos(plain[:, 5:], changed[:, 5:]), rtol=1e-6, atol=1e-14)
    np.testing.assert_allclose(1 - result.cls_cosine, 1 - _cos(plain[:, 0], changed[:, 0]), rtol=1e-6, atol=1e-14)
    assert (result.replaced == 4).all()
    if mode == "zero":  # mean and shuffle barely change input-independent registers (the point of the controls)
        assert (1 - result.cls_cosine).max() > 1e-6


@pytest.mark.parametrize("mode", ["zero", "mean", "shuffle"])
def test_outlier_ablation_matches_float64_by_hand(mode):
    loaded = _double_model("vit_small_patch14_dinov2", planted=True)
    pixels = random_pixels(loaded, batch=2).double()
    tokens = [1 + row * 8 + col for row, col in PLANTED_CELLS]

    def replace(y: torch.Tensor) -> torch.Tensor:
        out = y.clone()
        if mode == "zero":
            out[:, tokens] = 0
        elif mode == "mean":
            out[:, tokens] = y[:, tokens].reshape(-1, y.shape[-1]).mean(dim=0)
        else:
            out[:, tokens] = torch.roll(y[:, tokens], shifts=-1, dims=0)
        return out

    result = ablate(loaded, pixels, layer=PLANTED_LAYER + 1, target="outliers", mode=mode)
    plain, changed = _by_hand(loaded.model, pixels, PLANTED_LAYER + 1, replace)
    np.testing.assert_allclose(1 - result.patch_cosine.reshape(2, -1), 1 - _cos(plain[:, 1:], changed[:, 1:]), rtol=1e-6, atol=1e-14)
    np.testing.assert_allclose(1 - result.cls_cosine, 1 - _cos(plain[:, 0], changed[:, 0]), rtol=1e-6, atol=1e-14)
    assert (result.replaced == len(PLANTED_CELLS)).all()
    assert (1 - result.patch_cosine).max() > 1e-6  # the replacement did change something


def test_noise_keeps_each_token_norm():
    states = torch.randn(2, 6, 8, dtype=torch.float64)
    masks = torch.zeros(2, 6, dtype=torch.bool)
    masks[:, 1:3] = True
    noisy = replacement_states(states, masks, "noise", seed=3)
    np.testing.assert_allclose(noisy.norm(dim=-1), states.norm(dim=-1), rtol=1e-12)
    assert not torch.allclose(noisy[masks], states[masks]) and torch.equal(noisy[~masks], states[~masks])


def test_ablation_refuses_bad_requests(tiny_vit, tiny_vit_reg):
    pixels = random_pixels(tiny_vit, batch=2)
    with pytest.raises(OptionError, match="no registers"):
        ablate(tiny_vit, pixels, 1, "registers", "zero")
    with pytest.raises(OptionError, match="at least 2"):
        ablate(tiny_vit_reg, pixels[:1], 1, "registers", "shuffle")
    with pytest.raises(OptionError):
        ablate(tiny_vit_reg, pixels, 1, "registers", "scramble")


def test_attention_sinks_sum_to_one_and_find_the_register(planted):
    loaded = planted.loaded
    pixels = random_pixels(loaded)
    sinks = attention_sinks(loaded, pixels, layers=[1, PLANTED_LAYER, 5])
    assert sinks.received.shape == (3, 4, sinks.layout.num_tokens)
    np.testing.assert_allclose(sinks.received.sum(axis=-1), 1.0, rtol=1e-5)
    masses = sinks.masses()
    np.testing.assert_allclose(sum(masses.values()), 1.0, rtol=1e-5)
    assert (masses["outliers"][0] == 0).all() and (masses["outliers"][1:] > 0).all()
    treated = attention_sinks(loaded, pixels, layers=[5], register=TestTimeRegister(PLANTED_NEURONS))
    assert (treated.masses()["outliers"] == 0).all() and (treated.masses()["test-time register"] > 0).all()


def test_massive_activations_match_the_block_outputs(planted):
    loaded = planted.loaded
    pixels = random_pixels(loaded)
    result = massive_activations(loaded, pixels, k=3)
    states = capture(loaded, pixels, state_layers=range(6))[0].states
    for layer in range(6):
        flat = np.abs(states[layer].astype(np.float32))
        assert result.values[layer, 0] == pytest.approx(flat.max(), rel=2e-3)  # states are float16
        assert flat[result.tokens[layer, 0], result.channels[layer, 0]] == pytest.approx(flat.max(), rel=2e-3)
    prefix = result.layout.num_prefix
    planted_tokens = {prefix + row * 8 + col for row, col in PLANTED_CELLS}
    assert set(result.tokens[PLANTED_LAYER]) <= planted_tokens and result.ratio[PLANTED_LAYER] > 10 * result.ratio[0]
