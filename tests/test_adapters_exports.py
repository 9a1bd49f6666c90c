"""Exports other tools load, checked by the readers themselves: the LyCORIS library (`lycoris-lora`) for every
family and format, diffusers' `load_lora_weights` on the toy world and a tiny SDXL, PEFT; key names and shapes
against the patterns ComfyUI and A1111 document (they cannot be installed here); kohya LoRA import."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from models.adapters import AdapterError, AdapterHandle, attach
from models.adapters.export import export_adapter
from models.adapters.exports import (
    export_diffusers_lora,
    export_kohya_lora,
    export_lycoris_lokr,
    export_peft,
    import_kohya_lora,
    read_export_report,
)
from models.adapters.family import AdapterFileError
from models.pipelines import load_pipeline
from tests.test_adapters import perturb, run, unet_inputs

PIPES = ("tiny_sd_pipe", "tiny_sdxl_pipe")


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generate(pipe, seed: int = 0) -> np.ndarray:
    """A seeded 2-step 32x32 image as a float array."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        "a photo of sks", num_inference_steps=2, height=32, width=32, output_type="np", generator=generator
    ).images


@pytest.mark.parametrize("pipe_name", PIPES)
def test_lora_exports_load_in_diffusers_and_match_atelier(pipe_name: str, request, tmp_path: Path) -> None:
    pipe = request.getfixturevalue(pipe_name)
    pipe.set_progress_bar_config(disable=True)
    fresh = load_pipeline(
        request.getfixturevalue(pipe_name.replace("_pipe", "_path")), device="cpu", dtype="fp32"
    )
    fresh.set_progress_bar_config(disable=True)
    handle = attach(pipe.unet, "lora", {"rank": 2, "alpha": 6.0}, "qkvo")
    perturb(handle)
    ours = generate(pipe)
    export_diffusers_lora(handle, tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
    export_kohya_lora(handle, tmp_path / "kohya.safetensors")
    handle.detach()
    base = generate(fresh)
    assert np.abs(ours - base).max() > 1e-3  # the adapter visibly changes the image

    fresh.load_lora_weights(str(tmp_path / "diffusers"), weight_name="pytorch_lora_weights.safetensors")
    np.testing.assert_allclose(generate(fresh), ours, atol=1e-4)

    kohya = load_file(tmp_path / "kohya.safetensors")
    name = "lora_unet_" + handle.targets[0].replace(".", "_")
    assert kohya[f"{name}.lora_down.weight"].shape[0] == 2 and float(kohya[f"{name}.alpha"]) == 2.0
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors")
    np.testing.assert_allclose(generate(pipe), ours, atol=1e-4)
    pipe.unload_lora_weights()

    imported = import_kohya_lora(tmp_path / "kohya.safetensors", pipe.unet)
    assert imported.family == "lora" and imported.targets == handle.targets
    weights = imported.layer_weights(pipe.unet)
    again = imported.attach(pipe.unet)
    np.testing.assert_allclose(generate(pipe), ours, atol=1e-4)
    for layer, weight in again.layer_weights().items():
        torch.testing.assert_close(weights[layer], weight)


def test_kohya_import_keeps_per_layer_rank_alpha_and_text_encoder(tiny_sd_pipe, tmp_path: Path) -> None:
    unet = tiny_sd_pipe.unet
    handle = attach(unet, "lora", {"rank": 2, "alpha": 2.0}, "vo")
    perturb(handle)
    expected = handle.layer_weights()
    export_kohya_lora(handle, tmp_path / "k.safetensors")
    handle.detach()
    tensors = load_file(tmp_path / "k.safetensors")
    first = "lora_unet_" + handle.targets[0].replace(".", "_")
    tensors[f"{first}.alpha"] = torch.tensor(1.0)  # alpha 1 at rank 4: a quarter of the update
    down, up = tensors[f"{first}.lora_down.weight"], tensors[f"{first}.lora_up.weight"]
    tensors[f"{first}.lora_down.weight"] = torch.cat([down, torch.zeros_like(down)])  # rank 4, same ΔW·(r/α)
    tensors[f"{first}.lora_up.weight"] = torch.cat([up, torch.zeros_like(up)], dim=1)
    conv = (
        "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 Conv2d in SD 1.x, as kohya LoRAs often touch
    )
    conv_down, conv_up = torch.randn(2, 32, 1, 1), torch.randn(32, 2, 1, 1)
    tensors |= {f"{conv}.lora_down.weight": conv_down, f"{conv}.lora_up.weight": conv_up}
    tensors[f"{conv}.alpha"] = torch.tensor(1.0)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    tensors |= {f"{te}.lora_down.weight": torch.ones(2, 32), f"{te}.lora_up.weight": torch.ones(32, 2)}
    tensors[f"{te}.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "edited.safetensors")

    imported = import_kohya_lora(tmp_path / "edited.safetensors", unet)
    assert imported.config.rank == 2 and imported.config.rank_pattern == {handle.targets[0]: 4}
    conv_name = "down_blocks.0.attentions.0.proj_in"
    assert imported.config.alpha_pattern == {handle.targets[0]: 1.0, conv_name: 1.0}
    assert any("text_model.encoder.layers.0" in key for key in imported.text_encoder_tensors)
    weights = imported.layer_weights(unet)
    base = unet.get_submodule(handle.targets[0]).weight
    torch.testing.assert_close(weights[handle.targets[0]] - base, (expected[handle.targets[0]] - base) / 4)
    for layer in handle.targets[1:]:
        torch.testing.assert_close(weights[layer], expected[layer])
    assert imported.targets[0] == conv_name and imported.layer_shapes[conv_name] == (32, 32, 1, 1)
    conv_delta = 0.5 * (conv_up.flatten(1) @ conv_down.flatten(1)).reshape(32, 32, 1, 1)
    torch.testing.assert_close(weights[conv_name], unet.get_submodule(conv_name).weight + conv_delta)
    inputs = unet_inputs(unet)
    attached = imported.attach(unet)
    adapted = run(unet, inputs)
    attached.merge()
    torch.testing.assert_close(run(unet, inputs), adapted, atol=1e-4, rtol=0)


def test_kohya_import_rejects_foreign_and_mismatched_files(
    tiny_sd_pipe, tiny_sdxl_pipe, tmp_path: Path
) -> None:
    save_file({"model.weight": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(AdapterFileError, match="foreign.safetensors"):
        import_kohya_lora(tmp_path / "foreign.safetensors", tiny_sd_pipe.unet)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        import_kohya_lora(tmp_path / "pickle.safetensors", tiny_sd_pipe.unet)
    handle = attach(tiny_sd_pipe.unet, "lora", None, "vo")
    export_kohya_lora(handle, tmp_path / "sd.safetensors")
    handle.detach()
    with pytest.raises(AdapterFileError):
        import_kohya_lora(tmp_path / "sd.safetensors", tiny_sdxl_pipe.unet)


def test_lycoris_lokr_export_is_kron_of_w1_w2(tiny_sd_pipe, tmp_path: Path) -> None:
    unet = tiny_sd_pipe.unet
    handle = attach(unet, "krona", {"a1": 8, "a2": 4, "scale": 0.5}, "vo")
    perturb(handle)
    weights = handle.layer_weights()
    export_lycoris_lokr(handle, tmp_path / "lokr.safetensors")
    tensors = load_file(tmp_path / "lokr.safetensors")
    assert len(tensors) == 3 * len(handle.targets)
    for name in handle.targets:
        key = "lora_unet_" + name.replace(".", "_")
        w1, w2 = tensors[f"{key}.lokr_w1"], tensors[f"{key}.lokr_w2"]
        assert w1.shape == (8, 4) and float(tensors[f"{key}.alpha"]) == 1.0
        base = unet.get_submodule(name).get_base_layer().weight
        torch.testing.assert_close(base + torch.kron(w1, w2), weights[name])
    with pytest.raises(AdapterError, match="no exact LoRA form"):
        export_kohya_lora(handle, tmp_path / "nope.safetensors")
    with pytest.raises(AdapterError, match="PEFT has no DiffuseKronA"):
        export_peft(handle, tmp_path / "peft")


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
@pytest.mark.parametrize("family", ["lora", "boft", "hra"])
def test_peft_export_loads_with_peft(family: str, tiny_sd_pipe, tmp_path: Path) -> None:
    unet = tiny_sd_pipe.unet
    base = copy.deepcopy(unet)
    inputs = unet_inputs(unet)
    handle = attach(unet, family, None, "vo")
    perturb(handle)
    expected = run(unet, inputs)
    folder = export_peft(handle, tmp_path / "peft")
    export_peft(handle, folder)  # overwriting an existing export works
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == family.upper()
    model = PeftModel.from_pretrained(base, str(folder))
    torch.testing.assert_close(run(model.base_model.model, inputs), expected, atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


# --- every family, checked by the readers ----------------------------------------------------------------

FAMILY_CONFIGS = {
    "lora": {"rank": 2, "alpha": 6.0},
    "hra": {"r": 4},
    "boft": {"block_num": 4},
    "krona": {"a1": 8, "a2": 4, "scale": 0.5},  # A (8, 4): not a layout LyCORIS infers -> .diff there
    "krona-square": {"a1": 4, "a2": 4, "scale": 0.5},  # A (4, 4), B (8+, 8+): LyCORIS rebuilds the LoKr
    "krona-mixed": {
        "a1": 8,
        "a2": 8,
        "scale": 0.5,
    },  # LoKr where B is 8x8 or larger, .diff where B is smaller
}
EXPORTS = [("kohya", None), ("lycoris", None), ("kohya", 4), ("lycoris", 4)]
_KEY = re.compile(
    r"^lora_unet_(?P<module>[a-z0-9_]+)\.(?P<part>lora_up\.weight|lora_down\.weight|alpha|lokr_w1|lokr_w2|diff)$"
)


def _trained(unet, key: str) -> AdapterHandle:
    handle = attach(unet, key.split("-")[0], FAMILY_CONFIGS[key], "vo")
    perturb(handle, seed=2)
    return handle


def _relative_error(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], base) -> float:
    lost = sum(float((weights[n] - expected[n]).double().square().sum()) for n in expected)
    total = sum(float((expected[n] - base[n]).double().square().sum()) for n in expected)
    return (lost / total) ** 0.5


def _lycoris_merged(base_unet, path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, set[str]]:
    """Load `path` with the LyCORIS library's own loader and merge it into a copy of `base_unet`."""
    from lycoris import wrapper

    # The file uses kohya names (`lora_unet_<module>`), as sd-scripts' `lycoris.kohya` network does; the
    # generic loader names modules `<LORA_PREFIX>_<module>`, so it is pointed at the same prefix.
    monkeypatch.setattr(wrapper.LycorisNetwork, "LORA_PREFIX", "lora_unet")
    unet = copy.deepcopy(base_unet)
    network, _ = wrapper.create_lycoris_from_weights(1.0, str(path), unet)
    network.merge_to(1.0)
    modules = {type(module).__name__ for module in network.loras}
    return {name: param.detach() for name, param in unet.named_parameters()}, modules


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
@pytest.mark.parametrize(("to", "rank"), EXPORTS, ids=[f"{t}-{r or 'exact'}" for t, r in EXPORTS])
@pytest.mark.parametrize("key", sorted(FAMILY_CONFIGS))
def test_every_family_loads_in_lycoris_and_merges_to_atelier_weights(
    key: str, to: str, rank: int | None, tiny_sd_pipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = tiny_sd_pipe.unet
    base_unet = copy.deepcopy(unet)
    handle = _trained(unet, key)
    expected = handle.layer_weights()
    base = {n: unet.get_submodule(n).get_base_layer().weight.detach() for n in handle.targets}
    result = export_adapter(handle, to, tmp_path / "export.safetensors", rank=rank)
    assert read_export_report(result.path) == result.report
    if key in ("krona", "krona-mixed") and to == "kohya" and rank is None:
        # The compact LoKr is for A1111/ComfyUI; the LyCORIS library re-infers the factor and refuses it
        # (the limitation --to lycoris works around).
        with pytest.raises(RuntimeError, match="size of tensor"):
            _lycoris_merged(base_unet, result.path, monkeypatch)
        return
    merged, modules = _lycoris_merged(base_unet, result.path, monkeypatch)
    weights = {n: merged[f"{n}.weight"] for n in handle.targets}
    untouched = [n for n, p in base_unet.named_parameters() if n.rsplit(".", 1)[0] not in handle.targets]
    assert all(torch.equal(merged[n], base_unet.get_parameter(n)) for n in untouched)
    error = _relative_error(weights, expected, base)
    if rank is None:
        assert result.report.exact
        assert error < 2e-6, error
        form = {"lora": "LoConModule", "hra": "LoConModule", "boft": "FullModule", "krona": "FullModule"}
        form |= {"krona-square": "LokrModule", "krona-mixed": "FullModule LokrModule"}
        assert sorted(modules) == form[key].split()
        if to == "lycoris" and key.startswith("krona"):
            assert (
                result.report.form
                == {"krona": "full", "krona-square": "lokr", "krona-mixed": "lokr+full"}[key]
            )
    else:
        assert not result.report.exact and result.report.rank == rank and modules == {"LoConModule"}
        assert error == pytest.approx(result.report.relative_error, abs=1e-5)
        for name, layer_error in result.report.layer_errors.items():
            one = _relative_error({name: weights[name]}, {name: expected[name]}, base)
            assert one == pytest.approx(layer_error, abs=1e-5)
        exactly_low_rank = key in ("lora", "hra")  # rank 2 / r = 4 reflections: rank 4 loses nothing
        assert (error < 1e-5) if exactly_low_rank else (0.01 < error < 1)


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
@pytest.mark.parametrize("key", sorted(FAMILY_CONFIGS))
def test_kohya_and_lycoris_files_follow_the_comfyui_and_a1111_key_patterns(
    key: str, tiny_sdxl_pipe, tmp_path: Path
) -> None:
    """ComfyUI (comfy/lora.py `load_lora`, `model_lora_keys_unet`: `lora_unet_<diffusers module, . -> _>` with
    `.lora_up.weight`/`.lora_down.weight`/`.alpha`, `.lokr_w1`/`.lokr_w2`, `.diff`) and A1111
    (extensions-builtin/Lora: network_lora.py, network_lokr.py, network_full.py; networks.py maps the same
    diffusers-named kohya keys) apply ΔW = up·down·alpha/rank, kron(w1, w2) (alpha unused for full factors) and
    diff. Checked on SDXL, whose diffusers names differ most from its original ones."""
    unet = tiny_sdxl_pipe.unet
    handle = _trained(unet, key)
    expected = handle.layer_weights()
    modules = {name.replace(".", "_"): name for name, _ in unet.named_modules()}
    for to, rank in EXPORTS:
        tensors = load_file(export_adapter(handle, to, tmp_path / f"{to}.safetensors", rank=rank).path)
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            match = _KEY.match(name)
            assert match, name
            layers.setdefault(modules[match["module"]], {})[match["part"]] = tensor
        assert sorted(layers) == sorted(handle.targets)
        for name, parts in layers.items():
            base = unet.get_submodule(name).get_base_layer().weight
            if "diff" in parts:
                delta = parts["diff"]
            elif "lokr_w1" in parts:
                delta = torch.kron(parts["lokr_w1"], parts["lokr_w2"])
            else:
                up, down = parts["lora_up.weight"], parts["lora_down.weight"]
                delta = up @ down * float(parts["alpha"]) / down.shape[0]
            assert delta.shape == base.shape
            if rank is None:
                torch.testing.assert_close(base + delta, expected[name], atol=2e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
@pytest.mark.parametrize("family", ["hra", "boft"])
def test_diffusers_loads_hra_exactly_and_boft_within_its_reported_error_on_the_toy_world(
    family: str, tmp_path: Path
) -> None:
    from models.toyworld.paths import TOYWORLD_PIPELINE

    if not (TOYWORLD_PIPELINE / "model_index.json").is_file():
        pytest.skip("toy-world assets not installed")
    pipe = load_pipeline(TOYWORLD_PIPELINE, device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    handle = attach(pipe.unet, family, FAMILY_CONFIGS[family], "vo")
    perturb(handle, seed=2)
    expected = handle.layer_weights()
    base = {n: pipe.unet.get_submodule(n).get_base_layer().weight.detach().clone() for n in handle.targets}
    ours = generate(pipe)
    rank = None if family == "hra" else 8
    result = export_adapter(handle, "diffusers", tmp_path / "lora.safetensors", rank=rank)
    handle.detach()
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    if family == "hra":
        np.testing.assert_allclose(generate(pipe), ours, atol=1e-4)
    pipe.fuse_lora()
    fused = {
        n: getattr(m := pipe.unet.get_submodule(n), "base_layer", m).weight.detach() for n in handle.targets
    }
    error = _relative_error(fused, expected, base)
    assert error == pytest.approx(result.report.relative_error, abs=1e-5)
    assert error < 1e-5 if family == "hra" else 0.01 < error < 1


@pytest.mark.parametrize("family", ["hra", "krona"])
def test_diffusers_loads_exports_on_tiny_sdxl(
    family: str, tiny_sdxl_pipe, tiny_sdxl_path: Path, tmp_path: Path
) -> None:
    pipe = tiny_sdxl_pipe
    pipe.set_progress_bar_config(disable=True)
    handle = attach(pipe.unet, family, FAMILY_CONFIGS[family], "qkvo")
    perturb(handle, seed=2)
    expected = handle.layer_weights()
    ours = generate(pipe)
    rank = None if family == "hra" else 64  # ≥ every layer's size: the extraction is lossless
    result = export_adapter(handle, "diffusers", tmp_path / "lora.safetensors", rank=rank)
    assert result.report.relative_error < 1e-5
    handle.detach()
    fresh = load_pipeline(tiny_sdxl_path, device="cpu", dtype="fp32")
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    np.testing.assert_allclose(generate(fresh), ours, atol=1e-4)
    fresh.fuse_lora()
    for name, weight in expected.items():
        module = fresh.unet.get_submodule(name)
        torch.testing.assert_close(getattr(module, "base_layer", module).weight, weight, atol=2e-6, rtol=0)
