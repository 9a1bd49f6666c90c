"""The toy world's tiny CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"): clip-anytorch's own `clip.model.CLIP` at small widths, trained contrastively on world scenes.

It keeps CLIP's full 49,408-token BPE vocabulary and 77-token context, so `clip.tokenize` and SD's
`CLIPTokenizer` give the same ids as for real CLIP. Saved as a plain fp16 state dict (`.pt`, read
with torch's weights-only loader; `clip.model.build_model` infers the architecture from it) and as
`.safetensors`. `to_transformers_text_model` converts the text tower to the transformers `CLIPTextModel` that a
`StableDiffusionPipeline` uses (quick-GELU, causal mask, same hidden states).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from models.atomic_write import atomic_write, write_safetensors
from models.clip_compat import clip
from models.toyworld.world import IMAGE_SIZE

EMBED_DIM = 64
WIDTH = 64
"""Text and vision width; clip-anytorch infers heads = width // 64, so 64 gives one head."""
TEXT_LAYERS = 4
VISION_LAYERS = 4
PATCH_SIZE = 4
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
START_ID, END_ID = 49406, 49407
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_clip(seed: int = 0) -> clip.model.CLIP:
    """A freshly initialised tiny CLIP for IMAGE_SIZE images (fp32)."""
    torch.manual_seed(seed)
    return clip.model.CLIP(
        embed_dim=EMBED_DIM,
        image_resolution=IMAGE_SIZE,
        vision_layers=VISION_LAYERS,
        vision_width=WIDTH,
        vision_patch_size=PATCH_SIZE,
        context_length=CONTEXT_LENGTH,
        vocab_size=VOCAB_SIZE,
        transformer_width=WIDTH,
        transformer_heads=WIDTH // 64,
        transformer_layers=TEXT_LAYERS,
    )


def normalize_images(batch: torch.Tensor) -> torch.Tensor:
    """Map a (N, 3, H, W) batch in [-1, 1] to CLIP's input normalisation (what `clip.load`'s preprocess gives)."""
    mean = torch.tensor(CLIP_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=batch.device).view(1, 3, 1, 1)
    return ((batch + 1) / 2 - mean) / std


def contrastive_loss(model: clip.model.CLIP, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching (normalised image, token) pairs."""
    logits_per_image, logits_per_text = model(images, tokens)
    target = torch.arange(images.shape[0], device=images.device)
    loss_images = torch.nn.functional.cross_entropy(logits_per_image, target)
    loss_texts = torch.nn.functional.cross_entropy(logits_per_text, target)
    return (loss_images + loss_texts) / 2


def save_tiny_clip(model: clip.model.CLIP, pt_path: str | Path) -> tuple[Path, Path]:
    """Write the fp16 state dict as `<name>.pt` (for `clip.load`) and `<name>.safetensors`; returns both."""
    pt_path = Path(pt_path)
    state = {  # floating tensors only: a ResNet tower's BatchNorm step counters stay integers
        key: (value.detach().to(torch.float16) if value.is_floating_point() else value.detach()).contiguous()
        for key, value in model.state_dict().items()
    }
    st_path = pt_path.with_suffix(".safetensors")
    atomic_write(pt_path, lambda tmp: torch.save(state, tmp))
    write_safetensors(st_path, state, {"format": "pt", "model": "atelier-toyworld-clip"})
    return pt_path, st_path


def text_config(model: clip.model.CLIP) -> CLIPTextConfig:
    """The transformers config equivalent to the clip-anytorch text tower of `model`."""
    width = model.ln_final.weight.shape[0]
    return CLIPTextConfig(
        vocab_size=model.vocab_size,
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=model.text_projection.shape[1],
        num_hidden_layers=len(model.transformer.resblocks),
        num_attention_heads=max(width // 64, 1),
        max_position_embeddings=model.context_length,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=START_ID,
        eos_token_id=END_ID,
        pad_token_id=END_ID,
    )


def to_transformers_text_model(model: clip.model.CLIP) -> CLIPTextModel:
    """Convert the text tower to a transformers `CLIPTextModel` whose last hidden state equals CLIP's
    pre-projection text features (fp32, eval mode)."""
    source = {key: value.detach().float() for key, value in model.state_dict().items()}
    target: dict[str, torch.Tensor] = {
        "embeddings.token_embedding.weight": source["token_embedding.weight"],
        "embeddings.position_embedding.weight": source["positional_embedding"],
        "final_layer_norm.weight": source["ln_final.weight"],
        "final_layer_norm.bias": source["ln_final.bias"],
    }
    for index in range(len(model.transformer.resblocks)):
        old, new = f"transformer.resblocks.{index}.", f"encoder.layers.{index}."
        for part, weight in zip("qkv", source[old + "attn.in_proj_weight"].chunk(3), strict=True):
            target[new + f"self_attn.{part}_proj.weight"] = weight
        for part, bias in zip("qkv", source[old + "attn.in_proj_bias"].chunk(3), strict=True):
            target[new + f"self_attn.{part}_proj.bias"] = bias
        renames = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for old_name, new_name in renames.items():
            for kind in ("weight", "bias"):
                target[f"{new}{new_name}.{kind}"] = source[f"{old}{old_name}.{kind}"]
    text_model = CLIPTextModel(text_config(model))
    missing, unexpected = text_model.load_state_dict(target, strict=False)
    if unexpected or [key for key in missing if "position_ids" not in key]:
        raise RuntimeError(f"CLIP text conversion mismatch: missing {missing}, unexpected {unexpected}")
    return text_model.eval()


def clip_text_hidden_states(model: clip.model.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's per-token text features before the projection, (N, 77, width): what SD's UNet attends to."""
    x = model.token_embedding(tokens).type(model.dtype) + model.positional_embedding.type(model.dtype)
    x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # (N, 77, width)
    return model.ln_final(x).type(model.dtype)


def encode_text_truncated(model: clip.model.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's `encode_text` on tokens cut after the longest caption's end token (same result: the mask is
    causal and the feature is read at the end token), which makes contrastive training ~4x cheaper."""
    length = int(tokens.argmax(dim=-1).max()) + 1
    x = model.token_embedding(tokens[:, :length]) + model.positional_embedding[:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = x.permute(1, 0, 2)  # (L, N, width)
    for block in model.transformer.resblocks:
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x.permute(1, 0, 2))  # (N, L, width)
    return x[torch.arange(x.shape[0]), tokens[:, :length].argmax(dim=-1)] @ model.text_projection
