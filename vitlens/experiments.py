"""Experiments on the forward pass: what a test-time register costs, replacement ablations with
controls, massive activations, and where attention sinks.

- ``register_cost``: cosine between the token vectors with and without a test-time register,
  per block and after the final norm, for CLS and for the patches outside the outlier cells.
- ``ablate``: replace the registers' (or the outliers') states after one block by zero, their
  mean over the images given, Gaussian noise of the same norm, or the same kind of tokens of
  another image in the batch, and measure the cosine change of CLS and of every patch after the
  final norm. Zero-ablation is known to overstate what registers hold; the other three are the
  controls, so all four are computed the same way.
- ``massive_activations``: per block, the largest absolute residual-stream values (which token,
  which channel) against the median absolute value.
- ``attention_sinks``: per block and head, the attention every key token receives, averaged over
  *all* queries (full attention rows, computed only for the blocks asked for).

Every pass holds the model's lock and attaches its hooks only for its own duration.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .analysis.outliers import find_outliers
from .capture import input_resolution
from .errors import OptionError
from .interventions import TestTimeRegister, apply_test_time_register
from .layout import TokenLayout
from .models import LoadedModel

ABLATIONS = ("zero", "mean", "noise", "shuffle")
TARGETS = ("registers", "outliers")
Hook = tuple[torch.nn.Module, Callable]


def _hooked_pass(loaded: LoadedModel, pixels: torch.Tensor, hooks: Sequence[Hook], antialias: bool = True,
                 register: TestTimeRegister | None = None) -> TokenLayout:
    """Run one forward pass with forward hooks attached (removed afterwards); the token layout of that pass."""
    model = loaded.model
    with loaded.lock, input_resolution(model, tuple(pixels.shape[-2:]), antialias) as grid, \
            apply_test_time_register(model, register), _forward_hooks(hooks), torch.inference_mode():
        model.forward_features(pixels.to(loaded.device))
    return TokenLayout.from_model(model, grid).with_test_time_registers(0 if register is None else 1)


@contextlib.contextmanager
def _forward_hooks(hooks: Sequence[Hook]) -> Iterator[None]:
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _final_features(loaded: LoadedModel, pixels: torch.Tensor, extra: Sequence[Hook] = (), antialias: bool = True,
                    register: TestTimeRegister | None = None) -> tuple[torch.Tensor, TokenLayout]:
    """Token vectors after the final norm.  # [batch, token, channel]"""
    found: list[torch.Tensor] = []
    hooks = [*extra, (loaded.model.norm, lambda module, args, output: found.append(output))]
    layout = _hooked_pass(loaded, pixels, hooks, antialias, register)
    return found[0], layout


