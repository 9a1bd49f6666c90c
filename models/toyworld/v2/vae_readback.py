"""How much of a scene survives toy world v2's VAE: the checks read its reconstructions.

No paper: the acceptance test for the autoencoder, run before any UNet is trained on its latents (a UNet cannot
draw what the decoder cannot). Seeded scenes with every concept are encoded (posterior mean) and decoded, and
`models.toyworld.v2.checks` reads each reconstruction; reported per object count: count, colour, shape,
texture and everything right (docs/toyworld_v2.md keeps the record).

    python -m models.toyworld.v2.vae_readback WORK_DIR/vae_final.safetensors   # or a vae_state checkpoint
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.toyworld.checkpoint import read_module_weights
from models.toyworld.v2.checks import check_scene
from models.toyworld.v2.world import images_to_array, render_scene, sample_batch

FIELDS = ("count", "colour", "shape", "texture", "all")


@torch.no_grad()
def readback(vae: Any, count: int = 240, seed: int = 78, batch: int = 32) -> dict[int, dict[str, float]]:
    """{objects: {field: share right}} over `count` seeded scenes (1-3 objects, held-out concepts included)."""
    scenes = sample_batch(seed, count, held_out=True)
    images = torch.from_numpy(images_to_array([render_scene(scene) for scene in scenes]))
    decoded = torch.cat(
        [
            vae.decode(vae.encode(images[i : i + batch]).latent_dist.mean).sample
            for i in range(0, count, batch)
        ]
    )
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    tally: collections.Counter[tuple[int, str, bool]] = collections.Counter()
    for image, scene in zip(pixels, scenes, strict=True):
        for key, right in check_scene(image, scene).items():
            tally[(len(scene.objects), key.split(".")[-1], right)] += 1
    return {
        n: {f: tally[(n, f, True)] / max(1, tally[(n, f, True)] + tally[(n, f, False)]) for f in FIELDS}
        for n in sorted({n for n, _, _ in tally})
    }


def load_vae(path: Path) -> torch.nn.Module:
    """`build_vae()` with the weights of a `vae_final` file or of a `vae_state` training checkpoint."""
    from models.toyworld.v2.train import build_vae

    weights = read_module_weights(path, "vae") or load_file(str(path))
    vae = build_vae()
    vae.load_state_dict(weights)
    return vae.eval()


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, help="vae_final.safetensors or vae_state.safetensors")
    parser.add_argument("--scenes", type=int, default=240)
    parser.add_argument("--seed", type=int, default=78)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rates = readback(load_vae(args.weights), args.scenes, args.seed)
    for n, row in rates.items():
        print(f"{n} object(s): " + ", ".join(f"{f} {row[f]:.1%}" for f in FIELDS))
    return rates


if __name__ == "__main__":
    main()
