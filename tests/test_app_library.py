"""The Library's downloads of an imported Atelier adapter are the trainer's standard exports, written by the
same function (`models.adapters.export.write_standard_exports`), with how faithful each one is; the Library
runs the adapter inspector on one adapter beside another."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.library import Library
from app.store import Store
from models.adapters import attach
from models.adapters.export import standard_exports
from models.adapters.files import save_adapter_file
from tests.test_adapters import perturb


def _adapter_file(unet, family: str, config: dict, folder: Path) -> Path:
    handle = attach(unet, family, config, "vo")
    perturb(handle)
    path = save_adapter_file(
        folder / f"{family}.safetensors", handle, unet=unet, base_model_id="tiny", trigger_phrase="sks",
        train_steps=1,
    )  # fmt: skip
    handle.detach()
    return path


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
def test_imported_adapters_get_the_standard_exports_their_notes_and_the_inspector(
    tiny_sd_pipe, tiny_sdxl_pipe, tmp_path: Path
) -> None:
    unet = tiny_sd_pipe.unet
    library = Library(Store(tmp_path / "data"))
    hra = library.import_file(_adapter_file(unet, "hra", {"r": 2}, tmp_path), lambda: unet)
    names = {p.name for p in library.export_paths(hra)}
    files = {s.name for s in standard_exports("hra").values() if s.to != "peft"}
    assert names == files
    assert (library.path(hra).parent / "exports" / "peft" / "adapter_config.json").is_file()
    notes = library.export_notes(hra)
    assert notes["kohya_lora.safetensors"] == "hra → lora, exact"
    kohya = load_file(library.path(hra).parent / "exports" / "kohya_lora.safetensors")
    assert sum(k.endswith("lora_down.weight") for k in kohya) == 16

    boft = library.import_file(_adapter_file(unet, "boft", {"block_num": 4}, tmp_path), lambda: unet)
    notes = library.export_notes(boft)
    assert notes["kohya_full.safetensors"] == "boft → full, exact"
    assert notes["pytorch_lora_weights_rank32.safetensors"].startswith("boft → rank-32 LoRA, relative error")

    reports, files = library.inspect(hra, tiny_sd_pipe, compare=boft, images=1)
    assert [r["name"] for r in reports] == [hra.name, boft.name] and reports[0]["intruders"] == 0
    assert {p.name for p in files} >= {"report.json", "spectrum.png", "samples.png"}
    assert all(p.parent == library.path(hra).parent / f"inspect-vs-{boft.id}" for p in files)

    # An HRA adapter of another base model: the exports that need its base weights are left out.
    (tmp_path / "other").mkdir()
    other = library.import_file(
        _adapter_file(unet, "hra", {"r": 2}, tmp_path / "other"), lambda: tiny_sdxl_pipe.unet
    )
    assert library.export_paths(other) == [] and other.family == "hra"
    assert not list(library.root.glob(".partial-*"))
    assert torch.isfinite(next(iter(kohya.values()))).all()


@pytest.mark.filterwarnings("ignore:.*(CUDA extension|boft_n_butterfly_factor).*:UserWarning")
def test_library_tab_inspects_through_the_app_api(tiny_sd_pipe, tiny_sd_path: Path, tmp_path: Path) -> None:
    from gradio_client import Client

    from app.studio import Settings, Studio
    from app.ui import serve
    from tests.test_app_api import free_port

    studio = Studio(Settings(data_dir=tmp_path / "data", base_model=str(tiny_sd_path), device="cpu"))
    unet = tiny_sd_pipe.unet
    record = studio.library.import_file(_adapter_file(unet, "lora", {"rank": 2}, tmp_path), lambda: unet)
    port = free_port()
    demo = serve(studio, host="127.0.0.1", port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        summary, gallery = client.predict(adapter_id=record.id, other_id=None, api_name="/inspect_adapter")
    finally:
        demo.close()
        studio.close()
    assert summary.startswith(f"- {record.name} (LoRA): ") and "intruder dimensions" in summary
    assert {item["caption"] for item in gallery} >= {"layers", "delta", "spectrum", "rank", "intruders"}
    assert all(Path(item["image"]).is_file() for item in gallery)
