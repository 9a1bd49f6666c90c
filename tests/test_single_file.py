"""Single-file (original LDM layout) export, checked against diffusers' own single-file loader, offline."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from peft import LoraConfig
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models import atomic_write
from models.pipelines import load_pipeline
from models.single_file import (
    SD1_CLIP_PREFIX,
    SD2_OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    SingleFileError,
    clip_to_ldm,
    open_clip_to_ldm,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)
from tests.tiny_models import TINY_IMAGE_SIZE, build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

TEXT_ENCODERS = {
    "sd1": ("text_encoder",),
    "sd2": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
}
PIPELINE_CLASSES = {
    "sd1": StableDiffusionPipeline,
    "sd2": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}


def _with_text_config(model: CLIPTextModel, **changes: object) -> CLIPTextConfig:
    return CLIPTextConfig.from_dict({**model.config.to_dict(), **changes})


def _tiny_sd2_pipeline() -> StableDiffusionPipeline:
    """The tiny SD 1.x pipeline with an OpenCLIP-style (gelu) text encoder, i.e. SD 2.x's layout."""
    pipe = build_tiny_sd_pipeline(seed=0)
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_with_text_config(pipe.text_encoder, hidden_act="gelu"))
    return StableDiffusionPipeline(
        **{**pipe.components, "text_encoder": text_encoder}, requires_safety_checker=False
    )


def _tiny_sdxl_distinct_widths() -> StableDiffusionXLPipeline:
    """The shared tiny SDXL pipeline, with its OpenCLIP-G encoder widened to 48 if it is as narrow as CLIP-L
    (real SDXL: 1280 vs 768): diffusers' single-file loader tells the two encoders apart by width only."""
    pipe = build_tiny_sdxl_pipeline(seed=0)
    clip_l, wide = pipe.text_encoder.config.hidden_size, 48
    if pipe.text_encoder_2.config.hidden_size != clip_l:
        return pipe
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _with_text_config(
            pipe.text_encoder_2, hidden_size=wide, intermediate_size=2 * wide, projection_dim=wide
        )
    )
    unet_config = dict(pipe.unet.config)
    unet_config["cross_attention_dim"] = clip_l + wide
    unet_config["projection_class_embeddings_input_dim"] = 6 * unet_config["addition_time_embed_dim"] + wide
    unet = UNet2DConditionModel.from_config(unet_config)
    return StableDiffusionXLPipeline(**{**pipe.components, "unet": unet, "text_encoder_2": text_encoder_2})


