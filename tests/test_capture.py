"""Capture exactness against float64 references from the model's own (non-fused) code path."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from conftest import TINY_ARGS
from vitlens.capture import capture, input_resolution, neighbor_similarity, record
from vitlens.errors import OptionError
from vitlens.layout import TokenLayout
from vitlens.models import load_model


def _reference_attention(loaded, pixels: torch.Tensor) -> np.ndarray:
    """Full softmax attention of every block in float64, read from ``attn_drop``.  # [batch, layer, head, token, token]"""
    model = copy.deepcopy(loaded.model).double()
    matrices = []
    handles = []
    for block in model.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda module, args, output: matrices.append(output)))
    try:
        with torch.no_grad():
            model.forward_features(pixels.double())
    finally:
        for handle in handles:
            handle.remove()
    assert len(matrices) == len(model.blocks)
    return torch.stack(matrices, dim=1).numpy()


def _reference_norms(loaded, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Token norms of every block output via ``forward_intermediates``, and of the final output.

    Returns:
        ``[batch, layer, token]`` and ``[batch, token]``, float64.
    """
    model = copy.deepcopy(loaded.model).double()
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(pixels.double(), norm=False, output_fmt="NLC",
                                                           return_prefix_tokens=True)
    tokens = [torch.cat([prefix, patches], dim=1) for patches, prefix in intermediates]  # [batch, token, channel]
    norms = torch.stack([t.norm(dim=-1) for t in tokens], dim=1)
    return norms.numpy(), final.norm(dim=-1).numpy()


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_prefix_attention_matches_float64_reference(tiny_model, pixels):
    x = pixels(tiny_model, seed=1, batch=2)
    traces = capture(tiny_model, x)
    reference = _reference_attention(tiny_model, x)
    num_prefix = tiny_model.model.num_prefix_tokens
    for trace, ref in zip(traces, reference):
        assert trace.attention.dtype == np.float32
        assert trace.attention.shape == (4, 4, num_prefix, trace.layout.num_tokens)
        np.testing.assert_allclose(trace.attention, ref[:, :, :num_prefix, :], rtol=1e-4, atol=2e-6)
    assert not np.allclose(traces[0].attention, traces[1].attention)  # each image its own attention


def test_attention_matches_the_reference_for_a_planted_model(planted, pixels):
    """Large outlier tokens make peaky attention: still exact, in every layer and head."""
    x = pixels(planted.loaded, seed=2)
    trace = capture(planted.loaded, x)[0]
    reference = _reference_attention(planted.loaded, x)[0]
    np.testing.assert_allclose(trace.attention, reference[:, :, :trace.layout.num_prefix, :], rtol=1e-4, atol=2e-6)


def test_attention_rows_sum_to_one(tiny_model, pixels):
    trace = capture(tiny_model, pixels(tiny_model, seed=3))[0]
    assert (trace.attention >= 0).all()
    np.testing.assert_allclose(trace.attention.sum(axis=-1), 1.0, atol=1e-5)


def test_norms_match_forward_intermediates(tiny_model, pixels):
    x = pixels(tiny_model, seed=4, batch=2)
    traces = capture(tiny_model, x)
    norms, final_norms = _reference_norms(tiny_model, x)
    for i, trace in enumerate(traces):
        assert trace.norms.dtype == np.float32 and trace.final_norms.dtype == np.float32
        assert trace.norms.shape == (4, trace.layout.num_tokens)
        np.testing.assert_allclose(trace.norms, norms[i], rtol=1e-5)
        np.testing.assert_allclose(trace.final_norms, final_norms[i], rtol=1e-5)


def test_norm_order_is_cls_registers_patches(tiny_vit_reg, pixels):
    """Token i of the trace is token i of the model's residual stream (no reordering)."""
    x = pixels(tiny_vit_reg, seed=5)
    captured = []
    handle = tiny_vit_reg.model.blocks[1].register_forward_hook(lambda m, a, out: captured.append(out[0].clone()))
    try:
        trace = capture(tiny_vit_reg, x)[0]
    finally:
        handle.remove()
    np.testing.assert_allclose(trace.norms[1], captured[0].norm(dim=-1).numpy(), rtol=1e-6)
    layout = trace.layout
    assert (layout.num_cls, layout.num_registers, layout.grid) == (1, 4, (4, 4))
    assert layout.prefix_names() == ["cls", "reg0", "reg1", "reg2", "reg3"]
    assert trace.patch_norms().shape == (4, 4, 4)
    np.testing.assert_array_equal(trace.patch_norms()[1].ravel(), trace.norms[1, 5:])


def test_states_are_block_outputs_in_half_precision(tiny_vit, pixels):
    x = pixels(tiny_vit, seed=6)
    trace = capture(tiny_vit, x, state_layers=(1, -1))[0]
    assert sorted(trace.states) == [1, 3]
    _, intermediates = tiny_vit.model.forward_intermediates(x, indices=[1, 3], output_fmt="NLC", return_prefix_tokens=True)
    for layer, (patches, prefix) in zip([1, 3], intermediates):
        expected = torch.cat([prefix, patches], dim=1)[0].detach().numpy()
        assert trace.states[layer].dtype == np.float16
        np.testing.assert_allclose(trace.states[layer].astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def test_state_layer_out_of_range(tiny_vit, pixels):
    with pytest.raises(IndexError):
        capture(tiny_vit, pixels(tiny_vit), state_layers=(4,))
    assert _hook_count(tiny_vit.model) == 0


def test_forward_output_is_bit_identical_with_and_without_capture(tiny_model, pixels):
    x = pixels(tiny_model, seed=7, batch=2)
    model = tiny_model.model
    with torch.inference_mode():
        plain = model.forward_features(x)
    outputs = []
    handle = model.norm.register_forward_hook(lambda module, args, output: outputs.append(output.clone()))
    try:
        capture(tiny_model, x)
    finally:
        handle.remove()
    assert torch.equal(outputs[0], plain)
    with record(model, model.num_prefix_tokens), torch.inference_mode():
        recorded = model.forward_features(x)
    assert torch.equal(recorded, plain)


def test_hooks_are_removed_after_capture(tiny_model, pixels):
    before = _hook_count(tiny_model.model)
    capture(tiny_model, pixels(tiny_model), state_layers=(0,))
    assert _hook_count(tiny_model.model) == before == 0
    assert not tiny_model.lock.locked()


class _Boom(RuntimeError):
    pass


def _raise(*args, **kwargs):
    raise _Boom("block failed")


@pytest.mark.parametrize("size", [None, (42, 70)], ids=["native", "resampled"])
def test_model_is_restored_when_the_forward_pass_raises(tiny_vit_reg, pixels, size):
    model = tiny_vit_reg.model
    pos_embed = model.pos_embed
    saved = pos_embed.detach().clone()
    model.blocks[2].forward = _raise  # instance attribute shadows Block.forward
    try:
        with pytest.raises(_Boom):
            capture(tiny_vit_reg, pixels(tiny_vit_reg, size=size))
    finally:
        del model.blocks[2].forward
    assert _hook_count(model) == 0
    assert not tiny_vit_reg.lock.locked()
    assert model.pos_embed is pos_embed and torch.equal(model.pos_embed, saved)
    assert tuple(model.patch_embed.img_size) == (56, 56) and tuple(model.patch_embed.grid_size) == (4, 4)
    capture(tiny_vit_reg, pixels(tiny_vit_reg))  # still usable


@pytest.mark.parametrize("size,grid", [((56, 84), (4, 6)), ((98, 42), (7, 3)), ((14, 140), (1, 10))])
def test_non_square_inputs_give_their_grid(tiny_model, pixels, size, grid):
    trace = capture(tiny_model, pixels(tiny_model, size=size))[0]
    num_prefix = tiny_model.model.num_prefix_tokens
    assert trace.layout.grid == grid
    assert trace.input_size == size
    assert trace.norms.shape == (4, num_prefix + grid[0] * grid[1])
    assert trace.attention.shape == (4, 4, num_prefix, num_prefix + grid[0] * grid[1])
    assert trace.patch_norms().shape == (4, *grid)
    assert trace.neighbor_similarity.shape == grid


def test_resampled_capture_equals_a_model_built_for_that_size(tiny_model, pixels):
    """Capture at a new grid is timm's own resize (bicubic, antialiased), not something else."""
    x = pixels(tiny_model, seed=8, size=(42, 84))
    trace = capture(tiny_model, x, antialias=True)[0]
    resized = dataclasses.replace(tiny_model, model=copy.deepcopy(tiny_model.model))
    resized.model.set_input_size(img_size=(42, 84))
    norms, _ = _reference_norms(resized, x)
    np.testing.assert_allclose(trace.norms, norms[0], rtol=1e-5)
    np.testing.assert_allclose(trace.attention, _reference_attention(resized, x)[0][:, :, :trace.layout.num_prefix],
                               rtol=1e-4, atol=2e-6)


def test_changed_grid_restores_the_model(tiny_model, pixels):
    model = tiny_model.model
    pos_embed = model.pos_embed
    saved = pos_embed.detach().clone()
    x = pixels(tiny_model, seed=9)
    with torch.inference_mode():
        before = model.forward_features(x)
    capture(tiny_model, pixels(tiny_model, size=(84, 28)))
    assert model.pos_embed is pos_embed and torch.equal(model.pos_embed, saved)
    assert tuple(model.patch_embed.img_size) == (56, 56)
    assert tuple(model.patch_embed.grid_size) == (4, 4)
    assert model.patch_embed.num_patches == 16
    with torch.inference_mode():
        assert torch.equal(model.forward_features(x), before)


def test_input_resolution_restores_on_error(tiny_vit):
    model = tiny_vit.model
    pos_embed = model.pos_embed
    with pytest.raises(_Boom):
        with input_resolution(model, (28, 42)) as grid:
            assert grid == tuple(model.patch_embed.grid_size) == (2, 3)
            assert model.pos_embed.shape[1] == 1 + 6
            raise _Boom()
    assert model.pos_embed is pos_embed and tuple(model.patch_embed.grid_size) == (4, 4)


def test_antialias_matters_only_when_the_grid_shrinks(tiny_vit):
    from vitlens.models import load_model

    loaded = load_model("vit_small_patch14_dinov2", "random", model_args=dict(depth=2, embed_dim=64, num_heads=4, img_size=112))
    with torch.no_grad():  # random init has tiny position embeddings; make them matter
        loaded.model.pos_embed.mul_(200.0)
    small = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with_aa, without_aa = capture(loaded, small, antialias=True)[0], capture(loaded, small, antialias=False)[0]
    assert not np.allclose(with_aa.norms, without_aa.norms, rtol=1e-3)
    for trace in (with_aa, without_aa):
        assert np.isfinite(trace.norms).all()
        np.testing.assert_allclose(trace.attention.sum(-1), 1.0, atol=1e-5)
    native = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    a, b = capture(loaded, native, antialias=True)[0], capture(loaded, native, antialias=False)[0]
    assert np.array_equal(a.norms, b.norms) and np.array_equal(a.attention, b.attention)


def test_bf16_capture_is_close_to_fp32(tiny_vit_reg, pixels):
    x = pixels(tiny_vit_reg, seed=10)
    fp32 = capture(tiny_vit_reg, x)[0]
    bf16 = capture(tiny_vit_reg, x, precision="bf16")[0]
    assert bf16.norms.dtype == np.float32 and bf16.attention.dtype == np.float32
    np.testing.assert_allclose(bf16.norms, fp32.norms, rtol=3e-2)
    np.testing.assert_allclose(bf16.attention.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(bf16.attention, fp32.attention, atol=2e-2)
    with pytest.raises(ValueError):
        capture(tiny_vit_reg, x, precision="fp8")
    assert _hook_count(tiny_vit_reg.model) == 0


def test_neighbor_similarity_matches_a_loop():
    embeddings = torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(0))  # batch 2, grid 3x4
    result = neighbor_similarity(embeddings, (3, 4)).numpy()
    unit = torch.nn.functional.normalize(embeddings, dim=-1).reshape(2, 3, 4, 5).numpy()
    for b in range(2):
        for r in range(3):
            for c in range(4):
                sims = [unit[b, r, c] @ unit[b, rr, cc] for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))
                        if 0 <= rr < 3 and 0 <= cc < 4]
                assert result[b, r, c] == pytest.approx(np.mean(sims), abs=1e-6)


