"""Family-specific behaviour: target presets, DiffuseKronA math and counts, BOFT on CPU, HRA's regulariser,
config validation, adapter-file failure modes and the parameter report."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn

from models.adapters import FAMILIES, AdapterConfigError, AdapterError, attach, resolve_targets
from models.adapters.boft import BoftAdapterConfig, BoftUnavailableError
from models.adapters.files import AdapterFileError, load_adapter_file, save_adapter_file
from models.adapters.hra import orthogonality_loss
from models.adapters.krona import KronaConfig, KronaLinear, fit_factor
from models.adapters.report import parameter_report
from tests.test_adapters import perturb


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_unet(tiny_sd_path: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet").eval()


@pytest.fixture(scope="module")
def sdxl_unet(tiny_sdxl_path: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_sdxl_path / "unet").eval()


def test_presets_select_the_named_projections(sd_unet, sdxl_unet) -> None:
    vo = resolve_targets(sd_unet, "vo")
    # tiny SD: 4 transformer blocks (down 0, mid, up 1 x2) x 2 attentions x {to_v, to_out.0}
    assert len(vo) == 16 and all(n.endswith(("attn1.to_v", "attn2.to_v", "to_out.0")) for n in vo)
    assert len(resolve_targets(sd_unet, "qkvo")) == 32
    cross = resolve_targets(sd_unet, "cross-vo")
    assert len(cross) == 8 and all(".attn2." in n for n in cross)
    assert set(resolve_targets(sd_unet, "all-linear")) >= set(resolve_targets(sd_unet, "qkvo"))
    assert all(".ff." not in n for n in vo)
    # tiny SDXL: down 1 (2 blocks), mid (2), up 0 (2 attentions x 2 blocks) = 8 blocks
    assert len(resolve_targets(sdxl_unet, "vo")) == 32
    assert resolve_targets(sd_unet, ["attn2.to_k", "cross-vo"]) == [
        n
        for n in resolve_targets(sd_unet, "all-linear")
        if n.endswith(("attn2.to_k", "attn2.to_v", "attn2.to_out.0"))
    ]
    assert resolve_targets(sd_unet, "mid_block.*attn1.to_q") == [
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    ]
    with pytest.raises(AdapterConfigError, match="selects no nn.Linear"):
        resolve_targets(sd_unet, "to_banana")


def test_attach_refuses_a_second_adapter_and_bad_family(sd_unet) -> None:
    unet = copy.deepcopy(sd_unet)
    handle = attach(unet, "lora", None, "vo")
    with pytest.raises(AdapterConfigError, match="already has an adapter"):
        attach(unet, "hra", None, "vo")
    handle.detach()
    with pytest.raises(AdapterError, match="detached"):
        handle.state_dict()
    with pytest.raises(AdapterConfigError, match="unknown adapter family 'dora'"):
        attach(unet, "dora", None, "vo")
    with pytest.raises(AdapterConfigError, match="needs a LoraAdapterConfig"):
        attach(unet, "lora", KronaConfig(), "vo")


def test_krona_factor_rule() -> None:
    assert fit_factor(320, 64) == 64 and fit_factor(768, 8) == 8
    assert fit_factor(32, 64) == 32 and fit_factor(100, 8) == 5 and fit_factor(7, 4) == 1
    config = KronaConfig(factors={"to_v": [16, 4], "attn2.to_v": [8, 2]})
    assert config.factors_for("x.attn1.to_v", (320, 320)) == (16, 4)
    assert config.factors_for("x.attn2.to_v", (320, 768)) == (8, 2)
    assert config.factors_for("x.attn2.to_out.0", (320, 320)) == (64, 8)


def test_krona_forward_never_builds_delta_and_matches_kron() -> None:
    torch.manual_seed(0)
    base = nn.Linear(48, 40)
    for factors in [(8, 4), (40, 2), (2, 48), (5, 12)]:
        layer = KronaLinear(copy.deepcopy(base), "default", factors, scale=0.7)
        with torch.no_grad():
            layer.krona_B["default"].normal_()
        x = torch.randn(3, 5, 48)
        delta = 0.7 * torch.kron(layer.krona_A["default"], layer.krona_B["default"])
        torch.testing.assert_close(layer(x), base(x) + x @ delta.t(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.get_delta_weight("default"), delta)
    layer = KronaLinear(nn.Linear(64, 64), "default", (64, 8), 1.0)
    assert layer.krona_A["default"].std().item() == pytest.approx(1 / 64, rel=0.2)
    assert not layer.krona_B["default"].any()


def test_krona_parameter_count_matches_closed_form(sd_unet, sdxl_unet) -> None:
    for unet in (sd_unet, sdxl_unet):
        for config in (
            KronaConfig(),
            KronaConfig(a1=4, a2=2),
            KronaConfig(a1=16, a2=8, factors={"to_out.0": [2, 2]}),
        ):
            targets = resolve_targets(unet, "qkvo")
            expected = 0
            for name in targets:
                d_out, d_in = unet.get_submodule(name).weight.shape
                a1, a2 = config.factors_for(name, (d_out, d_in))
                assert d_out % a1 == 0 and d_in % a2 == 0
                expected += a1 * a2 + (d_out // a1) * (d_in // a2)
            report = parameter_report(unet, "krona", config, "qkvo")
            assert report["trainable_parameters"] == expected
            handle = attach(copy.deepcopy(unet), "krona", config, "qkvo")
            assert handle.num_parameters() == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_report_matches_attached_adapter_and_file_size(family: str, sd_unet, tmp_path: Path) -> None:
    unet = copy.deepcopy(sd_unet)
    report = parameter_report(unet, family, None, "qkvo")
    handle = attach(unet, family, None, "qkvo")
    assert report["trainable_parameters"] == handle.num_parameters()
    shapes = {k: list(v.shape) for k, v in handle.state_dict().items()}
    assert {
        f"{layer['name']}.{k}": v for layer in report["layers"] for k, v in layer["tensors"].items()
    } == shapes
    path = save_adapter_file(
        tmp_path / "a.safetensors",
        handle,
        unet=unet,
        base_model_id="tiny",
        trigger_phrase="sks",
        train_steps=0,
    )
    assert abs(report["file_bytes_estimate"] - path.stat().st_size) < 0.1 * path.stat().st_size


def test_boft_butterfly_factor_is_refused_without_the_cuda_extension(sd_unet) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine may have PEFT's fbd_cuda extension")
    unet = copy.deepcopy(sd_unet)
    with pytest.raises(BoftUnavailableError, match="butterfly_factor=2"):
        attach(unet, "boft", BoftAdapterConfig(block_num=4, butterfly_factor=2), "vo")
    assert not any("boft" in type(m).__name__.lower() for m in unet.modules())
    handle = attach(unet, "boft", BoftAdapterConfig(block_num=0, block_size=8), "vo")
    assert {tuple(p.shape) for k, p in handle.state_dict().items() if k.endswith("boft_R")} == {
        (1, 4, 8, 8),
        (1, 8, 8, 8),
    }


def test_boft_config_errors_name_the_problem(sd_unet) -> None:
    with pytest.raises(AdapterConfigError, match="exactly one of block_size / block_num"):
        BoftAdapterConfig(block_size=4, block_num=4)
    with pytest.raises(AdapterConfigError, match="does not divide the 32 inputs"):
        attach(copy.deepcopy(sd_unet), "boft", BoftAdapterConfig(block_num=0, block_size=5), "vo")


def test_hra_regularizer_is_the_orthogonality_penalty(sd_unet) -> None:
    u = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # columns e1 and (e1+e2)/√2: off-diagonal cosine 1/√2 twice -> ‖·‖_F = 1
    assert orthogonality_loss(u).item() == pytest.approx(1.0)
    assert orthogonality_loss(torch.eye(4)[:, :2] * 3).item() == pytest.approx(0.0)
    unet = copy.deepcopy(sd_unet)
    handle = attach(unet, "hra", {"r": 4, "ortho_lambda": 0.5}, "vo")
    perturb(handle)
    loss = handle.regularization_loss()
    expected = 0.5 * sum(orthogonality_loss(layer.hra_u["default"]) for layer in handle.layers.values())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.trainable_parameters())
    handle.detach()
    assert attach(unet, "hra", {"r": 4, "ortho_lambda": 0.0}, "vo").regularization_loss() is None
    with pytest.raises(AdapterConfigError, match="even"):
        attach(unet, "hra", {"r": 3}, "vo")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_round_trip_and_validation(family: str) -> None:
    spec = FAMILIES[family]
    config = spec.default_config()
    assert spec.config_cls.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(AdapterConfigError, match="unknown fields"):
        spec.config_cls.from_dict({**config.to_dict(), "banana": 1})
    with pytest.raises(AdapterConfigError, match="no target layers"):
        config.validate({})


@pytest.mark.parametrize(
    ("family", "bad", "message"),
    [
        ("lora", {"rank": 0}, "rank must be"),
        ("lora", {"dropout": 1.5}, "dropout"),
        ("lora", {"init": "pissa"}, "init must be"),
        ("lora", {"rank": 64}, "exceeds the size"),
        ("krona", {"a1": 0}, "a1 must be"),
        ("krona", {"factors": {"to_v": [4]}}, "two integers"),
        ("hra", {"r": 40}, "exceeds the 32 inputs"),
    ],
)
def test_bad_hyperparameters_fail_clearly(family: str, bad: dict, message: str, sd_unet) -> None:
    with pytest.raises(AdapterConfigError, match=message):
        attach(copy.deepcopy(sd_unet), family, bad, "vo")


def _saved(unet, tmp_path: Path, family: str = "lora") -> Path:
    handle = attach(unet, family, None, "vo")
    path = save_adapter_file(
        tmp_path / "a.safetensors",
        handle,
        unet=unet,
        base_model_id="tiny",
        trigger_phrase="sks",
        train_steps=1,
    )
    handle.detach()
    return path


def test_adapter_file_failure_modes(sd_unet, tmp_path: Path) -> None:
    unet = copy.deepcopy(sd_unet)
    path = _saved(unet, tmp_path)
    data = path.read_bytes()

    with pytest.raises(AdapterFileError, match="no adapter file"):
        load_adapter_file(tmp_path / "missing.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="truncated"):
        load_adapter_file(tmp_path / "cut.safetensors")
    (tmp_path / "noise.safetensors").write_bytes(b"\x80\x04\x95 a pickle, not safetensors")
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        load_adapter_file(tmp_path / "noise.safetensors")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, tmp_path / "kohya.safetensors")
    with pytest.raises(AdapterFileError, match="import_kohya_lora"):
        load_adapter_file(tmp_path / "kohya.safetensors")

    loaded = load_adapter_file(path)
    tensors = load_file(path)
    first = next(iter(tensors))
    save_file(
        {k: v for k, v in tensors.items() if k != first},
        tmp_path / "missing_key.safetensors",
        loaded.metadata,
    )
    with pytest.raises(AdapterFileError, match="1 missing"):
        load_adapter_file(tmp_path / "missing_key.safetensors")
    reshaped = {**tensors, first: torch.zeros(3, 3)}
    save_file(reshaped, tmp_path / "shape.safetensors", loaded.metadata)
    with pytest.raises(AdapterFileError, match="has shape"):
        load_adapter_file(tmp_path / "shape.safetensors")
    save_file(tensors, tmp_path / "family.safetensors", {**loaded.metadata, "family": "dora"})
    with pytest.raises(AdapterFileError, match="unknown adapter family"):
        load_adapter_file(tmp_path / "family.safetensors")
    handle = attach(unet, "lora")
    with pytest.raises(AdapterFileError, match=r"end in \.safetensors"):
        save_adapter_file(
            tmp_path / "a.pt", handle, unet=unet, base_model_id="", trigger_phrase="", train_steps=0
        )


def test_fingerprint_mismatch_with_matching_shapes_warns(sd_unet, tmp_path: Path) -> None:
    unet = copy.deepcopy(sd_unet)
    loaded = load_adapter_file(_saved(unet, tmp_path, "hra"))
    loaded.metadata["unet_fingerprint"] = "0123456789ab"
    with pytest.warns(UserWarning, match="0123456789ab"):
        loaded.check_compatible(unet)
    with pytest.raises(AdapterFileError, match="0123456789ab"):
        loaded.check_compatible(unet, strict=True)


def test_layer_weights_of_a_file_follow_the_unets_current_weights(sd_unet, tmp_path: Path) -> None:
    unet = copy.deepcopy(sd_unet)
    handle = attach(unet, "lora", None, "vo")
    perturb(handle)
    path = save_adapter_file(
        tmp_path / "a.safetensors",
        handle,
        unet=unet,
        base_model_id="tiny",
        trigger_phrase="sks",
        train_steps=1,
    )
    handle.detach()
    loaded = load_adapter_file(path)
    first = loaded.targets[0]
    before = loaded.layer_weights(unet)[first]
    with torch.no_grad():
        unet.get_submodule(first).weight.add_(1.0)
    torch.testing.assert_close(loaded.layer_weights(unet)[first], before + 1.0)
