"""The Library's downloads of an imported Atelier adapter are the trainer's standard exports, written by the
same function (`models.adapters.export.write_standard_exports`), with how faithful each one is; the Library
runs the adapter inspector on one adapter beside another. A file that is not an adapter is refused in one
line without temporary folders, the same file imported twice is named instead of duplicated, downloads carry
the adapter's name (and follow a rename) and are published under ``public/`` like every file the page shows,
and sample grids are enlarged crisply for display."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from app.library import Library, LibraryError, download_stem
from app.public import PublicFiles
from app.store import Store
from app.tabs.library import SAMPLE_MIN_WIDTH, readable_sample
from models.adapters import attach
from models.adapters.export import standard_exports
from models.adapters.files import save_adapter_file
from tests.test_adapters import perturb
from tests.test_app_load import make_adapter_library


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


@pytest.fixture
def library(tmp_path: Path, tiny_sd_path: Path) -> Library:
    make_adapter_library(tmp_path / "data", tiny_sd_path)
    store = Store(tmp_path / "data")
    yield Library(store)
    store.close()


def test_a_file_that_is_not_an_adapter_is_refused_in_one_line(
    library: Library, tmp_path: Path, tiny_sd_pipe
) -> None:
    upload = tmp_path / "gradio" / "3f9a1c" / "notes.safetensors"
    upload.parent.mkdir(parents=True)
    upload.write_text("a text file with the wrong suffix")
    tensors = upload.with_name("weights.safetensors")
    save_file({"w": torch.zeros(3)}, tensors)
    before = [r.id for r in library.records()]
    for path, reason in ((upload, "not a readable safetensors file"), (tensors, "neither an Atelier")):
        with pytest.raises(LibraryError, match=reason) as caught:
            library.import_file(path, lambda: tiny_sd_pipe.unet)
        message = str(caught.value)
        assert str(upload.parent) not in message and "\n" not in message
        assert message.startswith(f"{path.name} is not an adapter")
    assert [r.id for r in library.records()] == before
    assert not list(library.root.glob(".partial-*"))


def test_the_same_file_twice_is_named_not_duplicated(library: Library, tmp_path: Path) -> None:
    first = library.records()[0]
    copy = tmp_path / "copy-of-dog.safetensors"
    copy.write_bytes(library.path(first).read_bytes())
    assert library.find_file(copy).id == first.id
    with pytest.raises(LibraryError, match=f"already in the library as '{first.name}'"):
        library.import_file(copy, lambda: None)
    assert len(library.records()) == 2
    assert first.metadata["sha256"], "the hash is recorded when the adapter is added"


def test_downloads_are_named_after_the_adapter_and_follow_a_rename(library: Library) -> None:
    """Downloads are published (``app.public``) under the adapter's name: only ``public/`` is served."""
    public = PublicFiles(library.store.data_dir)
    record = next(r for r in library.records() if r.family == "hra")
    names = [name for _, name in library.download_names(record)]
    assert names[0] == "zwx-cat-hra.safetensors"
    renamed = library.rename(record.id, "Cat / v2")
    paths = [Path(public.publish(path, name)) for path, name in library.download_names(renamed)]
    assert paths[0].name == "Cat-v2-hra.safetensors" and len(paths) == len(names) > 1
    assert all(p.name.startswith("Cat-v2-") for p in paths), "exports carry the new name too"
    assert all(p.is_relative_to(public.shown) for p in paths), paths
    assert paths[0].read_bytes() == library.path(record).read_bytes()
    assert download_stem("../../etc") == "etc" and download_stem("  ") == "adapter"
    public.unpublish(library.path(record).parent)
    library.delete(record.id)
    assert not any(p.exists() for p in paths), "a deleted adapter's downloads are no longer served"


def test_sample_grids_are_enlarged_with_whole_pixels(tmp_path: Path) -> None:
    grid = Image.new("RGB", (64, 32), "white")
    grid.putpixel((0, 0), (255, 0, 0))
    grid.save(tmp_path / "sample.png")
    shown = readable_sample(str(tmp_path / "sample.png"))
    assert shown.size == (SAMPLE_MIN_WIDTH, SAMPLE_MIN_WIDTH // 2)
    factor = SAMPLE_MIN_WIDTH // 64
    assert {shown.getpixel((x, y)) for x in range(factor) for y in range(factor)} == {(255, 0, 0)}
    assert shown.getpixel((factor, 0)) == (255, 255, 255)
    assert readable_sample(None) is None
