"""Every method's default on the toy world gives an image, not noise: `composition.quality.is_noise_image` on a few
seeds here, on 32 in the slow test (the purple and heart LoRA fixtures, "a purple square and a blue heart")."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from composition import AdapterBank, ConceptPrompt, generate
from composition.methods import METHODS
from composition.quality import FIXTURES, GUIDANCE, is_noise_image, plain_form
from models.pipelines import default_base_model, load_pipeline
from tests.composition_helpers import torch_threads


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def test_noise_image_check_flags_noise_and_empty_images_and_passes_toy_world_renders() -> None:
    from models.toyworld.world import render_scene, sample_batch

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert is_noise_image(noise)
    assert is_noise_image(Image.new("RGB", (32, 32), (250, 250, 250)))  # nothing there either
    renders = [render_scene(scene).resize((32, 32)) for scene in sample_batch(0, 20)]
    assert not any(is_noise_image(image) for image in renders)


def _toy_case() -> tuple:
    folder = default_base_model()
    if folder is None:
        pytest.skip("the toy-world pipeline is not installed under assets/ (python -m models.toyworld.train)")
    pipe = load_pipeline(folder, device="cpu", dtype="fp32")
    bank = AdapterBank(pipe, [FIXTURES / "purple-lora.safetensors", FIXTURES / "heart-lora.safetensors"])
    phrases = ["purple square", "blue heart"]
    prompt = ConceptPrompt.build(
        "a purple square and a blue heart", phrases, plains=[plain_form(p) for p in phrases]
    )
    return pipe, bank, prompt


def _noise_seeds(seeds: range) -> dict[str, list[int]]:
    pipe, bank, prompt = _toy_case()
    found = {}
    for method in METHODS:
        found[method] = [
            seed
            for seed in seeds
            if is_noise_image(generate(method, pipe, bank, prompt, 25, GUIDANCE, seed).images[0])
        ]
    return found


def test_no_method_default_gives_a_noise_image_on_the_first_seeds() -> None:
    assert _noise_seeds(range(2)) == {method: [] for method in METHODS}


@pytest.mark.slow
def test_no_method_default_gives_a_noise_image_over_32_seeds() -> None:
    assert _noise_seeds(range(32)) == {method: [] for method in METHODS}
