"""Where each token sits in the sequence: [cls, registers..., patches row-major]."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from timm.models.vision_transformer import VisionTransformer


@dataclass(frozen=True)
class TokenLayout:
    """Token order of one forward pass, read from the model rather than guessed.

    Attributes:
        num_cls: 1 when the model has a class token, else 0.
        num_registers: Register tokens right after the class token.
        grid: Patch grid (rows, cols) of this input size.
    """

    num_cls: int
    num_registers: int
    grid: tuple[int, int]

    @classmethod
    def from_model(cls, model: VisionTransformer, grid: tuple[int, int]) -> TokenLayout:
        num_cls = 1 if getattr(model, "cls_token", None) is not None else 0
        num_registers = int(getattr(model, "num_reg_tokens", 0))
        if num_cls + num_registers != model.num_prefix_tokens:
            raise ValueError(f"{type(model).__name__} has {model.num_prefix_tokens} prefix tokens, "
                             f"not {num_cls} class + {num_registers} register tokens")
        return cls(num_cls=num_cls, num_registers=num_registers, grid=(int(grid[0]), int(grid[1])))

    @property
    def num_prefix(self) -> int:
        return self.num_cls + self.num_registers

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def cls_index(self) -> int | None:
        return 0 if self.num_cls else None

    @property
    def registers(self) -> slice:
        return slice(self.num_cls, self.num_prefix)

    @property
    def patches(self) -> slice:
        return slice(self.num_prefix, self.num_tokens)

    def prefix_names(self) -> list[str]:
        """Names of the prefix tokens in order: ``cls``, ``reg0``, ``reg1``, ..."""
        return ["cls"] * self.num_cls + [f"reg{i}" for i in range(self.num_registers)]

    def patch_grid(self, values: np.ndarray) -> np.ndarray:
        """Patch-token values ``[..., token]`` (all tokens) as ``[..., rows, cols]``."""
        if values.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens, got {values.shape[-1]}")
        return values[..., self.patches].reshape(*values.shape[:-1], *self.grid)
