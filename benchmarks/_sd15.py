"""SD 1.5-architecture pipelines built from configs with random weights, for the benchmarks.

No paper of its own: the shapes are Stable Diffusion 1.5's (Rombach et al., 2022) — UNet 860M, CLIP ViT-L
text encoder, SD VAE — so speed and memory are measured honestly without downloading anything (random
weights cost the same as trained ones). `quick` swaps in a narrow UNet of the same layout, a 2-layer text
encoder and a small VAE, for smoke runs on a CPU.
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.clip_tokenizer import VOCAB_SIZE, write_clip_tokenizer_files


def build_sd15_pipeline(quick: bool, size: int, device: str) -> StableDiffusionPipeline:
    """SD 1.5-architecture pipeline from configs (random weights); `quick`: a narrow UNet of the same shape."""
    torch.manual_seed(0)
    widths = (64, 128, 256, 256) if quick else (320, 640, 1280, 1280)
    unet = UNet2DConditionModel(
        sample_size=size // 8, block_out_channels=widths, layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )  # fmt: skip
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=2 if quick else 12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64) if quick else (128, 256, 512, 512), layers_per_block=1 if quick else 2,
        latent_channels=4, norm_num_groups=16 if quick else 32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=size,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
