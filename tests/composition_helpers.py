"""Test helpers for the composition tests: adapter sources built in code (no adapter files needed)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


class FakeAdapter:
    """An adapter source with seeded per-layer weights W + scale·noise on the chosen layers."""

    family = "lora"

    def __init__(
        self,
        seed: int,
        trigger_phrase: str | None = None,
        suffixes: tuple[str, ...] = ("to_v", "to_out.0"),
        scale: float = 0.05,
        compatible: bool = True,
    ) -> None:
        self.seed, self.trigger_phrase, self.suffixes, self.scale = seed, trigger_phrase, suffixes, scale
        self.compatible = compatible
        self.metadata: Mapping[str, str] = {"name": f"fake{seed}"}

    def check_compatible(self, unet: nn.Module) -> None:
        if not self.compatible:
            raise ValueError("trained for base model 'other' (fingerprint 000000000000), not this one")

    def layer_weights(self, unet: nn.Module) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return {
            name: module.weight.detach() + self.scale * torch.randn(module.weight.shape, generator=generator)
            for name, module in unet.named_modules()
            if isinstance(module, nn.Linear) and name.endswith(self.suffixes)
        }


def unet_state(unet: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every UNet parameter."""
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with `count` torch CPU threads, then restore the previous setting.

    The composition tests run hundreds of tiny UNet calls; on a loaded 2-core machine two threads per call
    oversubscribe the cores and run 10-40x slower than one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
