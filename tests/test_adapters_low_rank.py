"""ΔW per family and its low-rank forms: HRA is exactly a rank-r LoRA (the WY form), SVD extraction reports
the error it actually makes, and every family's ΔW is what Atelier's own adapted weights say."""

from __future__ import annotations

import pytest
import torch

from models.adapters import AdapterError, attach
from models.adapters.low_rank import delta_weights, exact_lora, extract_lora, householder_wy, svd_lora
from tests.test_adapters import perturb

CONFIGS = {
    "lora": {"rank": 2, "alpha": 6.0},
    "krona": {"a1": 8, "a2": 4, "scale": 0.5},
    "boft": None,
    "hra": None,
}


def test_householder_wy_reproduces_the_product_of_reflections() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(12, 5, generator=g, dtype=torch.float64)
    product = torch.eye(12, dtype=torch.float64)
    for i in range(5):  # PEFT's order: weight = weight @ (I - 2 û ûᵀ) for i = 0..r-1
        unit = u[:, i : i + 1] / u[:, i].norm()
        product = product @ (torch.eye(12, dtype=torch.float64) - 2 * unit @ unit.t())
    y, t = householder_wy(u)
    torch.testing.assert_close(torch.eye(12, dtype=torch.float64) - y @ t @ y.t(), product)
    assert torch.linalg.matrix_rank(product - torch.eye(12, dtype=torch.float64)) <= 5
    assert torch.equal(t, torch.triu(t))


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("preset", ["vo", "all-linear"])
def test_hra_is_exactly_a_rank_r_lora(apply_gs: bool, preset: str, tiny_sd_pipe) -> None:
    unet = tiny_sd_pipe.unet
    handle = attach(unet, "hra", {"r": 4, "apply_gs": apply_gs}, preset)
    perturb(handle, seed=3)
    adapted = handle.layer_weights()
    factors = exact_lora(handle)
    assert set(factors) == set(handle.targets)
    worst = 0.0
    for name, (down, up) in factors.items():
        base = unet.get_submodule(name).get_base_layer().weight
        assert down.shape == (4, base.shape[1]) and up.shape == (base.shape[0], 4)
        torch.testing.assert_close(base + up @ down, adapted[name], atol=2e-6, rtol=0)
        worst = max(worst, float((adapted[name] - base).abs().max()))
    assert worst > 1e-2  # the reflections really changed the weights


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_delta_weights_are_atelier_adapted_minus_base(family: str, tiny_sd_pipe) -> None:
    unet = tiny_sd_pipe.unet
    handle = attach(unet, family, CONFIGS[family], "vo")
    perturb(handle)
    adapted = handle.layer_weights()
    deltas = delta_weights(handle)
    for name in handle.targets:
        base = unet.get_submodule(name).get_base_layer().weight
        torch.testing.assert_close(base + deltas[name], adapted[name], atol=2e-6, rtol=0)


def test_svd_extraction_error_is_the_frobenius_error_and_falls_with_rank() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 16, generator=g) @ torch.diag(torch.linspace(1, 0.05, 16))
    errors = []
    for rank in (1, 4, 8, 16, 40):
        down, up, error = svd_lora(delta, rank)
        assert down.shape == (min(rank, 16), 16) and up.shape == (24, min(rank, 16))
        measured = float((delta - up @ down).norm() / delta.norm())
        assert error == pytest.approx(measured, abs=1e-5)
        errors.append(error)
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.3 and errors[-1] < 1e-6
    exact_rank_2 = torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g)
    assert svd_lora(exact_rank_2, 2)[2] < 1e-6
    conv = exact_rank_2.reshape(24, 16, 1, 1)  # a 1x1 convolution's ΔW gets kohya's conv LoRA shapes
    down, up, error = svd_lora(conv, 2)
    assert down.shape == (2, 16, 1, 1) and up.shape == (24, 2, 1, 1) and error < 1e-6
    torch.testing.assert_close((up.flatten(1) @ down.flatten(1)).reshape(conv.shape), conv, atol=1e-5, rtol=0)


def test_overall_error_weighs_layers_by_their_norm() -> None:
    g = torch.Generator().manual_seed(1)
    big, small = 10 * torch.randn(8, 8, generator=g), 0.1 * torch.randn(8, 8, generator=g)
    extraction = extract_lora({"big": big, "small": small}, 2)
    lost = sum(
        float((d - up @ down).square().sum())
        for d, (down, up) in zip((big, small), extraction.factors.values(), strict=True)
    )
    total = float(big.square().sum() + small.square().sum())
    assert extraction.relative_error == pytest.approx((lost / total) ** 0.5, rel=1e-5)
    assert extraction.relative_error == pytest.approx(extraction.layer_errors["big"], abs=1e-3)
    with pytest.raises(AdapterError, match="rank"):
        extract_lora({"big": big}, 0)


def test_boft_and_krona_have_no_exact_lora_and_hra_needs_its_base(tiny_sd_pipe, tmp_path) -> None:
    from models.adapters.files import load_adapter_file, save_adapter_file

    unet = tiny_sd_pipe.unet
    handle = attach(unet, "krona", CONFIGS["krona"], "vo")
    with pytest.raises(AdapterError, match="no exact LoRA form"):
        exact_lora(handle)
    handle.detach()
    handle = attach(unet, "hra", None, "vo")
    perturb(handle)
    path = save_adapter_file(
        tmp_path / "h.safetensors", handle, unet=unet, base_model_id="tiny", trigger_phrase="", train_steps=1
    )
    expected = delta_weights(handle)
    handle.detach()
    adapter = load_adapter_file(path)
    with pytest.raises(AdapterError, match="base model"):
        delta_weights(adapter)
    for name, delta in delta_weights(adapter, unet).items():
        torch.testing.assert_close(delta, expected[name])
