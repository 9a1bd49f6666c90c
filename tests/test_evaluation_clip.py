"""`evaluation.score` / `concept_scores` on real (tiny, seeded) CLIP models loaded the way released files are.

Checked against a straightforward reference computed through each model's own API (clip-anytorch's
`preprocess` + `encode_image` / `clip.tokenize` + `encode_text`; transformers' `CLIPProcessor` +
`get_image_features` / `get_text_features`), across batch sizes, file formats and error cases.
"""

from __future__ import annotations

import sys
import types
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import evaluation
from evaluation import ClipLoadError, EvaluationError, load_clip
from models.clip_compat import clip
from tests.evaluation_models import random_images, save_tiny_clip, save_tiny_hf_clip

PROMPTS = ["a red circle", "a blue striped square on a black background", "a dog", "a red circle", "x"]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_hf_clip(tmp_path_factory.mktemp("tiny-hf-clip"), seed=0)


def _reference_clip_cosines(path: Path, images, prompts: list[str]) -> torch.Tensor:
    """The textbook computation, through clip.load's own model, preprocess and tokenizer."""
    model, preprocess = clip.load(str(path), device="cpu", jit=False)
    with torch.no_grad():
        image_emb = model.encode_image(torch.stack([preprocess(im) for im in images]))
        text_emb = model.encode_text(clip.tokenize(prompts))
    return F.cosine_similarity(image_emb, text_emb, dim=-1)


def test_score_matches_reference_through_clip_encode_image_and_text(clip_files: tuple[Path, Path]) -> None:
    pt_path, _ = clip_files
    images = random_images(len(PROMPTS), seed=1)
    scores = evaluation.score(images, PROMPTS, model=pt_path, device="cpu")
    expected = _reference_clip_cosines(pt_path, images, PROMPTS)
    torch.testing.assert_close(scores.text_cosine, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(scores.clipscore_hessel, 2.5 * expected.clamp_min(0), atol=3e-6, rtol=0)
    torch.testing.assert_close(scores.clipscore_100, 100 * expected.clamp_min(0), atol=1e-4, rtol=0)
    assert (scores.text_cosine < 0).any() and (scores.text_cosine > 0).any(), "want both signs for the clamp"
    assert scores.names == tuple(f"#{i}" for i in range(len(PROMPTS)))


def test_clip_i_matches_reference(clip_files: tuple[Path, Path]) -> None:
    pt_path, _ = clip_files
    images, refs = random_images(3, seed=2), random_images(4, seed=3, size=(32, 32))
    scores = evaluation.score(images, references=refs, model=pt_path, device="cpu", batch_size=2)
    model, preprocess = clip.load(str(pt_path), device="cpu", jit=False)
    with torch.no_grad():
        gen = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
        real = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in refs])), dim=-1)
    torch.testing.assert_close(scores.clip_i, (gen @ real.T).mean(dim=1), atol=1e-6, rtol=0)
    assert scores.text_cosine is None and scores.n_references == 4
    assert set(scores.summary()) == {"clip_i"}


def test_results_do_not_depend_on_batch_size(clip_files: tuple[Path, Path]) -> None:
    pt_path, _ = clip_files
    images = random_images(len(PROMPTS), seed=4)
    refs = random_images(3, seed=5)
    runs = [
        evaluation.score(images, PROMPTS, refs, model=pt_path, device="cpu", batch_size=b) for b in (1, 2, 32)
    ]
    for run in runs[1:]:
        torch.testing.assert_close(run.text_cosine, runs[0].text_cosine, atol=1e-6, rtol=0)
        torch.testing.assert_close(run.clip_i, runs[0].clip_i, atol=1e-6, rtol=0)


def test_safetensors_copy_scores_exactly_like_the_pt_file(clip_files: tuple[Path, Path]) -> None:
    pt_path, st_path = clip_files
    images = random_images(3, seed=6)
    from_pt = evaluation.score(images, PROMPTS[:3], model=pt_path, device="cpu")
    from_st = evaluation.score(images, PROMPTS[:3], model=st_path, device="cpu")
    assert isinstance(load_clip(st_path, "cpu"), evaluation.OpenAIClipBackend)
    assert torch.equal(from_pt.text_cosine, from_st.text_cosine)


def test_image_files_score_like_the_same_pil_images(clip_files: tuple[Path, Path], tmp_path: Path) -> None:
    pt_path, _ = clip_files
    images = random_images(3, seed=7)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    from_files = evaluation.score(paths, "a red circle", model=pt_path, device="cpu")
    from_folder = evaluation.score(tmp_path, "a red circle", model=pt_path, device="cpu")
    from_pil = evaluation.score(images, "a red circle", model=pt_path, device="cpu")
    assert torch.equal(from_files.text_cosine, from_pil.text_cosine)
    assert torch.equal(from_folder.text_cosine, from_pil.text_cosine)
    assert from_files.names == tuple(str(p) for p in paths)


