"""Content fingerprints that tell the app when two requests or two files are the same thing.

A training job's fingerprint covers its configuration (without the paths that differ per job) and the bytes
of its subject images, so a second click on Start training can be recognised as the job already queued;
a file's SHA-256 tells an adapter that is already in the library from a new one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PER_JOB_KEYS = frozenset({"output_dir", "instance_data_dir", "resume_from_checkpoint"})
"""``TrainConfig`` keys that differ between two otherwise identical jobs (each job has its own folders)."""

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def job_fingerprint(config: Mapping[str, Any], images: Iterable[str | Path]) -> str:
    """Hash of a job's configuration (per-job paths left out) and of its images' contents, in any order."""
    settings = {k: v for k, v in config.items() if k not in PER_JOB_KEYS}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for image_hash in sorted(file_sha256(p) for p in images):
        digest.update(image_hash.encode())
    return digest.hexdigest()
