"""timm ``VisionTransformer``: DINOv2, DeiT(-III), CLIP/OpenCLIP, SigLIP (attention pool), AIMv2, RADIO.

Plain fused-qkv attention (``timm.layers.Attention``), optional q/k norms, absolute position
embeddings, token order [cls, dist, registers, patches]. SigLIP-style models (``global_pool='map'``)
have an attention-pool head whose latent query is read like a prefix query. RADIO (timm's
``vit_*_radio_*``) adds registers (read from ``reg_token``) and resizes its position
embeddings bilinearly without antialiasing, with corner alignment per checkpoint as timm does.
"""
from __future__ import annotations

from typing import Mapping

import torch
from timm.layers import resample_abs_pos_embed
from timm.models import vision_transformer as timm_vit

from .base import Adapter, Prefix


class VitAdapter(Adapter):
    """timm ``VisionTransformer``."""

    family = "ViT"
    model_types = (timm_vit.VisionTransformer,)

    def prefix(self, model: torch.nn.Module) -> Prefix:
        return Prefix(num_cls=1 if getattr(model, "cls_token", None) is not None else 0,
                      num_distill=1 if getattr(model, "dist_token", None) is not None else 0,
                      num_registers=int(getattr(model, "num_reg_tokens", 0)))

    def pool_key_offset(self, model: torch.nn.Module) -> int:
        return 0 if model.pool_include_prefix else model.num_prefix_tokens

    def filter_checkpoint(self, state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return timm_vit.checkpoint_filter_fn(dict(state_dict), model)


class RadioAdapter(VitAdapter):
    """timm's RADIO backbones (``vit_*_radio_*``): a ``VisionTransformer`` whose position embeddings
    are resized bilinearly, without antialiasing, as RADIO itself does."""

    family = "RADIO"

    def matches(self, model: torch.nn.Module) -> bool:
        return super().matches(model) and "_radio_" in _architecture(model)

    def resample(self, model: torch.nn.Module, pos_embed: torch.Tensor, grid: tuple[int, int],
                 native_grid: tuple[int, int], antialias: bool) -> torch.Tensor:
        align_corners = any(name in _architecture(model) for name in timm_vit._RADIO_ALIGN_CORNERS)
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=list(native_grid),
                                      num_prefix_tokens=num_prefix, interpolation="bilinear", antialias=False,
                                      align_corners=align_corners)


def _architecture(model: torch.nn.Module) -> str:
    return str(getattr(model, "pretrained_cfg", {}).get("architecture") or "")
