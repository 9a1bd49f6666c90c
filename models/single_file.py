"""Export a diffusers Stable Diffusion pipeline as one single-file checkpoint (original LDM/CompVis layout).

The `.safetensors` files people share for AUTOMATIC1111 and ComfyUI hold the UNet, the VAE and the text
encoder(s) of a model in one file, with the key names of the original latent-diffusion code (Rombach et al.,
"High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022; SDXL: Podell et al., 2023):

- UNet: `model.diffusion_model.*` (`input_blocks` / `middle_block` / `output_blocks`);
- VAE: `first_stage_model.*` (`encoder.down.N.block.M`, `decoder.up.N` numbered from the bottom, 1x1-conv
  attention weights);
- SD 1.x: `cond_stage_model.transformer.text_model.*` (OpenAI CLIP in transformers' layout);
- SD 2.x: `cond_stage_model.model.*` (OpenCLIP layout: fused `in_proj`, `resblocks`, `ln_final`);
- SDXL: `conditioner.embedders.0.transformer.text_model.*` (CLIP-L) and `conditioner.embedders.1.model.*`
  (OpenCLIP-G layout, with `text_projection` stored transposed).

`save_single_file(pipe, path)` writes that layout; it is the inverse of diffusers' own readers
(`diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`). Block indices are computed from the model's
own config (number of blocks, `layers_per_block`, which blocks have attention), so any size of SD-style UNet
works, not just the released ones. A key the mapping does not know (a PEFT adapter left attached, a
`torch.compile` wrapper, a class embedding) is an error, never silently dropped.

Loading such a file back with diffusers, offline. A single file holds weights only, so diffusers needs the
pipeline's configs from somewhere; without them it infers a hub repo from the key names and downloads its
configs, which fails offline and is wrong for non-standard sizes. Pass them explicitly::

    pipe = StableDiffusionPipeline.from_single_file(          # or StableDiffusionXLPipeline
        "model.safetensors",
        config="path/to/diffusers_folder",   # model_index.json, <component>/config.json, scheduler config,
                                             # tokenizer files; no weights needed
        local_files_only=True,
    )

Do not pass `original_config` together with `config`: diffusers then ignores the folder for the UNet/VAE.
The scheduler and tokenizers come from the `config` folder unchanged. For SDXL, the two text encoders must have
different hidden sizes (as CLIP-L 768 / OpenCLIP-G 1280 do): diffusers tells the CLIP-L and OpenCLIP-G
weights apart by comparing the embedding width with the model being loaded, so with equal widths it loads the
CLIP-L weights into `text_encoder_2`; `save_single_file` refuses such a pipeline rather than write a file that
loads wrongly. Tools such as A1111 build their networks from their own fixed configs, so only models of the
released SD 1.x/2.x/SDXL sizes load there; any size round-trips through diffusers with `config=`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from models.atomic_write import write_safetensors
from models.pipelines import architecture

MODELSPEC_ARCHITECTURES: dict[str, str] = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
}
"""`models.pipelines.architecture` name -> ModelSpec `modelspec.architecture` id (SD 2.x v-prediction: 768-v)."""

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# Parameters of LDM's SpatialTransformer (diffusers' Transformer2DModel): same names in both layouts.
_UNET_ATTENTION_PARAM = re.compile(
    r"(norm|proj_in|proj_out|transformer_blocks\.\d+\."
    r"(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))\.(weight|bias)"
)
_CLIP_TEXT_PARAM = re.compile(
    r"embeddings\.(token|position)_embedding\.weight|final_layer_norm\.(weight|bias)|encoder\.layers\.\d+\."
    r"(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
)

_UNET_BLOCK = re.compile(
    r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_UNET_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_BLOCK = re.compile(
    r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)"
)
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_CLIP_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


class SingleFileError(ValueError):
    """A pipeline cannot be written as an LDM single-file checkpoint (the message says why and what to do)."""


def _unknown_key(component: str, key: str) -> SingleFileError:
    return SingleFileError(
        f"{component} weight {key!r} has no place in the original LDM layout; fuse or unload adapters "
        "(e.g. `pipe.fuse_lora(); pipe.unload_lora_weights()`) and undo torch.compile before exporting, "
        "or export a plain SD 1.x/2.x/SDXL model"
    )


def _rename_param(rest: str, names: Mapping[str, str], component: str, key: str) -> str:
    """Rename `module.weight` / `module.bias` through `names` (anything deeper, e.g. `conv1.base_layer.weight`
    from an attached adapter, is an unknown key)."""
    module, _, param = rest.rpartition(".")
    if module not in names or param not in ("weight", "bias"):
        raise _unknown_key(component, key)
    return f"{names[module]}.{param}"


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Map a diffusers `UNet2DConditionModel` state dict to LDM `input_blocks/middle_block/output_blocks` keys."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise SingleFileError(
            f"UNet layers_per_block={layers!r} varies per block; the LDM layout needs one number for all blocks"
        )
    for field in ("class_embed_type", "num_class_embeds", "time_cond_proj_dim", "encoder_hid_dim"):
        if config.get(field) is not None:
            raise SingleFileError(
                f"UNet config sets {field}={config[field]!r}, which SD/SDXL checkpoints lack"
            )
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise SingleFileError(
            f"UNet mid_block_type={config['mid_block_type']!r} is not SD's cross-attention mid block"
        )
    stride = layers + 1  # LDM counts each resnet (+attention) and each down/upsampler as one numbered block
    up_with_attention = {
        int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP_LEVEL:
            ldm = f"{_UNET_TOP_LEVEL[module]}.{param}"
        elif m := _UNET_BLOCK.fullmatch(key):
            direction, block, kind, index, rest = m.groups()
            block, index, down = int(block), int(index), direction == "down_blocks"
            if kind in ("downsamplers", "upsamplers"):
                if index != 0 or rest not in ("conv.weight", "conv.bias"):
                    raise _unknown_key("UNet", key)
                position = block * stride + layers
                if down:
                    ldm = f"input_blocks.{position + 1}.0.op.{rest[len('conv.') :]}"
                else:
                    slot = 2 if block in up_with_attention else 1
                    ldm = f"output_blocks.{position}.{slot}.{rest}"
            else:
                if index >= (layers if down else stride):
                    raise SingleFileError(
                        f"UNet weight {key!r} does not fit layers_per_block={layers} from the model's config"
                    )
                position = block * stride + index + (1 if down else 0)
                prefix = f"{'input_blocks' if down else 'output_blocks'}.{position}"
                if kind == "resnets":
                    ldm = f"{prefix}.0.{_rename_param(rest, _UNET_RESNET, 'UNet', key)}"
                elif _UNET_ATTENTION_PARAM.fullmatch(rest):
                    ldm = f"{prefix}.1.{rest}"
                else:
                    raise _unknown_key("UNet", key)
        elif m := _UNET_MID.fullmatch(key):
            kind, index, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "resnets" and index in (0, 1):
                ldm = f"middle_block.{2 * index}.{_rename_param(rest, _UNET_RESNET, 'UNet', key)}"
            elif kind == "attentions" and index == 0 and _UNET_ATTENTION_PARAM.fullmatch(rest):
                ldm = f"middle_block.1.{rest}"
            else:
                raise _unknown_key("UNet", key)
        else:
            raise _unknown_key("UNet", key)
        out[UNET_PREFIX + ldm] = tensor
    return out


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Map a diffusers `AutoencoderKL` state dict to LDM `first_stage_model.*` keys."""
    num_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module in _VAE_TOP_LEVEL:
            ldm = f"{_VAE_TOP_LEVEL[module]}.{param}"
        elif m := _VAE_BLOCK.fullmatch(key):
            part, direction, block, kind, index, rest = m.groups()
            block, index = int(block), int(index)
            if direction == "up_blocks":
                block = num_up - 1 - block  # LDM numbers decoder levels from the lowest resolution up
            level = f"{part}.{'down' if direction == 'down_blocks' else 'up'}.{block}"
            if kind == "resnets":
                ldm = f"{level}.block.{index}.{_rename_param(rest, _VAE_RESNET, 'VAE', key)}"
            elif index == 0 and rest in ("conv.weight", "conv.bias"):
                ldm = f"{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{rest}"
            else:
                raise _unknown_key("VAE", key)
        elif m := _VAE_MID.fullmatch(key):
            part, kind, index, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets" and index in (0, 1):
                ldm = f"{part}.mid.block_{index + 1}.{_rename_param(rest, _VAE_RESNET, 'VAE', key)}"
            elif kind == "attentions" and index == 0:
                ldm = f"{part}.mid.attn_1.{_rename_param(rest, _VAE_ATTENTION, 'VAE', key)}"
                if tensor.ndim == 2:  # LDM's attention block uses 1x1 convolutions: (C, C) -> (C, C, 1, 1)
                    tensor = tensor[:, :, None, None]
            else:
                raise _unknown_key("VAE", key)
        else:
            raise _unknown_key("VAE", key)
        out[VAE_PREFIX + ldm] = tensor
    return out