def _block_outputs(loaded: LoadedModel, pixels: torch.Tensor, antialias: bool = True,
                   register: TestTimeRegister | None = None) -> tuple[torch.Tensor, TokenLayout]:
    """Token vectors after every block, then after the final norm.  # [layer + 1, batch, token, channel]"""
    found: list[torch.Tensor] = []
    model = loaded.model

    def keep(module, args, output: torch.Tensor) -> None:
        found.append(output)

    hooks = [(block, keep) for block in model.blocks] + [(model.norm, keep)]
    layout = _hooked_pass(loaded, pixels, hooks, antialias, register)
    return torch.stack(found), layout


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Cosine similarity over the last axis, in float64 on the host."""
    return F.cosine_similarity(a.double(), b.double(), dim=-1).cpu().numpy()


@dataclass(frozen=True, eq=False)
class RegisterCost:
    """How much a test-time register changes the tokens it is not meant to change.

    Rows are the blocks, then the output of the final norm (``layer == num_layers``).

    Attributes:
        cls_cosine: Cosine of CLS with vs without the register.  # [layer + 1]
        patch_cosine: Mean cosine of the patches outside ``excluded``.  # [layer + 1]
        patch_cosine_min: Smallest such cosine.  # [layer + 1]
        excluded: Cells left out: outliers of the plain pass in any block.  # [row, col]
    """

    cls_cosine: np.ndarray
    patch_cosine: np.ndarray
    patch_cosine_min: np.ndarray
    excluded: np.ndarray


def register_cost(loaded: LoadedModel, pixels: torch.Tensor, register: TestTimeRegister,
                  threshold: float | None = None, antialias: bool = True) -> RegisterCost:
    """Compare one image's tokens with and without ``register`` (see ``RegisterCost``).

    Args:
        pixels: One normalised image.  # [1, 3, height, width]
        threshold: Outlier norm for ``excluded``; None: ``auto``.
    """
    plain, layout = _block_outputs(loaded, pixels[:1], antialias)
    treated, treated_layout = _block_outputs(loaded, pixels[:1], antialias, register)
    keep = [i for i in range(treated_layout.num_tokens) if i != treated_layout.num_prefix - 1]
    treated = treated[:, :, keep]  # the register's own token dropped: same layout as ``plain``
    norms = torch.linalg.vector_norm(plain[:-1, 0].float(), dim=-1).cpu().numpy()  # [layer, token]
    excluded = np.stack([find_outliers(grid, threshold).mask for grid in layout.patch_grid(norms)]).any(axis=0)
    patches = _cosine(plain[:, 0, layout.patches], treated[:, 0, layout.patches])[:, ~excluded.ravel()]  # [layer + 1, patch]
    cls = _cosine(plain[:, 0, 0], treated[:, 0, 0]) if layout.num_cls else np.full(len(plain), np.nan)
    return RegisterCost(cls_cosine=cls, patch_cosine=patches.mean(axis=1), patch_cosine_min=patches.min(axis=1),
                        excluded=excluded)


@dataclass(frozen=True, eq=False)
class AblationResult:
    """What replacing some tokens' states after block ``layer`` does to the final features.

    Attributes:
        mode: ``zero``, ``mean``, ``noise`` or ``shuffle``.
        target: ``registers`` or ``outliers``.
        layer: Block after which the states are replaced.
        patch_cosine: Cosine of each patch's final feature with vs without the replacement.  # [batch, row, col]
        cls_cosine: The same for CLS (NaN without a class token).  # [batch]
        replaced: Tokens replaced per image.  # [batch]
    """

    mode: str
    target: str
    layer: int
    patch_cosine: np.ndarray
    cls_cosine: np.ndarray
    replaced: np.ndarray


def ablate(loaded: LoadedModel, pixels: torch.Tensor, layer: int, target: str = "registers", mode: str = "zero",
           threshold: float | None = None, seed: int = 0, antialias: bool = True) -> AblationResult:
    """Replace the ``target`` tokens' states after block ``layer`` and measure the change (see module doc).

    Args:
        pixels: Normalised images; ``mean`` and ``shuffle`` draw on the other images.  # [batch, 3, height, width]
        threshold: Outlier norm at ``layer`` for ``target="outliers"``; None: ``auto``.
        seed: Seed of the ``noise`` directions.

    Raises:
        OptionError: an unknown mode or target, a layer out of range, no registers to replace, or
            fewer than 2 images for ``shuffle``.
    """
    _check_ablation(loaded, layer, target, mode, pixels.shape[0])
    block = loaded.model.blocks[layer]
    states: list[torch.Tensor] = []
    plain, layout = _final_features(loaded, pixels, [(block, lambda module, args, output: states.append(output))],
                                    antialias)
    masks = _target_masks(states[0], layout, target, threshold)  # [batch, token]
    if target == "registers" and not layout.num_registers:
        raise OptionError("This model has no registers to replace; choose the outliers.")
    replacement = replacement_states(states[0], masks, mode, seed, per_position=target == "registers")
    changed, _ = _final_features(loaded, pixels, [(block, lambda module, args, output: replacement)], antialias)
    patch = _cosine(plain[:, layout.patches], changed[:, layout.patches]).reshape(-1, *layout.grid)
    cls = _cosine(plain[:, 0], changed[:, 0]) if layout.num_cls else np.full(pixels.shape[0], np.nan)
    return AblationResult(mode=mode, target=target, layer=layer, patch_cosine=patch, cls_cosine=cls,
                          replaced=masks.sum(dim=1).cpu().numpy())


def _check_ablation(loaded: LoadedModel, layer: int, target: str, mode: str, batch: int) -> None:
    if mode not in ABLATIONS:
        raise OptionError(f"The replacement must be one of {', '.join(ABLATIONS)}, not '{mode}'.")
    if target not in TARGETS:
        raise OptionError(f"The replaced tokens must be one of {', '.join(TARGETS)}, not '{target}'.")
    if not 0 <= layer < len(loaded.model.blocks):
        raise OptionError(f"The ablation layer must be between 0 and {len(loaded.model.blocks) - 1}, not {layer}.")
    if mode in ("shuffle", "mean") and batch < 2:
        raise OptionError(f"The '{mode}' replacement needs at least 2 images.")


def _target_masks(states: torch.Tensor, layout: TokenLayout, target: str, threshold: float | None) -> torch.Tensor:
    """True at the tokens to replace.  # [batch, token]"""
    masks = torch.zeros(states.shape[:2], dtype=torch.bool, device=states.device)
    if target == "registers":
        masks[:, layout.registers] = True
        return masks
    norms = torch.linalg.vector_norm(states.float(), dim=-1).cpu().numpy()  # [batch, token]
    for image, grid in enumerate(layout.patch_grid(norms)):
        cells = torch.as_tensor(np.flatnonzero(find_outliers(grid, threshold).mask.ravel()) + layout.num_prefix)
        masks[image, cells.to(states.device)] = True
    return masks