def _configs_only(folder: Path, dest: Path) -> Path:
    """A copy of a diffusers folder without any weight file: all that `from_single_file(config=...)` needs."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest


@pytest.fixture(scope="module")
def exported(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """Per architecture: (pipeline, weight-free config folder, exported single file)."""
    root = tmp_path_factory.mktemp("single-file")
    sources = {
        "sd1": load_pipeline(tiny_sd_path, device="cpu", dtype="fp32"),
        "sd2": _tiny_sd2_pipeline(),
        "sdxl": _tiny_sdxl_distinct_widths(),
    }
    out = {}
    for arch, pipe in sources.items():
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(root / f"{arch}-full")
        configs = _configs_only(root / f"{arch}-full", root / f"{arch}-configs")
        out[arch] = (pipe, configs, save_single_file(pipe, root / f"{arch}.safetensors"))
    return out


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    left_empty = [
        k for k, t in got.items() if t.is_meta
    ]  # diffusers leaves weights it did not find on `meta`
    assert left_empty == []
    different = [k for k in want if not torch.equal(want[k], got[k])]
    assert different == []


def _image(pipe: DiffusionPipeline) -> np.ndarray:
    return pipe(
        "a red circle",
        num_inference_steps=1,
        height=TINY_IMAGE_SIZE,
        width=TINY_IMAGE_SIZE,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_diffusers_single_file_loader_gives_back_the_same_model(exported: dict, arch: str) -> None:
    pipe, configs, path = exported[arch]
    back = PIPELINE_CLASSES[arch].from_single_file(str(path), config=str(configs), local_files_only=True)
    assert type(back) is type(pipe)
    for name in ("unet", "vae", *TEXT_ENCODERS[arch]):
        _assert_same_weights(getattr(pipe, name), getattr(back, name))
    back.set_progress_bar_config(disable=True)
    expected, actual = _image(pipe), _image(back)
    assert expected.shape == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    np.testing.assert_array_equal(actual, expected)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_project_loader_reads_the_exported_file(exported: dict, arch: str) -> None:
    pipe, configs, path = exported[arch]
    back = load_pipeline(path, device="cpu", dtype="fp32", config=configs)
    assert type(back) is PIPELINE_CLASSES[arch]
    _assert_same_weights(pipe.unet, back.unet)
    _assert_same_weights(pipe.text_encoder, back.text_encoder)


def test_file_uses_the_original_key_layout_and_header(exported: dict) -> None:
    pipe, _, path = exported["sdxl"]
    with safe_open(str(path), framework="pt") as fh:
        keys, meta = set(fh.keys()), fh.metadata()
        in_proj = fh.get_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
        projection = fh.get_tensor("conditioner.embedders.1.model.text_projection")
        vae_q = fh.get_tensor("first_stage_model.decoder.mid.attn_1.q.weight")
    component_sizes = sum(len(getattr(pipe, n).state_dict()) for n in ("unet", "vae", *TEXT_ENCODERS["sdxl"]))
    assert len(keys) == component_sizes - 4 * len(
        pipe.text_encoder_2.text_model.encoder.layers
    )  # 6 q,k,v -> 2 in_proj
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # SDXL's added text-time embedding
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    attn = pipe.text_encoder_2.text_model.encoder.layers[0].self_attn
    torch.testing.assert_close(
        in_proj, torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), rtol=0, atol=0
    )
    torch.testing.assert_close(projection, pipe.text_encoder_2.text_projection.weight.T, rtol=0, atol=0)
    assert vae_q.ndim == 4 and vae_q.shape[2:] == (1, 1)  # LDM attention uses 1x1 convolutions
    assert meta["format"] == "pt"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert meta["atelier.architecture"] == "sdxl"
    assert meta["modelspec.resolution"] == f"{TINY_IMAGE_SIZE}x{TINY_IMAGE_SIZE}"
    with safe_open(str(exported["sd1"][2]), framework="pt") as fh:
        assert fh.metadata()["modelspec.architecture"] == "stable-diffusion-v1"
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in set(fh.keys())
    with safe_open(str(exported["sd2"][2]), framework="pt") as fh:
        assert fh.metadata()["atelier.architecture"] == "sd2"
        assert "cond_stage_model.model.ln_final.weight" in set(fh.keys())


UNET_VARIANTS = {
    "sd1-like, 3 levels, 2 layers": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
    ),
    "sdxl-like, deeper transformers": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=32,
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 4),
    ),
    "3 layers per block, attention everywhere": dict(
        block_out_channels=(16, 16),
        layers_per_block=3,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
    ),
}


@pytest.mark.parametrize("variant", list(UNET_VARIANTS))
def test_unet_mapping_is_inverted_by_diffusers_for_any_block_layout(variant: str) -> None:
    unet = UNet2DConditionModel(sample_size=8, norm_num_groups=8, **UNET_VARIANTS[variant])
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config)
    assert len(ldm) == len(state)
    back = convert_ldm_unet_checkpoint(ldm, unet.config)
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)


@pytest.mark.parametrize("levels,layers", [(2, 1), (3, 2)])
def test_vae_mapping_is_inverted_by_diffusers(levels: int, layers: int) -> None:
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16)[:levels],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=8,
    )
    state = vae.state_dict()
    back = convert_ldm_vae_checkpoint(vae_to_ldm(state, vae.config), vae.config)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def _released_size_checkpoint(arch: str) -> dict[str, torch.Tensor]:
    """The released SD 1.5 / 2.1 / SDXL-base architectures, built on the meta device (shapes only, no memory)."""

    def clip(hidden: int, layers: int, act: str, cls: type = CLIPTextModel) -> torch.nn.Module:
        config = CLIPTextConfig(
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            projection_dim=hidden,
            hidden_act=act,
        )
        return cls(config)

    with init_empty_weights():
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        )
        if arch == "sdxl":
            unet = UNet2DConditionModel(
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
                cross_attention_dim=2048,
            )
            text = clip_to_ldm(clip(768, 12, "quick_gelu").state_dict(), SDXL_CLIP_PREFIX)
            big_g = clip(1280, 32, "gelu", CLIPTextModelWithProjection)
            text.update(open_clip_to_ldm(big_g.state_dict(), SDXL_OPEN_CLIP_PREFIX))
        elif arch == "sd2":
            unet = UNet2DConditionModel(
                cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True
            )
            text = open_clip_to_ldm(clip(1024, 23, "gelu").state_dict(), SD2_OPEN_CLIP_PREFIX)
        else:
            unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
            text = clip_to_ldm(clip(768, 12, "quick_gelu").state_dict(), SD1_CLIP_PREFIX)
    return {**unet_to_ldm(unet.state_dict(), unet.config), **vae_to_ldm(vae.state_dict(), vae.config), **text}


@pytest.mark.parametrize(
    "arch,diffusers_type,unet_keys,known_key,shape",
    [
        ("sd1", "v1", 686, "model.diffusion_model.output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
        ("sd2", "v2", 686, "model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320)),
        ("sdxl", "xl_base", 1680, "model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
    ],
)
def test_released_sizes_are_recognised_by_diffusers(
    arch: str, diffusers_type: str, unet_keys: int, known_key: str, shape: tuple[int, ...]
) -> None:
    checkpoint = _released_size_checkpoint(arch)
    assert infer_diffusers_model_type(checkpoint) == diffusers_type
    assert sum(k.startswith("model.diffusion_model.") for k in checkpoint) == unet_keys
    assert sum(k.startswith("first_stage_model.") for k in checkpoint) == 248
    assert tuple(checkpoint[known_key].shape) == shape


def test_fp16_export_halves_floats(exported: dict, tmp_path: Path) -> None:
    pipe = exported["sd1"][0]
    path = save_single_file(pipe, tmp_path / "half.safetensors", dtype=torch.float16, title="tiny half")
    with safe_open(str(path), framework="pt") as fh:
        names = list(fh.keys())
        assert {fh.get_slice(name).get_dtype() for name in names} == {"F16"}
        assert fh.metadata()["modelspec.title"] == "tiny half"
    assert next(pipe.unet.parameters()).dtype == torch.float32  # the live model is not cast


def test_attached_adapter_is_refused_with_a_hint(tmp_path: Path) -> None:
    pipe = build_tiny_sd_pipeline(seed=0)
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_v"]))
    with pytest.raises(SingleFileError, match=r"to_v\.(base_layer|lora_A).*fuse or unload adapters"):
        save_single_file(pipe, tmp_path / "with-adapter.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_sdxl_encoders_of_equal_width_are_refused(tmp_path: Path) -> None:
    pipe = _tiny_sdxl_distinct_widths()
    same = pipe.text_encoder.config.hidden_size
    pipe.text_encoder_2 = CLIPTextModelWithProjection(
        _with_text_config(
            pipe.text_encoder_2, hidden_size=same, intermediate_size=2 * same, projection_dim=same
        )
    )
    with pytest.raises(SingleFileError, match=rf"both SDXL text encoders have hidden_size={same}"):
        save_single_file(pipe, tmp_path / "ambiguous.safetensors")


def test_bad_destinations_are_refused(exported: dict, tmp_path: Path) -> None:
    pipe = exported["sd1"][0]
    with pytest.raises(SingleFileError, match=r"must end in \.safetensors"):
        save_single_file(pipe, tmp_path / "model.ckpt")
    with pytest.raises(SingleFileError, match="does not exist"):
        save_single_file(pipe, tmp_path / "missing" / "model.safetensors")


def test_failed_write_keeps_the_old_file(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, _, good = exported["sd1"]
    target = tmp_path / "model.safetensors"
    shutil.copyfile(good, target)
    before = target.read_bytes()

    def disk_full(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_write, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left") as caught:
        save_single_file(pipe, target)
    assert caught.value.filename == str(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_single_file_base_model_trains_and_composes_offline_with_base_config(
    exported: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A single .safetensors checkpoint (what most people download) carries weights only; offline its configs
    come from `--base_config` / `--base-config`. Without it both CLIs stop with one line naming the flag."""
    from composition.__main__ import main as compose
    from models.toyworld.world import Scene, SceneObject, render_scene
    from training.dreambooth import main as train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, configs, path = exported["sd1"]
    images = tmp_path / "subject"
    images.mkdir()
    for k, colour in enumerate(["red", "blue", "green"]):
        render_scene(Scene((SceneObject("heart", colour),))).save(images / f"{k}.png")
    out = tmp_path / "run"
    argv = [
        "--pretrained_model_name_or_path", str(path), "--instance_data_dir", str(images),
        "--instance_prompt", "a photo of sks heart", "--output_dir", str(out), "--max_train_steps", "1",
        "--num_inference_steps", "1", "--num_validation_images", "1", "--adapter", "lora",
    ]  # fmt: skip
    capsys.readouterr()
    assert train(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--base_config FOLDER" in err, err
    assert not (out / "adapter.safetensors").exists()

    assert train([*argv, "--base_config", str(configs)]) == 0
    assert "## Base-model profile: `sd1`" in (out / "README.md").read_text()
    adapter = out / "adapter.safetensors"
    assert adapter.is_file()

    compose_argv = [
        "--base-model", str(path), "--adapter", f"{adapter}:sks heart", "--prompt", "a photo of sks heart",
        "--method", "merge", "--steps", "1", "--clip-model", "none", "--device", "cpu", "--out", str(tmp_path / "c"),
    ]  # fmt: skip
    assert compose(compose_argv) == 2
    assert "--base-config FOLDER" in capsys.readouterr().err
    assert compose([*compose_argv, "--base-config", str(configs)]) == 0
    assert list((tmp_path / "c").rglob("*.png")), "no image written"
