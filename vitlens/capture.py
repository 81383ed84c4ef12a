"""One forward pass -> one ``Trace`` per image: norms per layer, prefix attention, chosen states.

Hooks read the model's own intermediate tensors; nothing in the forward pass is replaced, so the
model's output is the same with and without capture. Attention is recomputed only for the prefix
queries (CLS and registers) from the very q and k the model used (after its q/k norms and rotary
embedding; see ``vitlens.adapters``), which is exact even when timm runs fused attention, and
costs [prefix x tokens] per head instead of [tokens x tokens]. A model's attention-pool head
(SigLIP-style) is run on the features too, and its query's attention recorded the same way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle

from .adapters import Adapter, AttentionSite, adapter_for
from .errors import OptionError
from .interventions import TestTimeRegister, apply_test_time_register
from .layout import TokenLayout
from .models import LoadedModel

CAPTURE_VERSION = 4  # bump when the content of a Trace changes; part of every cache key
# 3: prefix attention of bf16/fp16 captures computed in float32 (caches of version 1 held half-precision values)
# 4: final_norms is None for models without a per-token final norm (version 3 held the pre-norm values)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_FINAL_NORM = ("This model has no per-token final norm (it pools the tokens before normalising, or has no final "
                 "norm), so there are no norms after the final norm to show.")


@dataclass(frozen=True, eq=False)
class Trace:
    """What one forward pass recorded for one image. Layers are block indices (0-based).

    Precision: norms and attention are float32 (exact to float precision); states are float16
    (about 3 significant digits, for embeddings such as UMAP).

    Attributes:
        layout: Token order of this pass.
        input_size: Model input (height, width) in pixels.
        norms: L2 norm of every token after each block, before the final norm.  # [layer, token]
        final_norms: L2 norm of every token after the final norm; None when the model has no
            per-token final norm (``model.norm`` is Identity: average pooling with ``fc_norm``
            after it, or ``final_norm=False``).  # [token]
        attention: Softmax attention of each prefix query over all tokens; no heads (size 0)
            when captured with ``attention=False``.  # [layer, head, prefix, token]
        neighbor_similarity: Mean cosine similarity of each patch embedding (before position
            embedding) to its 4 neighbours.  # [row, col]
        states: Token vectors of the requested layers.  # {layer: [token, channel]}
        pool_attention: Softmax attention of the attention-pool head's query (SigLIP-style
            ``global_pool='map'``) over all tokens after the final norm, zero for tokens the pool
            does not see; None when the model has no such head.  # [pool_head, query, token]
    """

    layout: TokenLayout
    input_size: tuple[int, int]
    norms: np.ndarray
    final_norms: np.ndarray | None
    attention: np.ndarray
    neighbor_similarity: np.ndarray
    states: Mapping[int, np.ndarray] = field(default_factory=dict)
    pool_attention: np.ndarray | None = None

    @property
    def num_layers(self) -> int:
        return self.norms.shape[0]

    @property
    def num_heads(self) -> int:
        return self.attention.shape[1]

    @property
    def has_final_norm(self) -> bool:
        """Whether the model normalises every token at the end (so ``final_norms`` exists)."""
        return self.final_norms is not None

    def final_norms_or_nan(self) -> np.ndarray:
        """``final_norms`` as arrays are saved (``--save``, the app's NPZ): all NaN when the model
        has no per-token final norm, so the array keeps its shape.  # [token]"""
        if self.final_norms is None:
            return np.full(self.layout.num_tokens, np.nan, dtype=np.float32)
        return self.final_norms.astype(np.float32)

    def patch_norms(self, post_norm: bool = False) -> np.ndarray:
        """Patch-token norms on the grid: ``[layer, row, col]``, or ``[row, col]`` after the final norm.

        Raises:
            OptionError: ``post_norm`` for a model without a per-token final norm.
        """
        if not post_norm:
            return self.layout.patch_grid(self.norms)
        if self.final_norms is None:
            raise OptionError(NO_FINAL_NORM)
        return self.layout.patch_grid(self.final_norms)


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
    adapter = adapter_for(model)
    state_layers = sorted({_check_layer(layer, len(adapter.blocks(model))) for layer in state_layers})
    input_size = tuple(pixels.shape[-2:])
    extra = 0 if test_time_register is None else 1
    with loaded.lock, adapter.input_resolution(model, input_size, antialias) as grid, \
            apply_test_time_register(model, test_time_register), \
            record(model, model.num_prefix_tokens + extra, state_layers, attention) as recorder:
        with torch.inference_mode(), _autocast(loaded.device, precision):
            features = model.forward_features(pixels.to(loaded.device))
            if recorder.reads_pool:
                adapter.run_pool(model, features)
        layout = TokenLayout.from_model(model, grid).with_test_time_registers(extra)
    return recorder.traces(layout, input_size)


def full_attention(
        loaded: LoadedModel,
        pixels: torch.Tensor,
        layer: int,
        antialias: bool = True,
        test_time_register: TestTimeRegister | None = None,
) -> tuple[np.ndarray, TokenLayout]:
    """Softmax attention of every query over every token in one block, for one image.

    The same exact recomputation from the model's own q and k as the prefix attention of
    ``capture``, for all queries: what each patch attends to and who attends to it.

    Args:
        loaded: The model.
        pixels: One normalised image (only the first of a batch is used).  # [batch, 3, height, width]
        layer: Block index (negative counts from the end).
        antialias: Antialias when resampling position embeddings to a new grid.
        test_time_register: Run with this extra register token.

    Returns:
        Attention weights  # [head, query, token]
        and the token layout of the pass.
    """
    model = loaded.model
    adapter = adapter_for(model)
    layer = _check_layer(layer, len(adapter.blocks(model)))
    found: list[torch.Tensor] = []
    handles: list[RemovableHandle] = []
    extra = 0 if test_time_register is None else 1
    with loaded.lock, adapter.input_resolution(model, tuple(pixels.shape[-2:]), antialias) as grid, \
            apply_test_time_register(model, test_time_register):
        try:
            _Recorder._attach_attention(adapter.attention_site(model, layer), None, found, handles)
            with torch.inference_mode():
                model.forward_features(pixels[:1].to(loaded.device))
        finally:
            for handle in handles:
                handle.remove()
        layout = TokenLayout.from_model(model, grid).with_test_time_registers(extra)
    return found[0][0].cpu().numpy(), layout


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


def input_resolution(model: torch.nn.Module, size: tuple[int, int], antialias: bool = True
                     ) -> contextlib.AbstractContextManager[tuple[int, int]]:
    """Temporarily set the model's input size; yields the patch grid (rows, cols) of that size.

    Position embeddings (and rotary embeddings) follow the new grid the way the model's family
    does it (``Adapter.input_resolution``); the model is restored afterwards, even on error.
    """
    return adapter_for(model).input_resolution(model, size, antialias)


Hook = Callable[..., None]


class _Recorder:
    """Hooks that collect per-block tensors on the model's device.

    ``attach`` registers them through the model's adapter: block outputs (residual stream),
    the final norm, the patch embedding, and (unless ``attention`` is off: norms only) for every
    attention the q and k it uses (plus the rotary embedding it is given), from which the prefix
    queries' softmax is recomputed, and the attention-pool head's.
    """

    def __init__(self, num_prefix: int, state_layers: Sequence[int], attention: bool = True) -> None:
        self.num_prefix = num_prefix
        self.state_layers = state_layers
        self.with_attention = attention
        self.reads_pool = False
        self.norms: list[torch.Tensor] = []  # per block: [batch, token]
        self.attention: list[torch.Tensor] = []  # per block: [batch, head, prefix, token]
        self.pool_attention: list[torch.Tensor] = []  # at most one: [batch, head, query, token]
        self.pool_key_offset = 0
        self.states: dict[int, torch.Tensor] = {}  # [batch, token, channel]
        self.final_norms: torch.Tensor | None = None  # [batch, token]
        self.patch_embeddings: torch.Tensor | None = None  # [batch, patch, channel]

    def attach(self, model: torch.nn.Module, adapter: Adapter, handles: list[RemovableHandle]) -> None:
        """Register every hook, appending each handle to ``handles`` as soon as it exists."""
        handles.append(model.patch_embed.register_forward_hook(self._on_patch_embed))
        final_norm = adapter.final_norm(model)
        if not isinstance(final_norm, torch.nn.Identity):  # Identity: no per-token final norm to record
            handles.append(final_norm.register_forward_hook(self._on_final_norm))
        for index, block in enumerate(adapter.blocks(model)):
            if self.with_attention:
                self._attach_attention(adapter.attention_site(model, index), self.num_prefix, self.attention, handles)
            handles.append(block.register_forward_hook(self._block_hook(index)))
        pool = adapter.pool_site(model) if self.with_attention else None
        if pool is not None:
            self.reads_pool = True
            self.pool_key_offset = adapter.pool_key_offset(model)
            self._attach_attention(pool, None, self.pool_attention, handles)

    def _on_patch_embed(self, module, args, output: torch.Tensor) -> None:
        self.patch_embeddings = output.flatten(1, -2) if output.ndim == 4 else output

    def _on_final_norm(self, module, args, output: torch.Tensor) -> None:
        self.final_norms = _norms(output)

    def _block_hook(self, index: int) -> Hook:
        def hook(module, args, output: torch.Tensor) -> None:
            self.norms.append(_norms(output))
            if index in self.state_layers:
                self.states[index] = output.half()
        return hook

    @staticmethod
    def _attach_attention(site: AttentionSite, num_queries: int | None, out: list[torch.Tensor],
                          handles: list[RemovableHandle]) -> None:
        """Recompute ``site``'s softmax for its first ``num_queries`` queries (all when None) into ``out``."""
        seen: dict[str, object] = {}

        def on_call(module, args, kwargs) -> None:
            seen["rope"] = kwargs.get("rope")  # timm's blocks pass it by name
            seen["dtype"] = _compute_dtype(args[0] if args else kwargs["x"])

        def on_q(module, args, q: torch.Tensor) -> None:
            seen["q"] = q if num_queries is None else q[:, :, :num_queries]  # [batch, head, query, dim]

        def on_k(module, args, k: torch.Tensor) -> None:
            out.append(site.attention(seen.pop("q"), k, seen.pop("rope", None), seen.pop("dtype")))

        handles.append(site.module.register_forward_pre_hook(on_call, with_kwargs=True))
        handles.append(site.q_norm.register_forward_hook(on_q))
        handles.append(site.k_norm.register_forward_hook(on_k))

    def _host_attention(self, shape: tuple[int, ...]) -> np.ndarray:
        """Recorded attention on the host, or an empty one (no heads) when not recorded."""
        if not self.with_attention:
            batch, layers, tokens = shape
            return np.zeros((batch, layers, 0, self.num_prefix, tokens), dtype=np.float32)
        return _to_host(torch.stack(self.attention, dim=1)).numpy()

    def traces(self, layout: TokenLayout, input_size: tuple[int, int]) -> list[Trace]:
        norms = torch.stack(self.norms, dim=1).cpu().numpy()  # [batch, layer, token]
        attention = self._host_attention(norms.shape)  # [batch, layer, head, prefix, token]
        pool = self._pool_over_all_tokens(layout.num_tokens)  # [batch, head, query, token] or None
        final_norms = None if self.final_norms is None else self.final_norms.cpu().numpy()
        similarity = neighbor_similarity(self.patch_embeddings, layout.grid).cpu().numpy()
        states = {layer: _to_host(tensor).numpy() for layer, tensor in self.states.items()}
        return [
            Trace(layout=layout, input_size=input_size, norms=norms[i], final_norms=None if final_norms is None else final_norms[i],
                  attention=attention[i], neighbor_similarity=similarity[i],
                  states={layer: values[i] for layer, values in states.items()},
                  pool_attention=None if pool is None else pool[i])
            for i in range(norms.shape[0])
        ]

    def _pool_over_all_tokens(self, num_tokens: int) -> np.ndarray | None:
        """The pool's attention with a zero for each token it does not see (the prefix, for some ViTs)."""
        if not self.pool_attention:
            return None
        seen = _to_host(self.pool_attention[0]).numpy()  # [batch, head, query, key]
        full = np.zeros((*seen.shape[:3], num_tokens), dtype=seen.dtype)
        full[..., self.pool_key_offset:] = seen
        return full


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an attention's projections produce from input ``x`` (autocast's, when it is on)."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


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
def record(model: torch.nn.Module, num_prefix: int, state_layers: Sequence[int] = (),
           attention: bool = True) -> Iterator[_Recorder]:
    """Attach recording hooks for the duration of the block; they are removed even on error.

    Args:
        model: Any model an adapter reads (``vitlens.adapters``).
        num_prefix: Leading tokens whose attention rows are recorded (the prefix queries).
        state_layers: Blocks whose output token vectors are kept.
        attention: Record attention too (off: norms only, no attention hooks).
    """
    recorder = _Recorder(num_prefix, state_layers, attention)
    handles: list[RemovableHandle] = []
    try:
        recorder.attach(model, adapter_for(model), handles)
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
