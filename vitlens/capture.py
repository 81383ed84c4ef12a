"""One forward pass -> one ``Trace`` per image: norms per layer, prefix attention, chosen states.

Hooks read the model's own intermediate tensors; nothing in the forward pass is replaced, so the
model's output is the same with and without capture. Attention is recomputed only for the prefix
queries (CLS and registers) from the very q and k the model used, which is exact even when timm
runs fused attention, and costs [prefix x tokens] per head instead of [tokens x tokens].
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from .interventions import TestTimeRegister, apply_test_time_register
from .layout import TokenLayout
from .models import LoadedModel

CAPTURE_VERSION = 1  # bump when the content of a Trace changes; part of every cache key
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, eq=False)
class Trace:
    """What one forward pass recorded for one image. Layers are block indices (0-based).

    Precision: norms and attention are float32 (exact to float precision); states are float16
    (about 3 significant digits, for embeddings such as UMAP).

    Attributes:
        layout: Token order of this pass.
        input_size: Model input (height, width) in pixels.
        norms: L2 norm of every token after each block, before the final norm.  # [layer, token]
        final_norms: L2 norm of every token after the final norm.  # [token]
        attention: Softmax attention of each prefix query over all tokens; no heads (size 0)
            when captured with ``attention=False``.  # [layer, head, prefix, token]
        neighbor_similarity: Mean cosine similarity of each patch embedding (before position
            embedding) to its 4 neighbours.  # [row, col]
        states: Token vectors of the requested layers.  # {layer: [token, channel]}
    """

    layout: TokenLayout
    input_size: tuple[int, int]
    norms: np.ndarray
    final_norms: np.ndarray
    attention: np.ndarray
    neighbor_similarity: np.ndarray
    states: Mapping[int, np.ndarray] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.norms.shape[0]

    @property
    def num_heads(self) -> int:
        return self.attention.shape[1]

    def patch_norms(self, post_norm: bool = False) -> np.ndarray:
        """Patch-token norms on the grid: ``[layer, row, col]``, or ``[row, col]`` after the final norm."""
        return self.layout.patch_grid(self.final_norms if post_norm else self.norms)


def capture(
        loaded: LoadedModel,
        pixels: torch.Tensor,
        antialias: bool = True,
        state_layers: Sequence[int] = (),
        precision: str = "fp32",
        attention: bool = True,
        test_time_register: TestTimeRegister | None = None,
) -> list[Trace]:
    """Run one forward pass over a batch and record a ``Trace`` per image.

    Args:
        loaded: The model.
        pixels: Normalised images of one size.  # [batch, 3, height, width]
        antialias: Antialias when resampling position embeddings to a new grid (paper, appendix A).
        state_layers: Blocks whose output token vectors are kept.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast; norms and softmax stay float32).
        attention: Record prefix attention; False skips its computation and host copy (sweeps
            need only norms).
        test_time_register: Run with this extra register token (``vitlens.interventions``); the
            trace counts it as the last register.
    """
    model = loaded.model
    state_layers = sorted({_check_layer(layer, len(model.blocks)) for layer in state_layers})
    input_size = tuple(pixels.shape[-2:])
    extra = 0 if test_time_register is None else 1
    with loaded.lock, input_resolution(model, input_size, antialias) as grid, \
            apply_test_time_register(model, test_time_register), \
            record(model, model.num_prefix_tokens + extra, state_layers, attention) as recorder:
        with torch.inference_mode(), _autocast(loaded.device, precision):
            model.forward_features(pixels.to(loaded.device))
        layout = TokenLayout.from_model(model, grid).with_test_time_registers(extra)
    return recorder.traces(layout, input_size)


def _check_layer(layer: int, num_layers: int) -> int:
    if not -num_layers <= layer < num_layers:
        raise IndexError(f"layer {layer} out of range for {num_layers} blocks")
    return layer % num_layers


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@contextlib.contextmanager
def input_resolution(model: VisionTransformer, size: tuple[int, int], antialias: bool = True) -> Iterator[tuple[int, int]]:
    """Temporarily set the model's input size; yields the patch grid (rows, cols) of that size.

    Position embeddings are resampled (bicubic, optionally antialiased) when the grid changes;
    the model's own size and position embeddings are restored afterwards.
    """
    patch_embed = model.patch_embed
    native_size, native_grid, native_pos_embed = patch_embed.img_size, tuple(patch_embed.grid_size), model.pos_embed
    try:
        patch_embed.set_input_size(img_size=size)
        grid = tuple(patch_embed.grid_size)
        if native_pos_embed is not None and grid != native_grid:
            num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
            resampled = resample_abs_pos_embed(native_pos_embed.detach(), new_size=list(grid), old_size=list(native_grid),
                                               num_prefix_tokens=num_prefix, antialias=antialias)
            model.pos_embed = torch.nn.Parameter(resampled, requires_grad=False)
        yield grid
    finally:
        patch_embed.set_input_size(img_size=native_size)
        model.pos_embed = native_pos_embed


class _Recorder:
    """Forward hooks that collect per-block tensors on the model's device."""

    def __init__(self, model: VisionTransformer, num_prefix: int, state_layers: Sequence[int], attention: bool = True) -> None:
        self.num_prefix = num_prefix
        self.state_layers = state_layers
        self.with_attention = attention
        self.norms: list[torch.Tensor] = []  # per block: [batch, token]
        self.attention: list[torch.Tensor] = []  # per block: [batch, head, prefix, token]
        self.states: dict[int, torch.Tensor] = {}  # [batch, token, channel]
        self.final_norms: torch.Tensor | None = None  # [batch, token]
        self.patch_embeddings: torch.Tensor | None = None  # [batch, patch, channel]

    def hooks(self, model: VisionTransformer) -> list[tuple[torch.nn.Module, object]]:
        pairs = [(model.patch_embed, self._on_patch_embed), (model.norm, self._on_final_norm)]
        for index, block in enumerate(model.blocks):
            attn = getattr(block, "attn", None)
            if not self.with_attention:
                pairs.append((block, self._block_hook(index)))
                continue
            if attn is None or not isinstance(getattr(attn, "qkv", None), torch.nn.Linear):
                raise TypeError(f"block {index} ({type(block).__name__}) has no attn.qkv projection to read attention from")
            pairs.append((attn.qkv, self._attention_hook(attn)))
            pairs.append((block, self._block_hook(index)))
        return pairs

    def _on_patch_embed(self, module, args, output: torch.Tensor) -> None:
        self.patch_embeddings = output.flatten(1, -2) if output.ndim == 4 else output

    def _on_final_norm(self, module, args, output: torch.Tensor) -> None:
        self.final_norms = _norms(output)

    def _block_hook(self, index: int):
        def hook(module, args, output: torch.Tensor) -> None:
            self.norms.append(_norms(output))
            if index in self.state_layers:
                self.states[index] = output.half()
        return hook

    def _attention_hook(self, attn: torch.nn.Module):
        def hook(module, args, qkv: torch.Tensor) -> None:
            batch, tokens, _ = qkv.shape
            qkv = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q = attn.q_norm(qkv[0][:, :, :self.num_prefix])  # [batch, head, prefix, dim]
            k = attn.k_norm(qkv[1])  # [batch, head, token, dim]
            with torch.autocast(qkv.device.type, enabled=False):  # autocast would run this matmul in bf16
                logits = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
                self.attention.append(logits.softmax(dim=-1))
        return hook

    def _host_attention(self, shape: tuple[int, ...]) -> np.ndarray:
        """Recorded attention on the host, or an empty one (no heads) when not recorded."""
        if not self.with_attention:
            batch, layers, tokens = shape
            return np.zeros((batch, layers, 0, self.num_prefix, tokens), dtype=np.float32)
        return _to_host(torch.stack(self.attention, dim=1)).numpy()

    def traces(self, layout: TokenLayout, input_size: tuple[int, int]) -> list[Trace]:
        norms = torch.stack(self.norms, dim=1).cpu().numpy()  # [batch, layer, token]
        attention = self._host_attention(norms.shape)  # [batch, layer, head, prefix, token]
        final_norms = self.final_norms.cpu().numpy()
        similarity = neighbor_similarity(self.patch_embeddings, layout.grid).cpu().numpy()
        states = {layer: _to_host(tensor).numpy() for layer, tensor in self.states.items()}
        return [
            Trace(layout=layout, input_size=input_size, norms=norms[i], final_norms=final_norms[i],
                  attention=attention[i], neighbor_similarity=similarity[i],
                  states={layer: values[i] for layer, values in states.items()})
            for i in range(norms.shape[0])
        ]


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy, through pinned memory for a CUDA tensor (many times faster than pageable memory)."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host


