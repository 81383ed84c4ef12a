"""Test-time registers (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers").

A few "register neurons" in middle-layer MLPs write the high-norm outlier tokens. A test-time
register is one extra token that takes those neurons' activations over, so that the patches no
longer become outliers, without retraining:

1. After the position embeddings the extra token is inserted behind the trained registers and
   before the patches (order: [cls, trained registers, test-time register, patches]). It
   starts as zeros (``init="zeros"``, the authors' DINOv2 code) or as the mean of the patch
   tokens (``init="patch-mean"``, their OpenCLIP code); it gets no position embedding.
2. At each register neuron (a hidden unit of a block's MLP, read at the input of ``mlp.fc2``,
   i.e. after the activation) the extra token gets the neuron's largest activation over all
   tokens of the image, and the patches get zero (``patch_values="zero"``, the authors'
   default) or the mean of their lower 75% of activations of that neuron (``"low-mean"``).
   The class token and trained registers keep their activations.

Both steps are forward hooks, attached for the duration of a ``with`` block and removed in
``finally``; the model's weights are never changed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

import torch
from timm.models.vision_transformer import VisionTransformer

from .errors import OptionError

REGISTER_INITS = ("zeros", "patch-mean")
PATCH_VALUES = ("zero", "low-mean")
LOW_FRACTION = 0.75  # "low-mean": mean of the lower 75% of the patches' activations (authors' bottom_frac)


@dataclass(frozen=True)
class TestTimeRegister:
    """One extra register token that takes over the activations of ``neurons``.

    Attributes:
        neurons: (block, neuron) pairs; a neuron indexes the input of that block's ``mlp.fc2``.
        init: How the token starts: ``zeros`` or ``patch-mean``.
        patch_values: What the patches' activations of those neurons become: ``zero`` or ``low-mean``.
    """

    __test__ = False  # not a pytest test class despite the name

    neurons: tuple[tuple[int, int], ...]
    init: str = "zeros"
    patch_values: str = "zero"

    def __post_init__(self) -> None:
        if self.init not in REGISTER_INITS:
            raise OptionError(f"The test-time register starts as one of {', '.join(REGISTER_INITS)}, not '{self.init}'.")
        if self.patch_values not in PATCH_VALUES:
            raise OptionError(f"Patch activations become one of {', '.join(PATCH_VALUES)}, not '{self.patch_values}'.")
        if not self.neurons:
            raise OptionError("A test-time register needs at least one register neuron.")

    def key(self) -> str:
        """Short digest of everything that changes the forward pass (part of cache keys)."""
        text = json.dumps([sorted(self.neurons), self.init, self.patch_values])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def by_layer(self) -> dict[int, list[int]]:
        """Neuron indices per block, sorted."""
        layers: dict[int, list[int]] = {}
        for layer, neuron in sorted(set(self.neurons)):
            layers.setdefault(layer, []).append(neuron)
        return layers


def check_register(model: VisionTransformer, register: TestTimeRegister) -> None:
    """Refuse neurons the model does not have.

    Raises:
        OptionError: a model other than a timm VisionTransformer (an Eva's rotary embedding would
            treat the inserted token as a patch), a block or neuron index out of range, or a
            block without a linear ``mlp.fc2``.
    """
    if not isinstance(model, VisionTransformer):
        raise OptionError(f"A test-time register is inserted only into timm VisionTransformer models, and this is a timm "
                          f"{type(model).__name__}.")
    for layer, neurons in register.by_layer().items():
        if not 0 <= layer < len(model.blocks):
            raise OptionError(f"Register neuron block {layer} is out of range: the model has {len(model.blocks)} blocks.")
        width = fc2_of(model, layer).in_features
        bad = [neuron for neuron in neurons if not 0 <= neuron < width]
        if bad:
            raise OptionError(f"Register neuron {bad[0]} of block {layer} is out of range: that MLP has {width} neurons.")


def fc2_of(model: VisionTransformer, layer: int) -> torch.nn.Linear:
    """The output projection of block ``layer``'s MLP, whose inputs are the neurons.

    Raises:
        OptionError: the block has no linear ``mlp.fc2``.
    """
    fc2 = getattr(getattr(model.blocks[layer], "mlp", None), "fc2", None)
    if not isinstance(fc2, torch.nn.Linear):
        raise OptionError(f"Block {layer} has no linear mlp.fc2 whose input neurons could be read.")
    return fc2


@contextlib.contextmanager
def apply_test_time_register(model: VisionTransformer, register: TestTimeRegister | None) -> Iterator[None]:
    """Run ``model`` with a test-time register inside the block (no-op for None).

    Raises:
        OptionError: see ``check_register``.
    """
    if register is None:
        yield
        return
    check_register(model, register)
    position = model.num_prefix_tokens  # the new token's index: after cls and trained registers
    handles = []
    try:
        handles.append(model.patch_drop.register_forward_hook(_insert_hook(position, register.init)))
        for layer, neurons in register.by_layer().items():
            hook = _takeover_hook(position, neurons, register.patch_values)
            handles.append(fc2_of(model, layer).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _insert_hook(position: int, init: str):
    def hook(module, args, tokens: torch.Tensor) -> torch.Tensor:  # [batch, token, channel]
        patches = tokens[:, position:]
        if init == "zeros":
            extra = torch.zeros_like(tokens[:, :1])
        else:
            extra = patches.mean(dim=1, keepdim=True)  # [batch, 1, channel]
        return torch.cat([tokens[:, :position], extra, patches], dim=1)
    return hook


def _takeover_hook(position: int, neurons: list[int], patch_values: str):
    index = torch.tensor(neurons)

    def hook(module, args: tuple[torch.Tensor, ...]) -> None:
        hidden = args[0]  # [batch, token, neuron]; a fresh activation tensor, changed in place
        columns = index.to(hidden.device)
        acts = hidden[:, :, columns]  # [batch, token, k] (a copy)
        patch_acts = acts[:, position + 1:]
        hidden[:, position, columns] = acts.amax(dim=1)
        hidden[:, position + 1:, columns] = _patch_replacement(patch_acts, patch_values)
    return hook


def _patch_replacement(patch_acts: torch.Tensor, patch_values: str) -> torch.Tensor:
    """What the patches' activations become.  # [batch, 1, k] (broadcast over patches)"""
    if patch_values == "zero":
        return torch.zeros_like(patch_acts[:, :1])
    cutoff = max(1, int(LOW_FRACTION * patch_acts.shape[1]))
    low = patch_acts.sort(dim=1).values[:, :cutoff]
    return low.mean(dim=1, keepdim=True)
