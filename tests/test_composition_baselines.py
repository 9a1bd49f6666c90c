"""The `paper` presets against independent computations of the reference code's algorithm pieces.

What the reference code does was read from its source and run side by side on the toy world
(`docs/composition_baselines.md` has the commands and numbers): CLoRA, `gemlab-vt/clora` 76def7c
(`pipeline_clora.py`, `utils.py`, the author's notebook); CMLoRA, `Yqcca/CMLoRA` 5e79e41
(`pipeline_offline.py`, `callbacks_sa.py`). These tests do not need it: each checks one piece — the loss against its
formula written out pair by pair, the masks against a direct threshold, the update order and the gradient against a
hand-written step, the schedules and evaluation counts against the reference's rules.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from composition import AdapterBank, ConceptPrompt, generate
from composition.contrastive import ntxent_pairs, paper_contrastive_loss, threshold_masks
from composition.methods import method_options
from composition.methods.cmlora import PAPER, forward_plan
from composition.methods.switch import paper_schedule
from tests.composition_helpers import FakeAdapter, torch_threads


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _two_concepts(pipe) -> tuple[AdapterBank, ConceptPrompt]:
    bank = AdapterBank(
        pipe, [FakeAdapter(1, "sks star"), FakeAdapter(2, "zwx heart", suffixes=("to_q", "to_v"))]
    )
    prompt = ConceptPrompt.build(
        "a sks star and a zwx heart", ["sks star", "zwx heart"], plains=["star", "heart"]
    )
    return bank, prompt


def _ntxent_by_hand(vectors: torch.Tensor, labels: list[int], tau: float) -> float:
    """NT-Xent written out: for each ordered pair (a, p) of one label, −log e^{s_ap} / (e^{s_ap} + Σ_n e^{s_an})."""
    v = [x / x.norm() for x in vectors.double()]
    losses = []
    for a in range(len(v)):
        for p in range(len(v)):
            if a == p or labels[a] != labels[p]:
                continue
            positive = math.exp(float(v[a] @ v[p]) / tau)
            negatives = sum(
                math.exp(float(v[a] @ v[n]) / tau) for n in range(len(v)) if labels[n] != labels[a]
            )
            losses.append(-math.log(positive / (positive + negatives)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    "labels", [[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 0, 1, 1, 0], [0, 0, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 1]]
)
def test_ntxent_is_the_mean_over_positive_pairs_of_its_formula(labels) -> None:
    generator = torch.Generator().manual_seed(len(labels))
    vectors = torch.rand(len(labels), 16, generator=generator)
    for tau in (0.5, 0.07):
        assert float(ntxent_pairs(vectors, labels, tau)) == pytest.approx(
            _ntxent_by_hand(vectors, labels, tau), rel=1e-5
        )


def test_ntxent_differs_from_the_multi_positive_infonce() -> None:
    """Per positive pair, each pair's denominator holds that pair and the negatives only; the InfoNCE that Atelier's
    loop uses sums every positive in the numerator and the denominator."""
    from composition.contrastive import contrastive_loss

    generator = torch.Generator().manual_seed(0)
    maps = [torch.rand(8, 2, 2, generator=generator) for _ in range(3)]
    indices = [[[1, 2], [5]], [[1, 2], [5]], [[1], [4, 5]]]
    paper = float(paper_contrastive_loss(maps, indices, 0.5))
    infonce = float(contrastive_loss(maps, indices, 0.5))
    assert paper != pytest.approx(infonce, rel=1e-3)
    assert float(ntxent_pairs(torch.rand(3, 4), [0, 1, 2], 0.5)) == 0.0  # no positive pair: nothing to pull


def test_paper_loss_min_max_scales_each_token_map_and_labels_it_by_concept() -> None:
    generator = torch.Generator().manual_seed(1)
    maps = [torch.rand(8, 3, 3, generator=generator) * (b + 1) + b for b in range(3)]
    indices = [[[1, 2], [5]], [[1, 2], [5]], [[1], [4, 5]]]
    vectors, labels = [], []
    for b in range(3):
        for c, positions in enumerate(indices[b]):
            for p in positions:
                x = maps[b][p].flatten()
                vectors.append((x - x.min()) / (x.max() - x.min()))
                labels.append(c)
    expected = _ntxent_by_hand(torch.stack(vectors), labels, 0.5)
    assert float(paper_contrastive_loss(maps, indices, 0.5)) == pytest.approx(expected, rel=1e-5)
    shifted = [m * 3.0 + 2.0 for m in maps]  # min–max scaling: invariant to an affine change of each map
    assert float(paper_contrastive_loss(shifted, indices, 0.5)) == pytest.approx(expected, rel=1e-5)


def test_threshold_masks_are_strictly_above_alpha_of_each_token_peak_ored_over_tokens() -> None:
    first = torch.zeros(4, 2, 3)
    first[1] = torch.tensor([[1.0, 0.4, 0.39], [0.0, 0.5, 0.2]])  # peak 1: > 0.4 keeps 1.0 and 0.5, not 0.4
    first[2] = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # its own peak: the cell (1, 0)
    second = torch.rand(4, 2, 3)
    masks = threshold_masks([first, second], [[1, 2], [3]], 0.4)
    expected_first = np.array([[True, False, False], [True, True, False]])
    assert np.array_equal(masks[0].numpy(), expected_first)
    assert torch.equal(masks[1], second[3] > 0.4 * second[3].max())


def _paper_run(pipe, bank, prompt, steps: int, **options):
    """clora paper on the tiny pipe with its sampler exposed: (result, the latents handed to each scheduler step,
    the ε of each step)."""
    from composition.sampling import Sampler

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    step = Sampler.step

    def record(self, eps, t, index, **info):
        seen.append((self.latents.clone(), eps.clone()))
        step(self, eps, t, index, **info)

    Sampler.step = record
    try:
        result = generate(
            "clora", pipe, bank, prompt, steps=steps, guidance=5.0, seed=0, preset="paper", **options
        )
    finally:
        Sampler.step = step
    return result, seen


def test_clora_paper_predicts_eps_before_the_update_and_steps_from_the_updated_latent(tiny_sd_pipe) -> None:
    """One step, one update round: ε comes from every branch's CFG pair at z, the update moves z down the gradient
    of the loss through every branch's CFG pair (maps averaged over both halves), the step starts from the moved z."""
    from composition.attention_store import AttentionStore, capture_cross_attention
    from composition.contrastive import branch_masks, fuse
    from composition.methods.clora import _branches
    from composition.sampling import Sampler

    bank, prompt = _two_concepts(tiny_sd_pipe)
    result, seen = _paper_run(tiny_sd_pipe, bank, prompt, 1, refine_steps=[], step_size=5.0)
    assert result.extras["backward_passes"] == 1 and len(result.extras["losses"]) == 1
    sampler, store = Sampler(tiny_sd_pipe, 1, 5.0, 0), AttentionStore()
    t, z = sampler.timesteps[0], sampler.latents.clone()
    with capture_cross_attention(tiny_sd_pipe.unet, store, 4), torch.no_grad():
        branches = _branches(tiny_sd_pipe, bank, prompt, sampler)
        with torch.enable_grad():
            leaf = z.clone().requires_grad_(True)
            uncond, cond, maps = [], [], []
            for branch in branches:
                bank.activate(branch.selection)
                halves = []
                for half in (0, 1):  # each CFG half on its own: the maps are their average
                    hidden = branch.embeds.hidden[half : half + 1]
                    halves.append(tiny_sd_pipe.unet(leaf, t, encoder_hidden_states=hidden).sample)
                    halves.append(store.token_maps(tuple(z.shape[-2:]))[0])
                uncond.append(halves[0])
                cond.append(halves[2])
                maps.append((halves[1] + halves[3]) / 2)
            loss = paper_contrastive_loss(maps, [b.indices for b in branches], 0.5)
            (grad,) = torch.autograd.grad(loss, leaf)
    bank.deactivate()
    moved = z - 5.0 * grad
    own = [branches[k + 1].indices[k] for k in range(2)]
    masks = branch_masks(threshold_masks([m.detach() for m in maps[1:]], own, 0.4), tuple(z.shape[-2:]))
    eps = fuse([u.detach() for u in uncond], masks)
    eps = eps + 5.0 * (fuse([c.detach() for c in cond], masks) - eps)
    assert float(loss.detach()) == pytest.approx(result.extras["losses"][0], rel=1e-4)
    assert grad.abs().max() > 0
    torch.testing.assert_close(seen[0][0], moved, rtol=1e-4, atol=1e-5)  # stepped from the updated latent
    torch.testing.assert_close(seen[0][1], eps, rtol=1e-4, atol=1e-5)  # with ε predicted at z, before it


