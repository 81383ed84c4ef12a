"""Every family vitlens reads, checked against the model's own non-fused softmax in float64.

Attention is sharpened first (q and k scaled up), so that a wrong rotation, a missed q/k norm
or a wrong prefix count gives errors near 1 instead of hiding in near-uniform random maps.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from vitlens.adapters import AttentionSite, adapter_for
from vitlens.capture import capture, full_attention
from vitlens.errors import UnknownModelError, UnsupportedModelError
from vitlens.models import LoadedModel, load_model

SHARPEN = 2.0  # typical size of a q or k entry after sharpening (logit std ~ SHARPEN^2 for 16-dim heads)
FAMILIES = {  # name: (timm name, tiny constructor arguments, (cls, registers), pool heads or None)
    "vit_reg4": ("vit_small_patch14_reg4_dinov2", dict(depth=2, embed_dim=64, num_heads=4, img_size=56), (1, 4), None),
    "dinov3": ("vit_small_patch16_dinov3", dict(depth=2, embed_dim=64, num_heads=4, img_size=64), (1, 4), None),
    "dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb", dict(depth=2, embed_dim=64, num_heads=4, img_size=64), (1, 4), None),
    "eva02_fused": ("eva02_tiny_patch14_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=56, ref_feat_shape=(4, 4)),
                    (1, 0), None),
    "eva02_separate_qkv": ("eva02_base_patch14_224",
                           dict(depth=2, embed_dim=64, num_heads=4, img_size=56, ref_feat_shape=(4, 4)), (1, 0), None),
    "pe_core": ("vit_pe_core_tiny_patch16_384", dict(depth=2, embed_dim=64, num_heads=4, img_size=64, ref_feat_shape=(4, 4),
                                                     attn_pool_num_heads=2), (1, 0), 2),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=64), (1, 0), None),
    "gqa_qk_norm": ("vit_base_patch16_sapiens2", dict(depth=3, embed_dim=64, num_heads=4, num_kv_heads=(4, 2, 4),
                                                      img_size=(64, 48)), (1, 8), None),
    "aimv2": ("aimv2_large_patch14_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=56), (0, 0), None),
    "siglip_map": ("vit_base_patch16_siglip_224", dict(depth=2, embed_dim=64, num_heads=4, img_size=64), (0, 0), 4),
    "radio": ("vit_base_patch16_radio_v3", dict(depth=2, embed_dim=64, num_heads=4, img_size=64), (1, 7), None),
}
ROPE_FAMILIES = ["dinov3", "dinov3_qkvb", "eva02_fused", "eva02_separate_qkv", "pe_core", "rope_mixed", "gqa_qk_norm"]


class _Softmaxes(TorchFunctionMode):
    """Records the output of every softmax the model computes (its non-fused attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.softmax, torch.softmax, torch.nn.functional.softmax):
            self.outputs.append(out)
        return out


def _scale_rows(linear: torch.nn.Linear, rows: slice, size: float) -> None:
    """Scale output ``rows`` so that, for unit-variance inputs, their entries are about ``size``."""
    weight = linear.weight[rows]
    factor = size / float(weight.std() * weight.shape[1] ** 0.5)
    linear.weight[rows] *= factor
    if linear.bias is not None:
        linear.bias[rows] *= factor


