"""timm ``Eva``: DINOv3, EVA-02, Perception Encoder (PE-core) and other RoPE ViTs.

Attention is ``EvaAttention`` (fused or separate q/k/v, q bias without k bias) or
``AttentionRope`` (optionally grouped-query), both with q/k norms and a rotary embedding that
the model computes for the current grid and passes to each block; it rotates patch tokens
only, never the prefix. Variants with learned, per-block frequencies (``rope_type='mixed'``)
pass each block its own embedding: the pre-hook reads whatever the block received. The token
order is [cls, registers (DINOv3's storage tokens), patches]. For a new input size the
rotary embedding is recomputed by the model's own ``update_feat_shape`` (or, for
``dynamic_img_size`` models, by the model itself in every forward) and absolute position
embeddings, where there are any, are resampled as for a ViT.
"""
from __future__ import annotations

from typing import Mapping

import torch
from timm.models import eva as timm_eva

from ..errors import UnsupportedModelError
from .base import EXACT_ATTENTION, Adapter, AttentionSite, Prefix, exact_site


class EvaAdapter(Adapter):
    """timm ``Eva``."""

    family = "Eva (RoPE)"
    model_types = (timm_eva.Eva,)

    def prefix(self, model: torch.nn.Module) -> Prefix:
        registers = model.reg_token.shape[1] if getattr(model, "reg_token", None) is not None else 0
        return Prefix(num_cls=1 if model.cls_token is not None else 0, num_distill=0, num_registers=int(registers))

    def attention_site(self, model: torch.nn.Module, index: int) -> AttentionSite:
        block = self.blocks(model)[index]
        attn = getattr(block, "attn", None)
        where = f"block {index} ({type(block).__name__})"
        site = exact_site(attn, where, num_unrotated=model.num_prefix_tokens,
                          allowed=EXACT_ATTENTION + (timm_eva.EvaAttention,))
        if getattr(attn, "num_prefix_tokens", model.num_prefix_tokens) != model.num_prefix_tokens:
            raise UnsupportedModelError(f"{where} leaves {attn.num_prefix_tokens} tokens unrotated but the model has "
                                        f"{model.num_prefix_tokens} prefix tokens, so its token layout is unclear.")
        return site

    def set_grid(self, model: torch.nn.Module, grid: tuple[int, int]) -> None:
        rope = getattr(model, "rope", None)
        if rope is not None and getattr(rope, "feat_shape", None) is not None and hasattr(rope, "update_feat_shape"):
            rope.update_feat_shape(list(grid))

    def filter_checkpoint(self, state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return timm_eva.checkpoint_filter_fn(dict(state_dict), model)
