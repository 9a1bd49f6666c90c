"""The adapter library: trained and imported adapter files under ``<data-dir>/adapters/<id>/``, listed in SQLite.

Each entry is a folder holding ``adapter.safetensors`` (an Atelier adapter file, or an imported kohya/A1111
LoRA kept as it came), an optional ``sample.png`` (the last validation grid) and ``exports/`` (the kohya,
diffusers, LyCORIS and PEFT files written by the trainer). A folder is assembled under a hidden temporary
name, checked by loading the adapter back, and renamed into place in one ``os.replace``; only then is the
database row added. So the library never lists a half-written or unreadable file, and a crash leaves at most
a hidden temporary folder, which the next start removes. Each entry records its file's SHA-256, so importing
a file that is already in the library is refused by name; downloads are offered under the adapter's own name
(``<name>-<family>.safetensors``, ``download_names``), published by the app (``app.public``) under that name.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.fingerprints import file_sha256
from app.store import AdapterRecord, JobRecord, Store, new_id

ADAPTER_FILE = "adapter.safetensors"
SAMPLE_FILE = "sample.png"
EXPORTS_DIR = "exports"
UnetProvider = Callable[[], Any]
"""Returns the base pipeline's UNet (needed to import kohya LoRAs, whose keys name UNet layers)."""


class LibraryError(ValueError):
    """An adapter cannot be added, found or changed; the message says what to do."""


