"""Adapter inspector: what an adapter file changed, layer by layer, as a JSON report and PNG plots.

    python -m models.adapters.inspect adapter.safetensors [--compare other.safetensors] [--base-model SPEC]
        [--out DIR] [--images 2] [--prompt TEXT] [--steps 20]

Per layer: adapter parameters and bytes; ‖ΔW‖_F (and relative to ‖W‖_F), effective rank and numerical rank of
ΔW, its largest singular values, and intruder dimensions of W + ΔW (`models.adapters.spectra`: Roy & Vetterli
2007; Shuttleworth et al. 2024). Then the high-frequency energy of a few generations with and without the
adapter (`composition.frequency.high_frequency_energy`, the score CMLoRA orders adapters by, Zou et al. 2025),
at fixed seeds. `--compare` puts a second adapter beside the first in every plot. Files in `--out` (default
`<stem>-inspect/` beside FILE): `report.json`, `layers.png`, `delta.png`, `spectrum.png`, `rank.png`,
`intruders.png`, `frequency.png` and `samples.png` (base model's row first, then each adapter's). Exit 0, or 2 with one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from models.adapters import plots
from models.adapters.family import AdapterError
from models.adapters.files import AdapterFile, load_adapter_file
from models.adapters.low_rank import base_weights, delta_weights
from models.adapters.registry import FAMILIES
from models.adapters.spectra import INTRUDER_THRESHOLD, INTRUDER_TOP_K, layer_spectrum
from models.atomic_write import atomic_write, atomic_write_text

PLOTS = ("layers.png", "delta.png", "spectrum.png", "rank.png", "intruders.png")
"""The plots every report gets (`frequency.png` and `samples.png` too when generations were made)."""


def short_name(module: str) -> str:
    """A compact label for a UNet module: `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v` ->
    `d1.a0.t0.attn2.to_v`."""
    text = re.sub(r"(down|up)_blocks\.(\d+)", lambda m: f"{m[1][0]}{m[2]}", module)
    text = text.replace("mid_block", "m").replace("transformer_blocks.", "t").replace("attentions.", "a")
    return text


def _prompt(adapter: AdapterFile, prompt: str | None) -> str:
    if prompt:
        return prompt
    try:
        extra = json.loads(adapter.metadata.get("extra", "{}"))
    except ValueError:
        extra = {}
    return str(extra.get("instance_prompt") or adapter.trigger_phrase or "a photo")


@torch.no_grad()
def frequency_profile(
    pipe: Any, adapter: AdapterFile, prompt: str, images: int, steps: int
) -> tuple[dict[str, Any], list[Image.Image], list[Image.Image]]:
    """High-frequency energy of `images` generations (seeds 0..images-1) with and without the adapter."""
    from composition.frequency import high_frequency_energy

    def draw(count: int) -> list[Image.Image]:
        return [
            pipe(
                prompt,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(seed),
                output_type="pil",
            ).images[0]
            for seed in range(count)
        ]

    pipe.set_progress_bar_config(disable=True)
    base = draw(images)
    handle = adapter.attach(pipe.unet)
    try:
        adapted = draw(images)
    finally:
        handle.detach()
    scores = {
        "prompt": prompt,
        "seeds": list(range(images)),
        "steps": steps,
        "adapter": [high_frequency_energy(image) for image in adapted],
        "base": [high_frequency_energy(image) for image in base],
    }
    scores["adapter_mean"] = sum(scores["adapter"]) / images
    scores["base_mean"] = sum(scores["base"]) / images
    return scores, base, adapted


def inspect_adapter(
    adapter: AdapterFile,
    *,
    pipe: Any = None,
    images: int = 2,
    prompt: str | None = None,
    steps: int = 20,
    top_k: int = INTRUDER_TOP_K,
    threshold: float = INTRUDER_THRESHOLD,
) -> dict[str, Any]:
    """The inspector's report of one adapter; `pipe` = its base pipeline (intruders, HRA/BOFT ΔW, frequency)."""
    unet = pipe.unet if pipe is not None else None
    deltas = delta_weights(adapter, unet)
    bases = base_weights(adapter, unet) if unet is not None else {}
    layers = []
    for name in adapter.targets:
        own = [t for key, t in adapter.tensors.items() if key.startswith(f"{name}.")]
        spectrum = layer_spectrum(deltas[name], bases.get(name), top_k, threshold)
        layers.append(
            {
                "name": name,
                "shape": list(adapter.layer_shapes[name]),
                "parameters": sum(t.numel() for t in own),
                "bytes": sum(t.numel() * t.element_size() for t in own),
                **asdict(spectrum),
            }
        )
    report: dict[str, Any] = {
        "file": str(adapter.path) if adapter.path else None,
        "name": adapter.name,
        "family": adapter.family,
        "title": FAMILIES[adapter.family].title,
        "config": adapter.config.to_dict(),
        "base_model_id": adapter.base_model_id,
        "trigger_phrase": adapter.trigger_phrase,
        "trainable_parameters": sum(layer["parameters"] for layer in layers),
        "file_bytes": adapter.path.stat().st_size if adapter.path else None,
        "delta_norm": sum(layer["delta_norm"] ** 2 for layer in layers) ** 0.5,
        "intruders": sum(layer["intruders"] for layer in layers) if unet is not None else None,
        "intruders_right": sum(layer["intruders_right"] for layer in layers) if unet is not None else None,
        "intruder_settings": {"top_k": top_k, "threshold": threshold},
        "layers": layers,
        "frequency": None,
    }
    if pipe is not None and images > 0:
        report["frequency"], base, adapted = frequency_profile(
            pipe, adapter, _prompt(adapter, prompt), images, steps
        )
        report["_samples"] = (base, adapted)
    return report


