"""Adapter files with NaN or infinite weights are refused on load, naming the tensor (#35, item 6): by
`load_adapter_file`, the kohya importer, `python -m composition` (exit 2, one line) and the app's import."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.adapters.family import AdapterFileError
from models.adapters.files import load_adapter_file

STAR = Path(__file__).resolve().parents[1] / "assets" / "composition" / "star-lora.safetensors"


def _poisoned_copy(path: Path, value: float) -> tuple[Path, str]:
    """A copy of the star adapter with one weight set to `value`; returns the file and the tensor's key."""
    with safe_open(str(STAR), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    key = sorted(tensors)[len(tensors) // 2]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[3] = value
    save_file(tensors, str(path), metadata=metadata)
    return path, key


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_load_names_the_non_finite_tensor(value: float, tmp_path: Path) -> None:
    path, key = _poisoned_copy(tmp_path / "star-bad.safetensors", value)
    assert load_adapter_file(STAR).family == "lora"
    with pytest.raises(AdapterFileError, match=rf"star-bad\.safetensors: tensor {key} holds 1 NaN/infinite"):
        load_adapter_file(path)


def test_kohya_import_refuses_non_finite_weights(tmp_path: Path) -> None:
    from models.adapters.exports import import_kohya_lora

    path = tmp_path / "kohya.safetensors"
    down = torch.zeros(4, 32)
    down[0, 0] = float("nan")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": down}, str(path))
    with pytest.raises(AdapterFileError, match="proj_in.lora_down.weight holds 1 NaN"):
        import_kohya_lora(path, None)


def test_composition_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from composition.__main__ import main

    path, key = _poisoned_copy(tmp_path / "star-nan.safetensors", float("nan"))
    out = tmp_path / "out"
    code = main(["--adapter", str(path), "--prompt", "a purple star", "--clip-model", "none",
                 "--steps", "1", "--device", "cpu", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the pipeline's loading bar
    assert code == 2 and err == (
        f"error: star-nan.safetensors: tensor {key} holds 1 NaN/infinite value(s) of 512; the adapter is "
        "damaged (did its training diverge?): train it again or use an earlier checkpoint."
    )
    assert not out.exists() or not list(out.iterdir())


def test_app_import_refuses_non_finite_weights(tmp_path: Path) -> None:
    from app.library import Library, LibraryError
    from app.store import Store

    path, key = _poisoned_copy(tmp_path / "star-inf.safetensors", float("inf"))
    store = Store(tmp_path / "data")
    try:
        library = Library(store)
        with pytest.raises(LibraryError, match=key):
            library.import_file(path, lambda: pytest.fail("a damaged Atelier file needs no UNet"))
        assert library.records() == []
    finally:
        store.close()
