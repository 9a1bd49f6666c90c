"""Train toy world v2 end to end: tiny CLIP, VAE, then UNet; save a diffusers folder and the CLIP scorer.

Latent diffusion as in Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models"):
an `AutoencoderKL` compresses 64 px scenes 4x to 16x16x4 latents, a `UNet2DConditionModel` learns to denoise
them (epsilon prediction, DDPM noising, Ho et al. 2020, with offset noise) conditioned through cross-attention,
at every latent level, on the frozen text tower of a tiny CLIP (Radford et al. 2021), with 10% caption
dropout for classifier-free guidance (Ho & Salimans 2022) and an EMA of the weights. The CLIP and the VAE see
every concept; the UNet never sees the held-out ones (`world.HELD_OUT`).

The CLIP is trained in three steps. Its ResNet image tower first learns the scenes' attributes with supervised
heads, as LiT starts from a pretrained image tower (Zhai et al. 2022, "LiT: Zero-Shot Transfer with
Locked-image text Tuning"; here the tower stays unlocked). Its text tower then learns the same attributes from
captions alone, each head taught only what the caption says (the slots only where it names places): a
departure from CLIP, whose contrast alone left both towers place-blind here, as CLIPs are found to be
(Kamath et al. 2023, "What's 'up' with vision-language models?"). Then image and text train contrastively on
scenes with one-change twins and, as in NegCLIP (Yuksekgonul et al. 2023, "When and why vision-language models
behave like bags-of-words"), each image also picks its caption among copies with one attribute changed or, as
NegCLIP's word-order negatives do, the same words rebound: two objects' attributes exchanged, or the objects
named in other places; both towers' heads stay on as an auxiliary loss. The same CLIP is the shipped CLIPScore
model; its text tower, less the words only held-out captions use, is the pipeline's text encoder.

    python -m models.toyworld.v2.train --work-dir /path/to/checkpoints --out /path/to/out

Seeded (every batch is a function of seed and step) and resumable: each stage checkpoints into `--work-dir`
every `--checkpoint-every` steps and a rerun of the same command continues where it stopped; a finished stage
leaves `<stage>_final.safetensors` and is skipped.

Trade-offs measured on this 2-core CPU (1 torch thread, other jobs sharing the machine; the v1 figures are in
`models.toyworld.train`):
- Image size 64 px with a 4x VAE gives the same 16x16 latents as v1's 32 px with a 2x VAE, so the UNet costs
  what v1's cost for twice the resolution; an 8x VAE (SD's factor) would leave 8x8 latents, too coarse for
  three objects side by side.
- UNet at batch 8 (4 images with guidance), one 25-step sample: (32, 64, 128) channels with cross-attention
  only at 8x8 and 4x4 (v1) 1.4-1.8 s; (64, 128, 128) with cross-attention at all three levels, 32-wide heads,
  2.5 s; (64, 128, 192) 3.1 s; (64, 96, 128) 3.0 s. Training at batch 32: 0.7 s/step (v1), 1.1-2.1 s/step for
  the three-level 64-wide ones. Chosen: (64, 128, 128) with heads of 32 channels — cross-attention at the
  finest level (16x16, where a new shape's outline lives) inside the 3 s budget for 4 images.
- Three objects stayed at 72.9-77.1% from step 20,000 to 27,000 whatever the sampler, guidance or scene mix;
  `--unet-layers-per-block 2` (10.6 M) buys depth at every level. Its batch of 8 takes 2.3 s for 15 DPM++ 2M
  steps (today's UNet: 1.6 s; DPM++ at 15 steps draws three objects as well as DDIM at 25), 1.17 s a training
  step at two threads.
- Note that diffusers' `attention_head_dim` on `UNet2DConditionModel` is the number of heads: v1's "4" gave
  16-wide heads; (2, 4, 4) here gives 32-wide heads at every level.
- VAE (32, 64, 64) channels, one layer per block, 4 latent channels, MSE + L1: session-long readbacks of its
  reconstructions by the checks (docs/toyworld_v2.md) found steps the lever, not width or channels — 8 latent
  channels read small shapes back no better than 4 (78% vs 77%), an image-gradient loss hurt textures, and
  three-object shapes rose from 76% to 88% between 2500 and 4000 steps; hence 10000 steps. Textures repeat every
  8 px (two latent cells): a 6 px period sat at the latent grid's limit and came back plain.
- Text tower width 128 (two 64-wide heads) and 4 layers, 2x v1's width: captions now carry up to three
  objects with positions.
- CLIP: trained contrastively alone (batches of scenes and twins), the text tower stopped telling shapes apart
  (captions that differ only in the shape word: cosine 0.9997 between their features) and zero-shot shape
  stayed at chance, for a ViT or a ResNet image tower, with or without caption hard negatives, while the same
  ResNet learns the shapes of single objects in 200 supervised steps. Supervised heads first, then the
  contrastive stage with caption hard negatives, reach the zero-shot bar (docs/toyworld_v2.md). The ResNet
  (clip-anytorch's `ModifiedResNet`, one block per stage, width 16) learnt shape where the 8 px-patch ViT did
  not.
- Places: with contrast and place-swap caption negatives the CLIP still preferred a two-object caption over
  its place swap only about half the time, and a UNet trained on its text tower plateaued with two objects
  rarely in their places; text-only supervised heads teach the text tower where each object goes within a few
  hundred steps, in the pooled feature and in the EOS and padding states the UNet reads (docs/toyworld_v2.md).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel, compute_snr
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer

from models.atomic_write import write_safetensors
from models.clip_compat import clip
from models.clip_tokenizer import write_clip_tokenizer_files
from models.noise import training_noise
from models.toyworld import clip_model
from models.toyworld.checkpoint import carry_over_state, is_carry_over, read_checked_weights
from models.toyworld.clip_model import encode_text_truncated
from models.toyworld.stages import SCHEDULER_CONFIG, clip_file, run_stage, save_assets
from models.toyworld.v2.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    IMAGE_SIZE,
    OBJECT_COUNT_RATES,
    Scene,
    SceneObject,
    article,
    attribute_value,
    images_to_array,
    render_scene,
    sample_batch,
    twin_scene,
    with_attribute,
)

CLIP_WIDTH = 128
CLIP_LAYERS = 4
CLIP_VISION_WIDTH = 16
"""Stem width of the CLIP's ResNet image tower (1.4 M parameters)."""
CLIP_ATTRIBUTE_SLOTS = ("", "left", "middle", "right")
"""Where the supervised heads read an object's attributes: a lone object, or a slot of a two- or three-object
scene."""
LATENT_SCALE = 4
"""VAE downsampling factor: 64 px scenes <-> 16x16 latents."""
LATENT_CHANNELS = 4
"""Latent channels, SD's 4. Eight kept no more texture (docs/toyworld_v2.md: 64% of single objects either way)."""


