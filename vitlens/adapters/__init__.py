"""One adapter per model family: how capture reads each kind of timm ViT exactly.

An adapter tells capture where q and k are as the attention uses them (after norms and
rotary embeddings), the prefix tokens and their order, the residual-stream blocks, the final
norm, the attention-pool head, how to run at another input size and how to read a timm-layout
checkpoint. Adding a family is one module here with its test. A model no adapter reads exactly
is refused with one sentence, never captured wrong.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .base import Adapter, AttentionSite, Prefix
from .eva import EvaAdapter
from .vit import RadioAdapter, VitAdapter

ADAPTERS: tuple[Adapter, ...] = (RadioAdapter(), VitAdapter(), EvaAdapter())  # most specific first

__all__ = ["ADAPTERS", "Adapter", "AttentionSite", "Prefix", "adapter_for", "check_model"]


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter of ``model``'s family.

    Raises:
        UnsupportedModelError: no adapter reads this kind of model.
    """
    found = next((adapter for adapter in ADAPTERS if adapter.matches(model)), None)
    if found is None:
        families = ", ".join(sorted({type_.__name__ for adapter in ADAPTERS for type_ in adapter.model_types}))
        raise UnsupportedModelError(f"it is a timm {type(model).__name__}, not a Vision Transformer vitlens reads "
                                    f"(timm {families}).")
    return found


def check_model(model: torch.nn.Module, name: str) -> Adapter:
    """The adapter of ``model`` once it has checked that every attention can be read exactly.

    Raises:
        UnsupportedModelError: one sentence naming ``name`` and what cannot be read.
    """
    try:
        adapter = adapter_for(model)
        adapter.check(model)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"'{name}' is not supported: {_lower_first(str(error))}") from error
    return adapter


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