def _norms(tokens: torch.Tensor) -> torch.Tensor:
    """L2 norm over channels, accumulated in float32 without a float32 copy of ``tokens``."""
    with torch.autocast(tokens.device.type, enabled=False):  # autocast would add that copy
        return torch.linalg.vector_norm(tokens, dim=-1, dtype=torch.float32)


@contextlib.contextmanager
def record(model: VisionTransformer, num_prefix: int, state_layers: Sequence[int] = (),
           attention: bool = True) -> Iterator[_Recorder]:
    """Attach recording hooks for the duration of the block; they are removed even on error."""
    recorder = _Recorder(model, num_prefix, state_layers, attention)
    handles = []
    try:
        for module, hook in recorder.hooks(model):
            handles.append(module.register_forward_hook(hook))
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def neighbor_similarity(patch_embeddings: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Mean cosine similarity of each patch embedding to its up/down/left/right neighbours.

    Args:
        patch_embeddings: Output of the patch embedding.  # [batch, patch, channel]
        grid: (rows, cols).

    Returns:
        Similarity per cell.  # [batch, row, col]
    """
    x = F.normalize(patch_embeddings.float(), dim=-1).reshape(patch_embeddings.shape[0], *grid, -1)
    vertical = (x[:, 1:] * x[:, :-1]).sum(-1)  # [batch, row - 1, col]
    horizontal = (x[:, :, 1:] * x[:, :, :-1]).sum(-1)  # [batch, row, col - 1]
    total = torch.zeros(x.shape[:3], device=x.device)
    count = torch.zeros(x.shape[:3], device=x.device)
    total[:, 1:] += vertical  # neighbour above
    total[:, :-1] += vertical  # neighbour below
    total[:, :, 1:] += horizontal  # neighbour left
    total[:, :, :-1] += horizontal  # neighbour right
    count[:, 1:] += 1
    count[:, :-1] += 1
    count[:, :, 1:] += 1
    count[:, :, :-1] += 1
    return total / count.clamp(min=1)
