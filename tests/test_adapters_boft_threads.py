"""BOFT on a multi-threaded CPU: PEFT's batched Cayley solve hits an MKL bug there (pytorch/pytorch#142815);
`models.adapters.boft_cpu_solve` solves block by block. Checked against PEFT's own batched solve run on one
thread, and as a 2-thread process that must finish (before the fix it printed MKL errors and never returned on
SD-sized 160-wide blocks)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from peft.tuners.boft.layer import BOFTLayer

import models.adapters.boft  # noqa: F401  (installs the CPU solve)
from models.adapters.boft_cpu_solve import _PEFT_CAYLEY_BATCH, cayley_one_block_at_a_time

ROOT = Path(__file__).resolve().parents[1]


def test_block_by_block_equals_peft_batched_solve_and_is_orthogonal() -> None:
    data = torch.randn(8, 160, 160, generator=torch.Generator().manual_seed(0)) * 0.05
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # PEFT's batched path is safe on one thread
    try:
        reference = _PEFT_CAYLEY_BATCH(None, data)  # type: ignore[arg-type]
    finally:
        torch.set_num_threads(threads)
    ours = cayley_one_block_at_a_time(data)
    torch.testing.assert_close(ours, reference, rtol=0, atol=2e-6)
    eye = torch.eye(160).expand(8, 160, 160)
    torch.testing.assert_close(ours @ ours.transpose(1, 2), eye, rtol=0, atol=1e-5)
    assert BOFTLayer.cayley_batch.__module__ == "models.adapters.boft_cpu_solve"


def test_a_two_thread_boft_layer_on_sd_width_trains_and_matches_one_thread() -> None:
    script = textwrap.dedent(
        """
        import torch
        import models.adapters.boft  # installs the CPU solve
        from peft import BOFTConfig, get_peft_model

        def run(threads):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(1280, 1280)), BOFTConfig(
                boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=1, target_modules=["0"]))
            for name, p in model.named_parameters():
                if "boft_R" in name:
                    p.data.normal_(0, 0.05)
            x = torch.randn(4, 16, 1280, generator=torch.Generator().manual_seed(1))
            out = model(x)
            out.square().mean().backward()
            grad = next(p.grad for n, p in model.named_parameters() if "boft_R" in n)
            return out.detach(), grad

        out2, grad2 = run(2)
        out1, grad1 = run(1)
        assert (out2 - out1).abs().max() < 1e-4, (out2 - out1).abs().max()
        assert (grad2 - grad1).abs().max() < 1e-5, (grad2 - grad1).abs().max()
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
    assert "MKL ERROR" not in result.stderr.upper()
