"""Compose tab through ``gradio_client``: "Compare methods" renders every method on the same seed with CLIP
scores and UNet-evaluation counts, and CLoRA's masks are shown. Slow on a CPU (CLoRA runs every adapter branch
with gradient steps), so it is deselected by default: ``make test-slow``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image

from app.studio import Settings, Studio
from app.tabs.compose import COMPARISON_COLUMNS, TABLE_COLUMNS
from app.ui import serve
from tests.test_app_api import free_port, tiny_clip  # noqa: F401  (fixture)
from tests.test_app_load import make_adapter_library

pytestmark = pytest.mark.slow
PROMPT = "a photo of sks dog and zwx cat"


@pytest.fixture(scope="module")
def composing_app(
    tiny_sd_path: Path,
    tiny_clip: Path,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict]]:
    data_dir = tmp_path_factory.mktemp("atelier-data")
    binding = {"headers": TABLE_COLUMNS, "data": make_adapter_library(data_dir, tiny_sd_path)}
    studio = Studio(
        Settings(data_dir=data_dir, base_model=str(tiny_sd_path), clip_model=str(tiny_clip), device="cpu")
    )
    port = free_port()
    demo = serve(studio, host="127.0.0.1", port=port, block=False)
    try:
        yield f"http://127.0.0.1:{port}/", binding
    finally:
        demo.close()
        studio.close()


def compose(client: Client, binding: dict, method: str, api_name: str = "/compose") -> tuple:
    return client.predict(
        table=binding,
        prompt=PROMPT,
        method=method,
        negative="",
        seed=7,
        steps=2,
        guidance=5.0,
        num_images=1,
        api_name=api_name,
    )


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_compare_methods_scores_every_method_on_the_same_seed(composing_app: tuple[str, dict]) -> None:
    from composition.methods import METHODS

    url, binding = composing_app
    client = Client(url, verbose=False)
    merge_gallery, merge_info, _, merge_masks = compose(client, binding, "merge")
    assert "4 UNet evaluations" in merge_info  # 2 steps x (unconditional + conditional)
    assert merge_masks["visible"] is False

    gallery, info, table, masks = compose(client, binding, "merge", api_name="/compare_methods")
    rows = table["value"]["data"]
    assert [row[0] for row in rows] == list(METHODS) and "Compared 5 methods" in info
    assert table["value"]["headers"] == COMPARISON_COLUMNS  # full and shallow rows apart, each vs composite
    assert all(f"**{column}**" in info for column in COMPARISON_COLUMNS[3:]), "every cost column is explained"
    assert all(row[1] == 7 and 0.0 <= row[2] <= 100.0 for row in rows)
    evals = {row[0]: row[3] for row in rows}
    assert (
        evals["merge"] == evals["switch"] == 4 and evals["composite"] == 8
    )  # composite: one pass per adapter
    assert evals["clora"] > evals["composite"]
    assert [item["caption"].split(" · ")[0] for item in gallery] == list(METHODS)
    assert np.array_equal(pixels(gallery[0]["image"]), pixels(merge_gallery[0]["image"]))
    assert masks["visible"] is True
    assert [item["caption"] for item in masks["value"]] == [  # each method's masks, labelled by method
        "cmlora · seed 7: sks dog",
        "cmlora · seed 7: zwx cat",
        "clora · seed 7: base",
        "clora · seed 7: sks dog",
        "clora · seed 7: zwx cat",
    ]


def test_clora_masks_cover_the_image(composing_app: tuple[str, dict]) -> None:
    url, binding = composing_app
    gallery, info, _, masks = compose(Client(url, verbose=False), binding, "clora")
    assert len(gallery) == 1 and "**clora**" in info
    stack = np.stack([pixels(item["image"])[..., 0] / 255.0 for item in masks["value"]])  # (branches, H, W)
    assert stack.shape[0] == 3
    assert set(np.unique(stack)) <= {0.0, 1.0}, "masks are binary"
    assert np.array_equal(stack[0], 1.0 - stack[1:].max(axis=0)), (
        "the base branch covers what no concept covers"
    )