def replacement_states(states: torch.Tensor, masks: torch.Tensor, mode: str, seed: int = 0,
                       per_position: bool = False) -> torch.Tensor:
    """``states`` with the masked tokens replaced.  # [batch, token, channel]

    - ``zero``: zeros.
    - ``mean``: the mean of the masked tokens of all images, one vector; with ``per_position``
      (registers: the same positions in every image) the mean over images of each position.
    - ``noise``: a Gaussian direction (seeded) scaled to each token's own norm.
    - ``shuffle``: the masked tokens of the next image (cyclically), in order; an image with more
      masked tokens than the next one reuses them cyclically.
    """
    out = states.clone()
    if mode == "zero":
        out[masks] = 0
    elif mode == "mean":
        mean = states.mean(dim=0, keepdim=True) if per_position else states[masks].mean(dim=0)
        out[masks] = mean.expand_as(states)[masks]
    elif mode == "noise":
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(states.shape, generator=generator, dtype=torch.float64).to(states.device, states.dtype)
        scale = torch.linalg.vector_norm(states, dim=-1, keepdim=True) / torch.linalg.vector_norm(noise, dim=-1, keepdim=True)
        out[masks] = (noise * scale)[masks]
    else:
        for image in range(states.shape[0]):
            donor = states[(image + 1) % states.shape[0]][masks[(image + 1) % states.shape[0]]]  # [k', channel]
            wanted = int(masks[image].sum())
            if wanted and not len(donor):
                raise OptionError("The 'shuffle' replacement needs the same kind of tokens in the next image, which has none.")
            if wanted:
                out[image][masks[image]] = donor[torch.arange(wanted, device=donor.device) % len(donor)]
    return out


@dataclass(frozen=True, eq=False)
class MassiveActivations:
    """The largest absolute residual-stream values of each block.

    Attributes:
        values: Top absolute values, largest first.  # [layer, k]
        tokens: Their token index (model order).  # [layer, k]
        channels: Their channel.  # [layer, k]
        median: Median absolute value over all tokens and channels.  # [layer]
        layout: Token order of the pass.
    """

    values: np.ndarray
    tokens: np.ndarray
    channels: np.ndarray
    median: np.ndarray
    layout: TokenLayout

    @property
    def ratio(self) -> np.ndarray:
        """Largest value / median, per block.  # [layer]"""
        return self.values[:, 0] / np.maximum(self.median, 1e-12)


def massive_activations(loaded: LoadedModel, pixels: torch.Tensor, k: int = 5, antialias: bool = True,
                        register: TestTimeRegister | None = None) -> MassiveActivations:
    """Top-``k`` absolute activations per block of one image, reduced as each block finishes.

    Args:
        pixels: One normalised image.  # [1, 3, height, width]
    """
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def reduce(module, args, output: torch.Tensor) -> None:
        flat = output[0].float().abs()  # [token, channel]
        top = flat.flatten().topk(k)
        rows.append((top.values, top.indices, flat.median()))

    hooks = [(block, reduce) for block in loaded.model.blocks]
    layout = _hooked_pass(loaded, pixels[:1], hooks, antialias, register)
    channels = loaded.model.embed_dim
    indices = torch.stack([row[1] for row in rows]).cpu().numpy()
    return MassiveActivations(values=torch.stack([row[0] for row in rows]).cpu().numpy(),
                              tokens=indices // channels, channels=indices % channels,
                              median=torch.stack([row[2] for row in rows]).cpu().numpy(), layout=layout)


