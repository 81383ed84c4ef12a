"""Where each token sits in the sequence: [cls, registers..., patches row-major]."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from .adapters import adapter_for


@dataclass(frozen=True)
class TokenLayout:
    """Token order of one forward pass, read from the model rather than guessed.

    Attributes:
        num_cls: 1 when the model has a class token, else 0.
        num_registers: Register tokens after the class (and distillation) token.
        grid: Patch grid (rows, cols) of this input size.
        num_distill: 1 for DeiT's distillation token, right after the class token, else 0.
        num_test_time: Of the registers, how many were added at test time (the last ones;
            ``vitlens.interventions``), not trained.
    """

    num_cls: int
    num_registers: int
    grid: tuple[int, int]
    num_distill: int = 0
    num_test_time: int = 0

    @classmethod
    def from_model(cls, model: torch.nn.Module, grid: tuple[int, int]) -> TokenLayout:
        """The layout of ``model`` (any family ``vitlens.adapters`` reads) at patch grid ``grid``.

        Raises:
            ValueError: the prefix tokens found do not add up to the model's ``num_prefix_tokens``.
        """
        prefix = adapter_for(model).prefix(model)
        layout = cls(num_cls=prefix.num_cls, num_registers=prefix.num_registers,
                     grid=(int(grid[0]), int(grid[1])), num_distill=prefix.num_distill)
        if layout.num_prefix != model.num_prefix_tokens:
            raise ValueError(f"{type(model).__name__} has {model.num_prefix_tokens} prefix tokens, not "
                             f"{layout.num_cls} class + {layout.num_distill} distillation + {layout.num_registers} register tokens")
        return layout

    def with_test_time_registers(self, count: int) -> TokenLayout:
        """This layout with ``count`` more registers, added at test time after the trained ones."""
        if not count:
            return self
        return replace(self, num_registers=self.num_registers + count, num_test_time=self.num_test_time + count)

    @property
    def num_prefix(self) -> int:
        return self.num_cls + self.num_distill + self.num_registers

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
        return slice(self.num_cls + self.num_distill, self.num_prefix)

    @property
    def patches(self) -> slice:
        return slice(self.num_prefix, self.num_tokens)

    def prefix_names(self) -> list[str]:
        """Names of the prefix tokens in order: ``cls``, ``dist``, ``reg0``, ``reg1``, ..., then ``ttr0``, ... for
        test-time registers."""
        trained = self.num_registers - self.num_test_time
        return (["cls"] * self.num_cls + ["dist"] * self.num_distill + [f"reg{i}" for i in range(trained)]
                + [f"ttr{i}" for i in range(self.num_test_time)])

    def patch_grid(self, values: np.ndarray) -> np.ndarray:
        """Patch-token values ``[..., token]`` (all tokens) as ``[..., rows, cols]``."""
        if values.shape[-1] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens, got {values.shape[-1]}")
        return values[..., self.patches].reshape(*values.shape[:-1], *self.grid)