def _text_model_key(key: str, component: str) -> str:
    """`text_model.encoder...` or the flattened `encoder...` (transformers >= 5.6) -> `encoder...`."""
    inner = key.removeprefix("text_model.")
    if not _CLIP_TEXT_PARAM.fullmatch(inner):
        raise _unknown_key(component, key)
    return inner


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP text model in transformers' layout, as LDM stores it: `<prefix>text_model.*`."""
    return {f"{prefix}text_model.{_text_model_key(key, 'CLIP text encoder')}": t for key, t in state.items()}


def open_clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model in OpenCLIP's layout (fused q/k/v `in_proj`, transposed projection)."""
    component = "OpenCLIP text encoder"
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key == "text_projection.weight":
            # OpenCLIP computes x @ P, transformers x @ W.T: P = W.T
            out[prefix + "text_projection"] = tensor.T
            continue
        inner = _text_model_key(key, component)
        if inner in _OPEN_CLIP_TOP_LEVEL:
            out[prefix + _OPEN_CLIP_TOP_LEVEL[inner]] = tensor
        elif m := _CLIP_LAYER.fullmatch(inner):
            layer, module, param = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, param), {})[module.removeprefix("self_attn.")[0]] = tensor
            elif module in _OPEN_CLIP_LAYER:
                out[f"{prefix}transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
            else:
                raise _unknown_key(component, key)
        else:
            raise _unknown_key(component, key)
    for (layer, param), parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise SingleFileError(f"{component} layer {layer} lacks one of q/k/v_proj.{param}")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts[n] for n in "qkv"]
        )
    return out


