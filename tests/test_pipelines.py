"""Base-model loading (models.pipelines), device/dtype choice and the offline CLIP tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from models import device as device_mod
from models import pipelines
from models.clip_compat import clip
from models.pipelines import ModelLoadError, architecture, load_pipeline, unet_fingerprint


def _generate(pipe, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        "a red circle on a white background", num_inference_steps=2, generator=generator, output_type="np"
    )


def test_loads_tiny_sd_folder_and_generates(tiny_sd_path: Path) -> None:
    pipe = load_pipeline(tiny_sd_path, device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert architecture(pipe) == "sd1"
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert pipe.scheduler.config.clip_sample is False
    images = _generate(pipe).images
    assert images.shape == (1, 32, 32, 3)
    assert float(images.std()) > 0.0


def test_loads_tiny_sdxl_folder_and_generates(tiny_sdxl_path: Path) -> None:
    pipe = load_pipeline(str(tiny_sdxl_path), device="cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert architecture(pipe) == "sdxl"
    assert _generate(pipe).images.shape == (1, 32, 32, 3)


def test_same_seed_same_image(tiny_sd_pipe) -> None:
    a = _generate(tiny_sd_pipe, seed=3).images
    b = _generate(tiny_sd_pipe, seed=3).images
    c = _generate(tiny_sd_pipe, seed=4).images
    assert (a == b).all()
    assert not (a == c).all()


def test_dtype_override(tiny_sd_path: Path) -> None:
    pipe = load_pipeline(tiny_sd_path, device="cpu", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.bfloat16


def test_fingerprint_tells_architectures_apart(tiny_sd_pipe, tiny_sdxl_pipe) -> None:
    assert unet_fingerprint(tiny_sd_pipe.unet) == unet_fingerprint(tiny_sd_pipe.unet)
    assert unet_fingerprint(tiny_sd_pipe.unet) != unet_fingerprint(tiny_sdxl_pipe.unet)
    assert len(unet_fingerprint(tiny_sd_pipe.unet)) == 12


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(tmp_path / "nope", device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline("./models/sd15.safetensors", device="cpu")


def test_folder_that_is_not_a_diffusers_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(tmp_path, device="cpu")
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model.safetensors: pass that file"):
        load_pipeline(tmp_path, device="cpu")


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline.*Stable Diffusion 1.x, 2.x and SDXL"):
        load_pipeline(tmp_path, device="cpu")


def test_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set.*pass the local folder"):
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cpu")


def test_hub_id_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake_download(repo_id: str, local_files_only: bool = False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(ModelLoadError, match="hub is unreachable.*local folder"):
        load_pipeline("someone/some-model", device="cpu")


def test_spec_that_is_neither_path_nor_hub_id() -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline("not a model", device="cpu")


def test_no_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipelines, "default_base_model", lambda: None)
    with pytest.raises(ModelLoadError, match="No default base model.*--base-model PATH"):
        load_pipeline(None, device="cpu")


def test_single_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        load_pipeline(corrupt, device="cpu")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attn1_to_v.lora_down.weight": torch.zeros(4, 8)}, lora)
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion checkpoint.*load it as an adapter"):
        load_pipeline(lora, device="cpu")


def test_pick_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_mod.pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert device_mod.pick_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        device_mod.pick_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device_mod.pick_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_mod.pick_device() == torch.device("cuda")
    assert device_mod.pick_dtype("cpu") == torch.float32
    assert device_mod.pick_dtype("cuda") == torch.float16
    assert device_mod.pick_dtype("cuda", "bf16") == torch.bfloat16
    assert device_mod.pick_dtype("cpu", torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        device_mod.pick_dtype("cpu", "int3")


@pytest.mark.parametrize(
    "text", ["a red circle on a white background", "A photo of sks dog, 4k!!", "héllo wörld 🐶 striped"]
)
def test_tokenizer_matches_clip(tiny_sd_pipe, text: str) -> None:
    ours = tiny_sd_pipe.tokenizer(text).input_ids
    reference = clip.tokenize(text)[0].tolist()
    assert ours == reference[: len(ours)]
    assert ours[-1] == 49407 and len(ours) > 2


def test_clip_imports_without_pkg_resources() -> None:
    """setuptools >= 81 has no pkg_resources: the shim in models.clip_compat must still let clip import."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['pkg_resources'] = None\n"
        "from models.clip_compat import clip\n"
        "print(clip.tokenize('a dog').shape[1])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "77"
