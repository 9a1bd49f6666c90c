"""Composition building blocks: ConceptPrompt token indices, attention capture, contrastive loss and masks,
DeepCache-style shallow forward, frequency profiles."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from composition import CompositionError, ConceptPrompt
from composition.attention_store import AttentionStore, capture_cross_attention, capture_layers
from composition.contrastive import (
    branch_masks,
    concept_strength,
    connected,
    contrastive_loss,
    exclusive,
    fuse,
    normalised_token_maps,
    strength_masks,
)
from composition.feature_cache import (
    PAPER_BRANCH,
    DeepFeatureCache,
    full_forward,
    shallow_forward,
    skip_count,
)
from composition.frequency import frequency_order, high_frequency_energy, radial_profile
from tests.composition_helpers import torch_threads


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def test_token_indices_follow_the_tokenizer(tiny_sd_pipe) -> None:
    prompt = ConceptPrompt.build(
        "A photo of a sks dog and a zwx cat", ["sks dog", "zwx cat"], plains=["dog", "cat"]
    )
    tokenizer = tiny_sd_pipe.tokenizer
    ids = tokenizer(prompt.branch_text(0)).input_ids
    first, second = prompt.token_indices(tiny_sd_pipe, 0)
    assert tokenizer.decode([ids[i] for i in first]) == "sks dog"
    assert tokenizer.decode([ids[i] for i in second]) == "cat"  # the other concept reads plain in branch 0
    assert prompt.branch_text(None) == "A photo of a dog and a cat"
    assert prompt.branch_text(1) == "A photo of a dog and a zwx cat"
    base_ids = tokenizer(prompt.branch_text(None)).input_ids
    assert [tokenizer.decode([base_ids[i]]) for i in prompt.token_indices(tiny_sd_pipe, None)[1]] == ["cat"]


def test_token_indices_agree_across_sdxl_tokenizers(tiny_sdxl_pipe) -> None:
    prompt = ConceptPrompt.build("a red star left of a blue heart", ["red star", "blue heart"])
    assert prompt.token_indices(tiny_sdxl_pipe) == [[2, 3], [7, 8]]  # BOS a red star left of a blue heart


def test_prompt_errors_name_the_problem() -> None:
    with pytest.raises(CompositionError, match=r"phrase 'zwx cat' of adapter 2 is not in the prompt"):
        ConceptPrompt.build("a sks dog on a sofa", ["sks dog", "zwx cat"])
    with pytest.raises(CompositionError, match="at least one concept"):
        ConceptPrompt("a dog", [])
    with pytest.raises(CompositionError, match="one of each per adapter"):
        ConceptPrompt.build("a dog", ["dog"], weights=[1.0, 2.0])
    with pytest.raises(CompositionError, match="not in the prompt"):
        ConceptPrompt.build("a hotdog", ["dog"])  # whole words only


def test_capture_is_exact_and_restores_processors(tiny_sd_pipe) -> None:
    unet = tiny_sd_pipe.unet
    before = {k: type(v) for k, v in unet.attn_processors.items()}
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor(300), torch.randn(2, 77, 32)
    store = AttentionStore()
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=context).sample
        with capture_cross_attention(unet, store) as layers:
            captured = unet(x, t, encoder_hidden_states=context).sample
            maps = store.token_maps((16, 16))
    torch.testing.assert_close(captured, plain, rtol=1e-5, atol=1e-5)
    assert layers == capture_layers(unet) and all(".attn2." in name for name in layers)
    side = maps.shape[-1]
    assert maps.shape == (2, 77, side, side) and side in (8, 16)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, side, side))  # probabilities over tokens
    assert {k: type(v) for k, v in unet.attn_processors.items()} == before
    assert not store.maps


def test_contrastive_loss_prefers_separated_concepts() -> None:
    left, right = torch.zeros(8, 8), torch.zeros(8, 8)
    left[:, :4], right[:, 4:] = 1.0, 1.0
    separated = torch.zeros(5, 8, 8)
    separated[1], separated[2] = left, right
    overlapping = torch.zeros(5, 8, 8)
    overlapping[1], overlapping[2] = left, left + 0.1 * right
    indices = [[[1], [2]], [[1], [2]]]
    good = contrastive_loss([separated, separated], indices)
    bad = contrastive_loss([overlapping, overlapping], indices)
    assert good < bad
    assert contrastive_loss([separated], [[[1]]]) == 0  # one concept: nothing to contrast


def test_masks_and_fusion() -> None:
    raw = torch.rand(77, 4, 4).softmax(0)
    maps = normalised_token_maps(raw, eos=6)
    assert maps[0].abs().sum() == 0 and maps[6:].abs().sum() == 0
    assert torch.allclose(maps[1:6].flatten(1).amax(1), torch.ones(5))
    assert strength_masks([concept_strength(maps, [2])], 0.0)[0].all()
    (mask,) = strength_masks([concept_strength(maps, [2, 3])], 0.3)
    assert torch.equal(mask, (maps[2] >= 0.3) | (maps[3] >= 0.3))  # CLoRA's OR over the tokens
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    masks = branch_masks([left], (8, 8))
    assert masks.shape == (2, 8, 8) and torch.equal(masks.sum(0), torch.ones(8, 8))
    eps = [torch.full((1, 4, 8, 8), 1.0), torch.full((1, 4, 8, 8), 5.0)]
    fused = fuse(eps, masks)
    assert torch.all(fused[..., :4] == 5.0) and torch.all(fused[..., 4:] == 1.0)


def test_exclusive_masks_give_each_shared_cell_to_the_strongest_concept() -> None:
    maps = torch.zeros(5, 2, 3)
    maps[1] = torch.tensor([[1.0, 0.8, 0.1], [0.9, 0.4, 0.0]])  # concept 0, one token
    maps[2] = torch.tensor([[0.0, 0.35, 0.5], [0.1, 0.6, 1.0]])  # concept 1, two tokens
    maps[3] = torch.tensor([[0.0, 0.1, 1.0], [0.0, 0.2, 0.3]])
    masks = strength_masks([concept_strength(maps, [1]), concept_strength(maps, [2, 3])], 0.3)
    assert (masks[0] & masks[1]).sum() == 2  # (0, 1) and (1, 1) claimed by both
    strengths = [concept_strength(maps, [1]), concept_strength(maps, [2, 3])]
    assert torch.allclose(strengths[1], torch.tensor([[0.0, 0.35, 1.0], [0.1, 0.6, 1.0]]))
    first, second = exclusive(masks, strengths)
    assert not (first & second).any()
    assert torch.equal(first | second, masks[0] | masks[1])  # nothing claimed is dropped
    assert first[0, 1] and second[1, 1]  # 0.8 beats 0.35; 0.6 beats 0.4
    assert torch.equal(first, torch.tensor([[True, True, False], [True, False, False]]))


def test_concepts_of_one_object_share_its_cells_and_objects_stay_exclusive() -> None:
    """N=3 as in "a purple star and a blue heart": purple and star describe the left object, the heart the
    right one. The object wins a cell with its strongest concept; both its concepts get all its cells."""
    star = torch.tensor([[0.9, 0.2], [0.8, 0.1]])
    heart = torch.tensor([[0.3, 1.0], [0.85, 0.9]])
    purple = torch.tensor([[0.4, 0.1], [0.95, 0.5]])
    strengths = [star, heart, purple]
    masks = strength_masks(strengths, 0.3)
    assert torch.equal(masks[2], torch.tensor([[True, False], [True, True]]))
    left, right, colour = exclusive(masks, strengths, [[0, 2], [1]])
    assert torch.equal(left, colour)  # one object: the same cells for both of its concepts
    # (0,0): 0.9 vs 0.3; (1,0): purple 0.95 beats heart 0.85; (1,1): heart 0.9 beats purple 0.5
    assert torch.equal(left, torch.tensor([[True, False], [True, False]]))
    assert torch.equal(right, torch.tensor([[False, True], [False, True]]))
    # one concept per object (the default): the star loses (1,0) to the heart, purple keeps it
    alone = exclusive(masks, strengths)
    assert torch.equal(alone[0], torch.tensor([[True, False], [False, False]]))
    assert torch.equal(alone[2], torch.tensor([[False, False], [True, False]]))


def _grid(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "#" for c in row] for row in rows])


def test_connected_masks_hand_a_stray_cell_to_the_object_around_it() -> None:
    """The left object's mask also holds the bottom-right corner (a cell where both maps are weak): that cell
    goes to the right object, whose region surrounds it, and each mask becomes one region."""
    left = _grid(["##..", "##..", "##..", "##.#"])
    right = ~left
    strengths = [torch.where(left, 0.9, 0.1), torch.where(right, 0.8, 0.2)]
    strengths[0][3, 3] = 0.35  # the stray cell: weak for both, a little less weak for the left object
    strengths[1][3, 3] = 0.3
    new_left, new_right = connected([left, right], strengths)
    assert torch.equal(new_left, _grid(["##..", "##..", "##..", "##.."]))
    assert torch.equal(new_right, _grid(["..##", "..##", "..##", "..##"]))


def test_connected_keeps_the_component_of_largest_summed_strength_not_the_peak_cell() -> None:
    """A single stray cell holds the left object's strongest value; the region it keeps is still the large
    one, and the stray cell goes to its neighbour."""
    left = _grid(["##..", "##.#", "##..", "##.."])
    right = ~left
    strengths = [torch.where(left, 0.6, 0.0), torch.where(right, 0.7, 0.0)]
    strengths[0][1, 3] = 1.0
    new_left, new_right = connected([left, right], strengths)
    assert torch.equal(new_left, _grid(["##..", "##..", "##..", "##.."]))
    assert new_right[1, 3] and not (new_left & new_right).any()


def test_connected_leaves_object_groups_together_and_drops_unreachable_cells_to_the_base() -> None:
    """Two concepts of one object (identical masks) stay identical; a stray cell that touches no other
    object's region is left to the base branch; an empty mask stays empty."""
    one = _grid(["##...", "##...", ".....", "....#"])
    strengths = [torch.where(one, 0.9, 0.0), torch.where(one, 0.5, 0.0), torch.zeros(4, 5)]
    colour, shape, nothing = connected(
        [one, one.clone(), torch.zeros(4, 5, dtype=torch.bool)], strengths, [[0, 1], [2]]
    )
    expected = _grid(["##...", "##...", ".....", "....."])
    assert torch.equal(colour, expected) and torch.equal(shape, expected)
    assert not nothing.any()
    # already one region each: unchanged
    halves = [_grid(["##..", "##.."]), _grid(["..##", "..##"])]
    assert all(
        torch.equal(a, b) for a, b in zip(connected(halves, [h.float() for h in halves]), halves, strict=True)
    )


