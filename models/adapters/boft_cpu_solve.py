"""A thread-safe Cayley transform for PEFT's BOFT layers on the CPU.

No paper: a workaround. BOFT (`models.adapters.boft`) turns each skew-symmetric block S into the rotation
R = (I - S)(I + S)^-1, which PEFT computes with one batched `torch.linalg.solve` over all blocks of a layer. On
the CPU with more than one torch thread, batched LU of blocks wider than about 14 runs LAPACK's `getrf`
concurrently on several threads, which this torch build's MKL does not survive: "Intel oneMKL ERROR:
Parameter 6 was incorrect on entry to SLASWP", wrong rotations, or a hang (pytorch/pytorch#142815, fix
proposed in #181570). SD's 1280-wide layers with 8 blocks give 160-wide blocks: measured on this project's
2-core machine with torch 2.14.1, 20 batched solves of 8 blocks of 128 took 4.8-6.7 s with 2 threads and
printed the MKL error; 8 blocks of 160 never returned; a full-size SD 1.5 BOFT run did not finish one step in
25 minutes. Here the blocks are solved one at a time (a single matrix takes LAPACK's unbatched path, which is
safe): the same rotations, on any thread count. GPUs and single-threaded runs keep PEFT's batched solve.
"""

from __future__ import annotations

import torch
from peft.tuners.boft.layer import BOFTLayer

_PEFT_CAYLEY_BATCH = BOFTLayer.cayley_batch


def cayley_one_block_at_a_time(data: torch.Tensor) -> torch.Tensor:
    """R = (I - S)(I + S)^-1 for each block S of the skew-symmetric part of `data` (b, r, r), solved per block."""
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(data.shape[1], device=data.device, dtype=skew.dtype)
    return torch.stack([torch.linalg.solve(eye + s, eye - s, left=False) for s in skew]).to(data.dtype)


def _cayley_batch(self: BOFTLayer, data: torch.Tensor) -> torch.Tensor:
    if data.device.type == "cpu" and torch.get_num_threads() > 1:
        return cayley_one_block_at_a_time(data)
    return _PEFT_CAYLEY_BATCH(self, data)


def install() -> None:
    """Route every PEFT BOFT layer's Cayley transform through `_cayley_batch` (idempotent)."""
    BOFTLayer.cayley_batch = _cayley_batch  # type: ignore[method-assign]
