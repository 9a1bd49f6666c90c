"""No model file a person hands to Atelier can run code (#35, item 1).

Hostile files (`tests.payloads`: a TorchScript archive and pickles, each creating a marker file when run) go
through every entry point that accepts a model path: `python -m evaluation.clipscore --model`,
`python -m composition --clip-model`, `python -m training.dreambooth --pretrained_model_name_or_path`,
`python -m app --clip-model / --base-model`, and the app's adapter import. Each answers one line (exit 2 on
the command line) and the marker never appears, also with `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`. A grep over
the code base keeps `torch.jit.load` and unrestricted `torch.load` out.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.payloads import write_pickle_payload, write_raw_pickle_payload, write_torchscript_payload
from tests.test_app_jobs import make_subject_images

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = ROOT / "assets" / "composition" / "star-lora.safetensors"
PAYLOADS: dict[str, Callable[[Path, Path], Path]] = {
    "torchscript": write_torchscript_payload,
    "pickle": write_pickle_payload,
}


@pytest.fixture(params=["default", "force-no-weights-only"])
def torch_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each case as is and with torch told to skip its weights-only loader wherever it may."""
    if request.param != "default":
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return request.param


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("subject")
    make_subject_images(folder)
    return folder


def _payload(kind: str, folder: Path, suffix: str) -> tuple[Path, Path]:
    marker = folder / f"marker-{kind}"
    return PAYLOADS[kind](folder / f"model{suffix}", marker), marker


def _pickled_diffusers_folder(tiny_sd_path: Path, folder: Path) -> tuple[Path, Path]:
    """A copy of the tiny SD folder whose text encoder is a hostile `pytorch_model.bin`."""
    copy = folder / "pickled-sd"
    shutil.copytree(tiny_sd_path, copy)
    (copy / "text_encoder" / "model.safetensors").unlink()
    marker = folder / "marker-bin"
    write_raw_pickle_payload(copy / "text_encoder" / "pytorch_model.bin", marker)
    return copy, marker


def _pickled_clip_folder(folder: Path) -> tuple[Path, Path]:
    """A transformers CLIP folder look-alike whose weights are a hostile `pytorch_model.bin`."""
    copy = folder / "pickled-clip"
    copy.mkdir()
    (copy / "config.json").write_text('{"model_type": "clip"}')
    marker = folder / "marker-clip-bin"
    write_pickle_payload(copy / "pytorch_model.bin", marker)
    return copy, marker


