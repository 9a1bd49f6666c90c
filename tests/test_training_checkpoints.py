"""Checkpoint files (safetensors + JSON round trips, pruning, errors) and the stateless batch sampler."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

from training.checkpoints import (
    CheckpointError,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    restore_rng,
    save_checkpoint,
)
from training.sampling import INSTANCE_STREAM, micro_batch_generator, sample_indices


def _model_and_optimizer() -> tuple[
    torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler
]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    return model, optimizer, scheduler


def _train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, seed: int
) -> None:
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    model(x).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _save(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object,
          **kwargs: object) -> Path:  # fmt: skip
    rng_tensors, rng_values = capture_rng()
    return save_checkpoint(
        folder,
        step,
        adapter={k: v for k, v in model.state_dict().items()},
        optimizer=optimizer.state_dict(),
        lr_scheduler=scheduler.state_dict(),
        rng_tensors=[rng_tensors],
        rng_values=rng_values,
        run={"family": "lora"},
        **kwargs,
    )


def test_round_trip_continues_exactly(tmp_path: Path) -> None:
    model, optimizer, scheduler = _model_and_optimizer()
    for seed in range(2):
        _train_step(model, optimizer, scheduler, seed)
    path = _save(tmp_path, 2, model, optimizer, scheduler)
    for seed in range(2, 4):
        _train_step(model, optimizer, scheduler, seed)

    checkpoint = load_checkpoint(path)
    assert checkpoint.step == 2 and checkpoint.run == {"family": "lora"}
    fresh, fresh_optimizer, fresh_scheduler = _model_and_optimizer()
    fresh.load_state_dict(checkpoint.adapter)
    fresh_optimizer.load_state_dict(checkpoint.optimizer)
    fresh_scheduler.load_state_dict(checkpoint.lr_scheduler)
    assert fresh_optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    for seed in range(2, 4):
        _train_step(fresh, fresh_optimizer, fresh_scheduler, seed)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]


def test_rng_states_round_trip() -> None:
    tensors, values = capture_rng()
    expected = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(tensors, values)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


def test_pruning_latest_and_overwrite(tmp_path: Path) -> None:
    model, optimizer, scheduler = _model_and_optimizer()
    assert resolve_resume("latest", tmp_path) is None and resolve_resume(None, tmp_path) is None
    for step in (1, 2, 10, 3):
        _save(tmp_path, step, model, optimizer, scheduler, total_limit=3)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3, 10]  # numeric order, oldest pruned
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-10"
    assert resolve_resume("checkpoint-3", tmp_path) == tmp_path / "checkpoint-3"
    _save(tmp_path, 10, model, optimizer, scheduler)  # same step again: replaced in place
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3, 10]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a training checkpoint"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)
    model, optimizer, scheduler = _model_and_optimizer()
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    (path / "optimizer.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="incomplete or corrupt"):
        load_checkpoint(path)
    (path / "state.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not an Atelier training checkpoint"):
        load_checkpoint(path)


def test_sampling_splits_each_epoch_across_processes() -> None:
    count, batch, world = 7, 2, 2
    seen = []
    for micro_batch in range(7):  # 7 global micro-batches x 4 images = 4 epochs of 7
        for rank in range(world):
            seen += sample_indices(
                count,
                micro_batch=micro_batch,
                rank=rank,
                world_size=world,
                batch_size=batch,
                seed=3,
                stream=INSTANCE_STREAM,
            )
    epochs = [seen[i : i + count] for i in range(0, len(seen), count)]
    assert all(sorted(epoch) == list(range(count)) for epoch in epochs)  # every image once per epoch
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled between epochs
    again = sample_indices(
        count, micro_batch=5, rank=1, world_size=world, batch_size=batch, seed=3, stream=INSTANCE_STREAM
    )
    assert again == seen[(5 * world + 1) * batch : (5 * world + 2) * batch]
    other_seed = [
        i
        for k in range(7)
        for r in range(world)
        for i in sample_indices(
            count, micro_batch=k, rank=r, world_size=world, batch_size=batch, seed=4, stream=INSTANCE_STREAM
        )
    ]
    assert other_seed != seen
    a = torch.rand(4, generator=micro_batch_generator(1, 5, 0))
    assert torch.equal(a, torch.rand(4, generator=micro_batch_generator(1, 5, 0)))
    assert not torch.equal(a, torch.rand(4, generator=micro_batch_generator(1, 5, 1)))
