"""SDXL-architecture pipelines built from configs with random weights, for the SD-scale checks.

The shapes are Stable Diffusion XL base's (Podell et al., 2023): a UNet of three levels (no attention at the
first, 2 and 10 transformer layers per block at the second and third), linear projections, text-time added
conditioning, two text encoders (CLIP ViT-L, 12 layers, 768 wide; OpenCLIP ViT-bigG, 32 layers, 1280 wide,
projected), the SD VAE, 1024 px native. `width_divisor` > 1 divides every channel width and both encoders'
widths (2 or 4; the block structure, layer counts and the UNet's head counts stay, the encoders keep 64-wide
heads, GroupNorm takes 16 groups), for machines where the full 2.6B-parameter UNet does not fit; random
weights cost the same as trained ones.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from models.clip_tokenizer import VOCAB_SIZE, write_clip_tokenizer_files


def _text_config(
    hidden: int, layers: int, heads: int, act: str, projection: int | None = None
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=projection or hidden,
    )  # fmt: skip


def build_sdxl_pipeline(width_divisor: int = 1, device: str = "cpu") -> StableDiffusionXLPipeline:
    """SDXL-architecture pipeline from configs (random weights); widths divided by `width_divisor`."""
    torch.manual_seed(0)
    d = width_divisor
    clip_l, clip_g, time_dim = 768 // d, 1280 // d, 256
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320 // d, 640 // d, 1280 // d), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + clip_g, cross_attention_dim=clip_l + clip_g,
        norm_num_groups=32 if d == 1 else 16,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder, pad_token="!")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        text_encoder=CLIPTextModel(_text_config(clip_l, 12, max(1, 12 // d), "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(clip_g, 32, max(1, 20 // d), "gelu", clip_g)),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