def test_concept_scores_equal_scoring_each_phrase_as_the_prompt(clip_files: tuple[Path, Path]) -> None:
    pt_path, _ = clip_files
    images = random_images(4, seed=8)
    phrases = ["a red circle", "a dog", "a checkered heart"]
    concepts = evaluation.concept_scores(images, phrases, model=pt_path, batch_size=3)
    for phrase in phrases:
        single = evaluation.score(images, phrase, model=pt_path, device="cpu")
        torch.testing.assert_close(concepts.per_concept[phrase], single.clipscore_hessel, atol=3e-6, rtol=0)
    stacked = torch.stack([concepts.per_concept[p] for p in phrases], dim=1)
    torch.testing.assert_close(concepts.minimum, stacked.min(dim=1).values)
    with pytest.raises(EvaluationError, match="non-empty list"):
        evaluation.concept_scores(images, [], model=pt_path)


def test_transformers_clip_folder_matches_its_own_processor_and_model(hf_folder: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    images = random_images(len(PROMPTS), seed=9)
    backend = load_clip(hf_folder, "cpu")
    assert isinstance(backend, evaluation.TransformersClipBackend)
    scores = evaluation.score(images, PROMPTS, model=backend, batch_size=2)
    model = CLIPModel.from_pretrained(hf_folder).eval()
    processor = CLIPProcessor.from_pretrained(hf_folder)
    inputs = processor(text=PROMPTS, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs)
    expected = F.cosine_similarity(output.image_embeds, output.text_embeds, dim=-1)
    torch.testing.assert_close(scores.text_cosine, expected, atol=1e-6, rtol=0)
    one_by_one = evaluation.score(images, PROMPTS, model=backend, batch_size=1)
    torch.testing.assert_close(one_by_one.text_cosine, scores.text_cosine, atol=1e-6, rtol=0)


def test_mismatched_counts_are_a_clear_error(clip_files: tuple[Path, Path]) -> None:
    with pytest.raises(EvaluationError, match="3 images but 2 prompts"):
        evaluation.score(random_images(3), ["a", "b"], model=clip_files[0])
    with pytest.raises(EvaluationError, match="nothing to score"):
        evaluation.score(random_images(3), model=clip_files[0])
    with pytest.raises(EvaluationError, match="batch_size"):
        evaluation.score(random_images(3), "a", model=clip_files[0], batch_size=0)


def test_unreadable_image_is_a_clear_error_naming_the_file(
    clip_files: tuple[Path, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    with pytest.raises(EvaluationError, match=r"broken\.png is not a readable image"):
        evaluation.score([broken], "a", model=clip_files[0])
    with pytest.raises(EvaluationError, match=r"missing\.png does not exist"):
        evaluation.score([tmp_path / "missing.png"], "a", model=clip_files[0])


def test_missing_model_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ClipLoadError, match=r"nope\.pt does not exist"):
        load_clip(tmp_path / "nope.pt", "cpu")
    with pytest.raises(ClipLoadError, match="not a transformers CLIP model"):
        load_clip(tmp_path, "cpu")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ClipLoadError, match="not a readable .safetensors"):
        load_clip(garbage, "cpu")
    with pytest.raises(ClipLoadError, match="not found.*not a hub id"):
        load_clip("no-such-model", "cpu")


def test_uncached_hub_id_offline_names_the_local_path_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipLoadError) as info:
        load_clip("atelier-tests/clip-that-is-not-cached", "cpu")
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "--model PATH" in message
    assert "\n" not in message


def test_clip_name_that_cannot_be_downloaded_names_the_local_path_alternative(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline_download(url: str, root: str) -> str:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(clip.clip, "_download", offline_download)
    with pytest.raises(ClipLoadError, match=r"'ViT-B/32' is not in ~/.cache/clip.*--model PATH"):
        load_clip("ViT-B/32", "cpu")


def test_default_model_is_the_toy_world_clip_with_a_clear_error_when_absent(
    clip_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    paths = types.ModuleType("models.toyworld.paths")
    monkeypatch.setitem(sys.modules, "models.toyworld.paths", paths)
    paths.TOYWORLD_CLIP = clip_files[0]  # type: ignore[attr-defined]
    images = random_images(2, seed=10)
    by_default = evaluation.score(images, "a red circle", device="cpu")
    explicit = evaluation.score(images, "a red circle", model=clip_files[0], device="cpu")
    assert by_default.model == str(clip_files[0])
    assert torch.equal(by_default.text_cosine, explicit.text_cosine)
    paths.TOYWORLD_CLIP = tmp_path / "absent.pt"  # type: ignore[attr-defined]
    with pytest.raises(ClipLoadError, match="toy world's CLIP file .*absent.pt is missing"):
        evaluation.score(images, "a", model=None)


def test_loaded_models_are_cached(clip_files: tuple[Path, Path]) -> None:
    assert load_clip(clip_files[0], "cpu") is load_clip(str(clip_files[0]), "cpu")
