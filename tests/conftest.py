"""Shared pytest fixtures: tiny SD 1.x / SDXL pipelines saved in diffusers format and loaded back for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(1)  # tiny models: 1 thread is fastest, and 2 thrash on shared cores


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny SD 1.x pipeline saved as a diffusers folder."""
    from tests.tiny_models import build_tiny_sd_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd")
    build_tiny_sd_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny SDXL pipeline saved as a diffusers folder."""
    from tests.tiny_models import build_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_sd_pipe(tiny_sd_path: Path):
    """The tiny SD 1.x pipeline loaded through the real loader on CPU in fp32 (a fresh copy per test)."""
    from models.pipelines import load_pipeline

    return load_pipeline(tiny_sd_path, device="cpu", dtype="fp32")


@pytest.fixture
def tiny_sdxl_pipe(tiny_sdxl_path: Path):
    """The tiny SDXL pipeline loaded through the real loader on CPU in fp32 (a fresh copy per test)."""
    from models.pipelines import load_pipeline

    return load_pipeline(tiny_sdxl_path, device="cpu", dtype="fp32")