def _checked_architecture(pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> str:
    """`sd1`, `sd2` or `sdxl` (decided by `models.pipelines.architecture`, as the loader does), after checking
    that `pipe` is a text-to-image SD pipeline with all the parts a single file holds."""
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise SingleFileError(
            f"{type(pipe).__name__} is not a StableDiffusionPipeline or StableDiffusionXLPipeline; "
            "only SD 1.x/2.x/SDXL text-to-image pipelines can be exported as one LDM checkpoint"
        )
    if isinstance(pipe, StableDiffusionXLPipeline) and (
        pipe.text_encoder is None or pipe.text_encoder_2 is None
    ):
        raise SingleFileError(
            "SDXL export needs both text encoders (CLIP-L and OpenCLIP-G); refiner-style pipelines are not supported"
        )
    return architecture(pipe)


def single_file_state_dict(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
) -> dict[str, torch.Tensor]:
    """All weights of `pipe` under their LDM single-file names (tensors are views of the live weights)."""
    arch = _checked_architecture(pipe)
    tensors = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    tensors.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if arch == "sdxl":
        width, width_2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
        if width == width_2:
            raise SingleFileError(
                f"both SDXL text encoders have hidden_size={width}; diffusers' single-file loader tells them apart "
                "by width and would load CLIP-L weights into text_encoder_2. Give them different widths "
                "(SDXL: 768 and 1280) or share the model as a diffusers folder"
            )
        tensors.update(clip_to_ldm(pipe.text_encoder.state_dict(), SDXL_CLIP_PREFIX))
        tensors.update(open_clip_to_ldm(pipe.text_encoder_2.state_dict(), SDXL_OPEN_CLIP_PREFIX))
    elif arch == "sd1":
        tensors.update(clip_to_ldm(pipe.text_encoder.state_dict(), SD1_CLIP_PREFIX))
    else:
        tensors.update(open_clip_to_ldm(pipe.text_encoder.state_dict(), SD2_OPEN_CLIP_PREFIX))
    return tensors


def save_single_file(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    title: str | None = None,
) -> Path:
    """Write `pipe` as one `.safetensors` checkpoint in the original LDM layout; returns the path written.

    `dtype` casts floating-point weights (e.g. `torch.float16` halves the file); by default they are kept as
    they are. The header carries `format: pt` and ModelSpec metadata (`modelspec.architecture`, title,
    resolution, prediction type). The write is atomic: a temporary file next to `path`, then `os.replace`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SingleFileError(f"{path} must end in .safetensors (single-file checkpoints are never pickled)")
    if not path.parent.is_dir():
        raise SingleFileError(f"folder {path.parent} does not exist; create it first")
    arch = _checked_architecture(pipe)
    tensors = {
        key: (t.to(dtype) if dtype is not None and t.is_floating_point() else t).detach().cpu().contiguous()
        for key, t in single_file_state_dict(pipe).items()
    }
    v_prediction = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    metadata = {
        "format": "pt",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v2-768-v"
        if arch == "sd2" and v_prediction
        else MODELSPEC_ARCHITECTURES[arch],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or path.stem,
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "atelier.layout": "ldm",
        "atelier.architecture": arch,
    }
    write_safetensors(path, tensors, metadata)
    return path