@pytest.mark.parametrize(
    ("text", "phrases", "objects"),
    [
        ("a purple star and a blue heart", ["star", "blue heart", "purple"], [[0, 2], [1]]),
        ("a purple square and a blue heart", ["purple square", "blue heart"], [[0], [1]]),
        ("a purple heart on a white background", ["purple", "heart"], [[0, 1]]),
        ("a sks dog, a cat and my style", ["sks dog", "cat", "my style"], [[0], [1], [2]]),
        ("a big  sks dog", ["big", "sks dog"], [[0, 1]]),
        ("a big sks dog", ["big sks", "sks dog"], [[0, 1]]),
    ],
)
def test_concept_prompt_groups_touching_phrases_into_objects(text, phrases, objects) -> None:
    assert ConceptPrompt.build(text, phrases).objects() == objects


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_shallow_forward_with_a_fresh_cache_equals_the_full_forward_at_every_branch(
    which, tiny_sd_pipe, tiny_sdxl_pipe
) -> None:
    pipe = tiny_sd_pipe if which == "sd" else tiny_sdxl_pipe
    unet = pipe.unet
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(500)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    added = None
    if which == "sdxl":
        added = {
            "text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim),
            "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * 2).float(),
        }
    branches = range(skip_count(unet))
    assert PAPER_BRANCH in branches
    with torch.no_grad():
        for branch in branches:
            cache = DeepFeatureCache()
            full = full_forward(unet, cache, 0, x, t, context, added, branch)
            assert 0 in cache
            shallow = shallow_forward(unet, cache, 0, x, t, context, added, branch)
            stale = shallow_forward(unet, cache, 0, x, torch.tensor(450), context, added, branch)
            torch.testing.assert_close(shallow, full, rtol=1e-4, atol=1e-5)
            assert (stale - full).abs().max() > 1e-4  # the shallow path really is recomputed