@torch.no_grad()
def _sharpen(model: torch.nn.Module, factor: float = SHARPEN) -> None:
    """Scale every attention's q and k (or its q/k norm gains) so that its softmax is peaky.

    q and k are computed from normalised tokens (unit variance), so scaling the projection to
    entries of size ``factor`` (or the q/k norm gains by ``factor``) makes logits of std about
    ``factor**2`` whatever the initialisation. Class and register tokens and the pool's latent
    query, initialised near zero (their queries would be near zero), get unit-size entries first.
    """
    generator = torch.Generator().manual_seed(0)
    pool = getattr(model, "attn_pool", None)
    for token in (getattr(model, "cls_token", None), getattr(model, "reg_token", None), getattr(pool, "latent", None)):
        if token is not None:
            token.copy_(torch.randn(token.shape, generator=generator))
    for attn in [m for m in model.modules() if hasattr(m, "q_norm") and hasattr(m, "k_norm")]:
        if isinstance(attn.q_norm, torch.nn.Identity):
            if getattr(attn, "qkv", None) is not None:
                q_dim = attn.num_heads * attn.head_dim
                k_dim = getattr(attn, "num_kv_heads", attn.num_heads) * attn.head_dim
                _scale_rows(attn.qkv, slice(0, q_dim), factor)
                _scale_rows(attn.qkv, slice(q_dim, q_dim + k_dim), factor)
            elif getattr(attn, "q_proj", None) is not None:
                _scale_rows(attn.q_proj, slice(None), factor)
                _scale_rows(attn.k_proj, slice(None), factor)
            else:  # attention pool: q and the first half of kv
                _scale_rows(attn.q, slice(None), factor)
                _scale_rows(attn.kv, slice(0, attn.kv.out_features // 2), factor)
        else:
            for norm in (attn.q_norm, attn.k_norm):
                norm.weight *= factor
                if getattr(norm, "bias", None) is not None:
                    norm.bias *= factor


def _tiny(family: str) -> LoadedModel:
    name, args, _, _ = FAMILIES[family]
    loaded = load_model(name, "random", model_args=args)
    _sharpen(loaded.model)
    return loaded


def _reference(loaded: LoadedModel, pixels: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
    """The model's own float64 non-fused pass at the input's size (timm's own ``set_input_size``).

    Returns:
        Block-output norms ``[batch, layer, token]``, each block's full softmax
        ``[batch, layer, head, token, token]``, and the attention pool's ``[batch, head, query, key]`` (or None).
    """
    model = copy.deepcopy(loaded.model).double()
    if tuple(pixels.shape[-2:]) != tuple(model.patch_embed.img_size):
        _set_input_size(model, tuple(pixels.shape[-2:]))
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    outputs = []
    handles = [block.register_forward_hook(lambda m, a, out: outputs.append(out)) for block in model.blocks]
    try:
        with torch.no_grad(), _Softmaxes() as softmaxes:
            features = model.forward_features(pixels.double())
            if getattr(model, "attn_pool", None) is not None:
                model.pool(features)
    finally:
        for handle in handles:
            handle.remove()
    depth = len(model.blocks)
    norms = torch.stack([out.norm(dim=-1) for out in outputs], dim=1).numpy()
    blocks = torch.stack(softmaxes.outputs[:depth], dim=1).numpy()
    pool = softmaxes.outputs[depth].numpy() if len(softmaxes.outputs) > depth else None
    return norms, blocks, pool


def _set_input_size(model: torch.nn.Module, size: tuple[int, int]) -> None:
    """timm's own resize; RADIO's position embeddings are resized bilinearly (corners aligned for v3-B)."""
    if "_radio_" not in model.pretrained_cfg["architecture"]:
        model.set_input_size(img_size=size)
        return
    from timm.layers import resample_abs_pos_embed

    old_grid = model.patch_embed.grid_size
    model.patch_embed.set_input_size(img_size=size)
    model.pos_embed = torch.nn.Parameter(resample_abs_pos_embed(
        model.pos_embed, new_size=model.patch_embed.grid_size, old_size=old_grid, num_prefix_tokens=0,
        interpolation="bilinear", antialias=False, align_corners=True))


def _check_against_reference(loaded: LoadedModel, pixels: torch.Tensor) -> None:
    trace = capture(loaded, pixels)[0]
    norms, blocks, pool = _reference(loaded, pixels)
    prefix = trace.layout.num_prefix
    np.testing.assert_allclose(trace.norms, norms[0], rtol=1e-5)
    assert trace.attention.shape == blocks[0, :, :, :prefix].shape
    np.testing.assert_allclose(trace.attention, blocks[0, :, :, :prefix], atol=1e-4)
    if pool is None:
        assert trace.pool_attention is None
    else:
        offset = trace.layout.num_tokens - pool.shape[-1]
        np.testing.assert_allclose(trace.pool_attention[..., offset:], pool[0], atol=1e-4)
        assert not trace.pool_attention[..., :offset].any()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("size", ["native", "non-square"])
def test_attention_and_norms_equal_the_models_own_float64_softmax(family, size):
    loaded = _tiny(family)
    height, width = loaded.native_size
    patch = loaded.patch_size
    shape = (height, width) if size == "native" else (height + 2 * patch, width - patch)
    _check_against_reference(loaded, torch.randn(1, 3, *shape, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("family", ["vit_reg4", "dinov3", "pe_core", "gqa_qk_norm", "siglip_map"])
def test_sharpened_attention_is_peaky(family):
    """The premise of the exactness tests: maps far from uniform, so mistakes show."""
    loaded = _tiny(family)
    trace = capture(loaded, torch.randn(1, 3, *loaded.native_size, generator=torch.Generator().manual_seed(2)))[0]
    rows = trace.attention if trace.layout.num_prefix else trace.pool_attention[None]
    assert rows.max(axis=-1).mean() > 0.4


@pytest.mark.parametrize("family", ["dinov3", "eva02_fused", "rope_mixed"])
def test_ignoring_the_rotation_would_be_caught(family, monkeypatch):
    """Without the rotary embedding, the recomputed attention is far off: the exactness test can fail."""
    loaded = _tiny(family)
    x = torch.randn(1, 3, *loaded.native_size, generator=torch.Generator().manual_seed(3))
    exact = capture(loaded, x)[0].attention
    unrotated = AttentionSite.attention
    monkeypatch.setattr(AttentionSite, "attention", lambda self, q, k, rope, dtype: unrotated(self, q, k, None, dtype))
    wrong = capture(loaded, x)[0].attention
    assert np.abs(wrong - exact).max() > 0.2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layout_and_grid_are_read_from_the_model(family):
    _, _, (num_cls, num_registers), pool_heads = FAMILIES[family]
    loaded = _tiny(family)
    patch = loaded.patch_size
    trace = capture(loaded, torch.randn(1, 3, 3 * patch, 5 * patch))[0]
    layout = trace.layout
    assert (layout.num_cls, layout.num_registers, layout.grid) == (num_cls, num_registers, (3, 5))
    assert layout.num_prefix == loaded.model.num_prefix_tokens
    assert trace.norms.shape == (len(loaded.model.blocks), num_cls + num_registers + 15)
    assert trace.attention.shape[2] == num_cls + num_registers
    assert (trace.pool_attention is None) == (pool_heads is None)
    if pool_heads is not None:
        assert trace.pool_attention.shape[0] == pool_heads
        np.testing.assert_allclose(trace.pool_attention.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("family", ["dinov3", "eva02_separate_qkv", "pe_core"])
def test_capture_leaves_the_model_and_its_output_unchanged(family):
    loaded = _tiny(family)
    model = loaded.model
    x = torch.randn(1, 3, *loaded.native_size, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        before = model.forward_features(x)
    capture(loaded, torch.randn(1, 3, loaded.native_size[0] + 32, loaded.native_size[1] - 16))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    with torch.inference_mode():
        assert torch.equal(model.forward_features(x), before)
    outputs = []
    handle = model.norm.register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
    try:
        capture(loaded, x)
    finally:
        handle.remove()
    assert torch.equal(outputs[0], before)


def test_radio_resamples_position_embeddings_bilinearly_as_radio_does():
    from timm.layers import resample_abs_pos_embed

    loaded = _tiny("radio")
    model = loaded.model
    with adapter_for(model).input_resolution(model, (48, 96), antialias=True) as grid:
        resampled = model.pos_embed.detach().clone()
    expected = resample_abs_pos_embed(model.pos_embed.detach(), new_size=list(grid), old_size=[4, 4], num_prefix_tokens=0,
                                      interpolation="bilinear", antialias=False, align_corners=True)
    assert adapter_for(model).family == "RADIO" and grid == (3, 6)
    torch.testing.assert_close(resampled, expected)


@pytest.mark.parametrize("family", ["dinov3", "eva02_separate_qkv", "pe_core", "siglip_map"])
def test_timm_layout_weights_file_loads_through_the_real_loader(family, tmp_path):
    from safetensors.torch import save_file

    name, args, _, _ = FAMILIES[family]
    source = _tiny(family)
    path = tmp_path / f"{family}.safetensors"
    save_file({key: value.contiguous() for key, value in source.model.state_dict().items()}, str(path))
    loaded = load_model(name, path, model_args=args)
    x = torch.randn(1, 3, *source.native_size, generator=torch.Generator().manual_seed(5))
    a, b = capture(source, x)[0], capture(loaded, x)[0]
    np.testing.assert_array_equal(a.norms, b.norms)
    np.testing.assert_array_equal(a.attention, b.attention)


@pytest.mark.parametrize("name", ["vit_dwee_patch16_reg1_gap_256", "vit_dlittle_patch16_reg1_gap_256"])
def test_differential_attention_is_refused_in_one_sentence(name):
    with pytest.raises(UnsupportedModelError) as error:
        load_model(name, "random", model_args=dict(depth=1))
    message = str(error.value)
    assert "DiffAttention" in message and name in message
    assert message.count(". ") == 0 and "\n" not in message


def test_a_subclassed_attention_is_refused():
    """Exact types only: a subclass may compute its attention differently."""
    loaded = load_model("vit_small_patch14_dinov2", "random", model_args=dict(depth=1, embed_dim=64, num_heads=4, img_size=56))
    attn = loaded.model.blocks[0].attn
    attn.__class__ = type("TalkingHeadsAttention", (type(attn),), {})
    with pytest.raises(UnsupportedModelError, match="TalkingHeadsAttention"):
        adapter_for(loaded.model).check(loaded.model)
    assert issubclass(UnsupportedModelError, UnknownModelError)  # the CLI's and app's one-sentence path


def test_synthetic_demo_refuses_a_rope_model_in_one_sentence():
    from vitlens.errors import WeightsError

    with pytest.raises(WeightsError, match="plants into timm VisionTransformer"):
        load_model("eva02_tiny_patch14_224", "synthetic", model_args=dict(depth=2, embed_dim=64, num_heads=4))
    dinov3 = load_model("vit_small_patch16_dinov3", "synthetic", model_args=dict(depth=2, embed_dim=64, num_heads=4))
    assert dinov3.weights == "synthetic"  # registers: left clean, as for DINOv2 with registers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["dinov3", "pe_core", "gqa_qk_norm", "siglip_map"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_capture_of_each_family_matches_the_cpu(family, precision):
    loaded = _tiny(family)
    x = torch.randn(2, 3, *loaded.native_size, generator=torch.Generator().manual_seed(6))
    expected = capture(loaded, x)
    on_gpu = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).cuda())
    tolerance = dict(rtol=1e-4, atol=1e-4) if precision == "fp32" else dict(rtol=5e-2, atol=5e-2)
    for trace, reference in zip(capture(on_gpu, x, precision=precision), expected):
        np.testing.assert_allclose(trace.norms, reference.norms, **tolerance)
        np.testing.assert_allclose(trace.attention, reference.attention, **tolerance)
        if reference.pool_attention is not None:
            np.testing.assert_allclose(trace.pool_attention, reference.pool_attention, **tolerance)


def test_a_test_time_register_is_refused_for_a_rope_model():
    from vitlens.errors import OptionError
    from vitlens.interventions import TestTimeRegister

    loaded = _tiny("dinov3")
    with pytest.raises(OptionError, match="only into timm VisionTransformer"):
        capture(loaded, torch.randn(1, 3, *loaded.native_size), test_time_register=TestTimeRegister(((0, 1),)))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in loaded.model.modules()) == 0


def test_cli_save_adds_the_attention_pool_and_refuses_differential_attention(tmp_path, capsys):
    from PIL import Image

    from vitlens.cli import main

    image = tmp_path / "a.png"
    Image.new("RGB", (96, 64), (120, 60, 30)).save(image)
    out = tmp_path / "pe.npz"
    assert main(["inspect", str(image), "--model", "vit_pe_core_tiny_patch16_384", "--weights", "random", "--size", "96",
                 "--save", str(out)]) == 0
    arrays = np.load(out)
    assert arrays["pool_attention"].shape == (8, 1, arrays["norms"].shape[1])
    np.testing.assert_allclose(arrays["pool_attention"].sum(-1), 1.0, atol=1e-5)
    capsys.readouterr()
    assert main(["inspect", str(image), "--model", "vit_dlittle_patch16_reg1_gap_256", "--weights", "random"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "DiffAttention" in err[0]


@pytest.mark.parametrize("family", ["vit_reg4", "dinov3", "eva02_fused"])
def test_full_attention_of_one_block_equals_the_models_own_softmax(family):
    """Every query's row (patches rotated like the keys in RoPE families), not just the prefix's."""
    loaded = _tiny(family)
    x = torch.randn(1, 3, *loaded.native_size, generator=torch.Generator().manual_seed(4))
    _, blocks, _ = _reference(loaded, x)
    weights, layout = full_attention(loaded, x, layer=1)
    assert weights.shape == blocks[0, 1].shape == (blocks.shape[2], layout.num_tokens, layout.num_tokens)
    np.testing.assert_allclose(weights, blocks[0, 1], atol=1e-4)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules())