@dataclass
class ToyWorldV2TrainConfig:
    """Everything that determines a toy-world v2 run."""

    out: Path = Path(".cache/toyworld-v2/out")
    """Output folder: `pipeline/` (diffusers) and `clip/toyworld_clip.{pt,safetensors}`."""
    work_dir: Path = Path(".cache/toyworld-v2/work")
    """Checkpoints for resuming."""
    seed: int = 0
    clip_pretrain_steps: int = 500
    clip_text_pretrain_steps: int = 1000
    clip_text_batch: int = 256
    clip_steps: int = 1000
    clip_batch: int = 64
    clip_lr: float = 1e-3
    clip_head_weight: float = 0.1
    """Weight of the pretraining heads' loss (both towers) inside the contrastive stage."""
    vae_steps: int = 10000
    vae_batch: int = 16
    vae_lr: float = 2e-3
    unet_steps: int = 20000
    """The cosine schedule's length; a run resumed from a carry-over copy must keep the one it started with."""
    unet_batch: int = 32
    unet_lr: float = 1e-3
    unet_layers_per_block: int = 1
    """ResNet + cross-attention layers per UNet level (diffusers' `layers_per_block`); a checkpoint resumes only
    with the value it was trained with."""
    caption_dropout: float = 0.1
    colour_dropout: float = 0.1
    """Share of objects whose colour word the UNet's captions leave out, so that a caption naming no colour
    means "any base colour"."""
    unknown_colour_rate: float = 0.1
    """Share of objects whose colour word the UNet's captions replace by a word the text tower never learnt
    (`unknown_words`), so that an unknown word in a colour's place says nothing about colour. The held-out
    colours are such words once `forget_held_out_words` has reset them; without this the UNet read the reset
    "orange" as orange every time (docs/toyworld_v2.md, tenth session)."""
    unet_count_rates: tuple[float, float, float] = (0.3, 0.35, 0.35)
    """Weights of one, two and three objects in the UNet's scenes (the CLIP and the VAE keep the world's
    `OBJECT_COUNT_RATES`, 0.45 / 0.35 / 0.2): more three-object scenes, the hardest to bind, for the UNet
    (docs/toyworld_v2.md, eleventh session)."""
    noise_offset: float = 0.1
    """Std of a per-image, per-channel constant added to the UNet's training noise ("offset noise"): without it
    16x16 latents leak their mean through SD's schedule at t=999 and the sampler reads the background from the
    starting noise instead of the prompt (measured on v1: backgrounds 62% right; docs/toyworld.md)."""
    ema_decay: float = 0.999
    unet_snr_gamma: float = 5.0
    """Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"; the diffusers example scripts' `--snr_gamma`, 5 as the paper advises): each sample's loss is
    weighted min(SNR, gamma) / SNR, so low-noise timesteps stop dominating; 0 turns it off."""
    unet_precision: str = "auto"
    """`bf16` runs the UNet's forward pass under bfloat16 autocast (weights, optimizer state, EMA and loss stay
    float32), `fp32` runs it in float32; `auto` picks bf16 where the CPU computes it natively
    (`cpu_computes_bf16`). A run keeps the precision it started with only if it is resumed on a like machine."""
    checkpoint_every: int = 100
    threads: int = 1
    stage: str = "all"
    """`clip`, `vae` or `unet` (clip, vae, then unet) trains or resumes only that far; `all` also saves the
    pipeline and the CLIP. `snapshot` saves them from the UNet's last checkpoint (its EMA weights) while
    training goes on, so it can be evaluated midway. `carry` writes `out/unet_state.safetensors`, the UNet
    checkpoint's carry-over copy (`checkpoint.carry_over_state`: EMA weights in float16 and the step, 14 MB
    instead of 112), for a run that must continue on another machine: copy it into that machine's work folder
    (with `clip_final` and `vae_final`) and rerun `--stage unet`."""

    def __post_init__(self) -> None:
        for name in (
            "clip_pretrain_steps",
            "clip_text_pretrain_steps",
            "clip_steps",
            "clip_text_batch",
            "vae_steps",
            "unet_steps",
            "clip_batch",
            "vae_batch",
            "unet_batch",
            "unet_layers_per_block",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.stage not in ("all", "clip", "vae", "unet", "snapshot", "carry"):
            raise ValueError(f"stage must be all, clip, vae, unet, snapshot or carry, got {self.stage!r}")
        for name in ("caption_dropout", "colour_dropout", "unknown_colour_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.colour_dropout + self.unknown_colour_rate >= 1:
            raise ValueError("colour_dropout + unknown_colour_rate must stay below 1")
        rates = self.unet_count_rates
        if len(rates) != 3 or min(rates) < 0 or sum(rates) <= 0:
            raise ValueError(f"unet_count_rates must be three non-negative weights, not all 0, got {rates}")
        if self.unet_snr_gamma < 0:
            raise ValueError(f"unet_snr_gamma must be 0 (off) or positive, got {self.unet_snr_gamma}")
        if self.unet_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"unet_precision must be auto, bf16 or fp32, got {self.unet_precision!r}")


def cpu_computes_bf16() -> bool:
    """Whether oneDNN has native bfloat16 kernels on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than float32."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def unet_autocast(precision: str) -> torch.autocast:
    """The autocast context the UNet's training forward pass runs in for `precision` (auto, bf16, fp32)."""
    bf16 = precision == "bf16" or (precision == "auto" and cpu_computes_bf16())
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


@functools.lru_cache(maxsize=4)
def _split_by_article(words: tuple[str, ...]) -> tuple[list[str], list[str]]:
    return [w for w in words if article(w) == "a"], [w for w in words if article(w) == "an"]


def scene_tensors(
    seed: int,
    count: int,
    held_out: bool,
    dropout: float = 0.0,
    colour_dropout: float = 0.0,
    unknown_colour_rate: float = 0.0,
    unknown_words: Sequence[str] = (),
    count_rates: Sequence[float] = OBJECT_COUNT_RATES,
) -> tuple[torch.Tensor, list[str]]:
    """A seeded batch of (N, 3, 64, 64) images in [-1, 1] (one, two or three objects weighed by `count_rates`)
    and captions: "" with probability `dropout`; each object's colour word left out with probability
    `colour_dropout`, or replaced by one of `unknown_words` with probability `unknown_colour_rate` (one taking
    "an" half the time)."""
    if unknown_colour_rate and not unknown_words:
        raise ValueError("unknown_colour_rate needs unknown_words to draw from")
    scenes = sample_batch(seed, count, held_out=held_out, count_rates=count_rates)
    images = torch.from_numpy(images_to_array([render_scene(scene) for scene in scenes]))
    drop = random.Random(seed + 1)
    words = random.Random(seed + 3)
    # half the unknown words drawn take "a", half "an" (as orange does)
    by_article = _split_by_article(tuple(unknown_words))
    captions = []
    for scene in scenes:
        colour_words = {}
        for index in range(len(scene.objects)):
            draw = words.random()
            if draw < colour_dropout:
                colour_words[index] = ""
            elif draw < colour_dropout + unknown_colour_rate:
                colour_words[index] = words.choice(by_article[words.random() < 0.5] or unknown_words)
        captions.append("" if drop.random() < dropout else scene.caption(colour_words))
    return images, captions


def twin_scenes(seed: int, count: int, shape_rate: float = 0.5) -> list[Scene]:
    """`count // 2` random scenes (all concepts), then a one-change twin of each; a `shape_rate` share of the
    twins changes a shape (the rest follow `twin_scene`'s own mix)."""
    rng = random.Random(seed)
    scenes = sample_batch(seed, count // 2, held_out=True)
    return scenes + [twin_scene(s, rng, "shape" if rng.random() < shape_rate else None) for s in scenes]


HARD_NEGATIVE_KINDS = ("shape", "shape", "texture", "texture", "colour", "background")
"""What a caption hard negative changes in any scene: shape and texture, the attributes contrast alone leaves at
chance, twice as often as colour and background."""
MULTI_OBJECT_NEGATIVE_KINDS = ("binding", "binding")
"""Added for two or three objects: two objects exchange their shapes, colours or textures in the caption."""
PLACED_NEGATIVE_KINDS = ("places", "places")
"""Added where the caption names places: the same objects, named in the same order, in exchanged places."""


def caption_variants(scene: Scene, rng: random.Random) -> tuple[list[str], int]:
    """The captions of `scene` with one thing changed, and the index of the true caption among them: one
    attribute (of one object, or the background where the caption names it) set to each of its values, two
    objects' attributes exchanged (`binding_variants`) or the objects' places permuted (`place_variants`)."""
    kinds = [k for k in HARD_NEGATIVE_KINDS if scene.mention_background or k != "background"]
    if len(scene.objects) > 1:
        kinds += MULTI_OBJECT_NEGATIVE_KINDS
        if scene.mention_positions:
            kinds += PLACED_NEGATIVE_KINDS
    kind = rng.choice(kinds)
    if kind in ("places", "binding"):
        variants = place_variants(scene) if kind == "places" else binding_variants(scene, rng)
        if len(variants) > 1:
            return variants, 0
        kind = rng.choice([k for k in kinds if k not in ("binding", "places")])  # identical objects
    index = 0 if kind == "background" else rng.randrange(len(scene.objects))
    values = ATTRIBUTES[kind]
    captions = [with_attribute(scene, kind, value, index).caption() for value in values]
    return captions, values.index(attribute_value(scene, kind, index))


def _what_is_said(scene: Scene) -> tuple[tuple[str, str], ...]:
    """What a caption of `scene` claims, whatever the order it names things in: each object's phrase with its
    place (where the caption names places)."""
    return tuple(sorted((obj.phrase(), obj.slot if scene.mention_positions else "") for obj in scene.objects))


def _true_first(scene: Scene, variants: list[Scene]) -> list[str]:
    """The captions of `scene` and of those `variants` that claim something else, each claim once."""
    seen = {_what_is_said(scene)}
    captions = [scene.caption()]
    for variant in variants:
        claim = _what_is_said(variant)
        if claim not in seen:
            seen.add(claim)
            captions.append(variant.caption())
    return captions


def place_variants(scene: Scene) -> list[str]:
    """The true caption first, then the captions that name the same objects in the same order but in every
    other arrangement of their places ("a red star on the right and a blue ring on the left" for "... on the
    left ... on the right"): only the place words tell them apart. Arrangements that claim the same as the
    truth (two identical objects exchanged) are left out."""
    named = scene.named()
    variants = [
        Scene(
            tuple(
                SceneObject(obj.shape, obj.colour, obj.texture, obj.box, slot)
                for obj, slot in zip(named, slots, strict=True)
            ),
            scene.background,
            scene.mention_background,
            None,
            True,
        )
        for slots in itertools.permutations([obj.slot for obj in named])
    ]
    return _true_first(scene, variants)


def binding_variants(scene: Scene, rng: random.Random) -> list[str]:
    """The true caption first, then the captions in which two of the objects (picked by `rng`) exchange their
    shapes, their colours or their textures: the same words in another order, so only which word goes with
    which object tells them apart. Exchanges that claim the same as the truth (equal values, or two objects
    that differ only in that attribute and no places named) are left out."""
    i, j = rng.sample(range(len(scene.objects)), 2)
    variants = []
    for kind in ("shape", "colour", "texture"):
        first, second = attribute_value(scene, kind, i), attribute_value(scene, kind, j)
        variants.append(with_attribute(with_attribute(scene, kind, second, i), kind, first, j))
    return _true_first(scene, variants)


def clip_training_loss(
    model: clip.model.CLIP,
    images: torch.Tensor,
    scenes: list[Scene],
    rng: random.Random,
    heads: tuple[torch.nn.ModuleDict, torch.nn.ModuleDict] | None = None,
    head_weight: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE over the batch plus the mean cross-entropy of each image over its caption and that
    caption's `caption_variants`, from one encoding of the images (so BatchNorm sees each batch once); with
    `heads` (image heads, text heads), plus `head_weight` times their `attribute_loss` on the image features
    and on the captions' features (only what each caption says)."""
    image_raw = model.encode_image(clip_model.normalize_images(images))
    image_features = image_raw / image_raw.norm(dim=-1, keepdim=True)
    sets = [caption_variants(scene, rng) for scene in scenes]
    captions = [scene.caption() for scene in scenes]
    text_raw = encode_text_truncated(
        model, clip.tokenize(captions + [c for variants, _ in sets for c in variants])
    )
    text = text_raw / text_raw.norm(dim=-1, keepdim=True)
    scale = model.logit_scale.exp().clamp(max=100)
    ce = torch.nn.functional.cross_entropy
    logits = scale * image_features @ text[: len(captions)].t()
    target = torch.arange(len(captions))
    contrastive = (ce(logits, target) + ce(logits.t(), target)) / 2
    losses, start = [], len(captions)
    for index, (variants, truth) in enumerate(sets):
        variant_logits = scale * image_features[index] @ text[start : start + len(variants)].t()
        start += len(variants)
        losses.append(ce(variant_logits[None], torch.tensor([truth])))
    loss = contrastive + torch.stack(losses).mean()
    if heads is not None:
        image_heads, text_heads = heads
        supervised = attribute_loss(image_heads, image_raw, scenes) + attribute_loss(
            text_heads, text_raw[: len(captions)], scenes, said_only=True
        )
        loss = loss + head_weight * supervised
    return loss


def attribute_heads(width: int) -> torch.nn.ModuleDict:
    """Linear heads on a CLIP feature: background, object count, and shape / colour / texture (or "none") in
    each slot of `CLIP_ATTRIBUTE_SLOTS`."""
    heads = torch.nn.ModuleDict({"background": torch.nn.Linear(width, len(BACKGROUNDS))})
    heads["count"] = torch.nn.Linear(width, 3)
    for slot in CLIP_ATTRIBUTE_SLOTS:
        for kind in ("shape", "colour", "texture"):
            heads[f"{slot or 'lone'}_{kind}"] = torch.nn.Linear(width, len(ATTRIBUTES[kind]) + 1)
    return heads


IGNORE = -100
"""Label of a head whose answer the input does not say (skipped by the cross-entropy)."""


def attribute_labels(scenes: list[Scene], said_only: bool = False) -> dict[str, torch.Tensor]:
    """The label of every head of `attribute_heads` for each scene. With `said_only` (captions rather than
    images), labels the caption does not say are `IGNORE`: the background where it is not named, and the
    slots of two or three objects named without their places."""
    labels: dict[str, list[int]] = {
        "background": [
            tuple(BACKGROUNDS).index(s.background) if s.mention_background or not said_only else IGNORE
            for s in scenes
        ],
        "count": [len(s.objects) - 1 for s in scenes],
    }
    for slot in CLIP_ATTRIBUTE_SLOTS:
        for kind in ("shape", "colour", "texture"):
            values = ATTRIBUTES[kind]
            column = labels[f"{slot or 'lone'}_{kind}"] = []
            for scene in scenes:
                unsaid = said_only and slot and len(scene.objects) > 1 and not scene.mention_positions
                found = [obj for obj in scene.objects if obj.slot == slot]
                column.append(
                    IGNORE if unsaid else values.index(getattr(found[0], kind)) if found else len(values)
                )
    return {name: torch.tensor(column) for name, column in labels.items()}


def attribute_loss(
    heads: torch.nn.ModuleDict, features: torch.Tensor, scenes: list[Scene], said_only: bool = False
) -> torch.Tensor:
    """Summed cross-entropy of every head of `attribute_heads` on a batch of scenes (heads with no label said
    in the batch are left out)."""
    loss = features.new_zeros(())
    for name, labels in attribute_labels(scenes, said_only).items():
        if (labels != IGNORE).any():
            loss = loss + torch.nn.functional.cross_entropy(
                heads[name](features), labels, ignore_index=IGNORE
            )
    return loss


def build_tiny_clip(seed: int = 0) -> clip.model.CLIP:
    """A freshly initialised tiny CLIP for 64 px scenes (fp32), clip-anytorch's own architecture with its
    ResNet image tower (one block per stage)."""
    torch.manual_seed(seed)
    return clip.model.CLIP(
        embed_dim=CLIP_WIDTH,
        image_resolution=IMAGE_SIZE,
        vision_layers=(1, 1, 1, 1),
        vision_width=CLIP_VISION_WIDTH,
        vision_patch_size=None,  # type: ignore[arg-type]
        context_length=clip_model.CONTEXT_LENGTH,
        vocab_size=clip_model.VOCAB_SIZE,
        transformer_width=CLIP_WIDTH,
        transformer_heads=CLIP_WIDTH // 64,
        transformer_layers=CLIP_LAYERS,
    )


def text_tower(model: clip.model.CLIP) -> torch.nn.Module:
    """A module holding the CLIP's text tower (everything but the image tower and the logit scale), sharing
    its parameters; its state dict keys are the CLIP's own."""
    holder = torch.nn.Module()
    holder.register_parameter("positional_embedding", model.positional_embedding)
    holder.register_parameter("text_projection", model.text_projection)
    for name in ("token_embedding", "transformer", "ln_final"):
        holder.add_module(name, getattr(model, name))
    return holder


def _prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _load_prefixed(state: dict[str, torch.Tensor], prefix: str, module: torch.nn.Module) -> None:
    module.load_state_dict({k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")})


def _pretrain_image_tower(
    config: ToyWorldV2TrainConfig, model: clip.model.CLIP, heads: torch.nn.ModuleDict
) -> None:
    """`clip_pretrain`: the image tower and its `attribute_heads` on rendered scenes (all concepts)."""

    def loss_fn(step: int) -> torch.Tensor:
        scenes = sample_batch(config.seed * 7_000_003 + step, config.clip_batch, held_out=True)
        images = torch.from_numpy(images_to_array([render_scene(s) for s in scenes]))
        return attribute_loss(heads, model.visual(clip_model.normalize_images(images)), scenes)

    model.visual.train()
    modules = {"visual": model.visual, "heads": heads}
    params = list(model.visual.parameters()) + list(heads.parameters())
    run_stage("clip_pretrain", config, modules, params, config.clip_lr, config.clip_pretrain_steps, loss_fn)


def _pretrain_text_tower(
    config: ToyWorldV2TrainConfig, model: clip.model.CLIP, heads: torch.nn.ModuleDict
) -> None:
    """`clip_text_pretrain`: the text tower and its own `attribute_heads` on captions alone (all concepts),
    each head taught only what the caption says: the mirror of the image tower's pretraining, which makes
    the pooled feature, and the token states the UNet reads, carry which object is where."""
    holder = text_tower(model)

    def loss_fn(step: int) -> torch.Tensor:
        scenes = sample_batch(config.seed * 5_000_011 + step, config.clip_text_batch, held_out=True)
        features = encode_text_truncated(model, clip.tokenize([s.caption() for s in scenes]))
        return attribute_loss(heads, features, scenes, said_only=True)

    params = list(holder.parameters()) + list(heads.parameters())
    modules = {"text": holder, "heads": heads}
    run_stage(
        "clip_text_pretrain",
        config,
        modules,
        params,
        config.clip_lr,
        config.clip_text_pretrain_steps,
        loss_fn,
    )


def train_clip(config: ToyWorldV2TrainConfig) -> clip.model.CLIP:
    """The tiny CLIP (see the module docstring): `clip_pretrain` trains the image tower with the supervised
    `attribute_heads`, `clip_text_pretrain` the text tower with its own heads, then `clip` trains both towers
    on batches of scenes and their twins with InfoNCE plus the caption hard-negative loss, keeping both sets of
    heads as an auxiliary loss so contrast does not wash out what they taught."""
    final = config.work_dir / "clip_final.safetensors"
    model = build_tiny_clip(config.seed)
    if not final.exists():
        image_heads, text_heads = attribute_heads(CLIP_WIDTH), attribute_heads(CLIP_WIDTH)
        image_done = config.work_dir / "clip_pretrain_final.safetensors"
        if not image_done.exists():
            _pretrain_image_tower(config, model, image_heads)
            write_safetensors(image_done, _prefixed("visual", model.visual) | _prefixed("heads", image_heads))
        image_state = load_file(str(image_done))
        _load_prefixed(image_state, "visual", model.visual)
        _load_prefixed(image_state, "heads", image_heads)
        text_done = config.work_dir / "clip_text_pretrain_final.safetensors"
        if not text_done.exists():
            _pretrain_text_tower(config, model, text_heads)
            write_safetensors(
                text_done, _prefixed("text", text_tower(model)) | _prefixed("heads", text_heads)
            )
        text_state = load_file(str(text_done))
        _load_prefixed(text_state, "text", text_tower(model))
        _load_prefixed(text_state, "heads", text_heads)

        def loss_fn(step: int) -> torch.Tensor:
            seed = config.seed * 1_000_003 + step
            scenes = twin_scenes(seed, config.clip_batch)
            images = torch.from_numpy(images_to_array([render_scene(s) for s in scenes]))
            return clip_training_loss(
                model,
                images,
                scenes,
                random.Random(seed + 1),
                (image_heads, text_heads),
                config.clip_head_weight,
            )

        model.train()
        modules = {"clip": model, "image_heads": image_heads, "text_heads": text_heads}
        params = list(model.parameters()) + list(image_heads.parameters()) + list(text_heads.parameters())
        run_stage("clip", config, modules, params, config.clip_lr, config.clip_steps, loss_fn)
        write_safetensors(final, model.state_dict())
    model.load_state_dict(load_file(str(final)))
    return model.eval()


def build_vae() -> AutoencoderKL:
    """4x-downsampling KL autoencoder: 64x64x3 scenes <-> 16x16x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def train_vae(config: ToyWorldV2TrainConfig) -> AutoencoderKL:
    """Reconstruction (MSE + L1, which keeps texture marks sharp) + tiny KL on all concepts; sets
    `scaling_factor` to 1 / latent std."""
    final = config.work_dir / "vae_final.safetensors"
    torch.manual_seed(config.seed + 1)
    vae = build_vae()
    if not final.exists():
        vae.to(memory_format=torch.channels_last)  # 0.59 s a step instead of 0.73 on two AMD EPYC threads

        def loss_fn(step: int) -> torch.Tensor:
            images, _ = scene_tensors(config.seed * 2_000_003 + step, config.vae_batch, held_out=True)
            images = images.contiguous(memory_format=torch.channels_last)
            posterior = vae.encode(images).latent_dist
            recon = vae.decode(posterior.sample()).sample
            mse = torch.nn.functional.mse_loss(recon, images)
            l1 = torch.nn.functional.l1_loss(recon, images)
            return mse + 0.5 * l1 + 1e-6 * posterior.kl().mean()

        vae.train()
        run_stage(
            "vae", config, {"vae": vae}, list(vae.parameters()), config.vae_lr, config.vae_steps, loss_fn
        )
        with torch.no_grad():
            images, _ = scene_tensors(config.seed + 7, 256, held_out=True)
            std = vae.encode(images).latent_dist.mean.std().item()
        write_safetensors(final, vae.state_dict(), {"scaling_factor": str(1.0 / std)})
    with safe_open(str(final), framework="pt") as handle:
        vae.register_to_config(scaling_factor=float(handle.metadata()["scaling_factor"]))
    vae.load_state_dict(load_file(str(final)))
    return vae.eval().requires_grad_(False)


def build_unet(cross_attention_dim: int, layers_per_block: int = 1) -> UNet2DConditionModel:
    """Three-level UNet on 16x16x4 latents, (64, 128, 128) channels, `layers_per_block` ResNet +
    cross-attention layers at every level with 32-channel heads."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // LATENT_SCALE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(64, 128, 128),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4, 4),
        norm_num_groups=32,
    )


def min_snr_loss(
    prediction: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    gamma: float,
) -> torch.Tensor:
    """Epsilon-prediction MSE with each sample weighted min(SNR(t), gamma) / SNR(t) (plain MSE for gamma 0)."""
    per_sample = torch.nn.functional.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
    if gamma == 0:
        return per_sample.mean()
    snr = compute_snr(noise_scheduler, timesteps)
    return (per_sample * snr.clamp(max=gamma) / snr).mean()


def train_unet(
    config: ToyWorldV2TrainConfig, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer
) -> UNet2DConditionModel:
    """Epsilon-prediction denoiser on base-world latents (no held-out concept ever)."""
    final = config.work_dir / "unet_final.safetensors"
    torch.manual_seed(config.seed + 2)
    unet = build_unet(text_encoder.config.hidden_size, config.unet_layers_per_block)
    if not final.exists():
        noise_scheduler = DDPMScheduler(
            **{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"}
        )
        ema = EMAModel(unet.parameters(), decay=config.ema_decay)

        forget_held_out_words(text_encoder, tokenizer, config.seed)  # no base caption holds these tokens
        pool = tuple(unknown_words(tokenizer))

        @torch.no_grad()
        def encode_captions(captions: list[str]) -> torch.Tensor:
            ids = tokenizer(
                captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            )
            return text_encoder(ids.input_ids)[0]

        def loss_fn(step: int) -> torch.Tensor:
            seed = config.seed * 3_000_003 + step
            images, captions = scene_tensors(
                seed,
                config.unet_batch,
                held_out=False,
                dropout=config.caption_dropout,
                colour_dropout=config.colour_dropout,
                unknown_colour_rate=config.unknown_colour_rate,
                unknown_words=pool,
                count_rates=config.unet_count_rates,
            )
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample(generator) * vae.config.scaling_factor
            context = encode_captions(captions)
            noise = training_noise(latents.shape, generator, config.noise_offset)
            timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            with unet_autocast(config.unet_precision):
                prediction = unet(
                    noisy.contiguous(memory_format=torch.channels_last),
                    timesteps,
                    encoder_hidden_states=context,
                ).sample
            return min_snr_loss(prediction.float(), noise, timesteps, noise_scheduler, config.unet_snr_gamma)

        unet.to(memory_format=torch.channels_last)
        unet.train()
        params = list(unet.parameters())
        run_stage("unet", config, {"unet": unet}, params, config.unet_lr, config.unet_steps, loss_fn, ema)
        ema.copy_to(params)
        write_safetensors(final, unet.state_dict())
    unet.load_state_dict(load_file(str(final)))
    return unet.eval()


def tokens_only_in_held_out_captions(tokenizer: CLIPTokenizer, samples: int = 4000) -> list[int]:
    """Token ids that occur in captions of the whole world but never in a base-world caption: the held-out
    words, pieces of them ("checkered" is "check" + "ered") and the article "an", which only "orange" takes."""

    def token_ids(held_out: bool) -> set[int]:
        captions = [scene.caption() for scene in sample_batch(17, samples, held_out=held_out)]
        return {i for ids in tokenizer(captions, add_special_tokens=False).input_ids for i in ids}

    return sorted(token_ids(True) - token_ids(False))


def unknown_words(tokenizer: CLIPTokenizer, samples: int = 4000) -> list[str]:
    """Words the text tower never learnt: the tokenizer's whole-word entries of three or more letters that occur
    in no caption of the world, held-out ones included, and name none of its attributes ("plain" is never
    said). Their embeddings are as initialised, like the held-out words' after `forget_held_out_words` (which
    `train_unet` applies to its text tower too, so that "an", the held-out article, reads the same in training
    as in the shipped model); a UNet taught that such a word in a colour's place says nothing about colour
    treats "an orange" and "a teal" the same way."""
    captions = [scene.caption() for scene in sample_batch(17, samples, held_out=True)]
    used = {i for ids in tokenizer(captions, add_special_tokens=False).input_ids for i in ids}
    named = {value for values in ATTRIBUTES.values() for value in values}
    words = []
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        word = token.removesuffix("</w>")
        if (
            token.endswith("</w>")
            and len(word) >= 3
            and word.isascii()
            and word.isalpha()
            and index not in used
            and word not in named
        ):
            words.append(word)
    return words


def forget_held_out_words(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, seed: int) -> list[int]:
    """Give every token of `tokens_only_in_held_out_captions` back the embedding it had before the CLIP
    stage trained it; returns those ids.

    The CLIP stage sees every concept (its image tower must), so its text tower learnt "teal" and "orange"
    too, and a UNet that never saw them still renders the blend their embeddings sit between. The shipped
    text tower keeps meaning only for words the UNet was trained on, as SD's DreamBooth subjects have no word
    of their own; base captions are encoded exactly as before (none of them holds these tokens, and the
    attention mask is causal)."""
    ids = tokens_only_in_held_out_captions(tokenizer)
    initial = build_tiny_clip(seed).token_embedding.weight
    embedding = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        embedding[ids] = initial[ids].to(embedding.dtype)
    return ids


def snapshot(config: ToyWorldV2TrainConfig, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> Path:
    """Save `out/pipeline` with the EMA weights of the UNet's latest checkpoint (no training step)."""
    state = config.work_dir / "unet_state.safetensors"
    if not state.exists():
        raise FileNotFoundError(f"no UNet checkpoint in {config.work_dir}: train with --stage unet first")
    unet = build_unet(text_encoder.config.hidden_size, config.unet_layers_per_block)
    # a carry-over copy's weights are the EMA's already
    ema = read_checked_weights(state, unet, "unet", None if is_carry_over(state) else "ema")
    with safe_open(str(state), framework="pt") as handle:
        step = handle.metadata()["step"]
    unet.load_state_dict(ema)  # parameters from the EMA; buffers (none in this UNet) as saved
    clip_net = train_clip(config)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(config.work_dir / "tokenizer"))
    forget_held_out_words(text_encoder, tokenizer, config.seed)
    save_assets(Path(config.out), clip_net, vae, text_encoder, unet.eval())
    print(f"snapshot of UNet step {step}")
    return Path(config.out) / "pipeline"


def train(config: ToyWorldV2TrainConfig) -> Path | None:
    """Run (or resume) the stages and write the assets; returns the pipeline folder (None for one stage)."""
    torch.set_num_threads(config.threads)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    if config.stage == "snapshot" and not (config.work_dir / "unet_state.safetensors").exists():
        raise FileNotFoundError(f"no UNet checkpoint in {config.work_dir}: train with --stage unet first")
    if config.stage == "vae":
        train_vae(config)
        return None
    if config.stage == "carry":
        state = config.work_dir / "unet_state.safetensors"
        if not state.exists():
            raise FileNotFoundError(f"no UNet checkpoint in {config.work_dir}: train with --stage unet first")
        hidden = train_clip(config).transformer.width
        Path(config.out).mkdir(parents=True, exist_ok=True)
        return carry_over_state(
            state,
            Path(config.out) / "unet_state.safetensors",
            build_unet(hidden, config.unet_layers_per_block),
            "unet",
        )
    clip_net = train_clip(config)
    if config.stage == "clip":
        return None
    text_encoder = clip_model.to_transformers_text_model(clip_net).requires_grad_(False)
    vae = train_vae(config)
    if config.stage == "snapshot":
        return snapshot(config, vae, text_encoder)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(config.work_dir / "tokenizer"))
    unet = train_unet(config, vae, text_encoder, tokenizer)
    if config.stage == "unet":
        return None
    forget_held_out_words(text_encoder, tokenizer, config.seed)
    save_assets(Path(config.out), clip_net, vae, text_encoder, unet)
    return Path(config.out) / "pipeline"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in vars(ToyWorldV2TrainConfig()).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, tuple):
            parser.add_argument(flag, type=type(value[0]), nargs=len(value), default=value)
            continue
        kind = Path if isinstance(value, Path) else type(value)
        parser.add_argument(flag, type=kind, default=value)
    parser.add_argument(
        "--skip-report", action="store_true", help="no quality report after a full run (--stage all)"
    )
    args = vars(parser.parse_args(argv))
    skip_report = args.pop("skip_report")
    args = {name: tuple(value) if isinstance(value, list) else value for name, value in args.items()}
    try:
        config = ToyWorldV2TrainConfig(**args)
        saved = train(config)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if saved is None:
        return
    print(f"saved {saved}")
    if config.stage == "all" and not skip_report:
        from models.toyworld.v2 import evaluate

        evaluate.main(["--pipeline", str(saved), "--clip", str(clip_file(Path(config.out)))])


if __name__ == "__main__":
    main()
