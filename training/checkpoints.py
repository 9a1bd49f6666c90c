"""Resumable training checkpoints (``checkpoint-N/``), written with safetensors and JSON only.

A checkpoint holds everything needed to continue a DreamBooth run exactly where it stopped:

* ``adapter.safetensors``   — the adapter's trainable tensors (``AdapterHandle.state_dict()``);
* ``optimizer.safetensors`` — every tensor of the optimiser state, with the param groups and the
  non-tensor state in the JSON header;
* ``rng.safetensors``       — torch CPU (and CUDA) generator states of every process;
* ``ema.safetensors``       — the moving average of the adapter weights, when the run keeps one (``--use_ema``);
* ``state.json``            — step, LR-scheduler state, Python/NumPy RNG states, run identity.

Nothing is pickled, so loading a checkpoint someone sent you cannot run code. A checkpoint is written
to a temporary folder and renamed into place, so a crash never leaves a half-written ``checkpoint-N``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.atomic_write import as_os_error

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
FORMAT = "atelier.train-checkpoint/1"
_LEFTOVERS = (
    re.compile(r"^\.checkpoint-\d+-[a-z0-9_]{8}$"),  # a checkpoint's staging folder (tempfile.mkdtemp)
    re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$"),  # models.atomic_write's temporary file
    re.compile(r"^\.(peft|[\w.-]+\.safetensors)\.([a-z0-9_]{8}|old)$"),  # an export's staging folder
)
"""Names only the project's own staging gives, so a person's files in the output folder are never matched."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or belongs to a different run."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: tensors and states, ready to be applied to a fresh run."""

    path: Path
    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    lr_scheduler: dict[str, Any]
    rng: dict[str, Any]
    run: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``checkpoint-N`` folder in ``output_dir``, oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / "state.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def remove_leftovers(output_dir: str | Path) -> list[Path]:
    """Delete what a killed run left half-written in ``output_dir``: checkpoint staging folders
    (``.checkpoint-<step>-*``) and the temporary files and folders of atomic writes (``.<name>.*``, in the
    folder and in ``exports/``); complete files are never touched. Returns what was removed."""
    output_dir = Path(output_dir)
    removed = []
    for folder in (output_dir, output_dir / "exports"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if not _is_leftover(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _is_leftover(name: str) -> bool:
    return any(pattern.match(name) for pattern in _LEFTOVERS)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder meant by ``--resume_from_checkpoint`` (``None``: start fresh).

    ``latest`` picks the newest checkpoint in ``output_dir`` and means "start fresh" when there is none;
    an explicit path that is not a checkpoint is an error.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / resume
    if not (path / "state.json").is_file():
        raise CheckpointError(
            f"--resume_from_checkpoint {resume}: {path} is not a training checkpoint (no state.json); "
            "pass a checkpoint-N folder or 'latest'"
        )
    return path


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in header["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in header["param_groups"]]
    return {"state": state, "param_groups": groups}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's RNG states: tensors (torch CPU/CUDA) and JSON-able values (Python, NumPy)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = value
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    values = {
        "python": [version, list(internal), gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    return tensors, values


def restore_rng(tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
    """Put back the states taken by ``capture_rng``."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    adapter: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    lr_scheduler: dict[str, Any],
    rng_tensors: list[dict[str, torch.Tensor]],
    rng_values: dict[str, Any],
    run: dict[str, Any],
    total_limit: int | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically and prune old ones down to ``total_limit``.

    ``rng_tensors`` has one entry per process (index = process rank); ``run`` identifies the run
    (family, targets, config) so that resuming a different run is refused.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    staging = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir))
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in adapter.items()}, staging / "adapter.safetensors"
        )
        opt_tensors, opt_header = _flatten_optimizer(optimizer)
        save_file(opt_tensors, staging / "optimizer.safetensors", metadata={"header": json.dumps(opt_header)})
        rng = {f"{rank}.{k}": v for rank, states in enumerate(rng_tensors) for k, v in states.items()}
        save_file(rng, staging / "rng.safetensors")
        if ema is not None:
            save_file(ema, staging / "ema.safetensors")
        state = {
            "format": FORMAT,
            "step": step,
            "lr_scheduler": lr_scheduler,
            "rng": rng_values,
            "run": run,
        }
        (staging / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
        if final.exists():
            stale = output_dir / f".stale-{final.name}-{os.getpid()}"
            os.replace(final, stale)
            shutil.rmtree(stale)
        os.replace(staging, final)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        error = as_os_error(exc, final)  # the checkpoint's name, not its staging file's
        if error is None:
            raise
        raise error from exc
    if total_limit is not None:
        prune_checkpoints(output_dir, total_limit)
    return final


def prune_checkpoints(output_dir: str | Path, total_limit: int) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``total_limit`` remain; return the removed folders."""
    found = list_checkpoints(output_dir)
    removed = [path for _, path in found[: max(0, len(found) - total_limit)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


def load_checkpoint(path: str | Path, *, rank: int = 0) -> Checkpoint:
    """Read a checkpoint folder (``CheckpointError`` when incomplete or not a checkpoint)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        if state.get("format") != FORMAT:
            raise CheckpointError(
                f"{path} is not an Atelier training checkpoint (format {state.get('format')!r})"
            )
        adapter = load_file(path / "adapter.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
        with safe_open(str(path / "optimizer.safetensors"), framework="pt") as handle:
            opt_header = json.loads(handle.metadata()["header"])
        rng_all = load_file(path / "rng.safetensors")
        ema = load_file(path / "ema.safetensors") if (path / "ema.safetensors").exists() else None
    except (OSError, SafetensorError, json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or corrupt ({exc}); pick another one"
        ) from exc
    prefix = f"{rank}."
    rng_tensors = {k[len(prefix) :]: v for k, v in rng_all.items() if k.startswith(prefix)}
    if not rng_tensors:
        rng_tensors = {k.split(".", 1)[1]: v for k, v in rng_all.items() if k.startswith("0.")}
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        adapter=adapter,
        optimizer=_unflatten_optimizer(opt_tensors, opt_header),
        lr_scheduler=state["lr_scheduler"],
        rng={"tensors": rng_tensors, "values": state["rng"]},
        run=state["run"],
        ema=ema,
    )
