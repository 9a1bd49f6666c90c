"""Composition benchmark: UNet evaluations, wall time and memory of every method, side by side, as ratios.

    python -m benchmarks.composition [--quick] [--steps S] [--size PX] [--device cpu|cuda] [--clora-preset P]

One process, one randomly initialised pipeline with the SD 1.5 architecture (UNet 860M, CLIP ViT-L text
encoder, SD VAE; built from configs, nothing downloaded) at a reduced image size on CPU (128 px: latent 16×16)
so every method runs in minutes; `--quick` swaps in a narrow SD-shaped UNet with a 2-layer text encoder and a
small VAE, so that, as in real SD, the UNet still dominates the cost. Adapters are random LoRA-style
weight changes on the default `vo` targets (composition cost does not depend on the family: the bank swaps
tensors). Printed, for N = 2, 3, 4 adapters:
- full UNet rows, shallow (cached) rows and wall time per image of merge, switch, composite, cmlora, clora; ratios
  against the single-adapter run (targets: switch, merge ~1.0×) and of every method against composite in full rows,
  shallow rows per composite row and CPU seconds (cmlora target <= 0.6× in CPU seconds);
- clora's working-memory peak (process RSS above the level before the call, sampled every 2 ms; CUDA: peak
  allocated) at N = 4 over N = 2 (target <= 1.5×), and the peak of one latent update done Atelier's way
  (one branch's graph at a time) against a joint graph of every branch (as the reference code builds; here over
  the conditional forwards of Atelier's loop) at N = 2 and 4,
  both as process memory and as the bytes autograd graphs hold (saved-tensor hooks: exact on any device);
- bank activation time against one UNet forward (target <= 1%), and merged-adapter generation against the
  base path and diffusers' own `StableDiffusionPipeline.__call__` (target: within ±3%).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import torch

from benchmarks._sd15 import build_sd15_pipeline
from composition import AdapterBank, ConceptPrompt, generate
from composition.methods.clora import PRESETS as CLORA_PRESETS
from composition.report import method_cost, versus_composite
from models.adapters import resolve_targets

CONCEPTS = ("zq star", "vx heart", "kp circle", "wm square")
PARTS = ("methods", "memory", "activation", "speed")
TIMED_METHODS = ("merge", "switch", "composite", "cmlora", "clora")


class RandomAdapter:
    """An adapter source: W + σ·B·A (rank 4) on the `vo` targets, seeded."""

    family = "lora"

    def __init__(self, seed: int) -> None:
        self.seed, self.metadata, self.trigger_phrase = seed, {"name": f"random{seed}"}, CONCEPTS[seed % 4]

    def check_compatible(self, unet: torch.nn.Module) -> None:
        """Always compatible: built for this UNet."""

    def layer_weights(self, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        weights = {}
        for name in resolve_targets(unet, "vo"):
            weight = unet.get_submodule(name).weight.detach()
            up = torch.randn(weight.shape[0], 4, generator=generator) * 0.02
            down = torch.randn(4, weight.shape[1], generator=generator) * 0.02
            weights[name] = weight + (up @ down).to(weight)
        return weights


class PeakMemory:
    """Peak memory above the level at entry: CUDA peak allocated, else sampled process RSS."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        process = psutil.Process()
        self._base = process.memory_info().rss

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss - self._base)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._stop.set()
            self._thread.join()