def summary(report: dict[str, Any]) -> str:
    """One line: parameters, ‖ΔW‖, intruder dimensions and high-frequency energy of one adapter's report."""
    frequency = report["frequency"]
    hf = (
        f", high-frequency energy {frequency['adapter_mean']:.3f} (base {frequency['base_mean']:.3f})"
        if frequency
        else ""
    )
    intruders = (
        f", {report['intruders']}/{report['intruders_right']} intruder dimensions (left/right)"
        if report["intruders"] is not None
        else ""
    )
    return (
        f"{report['name']} ({report['title']}): {report['trainable_parameters']:,} parameters in "
        f"{len(report['layers'])} layers, ‖ΔW‖ {report['delta_norm']:.4g}{intruders}{hf}"
    )


def _grid(rows: Sequence[Sequence[Image.Image]], scale: int = 4) -> Image.Image:
    """Rows of images (base, then each adapter), enlarged `scale`x without smoothing so small ones stay legible."""
    rows = [
        [image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in row]
        for row in rows
    ]
    size = rows[0][0].size
    grid = Image.new("RGB", (size[0] * max(len(r) for r in rows), size[1] * len(rows)), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.convert("RGB"), (x * size[0], y * size[1]))
    return grid


def write_outputs(reports: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """`report.json` and the PNG plots of one adapter or several side by side."""
    out = Path(out)
    names = [f"{r['name']} ({r['family']})" for r in reports]
    order = list(dict.fromkeys(layer["name"] for r in reports for layer in r["layers"]))
    labels = [short_name(name) for name in order]

    def per_layer(report: dict[str, Any], key: str) -> list[float]:
        values = {layer["name"]: layer[key] for layer in report["layers"]}
        return [float(values[n]) if values.get(n) is not None else float("nan") for n in order]

    written = [
        plots.bar_chart(
            out / "layers.png",
            "Adapter parameters per layer - file bytes: "
            + ", ".join(f"{r['name']} {r['file_bytes'] or 0:,}" for r in reports),
            labels,
            {n: per_layer(r, "parameters") for n, r in zip(names, reports, strict=True)},
            unit="parameters",
        ),
        plots.bar_chart(
            out / "delta.png",
            "||dW||_F per layer (which blocks the adapter changed)",
            labels,
            {n: per_layer(r, "delta_norm") for n, r in zip(names, reports, strict=True)},
            unit="||dW||_F",
        ),
        plots.line_chart(
            out / "spectrum.png",
            "Singular values of dW, one line per layer (normalised by the largest)",
            {
                n: [
                    [v / layer["singular_values"][0] for v in layer["singular_values"]]
                    for layer in r["layers"]
                    if layer["singular_values"] and layer["singular_values"][0] > 0
                ]
                for n, r in zip(names, reports, strict=True)
            },
            x_label="index i",
            y_label="s_i / s_1",
            log_y=True,
        ),
        plots.line_chart(
            out / "rank.png",
            "Effective rank of dW per layer (Roy & Vetterli 2007), layers in UNet order",
            {n: [per_layer(r, "effective_rank")] for n, r in zip(names, reports, strict=True)},
            x_label="layer (report.json lists them in this order)",
            y_label="effective rank",
        ),
        plots.line_chart(
            out / "intruders.png",
            f"Intruder dimensions of W + dW per layer (top-{reports[0]['intruder_settings']['top_k']}, "
            f"max |cos| < {reports[0]['intruder_settings']['threshold']})",
            {
                f"{n} {side}": [per_layer(r, key)]
                for n, r in zip(names, reports, strict=True)
                for side, key in (("left", "intruders"), ("right", "intruders_right"))
            },
            x_label="layer (report.json lists them in this order)",
            y_label="intruder dimensions",
        ),
    ]
    frequencies = [r["frequency"] for r in reports]
    if all(frequencies):
        series = {"base model": [frequencies[0]["base"]]}
        series |= {n: [f["adapter"]] for n, f in zip(names, frequencies, strict=True)}
        written.append(
            plots.line_chart(
                out / "frequency.png",
                f"High-frequency energy of generations (CMLoRA's score) - '{frequencies[0]['prompt']}'",
                series,
                x_label="seed index",
                y_label="energy share beyond radius 0.25",
            )
        )
        samples = [reports[0]["_samples"][0], *(r["_samples"][1] for r in reports)]
        written.append(atomic_write(out / "samples.png", lambda tmp: _grid(samples).save(tmp, format="PNG")))
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in reports]
    document = clean[0] if len(clean) == 1 else {"adapters": clean}
    written.insert(0, atomic_write_text(out / "report.json", json.dumps(document, indent=2) + "\n"))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m models.adapters.inspect",
        description="Inspect what an Atelier adapter file changed, layer by layer (JSON report + PNG plots).",
    )
    parser.add_argument("file", type=Path, help="an Atelier adapter .safetensors file")
    parser.add_argument("--compare", type=Path, help="a second adapter file to show beside the first")
    parser.add_argument(
        "--base-model", help="its base model (default: the folder recorded in the file, else the toy world)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: <stem>-inspect beside FILE)")
    parser.add_argument(
        "--images", type=int, default=2, help="generations per adapter for the frequency profile (0 = none)"
    )
    parser.add_argument(
        "--prompt", help="prompt of those generations (default: the adapter's instance prompt)"
    )
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of those generations")
    parser.add_argument(
        "--top-k", type=int, default=INTRUDER_TOP_K, help="singular vectors checked for intruders"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=INTRUDER_THRESHOLD,
        help="an intruder's max |cos| with the base singular vectors stays below this",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffusers.utils.logging import disable_progress_bar
    from transformers.utils.logging import disable_progress_bar as disable_transformers_progress_bar

    from models.pipelines import ModelLoadError, load_pipeline

    try:
        if args.images < 0 or args.steps < 1 or args.top_k < 1 or not 0 < args.threshold < 1:
            raise AdapterError("--images must be >= 0, --steps and --top-k >= 1, --threshold in (0, 1).")
        adapters = [load_adapter_file(args.file)]
        if args.compare is not None:
            adapters.append(load_adapter_file(args.compare))
        spec = args.base_model
        if spec is None and adapters[0].base_model_id and Path(adapters[0].base_model_id).exists():
            spec = adapters[0].base_model_id
        disable_progress_bar()
        disable_transformers_progress_bar()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = load_pipeline(spec, device="cpu", dtype="fp32")
            reports = [
                inspect_adapter(
                    a, pipe=pipe, images=args.images, prompt=args.prompt, steps=args.steps,
                    top_k=args.top_k, threshold=args.threshold,
                )
                for a in adapters
            ]  # fmt: skip
        out = args.out or args.file.with_name(f"{args.file.stem}-inspect")
        written = write_outputs(reports, out)
    except (AdapterError, ModelLoadError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for report in reports:
        print(summary(report))
    print(f"wrote {', '.join(p.name for p in written)} to {Path(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