def test_clora_paper_schedule_uses_absolute_step_indices_and_counts_every_forward(tiny_sd_pipe) -> None:
    bank, prompt = _two_concepts(tiny_sd_pipe)
    options = {"update_steps": 2, "refine_steps": [0, 2], "refine_rounds": 2}
    result, seen = _paper_run(tiny_sd_pipe, bank, prompt, 4, **options)
    rounds = [
        1 + 2,
        1,
        0,
        0,
    ]  # step 0: one update + 2 refinement rounds; step 2 >= update_steps: refinement off
    forwards = sum(max(r, 1) for r in rounds)  # a step without an update still runs every branch once
    assert result.extras["backward_passes"] == sum(rounds)
    assert result.unet_evals == 2 * 3 * forwards  # a CFG pair for the base branch and each adapter branch
    assert len(seen) == 4
    from composition.methods.clora import PRESETS

    paper = PRESETS["paper"]
    per_step = [paper.rounds_at(i, 25) for i in range(25)]
    assert (
        sum(per_step) == 85 and per_step[0] == per_step[10] == per_step[20] == 21
    )  # the notebook at 25 steps
    assert [paper.rounds_at(i, 100) for i in (49, 50)] == [1, 0]  # absolute: updates while i < 50


def test_reference_preset_is_a_deprecated_alias_of_paper(tiny_sd_pipe) -> None:
    bank, prompt = _two_concepts(tiny_sd_pipe)
    options = {"steps": 2, "seed": 1, "iterations": 0}
    with pytest.warns(DeprecationWarning, match="use 'paper'"):
        old = generate("clora", tiny_sd_pipe, bank, prompt, preset="reference", **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = generate("clora", tiny_sd_pipe, bank, prompt, preset="paper", **options)
    assert old.extras["options"] == new.extras["options"]
    assert np.array_equal(np.asarray(old.images[0]), np.asarray(new.images[0]))


def test_cmlora_paper_plan_refreshes_one_adapter_round_robin_and_caches_the_rest() -> None:
    plan = forward_plan(25, [0, 1], "paper", 5)
    assert [d for d, _ in plan] == [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5 + [0] * 5
    assert plan[0][1] == {0, 1}  # nothing cached yet
    assert {i: set(full) for i, (_, full) in enumerate(plan) if full and i} == {
        5: {1},
        10: {0},
        15: {1},
        20: {0},
    }
    assert (
        2 * sum(len(full) for _, full in plan) == 12
    )  # full rows of one image: the 12 (+ 88 cached)
    three = forward_plan(7, [2, 0, 1], "paper", 2)
    assert [d for d, _ in three] == [2, 2, 0, 0, 1, 1, 2]
    assert all(full == {0, 1} for _, full in forward_plan(4, [0, 1], "paper", 1))  # c = 1: no caching


def test_cmlora_paper_runs_the_plan_on_the_shared_prompt(tiny_sd_pipe, monkeypatch) -> None:
    from composition.sampling import EmbeddingCache

    asked: set[str] = set()
    get = EmbeddingCache.get
    monkeypatch.setattr(
        EmbeddingCache, "get", lambda self, text, sel=None: asked.add(text) or get(self, text, sel)
    )
    bank, prompt = _two_concepts(tiny_sd_pipe)
    steps = 6
    result = generate(
        "cmlora", tiny_sd_pipe, bank, prompt, steps=steps, seed=0, preset="paper", cache_interval=2
    )
    assert asked == {prompt.text}  # one prompt for every adapter, triggers and all
    plan = forward_plan(steps, [0, 1], "paper", 2)
    full = 2 * sum(len(f) for _, f in plan)
    assert result.unet_evals == full and result.extras["profile_evals"] == 0
    assert result.extras["shallow_evals"] == 2 * 2 * steps - full
    assert result.extras["options"]["cache_branch"] == PAPER.cache_branch == 2
    assert result.extras["order"] == bank.names and result.extras["dominant_schedule"] == [d for d, _ in plan]


def test_switch_paper_schedule_is_the_reference_callback() -> None:
    assert paper_schedule(6, 2) == [0, 1, 0, 1, 0, 1]  # two adapters: every step
    # more: after step i > 0 with i % 5 == 0, so the first adapter holds steps 0-5
    assert paper_schedule(17, 3) == [0] * 6 + [1] * 5 + [2] * 5 + [0]
    assert method_options("switch") == {"preset": "atelier", "interval": 5}
