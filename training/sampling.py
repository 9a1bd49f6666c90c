"""Stateless randomness for the training loop: which images a micro-batch uses, and its generator.

Every micro-batch's randomness (image choice, flips, the latent sample, noise, timesteps) is a pure
function of ``(seed, micro-batch number, process rank)``. Consequences:

* resuming from ``checkpoint-N`` replays exactly the micro-batches an uninterrupted run would have
  seen — no data-loader state to save;
* under ``accelerate launch`` each process draws its own disjoint slice of the same epoch order, which
  is ordinary data parallelism;
* a run is reproducible on any device because generators live on the CPU.

Image order: epoch ``e`` visits the images in a permutation seeded by ``(seed, stream, e)``; the
global sequence of all epochs is dealt out ``batch_size`` at a time to the processes in turn.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

INSTANCE_STREAM = 0
CLASS_STREAM = 1


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (NumPy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts] + [len(parts)]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1]))


def micro_batch_generator(seed: int, micro_batch: int, rank: int) -> torch.Generator:
    """The CPU generator that drives all randomness of one micro-batch on one process."""
    return torch.Generator("cpu").manual_seed(mixed_seed(seed, micro_batch, rank, 7))


@lru_cache(maxsize=64)
def _epoch_order(count: int, seed: int, stream: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator("cpu").manual_seed(mixed_seed(seed, stream, epoch))
    return tuple(torch.randperm(count, generator=generator).tolist())


def sample_indices(
    count: int, *, micro_batch: int, rank: int, world_size: int, batch_size: int, seed: int, stream: int
) -> list[int]:
    """Indices (into ``count`` images) for one process's share of global micro-batch ``micro_batch``."""
    if count < 1:
        raise ValueError("cannot sample from an empty image set")
    start = (micro_batch * world_size + rank) * batch_size
    picks = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, count)
        picks.append(_epoch_order(count, seed, stream, epoch)[offset])
    return picks