@dataclass(frozen=True, eq=False)
class AttentionSinks:
    """Attention each key token receives, averaged over all queries.

    Attributes:
        layers: The blocks computed.
        received: Per block and head; sums to 1 over tokens.  # [layer, head, token]
        outliers: Outlier cells of each of those blocks (norms of the same pass).  # [layer, row, col]
        layout: Token order of the pass.
    """

    layers: tuple[int, ...]
    received: np.ndarray
    outliers: np.ndarray
    layout: TokenLayout

    def masses(self) -> dict[str, np.ndarray]:
        """Attention mass received by ``cls``, ``registers`` (trained), ``test-time register``,
        ``outliers`` and the other ``patches``.  # {group: [layer, head]}"""
        layout = self.layout
        prefix = self.received[:, :, :layout.num_prefix]
        patches = self.received[:, :, layout.patches]  # [layer, head, patch]
        outlier = self.outliers.reshape(len(self.layers), 1, -1)  # [layer, 1, patch]
        trained = slice(layout.registers.start, layout.registers.stop - layout.num_test_time)
        groups = {
            "cls": prefix[:, :, :layout.num_cls].sum(-1),
            "registers": prefix[:, :, trained].sum(-1),
            "test-time register": prefix[:, :, layout.registers.stop - layout.num_test_time:layout.registers.stop].sum(-1),
            "outliers": (patches * outlier).sum(-1),
            "patches": (patches * ~outlier).sum(-1),
        }
        return groups


def attention_sinks(loaded: LoadedModel, pixels: torch.Tensor, layers: Sequence[int] | None = None,
                    threshold: float | None = None, antialias: bool = True,
                    register: TestTimeRegister | None = None) -> AttentionSinks:
    """Full attention rows of the chosen blocks of one image, reduced to what each key receives.

    Args:
        pixels: One normalised image.  # [1, 3, height, width]
        layers: Blocks to compute (default: all); each costs [head, token, token] while it runs.
        threshold: Outlier norm; None: ``auto``.
        register: Run with a test-time register.

    Raises:
        OptionError: a layer out of range.
    """
    model = loaded.model
    layers = tuple(range(len(model.blocks))) if layers is None else tuple(sorted(set(layers)))
    if any(not 0 <= layer < len(model.blocks) for layer in layers):
        raise OptionError(f"Sink layers must be between 0 and {len(model.blocks) - 1}.")
    received: dict[int, torch.Tensor] = {}
    norms: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        block = model.blocks[layer]
        hooks.append((block.attn.qkv, _received_hook(block.attn, received, layer)))
        hooks.append((block, lambda module, args, output, layer=layer: norms.__setitem__(
            layer, torch.linalg.vector_norm(output[0].float(), dim=-1))))
    layout = _hooked_pass(loaded, pixels[:1], hooks, antialias, register)
    grids = layout.patch_grid(torch.stack([norms[layer] for layer in layers]).cpu().numpy())  # [layer, row, col]
    return AttentionSinks(layers=layers, received=torch.stack([received[layer] for layer in layers]).cpu().numpy(),
                          outliers=np.stack([find_outliers(grid, threshold).mask for grid in grids]), layout=layout)


def _received_hook(attn: torch.nn.Module, received: dict[int, torch.Tensor], layer: int) -> Callable:
    def hook(module, args, qkv: torch.Tensor) -> None:
        tokens = qkv.shape[1]
        q, k, _ = qkv[:1].reshape(1, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # each [1, head, token, dim]
        q, k = attn.q_norm(q), attn.k_norm(k)
        weights = ((q.float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # [1, head, query, key]
        received[layer] = weights[0].mean(dim=1)  # [head, key]
    return hook
