"""Lean LoRA forward: PEFT's LoRA `Linear` layer without its per-call bookkeeping, for training.

LoRA (Hu et al., 2021): y = W x + b + (alpha / rank) · B A x. No new method: a speed fix, like
`models.attention_calls`. PEFT's `lora.Linear.forward` handles many cases on every call (mixed adapter
batches, merged weights, disabled adapters, several active adapters, DoRA and other variants, input dtype
casts) and calls four submodules (base layer, dropout, A, B) through `nn.Module.__call__`, then scales and adds
in two autograd nodes. On the toy world's UNet at batch 1 that bookkeeping is a visible share of a training
step: the UNet forward and backward took 31.3 ms with PEFT's forward and 29.5 ms with this one (`vo`, 28 LoRA
layers, 1 thread, best of 5 rounds of 20 steps; `docs/benchmarks.md`).

`lean_lora_forward(module)` switches every plain PEFT LoRA `Linear` inside `module` (an `nn.Linear` base layer,
no bias on B) to `LeanLoraLinear`, a subclass whose forward computes the same sum with three `F.linear`
calls and one `torch.add(..., alpha=scaling)` when exactly one adapter is active, it is not merged, it has no
variant (DoRA) and the input already has the adapter's dtype; in every other case it runs PEFT's own forward.
Parameters, state dicts, PEFT's `isinstance` checks, merging and saving are untouched: the layer is still a
PEFT `lora.Linear`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from torch import nn


class LeanLoraLinear(lora_layer.Linear):
    """PEFT's LoRA `Linear`, computing W x + b + scaling · B A dropout(x) directly in the plain case."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return super().forward(x, *args, **kwargs)
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant:
            return super().forward(x, *args, **kwargs)
        lora_a = self.lora_A[name]
        if x.dtype != lora_a.weight.dtype:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dropout = self.lora_dropout[name]
        lora_in = x if isinstance(dropout, nn.Identity) else dropout(x)
        update = F.linear(F.linear(lora_in, lora_a.weight), self.lora_B[name].weight)
        return torch.add(F.linear(x, base.weight, base.bias), update, alpha=self.scaling[name])


def _plain(layer: lora_layer.Linear) -> bool:
    """A LoRA layer whose plain case `LeanLoraLinear` computes exactly (nn.Linear base, bias-free B)."""
    return type(layer.base_layer) is nn.Linear and all(b.bias is None for b in layer.lora_B.values())


def lean_lora_forward(module: nn.Module) -> int:
    """Switch every plain PEFT LoRA `Linear` in `module` to `LeanLoraLinear`; returns how many."""
    switched = 0
    for layer in module.modules():
        if type(layer) is lora_layer.Linear and _plain(layer):
            layer.__class__ = LeanLoraLinear
            switched += 1
    return switched