def test_deeper_cache_branches_recompute_more_of_the_unet(tiny_sd_pipe) -> None:
    """Branch k recomputes the down path to skip k and the up path from its consumer: the count of resnets a
    cached forward runs grows with k (branch 0: one up resnet only)."""
    unet = tiny_sd_pipe.unet
    calls: list[str] = []
    resnets = [(n, m) for n, m in unet.named_modules() if n.endswith(tuple(f"resnets.{i}" for i in range(4)))]
    handles = [m.register_forward_hook(lambda *_, n=n: calls.append(n)) for n, m in resnets]
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, 77, 32)
    counts = []
    try:
        with torch.no_grad():
            for branch in range(skip_count(unet)):
                cache = DeepFeatureCache()
                full_forward(unet, cache, 0, x, t, context, None, branch)
                calls.clear()
                shallow_forward(unet, cache, 0, x, t, context, None, branch)
                counts.append(len(calls))
    finally:
        for handle in handles:
            handle.remove()
    assert counts[0] == 1 and counts == sorted(counts) and counts[-1] < len(resnets)


def test_frequency_profile_ranks_texture_above_smooth() -> None:
    yy, xx = np.mgrid[0:32, 0:32]
    checker = ((yy // 2 + xx // 2) % 2).astype(float)
    smooth = (xx / 31.0).astype(float)
    assert radial_profile(checker).shape == (16,)
    scores = [high_frequency_energy(smooth), high_frequency_energy(checker)]
    assert scores[1] > scores[0]
    assert frequency_order(scores) == [1, 0]
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_energy(checker, cutoff=1.5)
