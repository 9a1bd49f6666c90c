"""Lean LoRA forward (models.adapters.lean_lora): PEFT's outputs and gradients, PEFT's own path otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import layer as lora_layer

from models.adapters import attach
from models.adapters.lean_lora import LeanLoraLinear, lean_lora_forward
from tests.test_adapters import perturb, unet_inputs
from tests.tiny_models import build_tiny_sd_pipeline


def _forward_backward(unet: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    out = unet(**inputs).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("options", [{}, {"rank": 2, "alpha": 3.0}])
def test_lean_layers_match_peft_outputs_and_gradients(options: dict) -> None:
    unet = build_tiny_sd_pipeline().unet
    unet.requires_grad_(False)
    handle = attach(unet, "lora", options, "vo")
    perturb(handle)  # B starts at zero; move it so the update term counts
    lean = copy.deepcopy(unet)
    count = sum(type(m) is lora_layer.Linear for m in unet.modules())
    assert count > 0 and lean_lora_forward(lean) == count
    assert all(isinstance(m, lora_layer.Linear) for m in lean.modules() if isinstance(m, LeanLoraLinear))
    inputs = unet_inputs(unet)
    (out, grads), (lean_out, lean_grads) = _forward_backward(unet, inputs), _forward_backward(lean, inputs)
    # the same sums in another order: fp32 rounding reaches 1.07e-6 on one torch thread (0.92e-6 on two)
    assert torch.allclose(out, lean_out, atol=1e-5, rtol=0)
    assert len(grads) == len(lean_grads) == 2 * count
    assert all(torch.allclose(g, h, atol=1e-6, rtol=1e-5) for g, h in zip(grads, lean_grads, strict=True))
    assert lean.state_dict().keys() == unet.state_dict().keys()


def test_lean_layer_defers_to_peft_when_disabled_merged_or_dropout() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, target_modules=["0"])
    model = inject_adapter_in_model(config, model, adapter_name="a")
    layer, base = model[0], model[0].base_layer
    torch.nn.init.normal_(layer.lora_B["a"].weight)
    assert lean_lora_forward(model) == 1 and type(layer) is LeanLoraLinear
    x = torch.randn(3, 6)
    expected_update = 2.0 * x @ layer.lora_A["a"].weight.T @ layer.lora_B["a"].weight.T
    layer.eval()  # dropout off: the plain case
    assert torch.allclose(layer(x), base(x) + expected_update, atol=1e-6)
    layer.train()  # dropout on: zeroed inputs change the update, not the base term
    torch.manual_seed(1)
    dropped = layer(x)
    assert not torch.allclose(dropped, base(x) + expected_update)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), base(x))
    layer.enable_adapters(True)
    layer.eval()
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), base(x), atol=1e-6)  # base now holds W + ΔW
    layer.unmerge()
    assert torch.allclose(layer(x), base(x) + expected_update, atol=1e-6)
