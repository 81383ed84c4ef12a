"""What a family adapter tells capture, and the reading of q and k that every family shares.

Every attention vitlens accepts computes ``q, k = q_norm(q), k_norm(k)`` on ``[batch, head,
token, dim]`` tensors, then (RoPE families) rotates the tokens after the prefix, then takes
``softmax(q k^T * scale)``. Hooks on ``q_norm`` and ``k_norm`` therefore see q and k exactly as
the model uses them (after fused or separate projections, biases and q/k norms), whatever the
fused/non-fused switch; a pre-hook reads the rotary embedding the block passes in, and
``AttentionSite.prefix_attention`` applies it with timm's own function. Attention modules whose
forward is anything else (differential attention, custom subclasses) are refused.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import ClassVar, Iterator, Mapping

import torch
from timm.layers import resample_abs_pos_embed
from timm.layers.attention import Attention, AttentionRope
from timm.layers.attention_pool import AttentionPoolLatent
from timm.layers.pos_embed_sincos import apply_rot_embed_cat

from ..errors import UnsupportedModelError

# The only forwards capture reproduces exactly (exact types: a subclass may change the forward).
EXACT_ATTENTION: tuple[type, ...] = (Attention, AttentionRope, AttentionPoolLatent)


@dataclass(frozen=True)
class Prefix:
    """Prefix tokens in model order: class, distillation, then registers."""

    num_cls: int
    num_distill: int
    num_registers: int


@dataclass(frozen=True)
class AttentionSite:
    """One attention, and how to recompute its softmax for a few queries from the model's own q and k.

    Attributes:
        module: The attention module (a pre-hook reads its ``rope`` argument).
        q_norm: Module whose output is q as the attention uses it, before any rotation.  # [batch, head, token, dim]
        k_norm: The same for k.  # [batch, kv_head, token, dim]
        scale: Logit scale (the non-fused path's ``scale``, equal to the fused path's default).
        num_unrotated: Leading tokens the rotary embedding skips (the prefix).
        rotate_half: timm's half-split rotary layout instead of the interleaved one.
        kv_groups: Query heads per key head (grouped-query attention), else 1.
    """

    module: torch.nn.Module
    q_norm: torch.nn.Module
    k_norm: torch.nn.Module
    scale: float
    num_unrotated: int = 0
    rotate_half: bool = False
    kv_groups: int = 1

    def attention(self, q: torch.Tensor, k: torch.Tensor, rope: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
        """Softmax attention of the given queries (the unrotated prefix ones, or all) over all keys, in float32.

        Args:
            q: Queries: all before ``num_unrotated``, or every token's, when a rotation is given.  # [batch, head, query, dim]
            k: Keys of every token, as ``k_norm`` returned them.  # [batch, kv_head, token, dim]
            rope: The rotary embedding the module was called with, or None.
            dtype: The dtype the module casts rotated q and k to (that of its v).

        Returns:
            Attention weights.  # [batch, head, query, token]
        """
        if rope is not None:
            n = self.num_unrotated
            if q.shape[2] == k.shape[2]:  # every query: the tokens after the prefix are rotated like the keys
                q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=self.rotate_half)], dim=2)
            elif q.shape[2] > n:
                raise ValueError(f"only the {n} unrotated prefix queries, or all queries, can be read")
            k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=self.rotate_half)], dim=2).to(dtype)
            q = q.to(dtype)
        if self.kv_groups > 1:
            k = k.repeat_interleave(self.kv_groups, dim=1)
        with torch.autocast(q.device.type, enabled=False):  # autocast would run this matmul in bf16
            logits = (q.float() * self.scale) @ k.float().transpose(-2, -1)
            return logits.softmax(dim=-1)


def exact_site(attn: torch.nn.Module | None, where: str, num_unrotated: int = 0,
               allowed: tuple[type, ...] = EXACT_ATTENTION) -> AttentionSite:
    """The site of a timm attention whose forward capture reproduces exactly.

    Raises:
        UnsupportedModelError: any other attention (one sentence naming it and where it is).
    """
    if type(attn) not in allowed:
        raise UnsupportedModelError(
            f"{where} uses {type(attn).__name__}, whose attention vitlens cannot recompute exactly "
            f"(it reads timm's {', '.join(t.__name__ for t in allowed)}).")
    return site_of(attn, where, num_unrotated)


def site_of(attn: torch.nn.Module, where: str, num_unrotated: int = 0) -> AttentionSite:
    """Build the site of an attention already known to follow the shared q/k pattern."""
    head_dim = attn.head_dim
    if not math.isclose(attn.scale, head_dim ** -0.5):
        raise UnsupportedModelError(f"{where} scales its logits by {attn.scale:.4g}, not 1/sqrt({head_dim}) as its "
                                    "fused path does, so vitlens cannot tell which one the model uses.")
    kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
    return AttentionSite(module=attn, q_norm=attn.q_norm, k_norm=attn.k_norm, scale=float(attn.scale),
                         num_unrotated=num_unrotated, rotate_half=bool(getattr(attn, "rotate_half", False)),
                         kv_groups=attn.num_heads // kv_heads)


class Adapter:
    """How capture reads one family of timm models. Subclasses override what differs.

    Attributes:
        family: Short family name shown to users.
        model_types: The timm model classes of the family (and their subclasses, e.g. DeiT's
            distilled ViT; exactness is checked per attention module, by exact type).
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[type, ...]] = ()

    def matches(self, model: torch.nn.Module) -> bool:
        return isinstance(model, self.model_types)

    def check(self, model: torch.nn.Module) -> None:
        """Raise ``UnsupportedModelError`` unless every attention can be read exactly."""
        for index in range(len(self.blocks(model))):
            self.attention_site(model, index)
        self.pool_site(model)

    def prefix(self, model: torch.nn.Module) -> Prefix:
        """Class, distillation and register token counts, read from the model."""
        raise NotImplementedError

    def blocks(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The blocks whose outputs are the residual stream."""
        return model.blocks

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        """The per-token norm after the last block (``Identity`` when there is none)."""
        return model.norm

    def attention_site(self, model: torch.nn.Module, index: int) -> AttentionSite:
        """Where block ``index`` computes its attention."""
        block = self.blocks(model)[index]
        return exact_site(getattr(block, "attn", None), f"block {index} ({type(block).__name__})")

    def pool_site(self, model: torch.nn.Module) -> AttentionSite | None:
        """The attention-pool head's attention (its latent queries over the tokens), if the model has one."""
        pool = getattr(model, "attn_pool", None)
        return None if pool is None else exact_site(pool, "the attention-pool head")

    def pool_key_offset(self, model: torch.nn.Module) -> int:
        """Index of the first token the attention pool sees as a key (0: all tokens)."""
        return 0

    def run_pool(self, model: torch.nn.Module, features: torch.Tensor) -> None:
        """Run the attention-pool head on ``forward_features``'s output (hooks read its attention)."""
        model.pool(features)

    def resample(self, model: torch.nn.Module, pos_embed: torch.Tensor, grid: tuple[int, int],
                 native_grid: tuple[int, int], antialias: bool) -> torch.Tensor:
        """Absolute position embeddings for a new grid (bicubic, optionally antialiased: timm's default)."""
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        return resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=list(native_grid),
                                      num_prefix_tokens=num_prefix, antialias=antialias)

    @contextlib.contextmanager
    def input_resolution(self, model: torch.nn.Module, size: tuple[int, int],
                         antialias: bool = True) -> Iterator[tuple[int, int]]:
        """Temporarily set the model's input size; yields the patch grid (rows, cols).

        Position embeddings are resampled when the grid changes; the model's own size and
        position embeddings are restored afterwards, even on error.
        """
        patch_embed = model.patch_embed
        native_size, native_grid, native_pos_embed = patch_embed.img_size, tuple(patch_embed.grid_size), model.pos_embed
        try:
            patch_embed.set_input_size(img_size=size)
            grid = tuple(patch_embed.grid_size)
            if native_pos_embed is not None and grid != native_grid:
                resampled = self.resample(model, native_pos_embed.detach(), grid, native_grid, antialias)
                model.pos_embed = torch.nn.Parameter(resampled, requires_grad=False)
            self.set_grid(model, grid)
            yield grid
        finally:
            patch_embed.set_input_size(img_size=native_size)
            model.pos_embed = native_pos_embed
            self.set_grid(model, native_grid)

    def set_grid(self, model: torch.nn.Module, grid: tuple[int, int]) -> None:
        """Tell position machinery other than ``pos_embed`` (rotary embeddings) the grid; none here."""

    def filter_checkpoint(self, state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Convert a checkpoint's tensors to the model's timm key layout."""
        raise NotImplementedError