def timed(function: Callable[[], Any], device: str) -> tuple[Any, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run_methods(
    pipe: Any,
    n: int,
    steps: int,
    device: str,
    clora_options: dict[str, Any],
    repeats: int,
    methods: Sequence[str] = TIMED_METHODS,
) -> dict[str, dict]:
    """UNet evals, best-of-`repeats` wall seconds and memory peak per image for a single-adapter run and every
    method with N adapters; runs are interleaved round-robin so machine-load drift hits all methods alike."""
    bank = AdapterBank(pipe, [RandomAdapter(i) for i in range(n)])
    single_bank = AdapterBank(pipe, [RandomAdapter(0)])
    text = " and ".join(f"a {c}" for c in CONCEPTS[:n])
    prompt = ConceptPrompt.build(text, list(CONCEPTS[:n]), plains=[c.split()[1] for c in CONCEPTS[:n]])
    single_prompt = ConceptPrompt.build(text, [CONCEPTS[0]])
    generate("cmlora", pipe, bank, prompt, steps, 7.5, 0)  # measures and caches the frequency profile
    runs = {
        "single": lambda: generate("merge", pipe, single_bank, single_prompt, steps, 7.5, 1),
        **{
            m: (
                lambda m=m: generate(
                    m, pipe, bank, prompt, steps, 7.5, 1, **(clora_options if m == "clora" else {})
                )
            )
            for m in methods
        },
    }
    rows: dict[str, dict] = {m: {"walls": [], "peak": 0} for m in runs}
    for _ in range(repeats):
        for method, run in runs.items():
            with PeakMemory(device) as memory:
                result, wall = timed(run, device)
            row = rows[method]
            row["walls"].append(wall)
            row.update(
                evals=result.unet_evals, shallow=result.extras.get("shallow_evals", 0), extras=result.extras,
                peak=max(row["peak"], memory.peak),
            )  # fmt: skip
    for row in rows.values():
        row["wall"] = min(row["walls"])
    bank.close()
    single_bank.close()
    return rows


class _Saved:
    """A tensor autograd saved for backward; releases its storage's count when the graph lets go of it."""

    def __init__(self, tensor: torch.Tensor, ledger: GraphBytes) -> None:
        self.tensor, self.ledger = tensor, ledger
        self.key = (tensor.untyped_storage().data_ptr(), tensor.device)
        ledger.hold(self.key, tensor.untyped_storage().nbytes())

    def __del__(self) -> None:
        self.ledger.release(self.key)


class GraphBytes:
    """Peak bytes of distinct storages held by autograd graphs (saved-tensor hooks; device-independent)."""

    def __init__(self) -> None:
        self.refs: dict[tuple, list[int]] = {}
        self.live = self.peak = 0

    def hold(self, key: tuple, nbytes: int) -> None:
        entry = self.refs.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[0] += 1

    def release(self, key: tuple) -> None:
        entry = self.refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]

    def hooks(self) -> Any:
        return torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(t, self), lambda saved: saved.tensor)


def clora_update_memory(pipe: Any, n: int, device: str, joint: bool) -> tuple[int, int]:
    """Peak memory of one CLoRA latent update with N adapters: Atelier's one-branch-at-a-time backprop, or
    (`joint`) every branch's graph alive for one backward over the joint loss, as the reference code does.
    Returns (process peak above the start level, peak bytes held by autograd graphs)."""
    from composition.attention_store import AttentionStore, capture_cross_attention
    from composition.contrastive import contrastive_loss
    from composition.methods.clora import CloraOptions, _branches, _cond_maps, _update_latents
    from composition.sampling import Sampler

    bank = AdapterBank(pipe, [RandomAdapter(i) for i in range(n)])
    text = " and ".join(f"a {c}" for c in CONCEPTS[:n])
    prompt = ConceptPrompt.build(text, list(CONCEPTS[:n]), plains=[c.split()[1] for c in CONCEPTS[:n]])
    sampler, store, opts = Sampler(pipe, 10, 7.5, 0), AttentionStore(), CloraOptions()
    with capture_cross_attention(pipe.unet, store), torch.no_grad():
        branches = _branches(pipe, bank, prompt, sampler)
        t = sampler.timesteps[0]
        _update_latents(sampler, bank, store, branches, t, opts)  # warm-up: one-time allocations stay out
        graph = GraphBytes()
        with PeakMemory(device) as memory, graph.hooks():
            if joint:
                with torch.enable_grad():
                    z = sampler.latents.clone().requires_grad_(True)
                    maps = []
                    for branch in branches:
                        bank.activate(branch.selection)
                        maps.append(_cond_maps(sampler, store, z, t, branch))
                    loss = contrastive_loss(maps, [b.indices for b in branches], opts.temperature)
                    torch.autograd.grad(loss, z)
            else:
                _update_latents(sampler, bank, store, branches, t, opts)
    bank.close()
    return memory.peak, graph.peak


