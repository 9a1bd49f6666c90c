"""Toy world v2's training command: a few steps of every stage write a 64 px pipeline the real loader reads,
and a stopped stage resumes from its checkpoint instead of starting over."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from models.clip_compat import clip
from models.clip_tokenizer import write_clip_tokenizer_files
from models.pipelines import load_pipeline
from models.toyworld import clip_model
from models.toyworld.v2.evaluate import clip_binding_choice, load_scorer, multi_object_cases
from models.toyworld.v2.train import (
    IGNORE,
    SCHEDULER_CONFIG,
    ToyWorldV2TrainConfig,
    attribute_heads,
    attribute_labels,
    attribute_loss,
    binding_variants,
    build_tiny_clip,
    build_vae,
    caption_variants,
    cpu_computes_bf16,
    forget_held_out_words,
    min_snr_loss,
    place_variants,
    scene_tensors,
    tokens_only_in_held_out_captions,
    train,
    train_unet,
    unet_autocast,
    unknown_words,
)
from models.toyworld.v2.train import main as train_main
from models.toyworld.v2.world import ATTRIBUTES, IMAGE_SIZE, Scene, SceneObject, sample_batch


def _tiny_config(tmp_path: Path, **overrides: object) -> ToyWorldV2TrainConfig:
    settings: dict[str, object] = {
        "out": tmp_path / "assets",
        "work_dir": tmp_path / "work",
        "clip_steps": 2,
        "clip_pretrain_steps": 1,
        "clip_text_pretrain_steps": 1,
        "clip_text_batch": 4,
        "vae_steps": 1,
        "unet_steps": 2,
        "clip_batch": 4,
        "vae_batch": 2,
        "unet_batch": 2,
        "checkpoint_every": 1,
    }
    settings.update(overrides)
    return ToyWorldV2TrainConfig(**settings)  # type: ignore[arg-type]


def _step(path: Path) -> int:
    with safe_open(str(path), framework="pt") as handle:
        return int(handle.metadata()["step"])


def test_a_short_run_writes_a_64px_pipeline_with_attention_at_every_level(tmp_path: Path) -> None:
    assert train(_tiny_config(tmp_path, stage="unet", unet_steps=1)) is None
    assert _step(tmp_path / "work" / "unet_state.safetensors") == 1
    (tmp_path / "work" / "unet_final.safetensors").unlink()
    config = _tiny_config(tmp_path)
    pipeline_dir = train(config)
    assert _step(config.work_dir / "unet_state.safetensors") == 2  # resumed at 1, not restarted
    pipe = load_pipeline(pipeline_dir, device="cpu", dtype="fp32")
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == IMAGE_SIZE == 64
    assert all("CrossAttn" in block for block in pipe.unet.config.down_block_types)
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 128
    image = pipe("an orange heart on the left and a blue ring on the right", num_inference_steps=2).images[0]
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    scorer = load_scorer(config.out / "clip" / "toyworld_clip.safetensors")  # as the evaluation reads it
    trained = load_file(str(config.work_dir / "clip_final.safetensors"))
    assert scorer.visual.__class__.__name__ == "ModifiedResNet"
    for key, value in scorer.state_dict().items():  # fp16 on disk, BatchNorm step counters kept as integers
        assert value.dtype == (torch.float32 if trained[key].is_floating_point() else trained[key].dtype)
        torch.testing.assert_close(value, trained[key].half().to(value.dtype), rtol=0, atol=0)
    plain = StableDiffusionPipeline.from_pretrained(
        pipeline_dir
    )  # no torch_dtype: one dtype, as in diffusers
    assert {plain.unet.dtype, plain.vae.dtype, plain.text_encoder.dtype} == {torch.float32}
    assert plain("a blue ring", num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


def test_impossible_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unet_steps"):
        _tiny_config(tmp_path, unet_steps=0)
    with pytest.raises(ValueError, match="stage"):
        _tiny_config(tmp_path, stage="everything")
    with pytest.raises(ValueError, match="unet_precision"):
        _tiny_config(tmp_path, unet_precision="fp8")
    with pytest.raises(ValueError, match="unet_snr_gamma"):
        _tiny_config(tmp_path, unet_snr_gamma=-1.0)


def test_min_snr_weighting_damps_only_the_low_noise_timesteps() -> None:
    scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    noise = torch.zeros(2, 4, 16, 16)
    prediction = torch.ones(2, 4, 16, 16)  # per-sample MSE 1
    timesteps = torch.tensor([10, 900])
    snr = scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])
    assert snr[0] > 5 > snr[1]  # t=10 is nearly clean, t=900 nearly all noise
    expected = (5 / snr[0] + 1) / 2
    torch.testing.assert_close(min_snr_loss(prediction, noise, timesteps, scheduler, 5.0), expected.float())
    assert min_snr_loss(prediction, noise, timesteps, scheduler, 0.0).item() == 1.0


def test_the_unet_runs_in_bfloat16_only_when_asked_or_native() -> None:
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with unet_autocast("bf16"):
        assert layer(x).dtype == torch.bfloat16
    with unet_autocast("fp32"):
        assert layer(x).dtype == torch.float32
    with unet_autocast("auto"):
        assert layer(x).dtype == (torch.bfloat16 if cpu_computes_bf16() else torch.float32)


def test_a_snapshot_saves_the_ema_weights_of_the_last_unet_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--stage unet"):
        train(_tiny_config(tmp_path, stage="snapshot"))
    assert train(_tiny_config(tmp_path, stage="unet", unet_steps=3, ema_decay=0.5)) is None
    pipeline_dir = train(_tiny_config(tmp_path, stage="snapshot", unet_steps=3))
    unet = load_pipeline(pipeline_dir, device="cpu", dtype="fp32").unet
    with safe_open(str(tmp_path / "work" / "unet_state.safetensors"), framework="pt") as handle:
        names = [name for name, _ in unet.named_parameters()]
        ema = {name: handle.get_tensor(f"extra.ema.{i}") for i, name in enumerate(names)}
        raw = {name: handle.get_tensor(f"module.unet.{name}") for name in names}
    differs = [name for name in names if not torch.equal(ema[name], raw[name])]
    assert differs, "EMA equals the raw weights: the test cannot tell them apart"
    for name, value in unet.named_parameters():  # saved in fp16, loaded in fp32
        torch.testing.assert_close(value, ema[name].half().float(), rtol=0, atol=0)

    # the carry-over copy: EMA weights in fp16 and the step, no moments; another machine resumes from it
    carry = train(_tiny_config(tmp_path, stage="carry", out=tmp_path / "carry", unet_steps=3))
    assert carry == tmp_path / "carry" / "unet_state.safetensors"
    with safe_open(str(carry), framework="pt") as handle:
        assert handle.metadata()["step"] == "3"
        assert sorted(handle.keys()) == sorted(f"module.unet.{name}" for name in names)
        carried = {name: handle.get_tensor(f"module.unet.{name}") for name in names}
    for name in names:
        assert carried[name].dtype == torch.float16
        torch.testing.assert_close(carried[name], ema[name].half(), rtol=0, atol=0)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("clip_final", "vae_final"):
        (other / f"{name}.safetensors").write_bytes((tmp_path / "work" / f"{name}.safetensors").read_bytes())
    (other / "unet_state.safetensors").write_bytes(carry.read_bytes())
    snap = train(_tiny_config(tmp_path, stage="snapshot", work_dir=other, out=tmp_path / "snap2"))
    for name, value in load_pipeline(snap, device="cpu", dtype="fp32").unet.named_parameters():
        torch.testing.assert_close(value, carried[name].float(), rtol=0, atol=0)
    train(_tiny_config(tmp_path, stage="unet", work_dir=other, unet_steps=4, ema_decay=0.5))
    state = other / "unet_state.safetensors"
    assert _step(state) == 4  # resumed at 3
    with safe_open(str(state), framework="pt") as handle:
        assert handle.get_tensor("optim.0.step").item() == 1  # fresh moments: one step taken since
        decay = min(0.5, (1 + 3) / (10 + 3))  # EMAModel's decay at its fourth step, under the 0.5 asked for
        for i, name in enumerate(names):  # the EMA restarted from the carried weights
            new = handle.get_tensor(f"module.unet.{name}")
            expected = decay * carried[name].float() + (1 - decay) * new
            torch.testing.assert_close(handle.get_tensor(f"extra.ema.{i}"), expected)


def test_the_shipped_text_tower_forgets_only_the_words_the_unet_never_saw(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp_path / "tokenizer"))
    ids = tokens_only_in_held_out_captions(tokenizer)
    assert sorted(tokenizer.decode([i]) for i in ids) == sorted(
        ["an", "chec", "kered", "heart", "frame", "orange", "teal"]
    )  # "an" too: no base colour or texture starts with a vowel, so only "orange" takes it
    text_encoder = clip_model.to_transformers_text_model(build_tiny_clip(0))
    with torch.no_grad():  # stand in for CLIP training: move every embedding away from its initial value
        text_encoder.get_input_embeddings().weight.add_(0.05)

    def encode(prompt: str) -> torch.Tensor:
        return text_encoder(tokenizer(prompt, return_tensors="pt").input_ids)[0]

    base = "a red dotted star on the left and a blue ring on the right on a grey background"
    held_out = "an orange checkered heart on a white background"
    before = encode(base), encode(held_out)
    assert forget_held_out_words(text_encoder, tokenizer, seed=0) == ids
    assert torch.equal(encode(base), before[0])
    assert not torch.allclose(encode(held_out), before[1])
    initial = build_tiny_clip(0).token_embedding.weight
    assert torch.equal(text_encoder.get_input_embeddings().weight[ids], initial[ids])


def test_caption_hard_negatives_change_one_attribute_or_rebind_the_same_words_and_point_at_the_truth() -> (
    None
):
    rng = random.Random(3)
    seen = set()
    for scene in sample_batch(5, 200, held_out=True):
        captions, truth = caption_variants(scene, rng)
        assert captions[truth] == scene.caption()
        assert len(set(captions)) == len(captions) > 1
        words = [caption.replace(",", "").split() for caption in captions]
        if all(sorted(other) == sorted(words[truth]) for other in words):  # the same words rebound
            assert len(scene.objects) > 1
            without_places = {re.sub(r"\b(left|middle|right)\b", "?", caption) for caption in captions}
            if len(without_places) == 1:  # only the place words differ: every arrangement of the places
                repeats = Counter(obj.phrase() for obj in scene.objects).values()
                assert len(captions) == math.factorial(len(scene.objects)) // math.prod(
                    map(math.factorial, repeats)
                )
                seen.add("places")
            else:
                seen.add("binding")
            continue
        assert len(captions) in {len(values) for values in ATTRIBUTES.values()}
        for (
            other
        ) in words:  # each variant swaps one word (an article may change with it: "a red" / "an orange")
            assert len(set(words[truth]) - set(other) - {"a", "an"}) <= 1
        seen.add(f"attribute{len(captions)}")
    assert seen == {"places", "binding"} | {f"attribute{len(values)}" for values in ATTRIBUTES.values()}


def test_place_variants_name_the_same_objects_in_the_same_order_in_every_other_arrangement() -> None:
    scene = multi_object_cases(3, 1)[0].scene  # three different shapes, places named
    captions = place_variants(scene)
    assert captions[0] == scene.caption()
    assert len(captions) == len(set(captions)) == 6
    places = {"left", "middle", "right"}
    for caption in captions:
        phrases = [obj.phrase() for obj in scene.named()]
        assert [caption.index(phrase) for phrase in phrases] == sorted(caption.index(p) for p in phrases)
        said = [word.strip(",") for word in caption.split() if word.strip(",") in places]
        assert sorted(said) == sorted(places)
    two = multi_object_cases(2, 1)[0].scene
    swapped = place_variants(two)
    assert len(swapped) == 2 and swapped[0] == two.caption()
    assert swapped[1].replace("left", "?").replace("right", "left").replace("?", "right") == two.caption()


def test_binding_variants_exchange_one_attribute_between_two_objects() -> None:
    scene = Scene(
        (
            SceneObject("star", "red", "dotted", (4, 20, 24), "left"),
            SceneObject("ring", "blue", "plain", (36, 20, 24), "right"),
        )
    )
    assert binding_variants(scene, random.Random(0)) == [
        "a red dotted star and a blue ring on a white background",
        "a red dotted ring and a blue star on a white background",
        "a blue dotted star and a red ring on a white background",
        "a red star and a blue dotted ring on a white background",
    ]
    twins = Scene((scene.objects[0], SceneObject("star", "red", "dotted", (36, 20, 24), "right")))
    assert binding_variants(twins, random.Random(0)) == [twins.caption()]  # nothing to exchange
    colours_only = Scene((scene.objects[0], SceneObject("star", "blue", "dotted", (36, 20, 24), "right")))
    assert binding_variants(colours_only, random.Random(0)) == [colours_only.caption()]  # same picture
    with_places = Scene(colours_only.objects, mention_positions=True)
    assert binding_variants(with_places, random.Random(0)) == [
        with_places.caption(),
        "a blue dotted star on the left and a red dotted star on the right on a white background",
    ]
    placed = Scene(twins.objects, mention_positions=True)
    assert place_variants(placed) == [placed.caption()]
    for seed in range(20):  # falls back to a one-attribute variant
        for scene in (twins, placed):
            captions, truth = caption_variants(scene, random.Random(seed))
            assert captions[truth] == scene.caption() and len(captions) > 1


def test_the_attribute_heads_read_every_slot_and_say_none_where_a_slot_is_empty() -> None:
    heads = attribute_heads(8)
    assert sorted(heads) == sorted(
        ["background", "count"]
        + [
            f"{slot}_{kind}"
            for slot in ("lone", "left", "middle", "right")
            for kind in ("shape", "colour", "texture")
        ]
    )
    scenes = sample_batch(2, 16, held_out=True)
    # zero features: every head outputs its bias; with zero biases each cross-entropy is log(classes)
    for head in heads.values():
        torch.nn.init.zeros_(head.bias)
    uniform = attribute_loss(heads, torch.zeros(len(scenes), 8), scenes).item()
    classes = [3, 3] + [len(ATTRIBUTES[k]) + 1 for _ in range(4) for k in ("shape", "colour", "texture")]
    assert uniform == pytest.approx(sum(math.log(n) for n in classes), rel=1e-5)
    # and the labels are the scenes' own: a head biased towards the truth lowers the loss to near zero
    for head in heads.values():
        torch.nn.init.zeros_(head.weight)
    lone = [s for s in scenes if len(s.objects) == 1]
    heads["lone_shape"].bias.data[ATTRIBUTES["shape"].index(lone[0].objects[0].shape)] = 50.0
    single = attribute_loss(heads, torch.zeros(1, 8), lone[:1]).item()
    assert single == pytest.approx(sum(math.log(n) for n in classes) - math.log(12), abs=1e-4)


def test_the_text_heads_learn_only_what_a_caption_says() -> None:
    placed = Scene(
        (
            SceneObject("star", "red", "dotted", (2, 20, 24), "left"),
            SceneObject("ring", "blue", "plain", (36, 20, 24), "right"),
        ),
        background="grey",
        mention_background=False,
        mention_positions=True,
    )
    unplaced = Scene(placed.objects, background="grey", mention_background=True, mention_positions=False)
    lone = Scene((SceneObject("cross", "green", "barred", (16, 16, 32)),), background="black")
    said = attribute_labels([placed, unplaced, lone], said_only=True)
    seen = attribute_labels([placed, unplaced, lone])
    none = {kind: len(ATTRIBUTES[kind]) for kind in ("shape", "colour", "texture")}
    assert said["background"].tolist() == [IGNORE, 2, 1]  # white, black, grey: only where the caption says it
    assert seen["background"].tolist() == [2, 2, 1]
    assert said["count"].tolist() == seen["count"].tolist() == [1, 1, 0]
    star, ring, cross = (ATTRIBUTES["shape"].index(s) for s in ("star", "ring", "cross"))
    assert said["left_shape"].tolist() == [star, IGNORE, none["shape"]]  # unplaced: where is not said
    assert said["right_shape"].tolist() == [ring, IGNORE, none["shape"]]
    assert said["middle_colour"].tolist() == [none["colour"], IGNORE, none["colour"]]
    assert seen["left_shape"].tolist() == [star, star, none["shape"]]  # an image always shows it
    assert said["lone_shape"].tolist() == seen["lone_shape"].tolist() == [none["shape"], none["shape"], cross]
    # a batch in which no caption says a head's answer leaves that head out instead of giving NaN
    heads = attribute_heads(8)
    loss = attribute_loss(heads, torch.randn(1, 8), [unplaced], said_only=True)
    assert torch.isfinite(loss)
    loss.backward()
    assert heads["left_shape"].weight.grad is None and heads["count"].weight.grad is not None


def test_the_text_pretraining_stage_teaches_the_text_tower_and_keeps_the_image_tower(tmp_path: Path) -> None:
    config = _tiny_config(tmp_path, stage="clip", clip_steps=1)
    train(config)
    image = load_file(str(config.work_dir / "clip_pretrain_final.safetensors"))
    text = load_file(str(config.work_dir / "clip_text_pretrain_final.safetensors"))
    initial = build_tiny_clip(0).state_dict()
    assert {k.split(".", 1)[0] for k in image} == {"visual", "heads"}
    assert {k.split(".", 1)[0] for k in text} == {"text", "heads"}
    text_keys = {k[len("text.") :] for k in text if k.startswith("text.")}
    assert text_keys == {k for k in initial if not k.startswith("visual.") and k != "logit_scale"}
    assert not torch.equal(
        text["text.transformer.resblocks.0.attn.in_proj_weight"],
        initial["transformer.resblocks.0.attn.in_proj_weight"],
    )
    # the contrastive stage starts from both pretrainings: its state moved on from them, the heads came along
    state = load_file(str(config.work_dir / "clip_state.safetensors"))
    assert any(k.startswith("module.text_heads.") for k in state)
    assert any(k.startswith("module.image_heads.") for k in state)


def test_a_clip_that_cannot_tell_left_from_right_never_prefers_the_true_places() -> None:
    model = build_tiny_clip(0)
    left, right = (clip.tokenize(word)[0, 1].item() for word in ("left", "right"))
    with torch.no_grad():
        model.token_embedding.weight[right] = model.token_embedding.weight[left]
    choice = clip_binding_choice(model, count=12)
    assert choice["places"] == 0.0  # the place swap encodes identically: a tie is not a preference
    assert 0.0 <= choice["binding"] <= 1.0


def test_unet_captions_leave_out_or_replace_colour_words_at_the_configured_rates_and_nothing_else() -> None:
    colour_words = set(ATTRIBUTES["colour"])
    unknown = ["zebra", "photo", "lantern"]
    _, full = scene_tensors(5, 400, held_out=False)
    images, some = scene_tensors(
        5, 400, held_out=False, colour_dropout=0.3, unknown_colour_rate=0.2, unknown_words=unknown
    )
    assert images.shape == (400, 3, IMAGE_SIZE, IMAGE_SIZE)
    counts: Counter[str] = Counter()
    for before, after, scene in zip(full, some, sample_batch(5, 400, held_out=False), strict=True):
        assert before == scene.caption()
        others = [w for w in after.split() if w not in colour_words | set(unknown)]
        assert others == [w for w in before.split() if w not in colour_words]
        kept = [w for w in after.split() if w in colour_words]
        remaining = iter(w for w in before.split() if w in colour_words)
        assert all(word in remaining for word in kept)  # the colour words kept, in their order
        replaced = sum(w in unknown for w in after.split())
        counts["named"] += len(kept)
        counts["replaced"] += replaced
        counts["left out"] += len(scene.objects) - len(kept) - replaced
    total = sum(counts.values())
    assert 0.25 < counts["left out"] / total < 0.35 and 0.15 < counts["replaced"] / total < 0.25
    with pytest.raises(ValueError, match="colour_dropout"):
        ToyWorldV2TrainConfig(colour_dropout=1.0)
    _, mixed = scene_tensors(7, 400, False, 0.0, 0.0, 0.5, ["zebra", "lantern", "photo", "apple"])
    replacements = Counter(w for c in mixed for w in c.split() if w in {"zebra", "lantern", "photo", "apple"})
    assert 0.4 < replacements["apple"] / sum(replacements.values()) < 0.6  # half the draws take "an"
    assert all("an apple" in c for c in mixed if "apple" in c.split())
    with pytest.raises(ValueError, match="stay below 1"):
        ToyWorldV2TrainConfig(colour_dropout=0.6, unknown_colour_rate=0.5)


def test_unet_scenes_weigh_object_counts_by_count_rates() -> None:
    def counts(captions: list[str]) -> Counter[int]:
        return Counter(caption.count(", ") + caption.count(" and ") + 1 for caption in captions)

    _, default = scene_tensors(9, 600, held_out=False)
    assert default == [s.caption() for s in sample_batch(9, 600, held_out=False)]
    _, three = scene_tensors(9, 60, held_out=False, count_rates=(0.0, 0.0, 1.0))
    assert counts(three) == {3: 60}
    _, shifted = scene_tensors(9, 600, held_out=False, count_rates=(0.3, 0.35, 0.35))
    assert counts(shifted)[3] / 600 > counts(default)[3] / 600 + 0.08  # 0.35 against the world's 0.2
    assert ToyWorldV2TrainConfig().unet_count_rates == (0.3, 0.35, 0.35)


def test_unknown_words_are_single_tokens_no_world_caption_uses(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp_path / "tokenizer"))
    words = unknown_words(tokenizer)
    assert len(words) > 10_000
    world = {i for s in sample_batch(3, 2000, held_out=True) for i in tokenizer(s.caption()).input_ids}
    for word in random.Random(0).sample(words, 500):
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] not in world, word
    assert any(word[0] in "aeiou" for word in words)  # these take "an", as "orange" does
    assert not set(words) & {w for names in ATTRIBUTES.values() for w in names}
    held_out_ids = set(tokens_only_in_held_out_captions(tokenizer))
    assert not {tokenizer(w, add_special_tokens=False).input_ids[0] for w in words} & held_out_ids


def test_a_deeper_unet_trains_snapshots_and_refuses_to_resume_as_another_shape(tmp_path: Path) -> None:
    assert train(_tiny_config(tmp_path, stage="unet", unet_steps=1, unet_layers_per_block=2)) is None
    state = tmp_path / "work" / "unet_state.safetensors"
    saved = state.read_bytes()
    unet = load_pipeline(
        train(_tiny_config(tmp_path, stage="snapshot", unet_layers_per_block=2)), device="cpu", dtype="fp32"
    ).unet
    assert unet.config.layers_per_block == 2
    assert [len(block.attentions) for block in unet.down_blocks] == [2, 2, 2]
    with safe_open(str(state), framework="pt") as handle:
        assert f"module.unet.{next(iter(unet.state_dict()))}" in handle.keys()  # noqa: SIM118
        torch.testing.assert_close(
            unet.down_blocks[0].attentions[1].proj_out.weight,
            handle.get_tensor(
                f"extra.ema.{_parameter_index(unet, 'down_blocks.0.attentions.1.proj_out.weight')}"
            )
            .half()
            .float(),
            rtol=0,
            atol=0,
        )
    (tmp_path / "work" / "unet_final.safetensors").unlink()
    for stage in ("unet", "snapshot", "carry"):  # one layer per block: not this checkpoint
        with pytest.raises(ValueError, match="another shape than this run builds"):
            train(_tiny_config(tmp_path, stage=stage, unet_steps=2, out=tmp_path / stage))
    assert state.read_bytes() == saved  # nothing already saved is touched
    assert not (tmp_path / "carry" / "unet_state.safetensors").exists()


def _parameter_index(module: torch.nn.Module, name: str) -> int:
    return [n for n, _ in module.named_parameters()].index(name)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stage", "everything"], "stage must be all, clip, vae, unet, snapshot or carry"),
        (["--colour-dropout", "1.5"], "colour_dropout must be in [0, 1)"),
        (["--unet-layers-per-block", "0"], "unet_layers_per_block must be positive"),
        (["--stage", "snapshot"], "no UNet checkpoint in"),
        (["--stage", "carry"], "no UNet checkpoint in"),
        (["--unet-count-rates", "0", "0", "0"], "unet_count_rates must be three non-negative weights"),
        (["--unet-count-rates", "0.2", "0.3", "0.5", "--stage", "snapshot"], "no UNet checkpoint in"),
    ],
)
def test_the_cli_answers_bad_settings_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        train_main([*argv, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_unet_trains_on_the_text_tower_it_ships_with_held_out_words_reset(tmp_path: Path) -> None:
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp_path / "tokenizer"))
    text_encoder = clip_model.to_transformers_text_model(build_tiny_clip(0)).requires_grad_(False)
    with torch.no_grad():  # stand in for CLIP training
        text_encoder.get_input_embeddings().weight.add_(0.05)
    config = _tiny_config(tmp_path, stage="unet", unet_steps=1, unknown_colour_rate=0.5)
    config.work_dir.mkdir(parents=True)
    train_unet(config, build_vae(), text_encoder, tokenizer)
    ids = tokens_only_in_held_out_captions(tokenizer)
    initial = build_tiny_clip(0).token_embedding.weight
    embedding = text_encoder.get_input_embeddings().weight
    assert torch.equal(embedding[ids], initial[ids])
    others = [i for i in range(100) if i not in ids]
    assert torch.equal(embedding[others], initial[others] + 0.05)
    _, captions = scene_tensors(5, 200, False, 0.0, 0.0, 0.5, unknown_words(tokenizer))
    assert any(
        " an " in f" {c} " for c in captions
    )  # an unknown word with a vowel takes "an", as in training