class Library:
    """Adds, lists, renames and deletes adapters; the files live under ``<data-dir>/adapters``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.data_dir / "adapters"
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".partial-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # --- adding -------------------------------------------------------------------------------------
    def register_trained(self, job: JobRecord, event: dict[str, Any]) -> str:
        """Move a finished job's adapter into the library (the job runner's ``register`` callback)."""
        existing = self.store.adapter_for_job(job.id)
        if existing is not None:
            return existing.id
        if not event.get("adapter_path"):
            raise LibraryError(f"job {job.id} reported no adapter file")
        source = Path(event["adapter_path"])
        samples = [Path(p) for p in event.get("validation_images") or [] if Path(p).is_file()]
        exports = [Path(p) for p in (event.get("exports") or {}).values() if Path(p).exists()]
        _read_atelier_file(source)
        name = job.name or str(job.config.get("instance_prompt") or job.id)
        record = self._install(
            source,
            name=name,
            source_kind="trained",
            job_id=job.id,
            sample=samples[-1] if samples else None,
            exports=exports,
            describe=lambda stored: _describe(_read_atelier_file(stored)),
        )
        return record.id

    def import_file(
        self, path: str | Path, unet: UnetProvider, name: str = "", trigger: str = ""
    ) -> AdapterRecord:
        """Add a ``.safetensors`` adapter from disk: an Atelier adapter file or a kohya/A1111 LoRA."""
        from models.adapters.family import AdapterFileError, DamagedAdapterFile
        from models.adapters.files import load_adapter_file

        path = Path(path)
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            raise LibraryError(f"{path.name}: only .safetensors adapter files can be imported")
        same = self.find_file(path)
        if same is not None:
            raise LibraryError(
                f"{path.name} is already in the library as '{same.name}' ({same.family}, {same.id}); "
                "nothing was added."
            )
        if not _readable_safetensors(path):
            raise LibraryError(
                f"{path.name} is not an adapter: it is not a readable safetensors file (truncated, corrupt or "
                "another format). Choose an Atelier adapter or a kohya/A1111 LoRA .safetensors file."
            )
        exports_dir = Path(tempfile.mkdtemp(prefix=".partial-exports-", dir=self.root))
        exports: list[Path] = []
        try:
            adapter = load_adapter_file(path)
            load, kind = load_adapter_file, "imported"
            exports = _write_exports(adapter, exports_dir, unet)
        except DamagedAdapterFile as error:
            shutil.rmtree(exports_dir, ignore_errors=True)
            raise LibraryError(str(error)) from None
        except AdapterFileError:
            from models.adapters.exports import import_kohya_lora

            try:
                import_kohya_lora(path, unet())
            except AdapterFileError as kohya_error:
                shutil.rmtree(exports_dir, ignore_errors=True)
                reason = str(kohya_error).replace(str(path), path.name)
                raise LibraryError(
                    f"{path.name} is not an adapter Atelier can use: it is neither an Atelier adapter file nor "
                    f"a kohya/A1111 LoRA for this base model ({reason})"
                ) from kohya_error
            load, kind = (lambda stored: import_kohya_lora(stored, unet())), "imported-kohya"

        def describe(stored: Path) -> dict[str, Any]:
            info = _describe(load(stored))
            if trigger.strip():
                info["trigger"] = trigger.strip()
            return info

        try:
            return self._install(
                path,
                name=name.strip() or path.stem,
                source_kind=kind,
                job_id=None,
                sample=None,
                exports=exports,
                describe=describe,
            )
        finally:
            shutil.rmtree(exports_dir, ignore_errors=True)

    def _install(
        self,
        source: Path,
        *,
        name: str,
        source_kind: str,
        job_id: str | None,
        sample: Path | None,
        exports: list[Path],
        describe: Callable[[Path], dict[str, Any]],
    ) -> AdapterRecord:
        adapter_id = new_id("adapter")
        partial = self.root / f".partial-{adapter_id}"
        final = self.root / adapter_id
        try:
            partial.mkdir()
            shutil.copyfile(source, partial / ADAPTER_FILE)
            if sample is not None:
                shutil.copyfile(sample, partial / SAMPLE_FILE)
            for export in exports:
                target = partial / EXPORTS_DIR / export.name
                target.parent.mkdir(exist_ok=True)
                if export.is_dir():
                    shutil.copytree(export, target)
                else:
                    shutil.copyfile(export, target)
            info = describe(partial / ADAPTER_FILE)
            info["metadata"]["sha256"] = file_sha256(partial / ADAPTER_FILE)
            os.replace(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        record = AdapterRecord(
            id=adapter_id,
            name=name,
            file=f"adapters/{adapter_id}/{ADAPTER_FILE}",
            family=info["family"],
            parameters=info["parameters"],
            size_bytes=(final / ADAPTER_FILE).stat().st_size,
            base_model=info["base_model"],
            trigger=info["trigger"],
            sample=f"adapters/{adapter_id}/{SAMPLE_FILE}" if sample is not None else None,
            source=source_kind,
            job_id=job_id,
            created_at=time.time(),
            metadata=info["metadata"],
        )
        try:
            return self.store.add_adapter(record)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise

    # --- reading and changing -----------------------------------------------------------------------
    def records(self) -> list[AdapterRecord]:
        return self.store.list_adapters()

    def get(self, adapter_id: str) -> AdapterRecord:
        return self.store.get_adapter(adapter_id)

    def path(self, record: AdapterRecord) -> Path:
        return self.store.data_dir / record.file

    def sample_path(self, record: AdapterRecord) -> Path | None:
        return self.store.data_dir / record.sample if record.sample else None

    def export_paths(self, record: AdapterRecord) -> list[Path]:
        """The export files of an adapter (folders such as the PEFT layout are skipped: not downloadable)."""
        folder = self.path(record).parent / EXPORTS_DIR
        return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []

    def export_notes(self, record: AdapterRecord) -> dict[str, str]:
        """Export file name -> how faithful it is ("boft → full, exact", or an extracted LoRA's error)."""
        from models.adapters.exports import read_export_report
        from models.adapters.family import AdapterFileError

        notes: dict[str, str] = {}
        for path in self.export_paths(record):
            try:
                report = read_export_report(path)
            except AdapterFileError:
                report = None
            notes[path.name] = report.summary() if report else ""
        return notes

    def inspect(
        self, record: AdapterRecord, pipe: Any, compare: AdapterRecord | None = None, images: int = 2
    ) -> tuple[list[dict[str, Any]], list[Path]]:
        """The adapter inspector (`models.adapters.inspect`) on `record` (beside `compare`) with the app's base
        pipeline: the reports, and `report.json` + plots written to ``adapters/<id>/inspect[-vs-<id2>]/``."""
        from models.adapters.family import AdapterError
        from models.adapters.inspect import inspect_adapter, write_outputs

        records = [record] if compare is None else [record, compare]
        try:
            adapters = [self._adapter_file(r, pipe.unet) for r in records]
            reports = [inspect_adapter(a, pipe=pipe, images=images) for a in adapters]
        except AdapterError as exc:
            raise LibraryError(str(exc)) from exc
        for report, r in zip(reports, records, strict=True):
            report["name"] = r.name
        folder = self.path(record).parent / ("inspect" if compare is None else f"inspect-vs-{compare.id}")
        return reports, write_outputs(reports, folder)

    def _adapter_file(self, record: AdapterRecord, unet: Any) -> Any:
        """The stored file as an `AdapterFile` (an imported kohya LoRA is read for `unet`)."""
        from models.adapters.exports import import_kohya_lora
        from models.adapters.files import load_adapter_file

        path = self.path(record)
        return import_kohya_lora(path, unet) if record.source == "imported-kohya" else load_adapter_file(path)

    def find_file(self, path: str | Path) -> AdapterRecord | None:
        """The library entry whose adapter file has the same bytes as ``path`` (None when it is new)."""
        wanted = file_sha256(path)
        for record in self.records():
            stored = record.metadata.get("sha256")
            if stored is None and self.path(record).is_file():
                stored = file_sha256(self.path(record))
            if stored == wanted:
                return record
        return None

    def download_names(self, record: AdapterRecord) -> list[tuple[Path, str]]:
        """The adapter file and its exports, each with the name it is downloaded under, after the adapter's
        current name: ``<name>-<family>.safetensors``, ``<name>-<export file>``."""
        stem = download_stem(record.name)
        names = [(self.path(record), f"{stem}-{record.family}.safetensors")]
        return names + [(p, f"{stem}-{p.name}") for p in self.export_paths(record)]

    def rename(self, adapter_id: str, name: str) -> AdapterRecord:
        return self.store.rename_adapter(adapter_id, name)

    def delete(self, adapter_id: str) -> AdapterRecord:
        """Remove the row first (the adapter disappears from the list at once), then its folder."""
        record = self.store.delete_adapter(adapter_id)
        folder = self.path(record).parent
        trash = self.root / f".partial-deleted-{adapter_id}"
        if folder.is_dir():
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        return record


def _write_exports(adapter_file: Any, folder: Path, unet: UnetProvider) -> list[Path]:
    """The trainer's standard exports of an imported Atelier file; an export this base model cannot produce
    (an HRA/BOFT adapter of another base model) is left out, the import goes on."""
    from models.adapters.export import needs_base_weights, standard_exports, write_standard_exports

    wanted = any(
        needs_base_weights(adapter_file.family, s.to) for s in standard_exports(adapter_file.family).values()
    )
    written = write_standard_exports(
        adapter_file, folder, unet=unet() if wanted else None, on_error=lambda name, error: None
    )
    return [export.path for export in written.values()]


def download_stem(name: str) -> str:
    """A file-name-safe form of an adapter name: letters, digits, ``.``, ``_`` and ``-``; spaces become ``-``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip("-.")
    return stem[:80] or "adapter"


def _readable_safetensors(path: Path) -> bool:
    """Whether ``path`` has a well-formed safetensors header (tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception:  # safetensors raises several unrelated types for a bad header
        return False
    return True


def _read_atelier_file(path: Path) -> Any:
    from models.adapters.family import AdapterFileError
    from models.adapters.files import load_adapter_file

    try:
        return load_adapter_file(path)
    except AdapterFileError as exc:
        raise LibraryError(f"the trained adapter {path} cannot be read back: {exc}") from exc


def _describe(adapter_file: Any) -> dict[str, Any]:
    """Family, parameter count, base model and trigger of a loaded adapter file."""
    metadata = {k: v for k, v in adapter_file.metadata.items() if k not in ("layer_shapes", "targets")}
    metadata["target_layers"] = len(adapter_file.targets)
    return {
        "family": adapter_file.family,
        "parameters": int(sum(t.numel() for t in adapter_file.tensors.values())),
        "base_model": str(metadata.get("base_model_id") or metadata.get("base_model") or "unknown"),
        "trigger": str(metadata.get("trigger_phrase") or ""),
        "metadata": metadata,
    }