def test_neighbor_similarity_of_a_flat_image_is_one(tiny_vit):
    flat = torch.full((1, 3, 56, 56), 0.3)
    trace = capture(tiny_vit, flat)[0]
    np.testing.assert_allclose(trace.neighbor_similarity, 1.0, atol=1e-5)
    textured = capture(tiny_vit, torch.randn(1, 3, 56, 56))[0]
    assert textured.neighbor_similarity.mean() < 0.9


def test_layout_refuses_an_inconsistent_model(tiny_vit):
    model = copy.deepcopy(tiny_vit.model)
    model.num_prefix_tokens = 3
    with pytest.raises(ValueError):
        TokenLayout.from_model(model, (4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_capture_matches_the_cpu(tiny_model, pixels, precision):
    x = pixels(tiny_model, seed=11, batch=3)
    expected = capture(tiny_model, x)
    on_gpu = dataclasses.replace(tiny_model, model=copy.deepcopy(tiny_model.model).cuda())
    for _ in range(2):  # the second pass reuses cached pinned buffers and streams
        traces = capture(on_gpu, x, precision=precision, state_layers=(1,))
    tolerance = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=3e-2, atol=2e-2)
    for trace, reference in zip(traces, expected):
        assert trace.attention.dtype == np.float32 and trace.norms.dtype == np.float32
        np.testing.assert_allclose(trace.norms, reference.norms, **tolerance)
        np.testing.assert_allclose(trace.final_norms, reference.final_norms, **tolerance)
        np.testing.assert_allclose(trace.attention, reference.attention, **tolerance)
        np.testing.assert_allclose(trace.attention.sum(-1), 1.0, atol=1e-4)
    assert _hook_count(on_gpu.model) == 0


@pytest.mark.parametrize("name, prefix_names, stride", [
    ("deit_tiny_distilled_patch16_224", ["cls", "dist"], 16),  # [cls, dist, patches]
    ("vit_tiny_r_s16_p8_224", ["cls"], 32),  # hybrid: ResNet stem (stride 4) then 8 px patches
])
def test_layout_and_grid_come_from_the_model(name, prefix_names, stride):
    from vitlens.models import load_model

    loaded = load_model(name, "random", model_args=dict(depth=1))
    assert loaded.patch_size == stride
    trace = capture(loaded, torch.randn(1, 3, 3 * stride, 5 * stride))[0]
    assert trace.layout.grid == (3, 5)
    assert trace.layout.prefix_names() == prefix_names
    assert trace.norms.shape == (1, len(prefix_names) + 15)
    assert trace.attention.shape[2] == len(prefix_names)
    np.testing.assert_allclose(trace.attention.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("model_args", [dict(global_pool="avg"), dict(final_norm=False)], ids=["avg_pool_fc_norm", "no_final_norm"])
def test_a_model_without_a_per_token_final_norm_records_none(model_args, pixels):
    """``model.norm`` is Identity: there is no per-token final norm, so no "after the final norm" values."""
    loaded = load_model("vit_small_patch14_dinov2", "random", model_args=dict(TINY_ARGS, **model_args))
    trace = capture(loaded, pixels(loaded, seed=12))[0]
    assert trace.final_norms is None and not trace.has_final_norm
    with pytest.raises(OptionError, match="no per-token final norm"):
        trace.patch_norms(post_norm=True)
    assert trace.patch_norms().shape == (4, 4, 4)


def test_a_model_with_a_final_norm_records_it(tiny_vit, pixels):
    trace = capture(tiny_vit, pixels(tiny_vit, seed=12))[0]
    assert trace.has_final_norm and trace.final_norms.shape == (trace.layout.num_tokens,)
    assert not np.allclose(trace.final_norms, trace.norms[-1])