def _one_line_error(code: int, capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _clipscore(model: Path, images: Path) -> int:
    from evaluation.clipscore import main

    return main(["--images", str(images), "--prompt", "a photo", "--model", str(model)])


def _composition(model: Path, out: Path) -> int:
    from composition.__main__ import main

    return main(["--adapter", str(ADAPTER), "--prompt", "a purple star", "--clip-model", str(model),
                 "--steps", "1", "--out", str(out)])  # fmt: skip


def _training(model: Path, images: Path, out: Path) -> int:
    from training.dreambooth import main

    return main(["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
                 "--instance_prompt", "a photo of sks dog", "--output_dir", str(out),
                 "--max_train_steps", "1"])  # fmt: skip


def _app(option: str, model: Path, data: Path) -> int:
    from app.__main__ import main

    return main([option, str(model), "--data-dir", str(data), "--port", "1"])


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_clip_entry_points_refuse_code_carrying_files(
    kind: str, torch_env: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload, marker = _payload(kind, tmp_path, ".pt")
    err = _one_line_error(_clipscore(payload, images), capsys)
    assert str(payload) in err
    out = tmp_path / "composed"
    err = _one_line_error(_composition(payload, out), capsys)
    assert str(payload) in err
    assert not list(out.glob("*.png")), "composition must fail before generating"
    err = _one_line_error(_app("--clip-model", payload, tmp_path / "data"), capsys)
    assert str(payload) in err
    assert not marker.exists(), f"the {kind} payload ran ({torch_env})"


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_base_model_entry_points_refuse_code_carrying_files(
    kind: str, torch_env: str, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for suffix in (".ckpt", ".safetensors"):
        payload, marker = _payload(kind, tmp_path, suffix)
        err = _one_line_error(_training(payload, images, tmp_path / "out"), capsys)
        assert payload.name in err
        err = _one_line_error(_app("--base-model", payload, tmp_path / "data"), capsys)
        assert payload.name in err
        assert not marker.exists(), f"the {kind}{suffix} payload ran ({torch_env})"
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_pickled_bin_folders_are_refused_with_one_line(
    torch_env: str, tiny_sd_path: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, marker = _pickled_diffusers_folder(tiny_sd_path, tmp_path)
    err = _one_line_error(_training(folder, images, tmp_path / "out"), capsys)
    assert "text_encoder" in err and ".bin" in err and "safetensors" in err
    err = _one_line_error(_app("--base-model", folder, tmp_path / "data"), capsys)
    assert "text_encoder" in err
    clip_folder, clip_marker = _pickled_clip_folder(tmp_path)
    err = _one_line_error(_clipscore(clip_folder, images), capsys)
    assert ".bin" in err and "safetensors" in err
    _one_line_error(_app("--clip-model", clip_folder, tmp_path / "data"), capsys)
    assert not marker.exists() and not clip_marker.exists()


def test_loaders_refuse_payloads_in_process(torch_env: str, tiny_sd_path: Path, tmp_path: Path) -> None:
    """The library functions behind the CLIs (also what the app calls on first Evaluate / Compose)."""
    from evaluation import ClipLoadError, load_clip
    from models.pipelines import ModelLoadError, load_pipeline

    folder, bin_marker = _pickled_diffusers_folder(tiny_sd_path, tmp_path)
    with pytest.raises(ModelLoadError, match=r"text_encoder weights are a pickled \.bin"):
        load_pipeline(folder, device="cpu", dtype="fp32")
    for kind in sorted(PAYLOADS):
        payload, marker = _payload(kind, tmp_path, ".pt")
        with pytest.raises(ClipLoadError, match=re.escape(str(payload))):
            load_clip(payload, device="cpu")
        assert not marker.exists(), kind
    assert not bin_marker.exists()


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_app_adapter_import_refuses_payloads(
    kind: str, torch_env: str, tiny_sd_path: Path, tmp_path: Path
) -> None:
    from app.library import Library, LibraryError
    from app.store import Store
    from models.pipelines import load_pipeline

    payload, marker = _payload(kind, tmp_path, ".safetensors")
    store = Store(tmp_path / "data")
    try:
        library = Library(store)
        with pytest.raises(LibraryError) as caught:
            library.import_file(payload, lambda: load_pipeline(tiny_sd_path, device="cpu", dtype="fp32").unet)
        assert len(str(caught.value).splitlines()) == 1 and payload.name in str(caught.value)
        assert library.records() == []
    finally:
        store.close()
    assert not marker.exists()


def test_cli_process_exits_2_with_one_line_for_a_torchscript_clip(images: Path, tmp_path: Path) -> None:
    """The real process: exit status 2, one line on stderr, and the scripted `__setstate__` never ran."""
    payload, marker = _payload("torchscript", tmp_path, ".pt")
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "evaluation.clipscore", "--images", str(images), "--prompt", "x",
         "--model", str(payload)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {payload} is a TorchScript archive; loading one can run code from the file, so Atelier never "
        "does. Pass a plain state dict instead (a .safetensors file, or a .pt written with "
        "torch.save(model.state_dict()))"
    ]
    assert not marker.exists()


def _unsafe_call(call: ast.Call) -> str | None:
    """Why this call may run code from a file, or None."""
    name = ast.unparse(call.func)
    if name.endswith("jit.load"):
        return name
    if name == "torch.load":
        safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords)
        return None if safe else "torch.load without weights_only=True"
    if name == "clip.load":
        released = bool(call.args) and isinstance(call.args[0], ast.Name) and call.args[0].id == "name"
        return None if released else "clip.load of anything but a released model name"
    if name in {"pickle.load", "pickle.loads", "pickle.Unpickler"}:
        return name
    return None


def test_no_unsafe_loader_in_the_code_base() -> None:
    """Outside the tests (which build the payloads and compare against clip.load on their own files), no code
    calls `torch.jit.load`, `torch.load` without `weights_only=True`, `clip.load` on anything but a released
    model name, or an unpickler."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] == "tests" or relative.parts[0].startswith("."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            why = _unsafe_call(node) if isinstance(node, ast.Call) else None
            if why:
                found.append(f"{relative}:{node.lineno}: {why}")
    assert found == []


def test_torch_weights_only_refusal_is_one_plain_line(torch_env: str, tmp_path: Path) -> None:
    """torch explains a weights-only refusal over a dozen lines with terminal colour codes; users get one."""
    from models.weights_files import WeightsFileError, load_tensors

    payload, marker = _payload("pickle", tmp_path, ".ckpt")
    with pytest.raises(WeightsFileError) as caught:
        load_tensors(payload)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "\x1b" not in message, message
    assert message.startswith(f"{payload} holds more than tensors") and "Weights only load failed" in message
    assert not marker.exists()
