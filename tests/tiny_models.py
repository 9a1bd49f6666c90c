"""Seeded tiny Stable Diffusion pipelines built in code, for tests that must not touch the network.

Same classes as the real models (UNet2DConditionModel with cross-attention in down/mid/up blocks,
AutoencoderKL, CLIP text encoder(s), the real CLIP BPE tokenizer, a standard scheduler with
`clip_sample=False`), widths shrunk so a forward pass takes milliseconds. Tests save them in diffusers
format and load them back through `models.pipelines.load_pipeline`, exactly as a hub model is loaded.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models.clip_tokenizer import VOCAB_SIZE, write_clip_tokenizer_files

TINY_IMAGE_SIZE = 32  # pixels; latents are 16x16 (the tiny VAE downsamples by 2)


def _tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(folder)
        kwargs = {"pad_token": pad_token} if pad_token else {}
        return CLIPTokenizer.from_pretrained(folder, **kwargs)


def _text_config(hidden: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )


def build_tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A seeded SD 1.x-style pipeline: attention in down, mid and up blocks, cross-attention width 32."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(32))
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A seeded SDXL-style pipeline: two text encoders, text-time added conditioning, linear projections.

    The encoders have different widths (32 and 48), as CLIP-L and OpenCLIP-G do (768/1280): diffusers'
    single-file loader tells them apart by width.
    """
    torch.manual_seed(seed)
    hidden, hidden_2 = 32, 48
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + hidden_2,
        cross_attention_dim=hidden + hidden_2,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(hidden)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(hidden_2)),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(pad_token="!"),
        scheduler=scheduler,
    )