def activation_cost(pipe: Any, device: str, repeats: int = 50) -> dict[str, float]:
    """Seconds per bank activation (one adapter, a weighted sum) and per UNet forward (CFG batch of 2)."""
    bank = AdapterBank(pipe, [RandomAdapter(0), RandomAdapter(1)])
    unet = pipe.unet
    side = unet.config.sample_size
    x = torch.randn(2, 4, side, side, device=device, dtype=unet.dtype)
    context = torch.randn(2, 77, 768, device=device, dtype=unet.dtype)
    with torch.no_grad():
        unet(x, torch.tensor(500, device=device), encoder_hidden_states=context)
        forward = statistics.median(
            timed(lambda: unet(x, torch.tensor(500, device=device), encoder_hidden_states=context), device)[1]
            for _ in range(5)
        )
    swap = statistics.median(timed(lambda k=k: bank.activate(k % 2), device)[1] for k in range(repeats))
    mix = statistics.median(
        timed(lambda k=k: bank.activate([1.0, 0.5 + 0.01 * k]), device)[1] for k in range(repeats // 5)
    )
    bank.close()
    return {"forward": forward, "swap": swap, "mix": mix}


def merged_vs_base(pipe: Any, steps: int, device: str, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` wall time: merged 2-adapter generation, the same loop with no adapter, and diffusers' __call__."""
    bank = AdapterBank(pipe, [RandomAdapter(0), RandomAdapter(1)])
    text = f"a {CONCEPTS[0]} and a {CONCEPTS[1]}"
    merged = ConceptPrompt.build(text, list(CONCEPTS[:2]))
    base = ConceptPrompt.build(text, list(CONCEPTS[:2]), weights=[0.0, 0.0])
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    runs: dict[str, list[float]] = {"merged": [], "base": [], "diffusers": []}
    for _ in range(repeats):  # interleaved, so drifting machine load hits all three alike
        runs["merged"].append(timed(lambda: generate("merge", pipe, bank, merged, steps, 7.5, 1), device)[1])
        runs["base"].append(timed(lambda: generate("merge", pipe, bank, base, steps, 7.5, 1), device)[1])
        generator = torch.Generator("cpu").manual_seed(1)

        def call(g: torch.Generator = generator) -> Any:
            return pipe(
                text, num_inference_steps=steps, guidance_scale=7.5, generator=g, height=side, width=side
            )

        runs["diffusers"].append(timed(call, device)[1])
    bank.close()
    return {k: min(v) for k, v in runs.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.composition")
    parser.add_argument("--quick", action="store_true", help="narrow UNet, small text encoder and VAE")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the best run counts)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by load)"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=list(PARTS),
        choices=PARTS,
        help="which measurements to run (default: all)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(TIMED_METHODS),
        choices=TIMED_METHODS,
        help="methods timed by the `methods` part beside the single-adapter run (default: all)",
    )
    parser.add_argument(
        "--clora-preset",
        default="light",
        choices=sorted(CLORA_PRESETS),
        help="clora preset timed (default light, with 2 refinement rounds; partition makes no latent updates)",
    )
    args = parser.parse_args(None if argv is None else list(argv))
    steps = args.steps or 10
    torch.set_num_threads(args.threads)
    pipe = build_sd15_pipeline(args.quick, args.size, args.device)
    clora_options: dict[str, Any] = {"preset": args.clora_preset}
    # presets with latent updates get fewer refinement rounds: the full ones take minutes on CPU
    if CLORA_PRESETS[args.clora_preset].iterations:
        clora_options["refine_rounds"] = 2
    print(f"device={args.device} unet={'narrow' if args.quick else 'SD1.5'} size={args.size}px steps={steps} "
          f"threads={torch.get_num_threads()} clora options={clora_options}")  # fmt: skip
    if "methods" in args.parts:
        report_methods(pipe, steps, args.device, clora_options, args.repeats, args.methods)
    if "memory" in args.parts:
        report_update_memory(pipe, args.device)
    if "activation" in args.parts:
        cost = activation_cost(pipe, args.device)
        print(f"bank activation: swap {cost['swap'] * 1e6:.0f} us = {100 * cost['swap'] / cost['forward']:.3f}% of "
              f"one UNet forward ({cost['forward'] * 1e3:.0f} ms); weighted-sum {cost['mix'] * 1e3:.1f} ms = "
              f"{100 * cost['mix'] / cost['forward']:.2f}% (target <= 1%)")  # fmt: skip
    if "speed" in args.parts:
        speed = merged_vs_base(pipe, steps, args.device, args.repeats)
        print(f"merged generation {speed['merged']:.2f} s vs base {speed['base']:.2f} s: "
              f"{100 * (speed['merged'] / speed['base'] - 1):+.1f}%; vs diffusers __call__ {speed['diffusers']:.2f} s: "
              f"{100 * (speed['merged'] / speed['diffusers'] - 1):+.1f}% (target within ±3%)")  # fmt: skip
    return 0


def report_methods(
    pipe: Any,
    steps: int,
    device: str,
    clora_options: dict[str, Any],
    repeats: int,
    methods: Sequence[str] = TIMED_METHODS,
) -> None:
    """Print the per-method table for N = 2, 3, 4 (the single-adapter run and `methods`) and clora's
    peak-memory ratio."""
    print(f"{'N':>2} {'method':10s} {'full':>5} {'shallow':>7} {'wall s':>8} {'full/1':>7} {'wall/1':>7} "
          f"{'vs composite (full rows / shallow rows / CPU s)':>48}")  # fmt: skip
    clora_peak: dict[int, int] = {}
    for n in (2, 3, 4):
        rows = run_methods(pipe, n, steps, device, clora_options, repeats, methods)
        single = rows["single"]
        costs = {m: method_cost([r["evals"]], [r["shallow"]], [r["wall"]]) for m, r in rows.items()}
        ratios = versus_composite(costs)
        for method, row in rows.items():
            vs = ""
            if method in ratios:
                ratio = ratios[method]
                vs = f"{ratio['full_rows']:.2f}x / {ratio['shallow_rows_per_composite_row']:.2f}x / {ratio['wall_s']:.2f}x"
            print(f"{n:>2} {method:10s} {row['evals']:>5} {row['shallow']:>7} {row['wall']:>8.2f} "
                  f"{row['evals'] / single['evals']:>6.2f}x {row['wall'] / single['wall']:>6.2f}x {vs:>48}",
                  flush=True)  # fmt: skip
        if "cmlora" in rows:
            extras = rows["cmlora"]["extras"]
            print(f"   cmlora: shallow evals {extras['shallow_evals']}, refresh steps {extras['refresh_steps']}, "
                  f"order {extras['order']}")  # fmt: skip
        if "clora" in rows:
            clora_peak[n] = rows["clora"]["peak"]
            print(f"   clora working-memory peak: {clora_peak[n] / 2**20:.0f} MiB", flush=True)
    if clora_peak:
        print(f"clora peak memory N=4 / N=2: {clora_peak[4] / max(clora_peak[2], 1):.2f}x (target <= 1.5x)")


def report_update_memory(pipe: Any, device: str) -> None:
    """Print one latent update's peak memory, branch-at-a-time vs one joint graph, N = 2 and 4."""
    for label, which in (("process peak", 0), ("autograd-graph peak", 1)):
        peak = {(n, j): clora_update_memory(pipe, n, device, j)[which] for n in (2, 4) for j in (False, True)}
        mib = {k: v / 2**20 for k, v in peak.items()}
        print(f"one clora latent update, {label} MiB: branch-at-a-time N=2 {mib[2, False]:.1f}, N=4 "
              f"{mib[4, False]:.1f} ({peak[4, False] / max(peak[2, False], 1):.2f}x); joint graph "
              f"N=2 {mib[2, True]:.1f}, N=4 {mib[4, True]:.1f} ({peak[4, True] / max(peak[2, True], 1):.2f}x)",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
