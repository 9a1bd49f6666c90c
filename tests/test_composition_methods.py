"""Every composition method on the tiny SD model: determinism, evaluation counts, equivalences, bad inputs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from composition import AdapterBank, CompositionError, ConceptPrompt, generate
from composition.methods import METHODS, method_options
from composition.methods.cmlora import default_cache_interval, refresh_steps, regional_weights
from tests.composition_helpers import FakeAdapter, torch_threads

STEPS = 3
FAST = {"clora": {"preset": "light", "refine_rounds": 1}, "cmlora": {"profile_steps": 1}}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def _two_concepts(pipe) -> tuple[AdapterBank, ConceptPrompt]:
    bank = AdapterBank(
        pipe, [FakeAdapter(1, "sks star"), FakeAdapter(2, "zwx heart", suffixes=("to_q", "to_v"))]
    )
    prompt = ConceptPrompt.build(
        "a sks star and a zwx heart", ["sks star", "zwx heart"], plains=["star", "heart"]
    )
    return bank, prompt


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_is_seeded_and_counts_its_unet_evaluations(method, tiny_sd_pipe) -> None:
    bank, prompt = _two_concepts(tiny_sd_pipe)
    options = FAST.get(method, {})
    first = generate(method, tiny_sd_pipe, bank, prompt, steps=STEPS, guidance=5.0, seed=3, **options)
    again = generate(method, tiny_sd_pipe, bank, prompt, steps=STEPS, guidance=5.0, seed=3, **options)
    assert np.array_equal(_pixels(first), _pixels(again))
    if method in ("merge", "composite"):
        other = generate(method, tiny_sd_pipe, bank, prompt, steps=STEPS, guidance=5.0, seed=4)
        assert not np.array_equal(_pixels(first), _pixels(other))
    assert first.images[0].size == (32, 32)
    assert bank.active is None  # every method leaves the base weights in place
    n, pair = 2, 2
    if method in ("merge", "switch"):
        assert first.unet_evals == pair * STEPS
    elif method == "composite":
        assert first.unet_evals == n * pair * STEPS
    elif method == "cmlora":
        assert first.extras["regions"]  # two separate objects: regional mixing, its refresh interval
        assert first.extras["refresh_steps"] == sorted(refresh_steps(STEPS, default_cache_interval(True)))
        refreshed = len(first.extras["refresh_steps"])  # step 0 among them
        # step 0: every adapter in full; later refresh steps: the others in full while the dominant adapter
        # reuses its deep feature (dominant_yields); other steps: the dominant adapter alone in full
        full = n + (refreshed - 1) * (n - 1) + (STEPS - refreshed)
        assert first.extras["dominant_yields"]
        assert first.extras["sampling_evals"] == pair * full
        assert first.extras["shallow_evals"] == pair * (n * STEPS - full)
        assert first.unet_evals == first.extras["sampling_evals"] + first.extras["profile_evals"]
        assert again.extras["profile_evals"] == 0  # measured scores are cached on the bank
    else:  # clora: each adapter branch's CFG pair per step, the base branch's where its mask covers a
        # cell, + per update round 2 conditional passes per branch
        rounds = len(first.extras["losses"])
        assert rounds == 4  # refinement at round(0.0·3)=0 and round(0.2·3)=round(0.4·3)=1: (1+1) + (1+1)
        base = first.extras["base_branch_steps"]
        assert 0 <= base <= STEPS
        assert first.unet_evals == n * pair * STEPS + pair * base + rounds * 2 * (n + 1)
        assert first.extras["masks"].shape == (n + 1, 16, 16)


def test_composite_of_identical_adapters_equals_the_single_adapter(tiny_sd_pipe) -> None:
    single = AdapterBank(tiny_sd_pipe, [FakeAdapter(7, "sks star")])
    prompt = ConceptPrompt.build("a sks star", ["sks star"])
    expected = generate("merge", tiny_sd_pipe, single, prompt, steps=STEPS, seed=1)
    single.close()
    tripled = AdapterBank(tiny_sd_pipe, [FakeAdapter(7), FakeAdapter(7), FakeAdapter(7)])
    prompt3 = ConceptPrompt.build("a sks star", ["sks star"] * 3)
    got = generate("composite", tiny_sd_pipe, tripled, prompt3, steps=STEPS, seed=1)
    assert np.abs(_pixels(got) - _pixels(expected)).max() <= 1


@pytest.mark.parametrize("plains", [True, False])
def test_switch_with_long_interval_equals_the_first_adapter_alone(plains, tiny_sd_pipe) -> None:
    """Alone on its own prompt: the other concept in its plain form when it has one (as in CLoRA's branch)."""
    bank, prompt = _two_concepts(tiny_sd_pipe)
    if not plains:
        prompt = ConceptPrompt.build(prompt.text, [c.phrase for c in prompt.concepts])
    got = generate("switch", tiny_sd_pipe, bank, prompt, steps=STEPS, seed=2, interval=STEPS)
    assert got.extras["schedule"] == [0] * STEPS
    bank.close()
    first = AdapterBank(tiny_sd_pipe, [FakeAdapter(1)])
    text = "a sks star and a heart" if plains else "a sks star and a zwx heart"
    alone = ConceptPrompt.build(text, ["sks star"])
    expected = generate("merge", tiny_sd_pipe, first, alone, steps=STEPS, seed=2)
    assert np.array_equal(_pixels(got), _pixels(expected))


@pytest.mark.parametrize("method", ["composite", "cmlora", "switch"])
def test_each_adapter_reads_its_own_branch_prompt_when_concepts_have_plain_forms(
    method, tiny_sd_pipe, monkeypatch
) -> None:
    """Adapter k conditions on the prompt with its own concept as written and the others plain (the other
    adapter's trigger is a word it never learnt); without plain forms every adapter reads the prompt."""
    from composition.sampling import EmbeddingCache

    asked: set[tuple[str, tuple[float, ...]]] = set()
    get = EmbeddingCache.get

    def record(self, text, selection=None):
        asked.add((text, tuple(selection)))
        return get(self, text, selection)

    monkeypatch.setattr(EmbeddingCache, "get", record)
    # switch every step so that both adapters get a turn
    options = {"switch": {"interval": 1}}.get(method, FAST.get(method, {}))
    bank, prompt = _two_concepts(tiny_sd_pipe)
    generate(method, tiny_sd_pipe, bank, prompt, steps=STEPS, seed=0, **options)
    assert asked == {("a sks star and a heart", (1.0, 0.0)), ("a star and a zwx heart", (0.0, 1.0))}
    asked.clear()
    plain = ConceptPrompt.build(prompt.text, [c.phrase for c in prompt.concepts])
    generate(method, tiny_sd_pipe, bank, plain, steps=STEPS, seed=0, **options)
    assert asked == {(prompt.text, (1.0, 0.0)), (prompt.text, (0.0, 1.0))}


def test_regional_weights_mix_inside_each_region_and_fall_back_to_the_step_mix() -> None:
    masks = torch.zeros(2, 2, 3)
    masks[0, :, 0] = 1  # region of adapter 0
    masks[1, :, 2] = 1  # region of adapter 1
    masks[:, 1, 1] = 1  # a cell both hold (one object)
    weights = regional_weights([0.6, 0.4], masks)
    assert torch.allclose(weights.sum(0), torch.ones(2, 3))
    assert torch.equal(weights[:, 0, 0], torch.tensor([1.0, 0.0]))
    assert torch.equal(weights[:, 0, 2], torch.tensor([0.0, 1.0]))
    assert torch.allclose(weights[:, 1, 1], torch.tensor([0.6, 0.4]))  # shared: the step's shares
    assert torch.allclose(weights[:, 0, 1], torch.tensor([0.6, 0.4]))  # held by none: the plain mix


def test_cmlora_regions_split_separate_objects_and_leave_one_object_to_the_plain_mix(tiny_sd_pipe) -> None:
    bank, prompt = _two_concepts(tiny_sd_pipe)
    options = {"profile_steps": 1, "frequency_scores": [2.0, 1.0]}
    regional = generate("cmlora", tiny_sd_pipe, bank, prompt, steps=STEPS, seed=1, **options)
    plain = generate("cmlora", tiny_sd_pipe, bank, prompt, steps=STEPS, seed=1, regions=False, **options)
    assert regional.extras["regions"] and not plain.extras["regions"] and "masks" not in plain.extras
    masks = regional.extras["masks"]
    assert masks.shape == (2, 16, 16) and not (masks[0] * masks[1]).any()  # one region per object
    assert regional.extras["mask_names"] == bank.names
    assert (regional.extras["cache_interval"], plain.extras["cache_interval"]) == (4, 5)
    assert not np.array_equal(_pixels(regional), _pixels(plain))
    # one object ("a zwx heart sks star": the phrases touch): regions default off, and forcing them on
    # gives both concepts the same cells, so the mix is the plain one
    one = ConceptPrompt.build("a zwx heart sks star", ["sks star", "zwx heart"])
    auto = generate("cmlora", tiny_sd_pipe, bank, one, steps=STEPS, seed=1, **options)
    forced = generate("cmlora", tiny_sd_pipe, bank, one, steps=STEPS, seed=1, regions=True, cache_interval=5,
                      **options)  # fmt: skip
    assert not auto.extras["regions"] and forced.extras["regions"]
    assert torch.equal(forced.extras["masks"][0], forced.extras["masks"][1])
    assert np.abs(_pixels(forced) - _pixels(auto)).max() <= 1


def test_cmlora_dominant_adapter_in_full_every_step_without_yielding(tiny_sd_pipe) -> None:
    """`dominant_yields=False` is the paper's schedule: the dominant adapter in full at every step, the others
    at refresh steps; with caching off (interval 1) every adapter runs in full either way."""
    bank, prompt = _two_concepts(tiny_sd_pipe)
    options = {"profile_steps": 1, "frequency_scores": [2.0, 1.0]}
    steps = 6
    paper = generate(
        "cmlora", tiny_sd_pipe, bank, prompt, steps=steps, seed=0, dominant_yields=False, **options
    )
    refreshed = len(paper.extras["refresh_steps"])
    assert 1 < refreshed < steps
    assert paper.extras["sampling_evals"] == 2 * (steps + refreshed)  # N=2: the other adapter, step 0 too
    yielding = generate("cmlora", tiny_sd_pipe, bank, prompt, steps=steps, seed=0, **options)
    assert yielding.extras["sampling_evals"] == 2 * (steps + 1)  # one full pass per step, two at step 0
    for flag in (True, False):
        uncached = generate(
            "cmlora", tiny_sd_pipe, bank, prompt, steps=steps, seed=0, cache_interval=1, dominant_yields=flag,
            **options,
        )  # fmt: skip
        assert uncached.extras["sampling_evals"] == 2 * 2 * steps and uncached.extras["shallow_evals"] == 0


def test_clora_without_updates_and_full_mask_equals_single_adapter(tiny_sd_pipe) -> None:
    bank = AdapterBank(tiny_sd_pipe, [FakeAdapter(5)])
    prompt = ConceptPrompt.build("a sks star on a blue background", ["sks star"], plains=["star"])
    got = generate("clora", tiny_sd_pipe, bank, prompt, steps=STEPS, seed=0, iterations=0, mask_threshold=0.0)
    expected = generate("merge", tiny_sd_pipe, bank, prompt, steps=STEPS, seed=0)
    assert got.extras["losses"] == []
    assert got.extras["masks"][1].min() == 1 and got.extras["masks"][0].max() == 0
    assert np.abs(_pixels(got) - _pixels(expected)).max() <= 1


def test_bad_inputs_give_clear_errors(tiny_sd_pipe) -> None:
    bank, prompt = _two_concepts(tiny_sd_pipe)
    with pytest.raises(CompositionError, match="unknown composition method 'blend'"):
        generate("blend", tiny_sd_pipe, bank, prompt)
    with pytest.raises(CompositionError, match="has no option"):
        generate("merge", tiny_sd_pipe, bank, prompt, interval=3)
    with pytest.raises(CompositionError, match="binds 1 concepts but the bank holds 2"):
        generate("merge", tiny_sd_pipe, bank, ConceptPrompt.build("a sks star", ["sks star"]), steps=1)
    with pytest.raises(CompositionError, match="unknown clora preset"):
        generate("clora", tiny_sd_pipe, bank, prompt, steps=1, preset="turbo")
    with pytest.raises(CompositionError, match="steps must be >= 1"):
        generate("switch", tiny_sd_pipe, bank, prompt, steps=0)
    assert method_options("switch") == {"preset": "atelier", "interval": 5}
    assert method_options("clora")["refine_rounds"] == 20


@pytest.mark.parametrize("preset", ["light", "partition"])
def test_clora_skipping_the_idle_base_branch_changes_only_the_evaluation_count(tiny_sd_pipe, preset) -> None:
    bank, prompt = _two_concepts(tiny_sd_pipe)
    options = {"preset": preset, **({"refine_rounds": 1} if preset == "light" else {})}
    skipped = generate("clora", tiny_sd_pipe, bank, prompt, steps=STEPS, seed=2, **options)
    every = generate(
        "clora", tiny_sd_pipe, bank, prompt, steps=STEPS, seed=2, skip_idle_base=False, **options
    )
    assert np.array_equal(_pixels(skipped), _pixels(every))
    assert torch.equal(skipped.extras["mean_masks"], every.extras["mean_masks"])
    assert every.extras["base_branch_steps"] == STEPS
    idle = STEPS - skipped.extras["base_branch_steps"]
    assert every.unet_evals - skipped.unet_evals == 2 * idle
    if preset == "partition":  # the objects' cells cover the image: the base branch never runs
        assert idle == STEPS


def test_clora_branchwise_backprop_equals_the_joint_gradient(tiny_sd_pipe) -> None:
    import torch

    from composition.attention_store import AttentionStore, capture_cross_attention
    from composition.contrastive import contrastive_loss
    from composition.methods.clora import CloraOptions, _branches, _cond_maps, _update_latents
    from composition.sampling import Sampler

    bank, prompt = _two_concepts(tiny_sd_pipe)
    sampler, store, opts = Sampler(tiny_sd_pipe, 3, 5.0, 0), AttentionStore(), CloraOptions(step_size=1.0)
    with capture_cross_attention(tiny_sd_pipe.unet, store, opts.capture_factor), torch.no_grad():
        branches = _branches(tiny_sd_pipe, bank, prompt, sampler)
        t, start = sampler.timesteps[0], sampler.latents.clone()
        loss = _update_latents(sampler, bank, store, branches, t, opts)
        branchwise = start - sampler.latents  # step size 1: the gradient itself
        with torch.enable_grad():
            z = start.clone().requires_grad_(True)
            maps = []
            for branch in branches:
                bank.activate(branch.selection)
                maps.append(_cond_maps(sampler, store, z, t, branch))
            joint_loss = contrastive_loss(maps, [b.indices for b in branches], opts.temperature)
            (joint,) = torch.autograd.grad(joint_loss, z)
    bank.deactivate()
    assert abs(loss - float(joint_loss.detach())) < 1e-5
    assert joint.abs().max() > 0
    torch.testing.assert_close(branchwise, joint, rtol=1e-4, atol=1e-6)
