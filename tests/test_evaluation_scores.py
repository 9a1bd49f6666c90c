"""The score formulas on hand-made embeddings: CLIPScore (Hessel and 0–100), CLIP-I, concept minimum, summaries."""

from __future__ import annotations

import math

import pytest
import torch

from evaluation.results import ConceptScores, Scores, summarize
from evaluation.scores import (
    clip_i,
    clipscore_100,
    clipscore_hessel,
    concept_minimum,
    cosine_matrix,
    paired_cosine,
)


def test_clipscore_on_hand_made_embeddings_including_a_clamped_negative_cosine() -> None:
    images = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[1.0, 1.0], [6.0, 8.0], [-2.0, 0.0], [1.0, -1.0]])
    cos = paired_cosine(images, texts)
    expected = torch.tensor([1 / math.sqrt(2), 1.0, -1.0, -1 / math.sqrt(2)])
    torch.testing.assert_close(cos, expected)
    torch.testing.assert_close(clipscore_hessel(cos), torch.tensor([2.5 / math.sqrt(2), 2.5, 0.0, 0.0]))
    torch.testing.assert_close(clipscore_100(cos), torch.tensor([100 / math.sqrt(2), 100.0, 0.0, 0.0]))


def test_cosine_ignores_embedding_length() -> None:
    a = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    b = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(paired_cosine(a, b), paired_cosine(3.0 * a, 0.01 * b))
    torch.testing.assert_close(cosine_matrix(a, b).diagonal(), paired_cosine(a, b))


def test_clip_i_is_the_mean_over_all_generated_reference_pairs() -> None:
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    refs = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    per_image = clip_i(images, refs)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(per_image, torch.tensor([(1 + s + 0) / 3, (0 + s - 1) / 3]))
    pairs = [float(paired_cosine(i[None], r[None])) for i in images for r in refs]
    assert float(per_image.mean()) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)


def test_concept_minimum_and_its_errors() -> None:
    scores = torch.tensor([[0.3, 0.1, 0.5], [0.2, 0.4, 0.6]])
    torch.testing.assert_close(concept_minimum(scores), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="at least one concept"):
        concept_minimum(torch.zeros(2, 0))
    with pytest.raises(ValueError, match="at least one reference"):
        clip_i(torch.ones(2, 3), torch.ones(0, 3))
    with pytest.raises(ValueError, match="same shape"):
        paired_cosine(torch.ones(2, 3), torch.ones(3, 3))


def test_scores_summary_rows_and_both_named_scales() -> None:
    cos = torch.tensor([0.2, -0.4, 0.6])
    scores = Scores(
        model="m",
        names=("a", "b", "c"),
        prompts=("p", "q", "r"),
        text_cosine=cos,
        clip_i=None,
        n_references=0,
    )
    summary = scores.summary()
    assert set(summary) == {"clip_t_cosine", "clipscore_hessel", "clipscore_100"}
    assert summary["clipscore_hessel"]["mean"] == pytest.approx((0.5 + 0.0 + 1.5) / 3)
    assert summary["clipscore_100"]["max"] == pytest.approx(60.0)
    assert summary["clipscore_100"]["min"] == 0.0
    assert summary["clip_t_cosine"]["std"] == pytest.approx(
        float(torch.tensor([0.2, -0.4, 0.6]).std(correction=0))
    )
    rows = scores.rows()
    assert [r["image"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["prompt"] == "q"
    assert rows[1]["clipscore_hessel"] == 0.0
    assert rows[2]["clipscore_hessel"] == pytest.approx(1.5)
    document = scores.to_dict()
    assert "Hessel" in document["metrics"]["clipscore_hessel"]
    assert "100" in document["metrics"]["clipscore_100"]


def test_concept_scores_per_concept_and_minimum() -> None:
    cos = torch.tensor([[0.4, -0.2], [0.1, 0.3]])
    concepts = ConceptScores(model="m", names=("x", "y"), phrases=("a cat", "a dog"), cosine=cos)
    torch.testing.assert_close(concepts.per_concept["a cat"], torch.tensor([1.0, 0.25]))
    torch.testing.assert_close(concepts.per_concept["a dog"], torch.tensor([0.0, 0.75]))
    torch.testing.assert_close(concepts.minimum, torch.tensor([0.0, 0.25]))
    assert concepts.summary()["concept_min"]["mean"] == pytest.approx(0.125)
    assert concepts.rows()[1] == {
        "image": "y",
        "concept:a cat": pytest.approx(0.25),
        "concept:a dog": pytest.approx(0.75),
        "concept_min": pytest.approx(0.25),
    }


def test_summarize_statistics() -> None:
    stats = summarize(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert stats == {"mean": 3.0, "std": pytest.approx(math.sqrt(3.5)), "min": 1.0, "max": 6.0, "n": 4}
