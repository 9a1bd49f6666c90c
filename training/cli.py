"""Command-line flags ↔ ``TrainConfig`` for ``python -m training.dreambooth``.

Flag names are diffusers' DreamBooth-LoRA flags (``--instance_data_dir``, ``--max_train_steps``, ...)
generated from ``TrainConfig``'s fields, so the two never drift apart. Each adapter family's
hyperparameters become ``--<family>_<field>`` flags (``--lora_rank``, ``--boft_block_size``) generated
from the family's config dataclass in ``models.adapters``; ``--rank`` is diffusers' name for ``--lora_rank``. ``--config file.json|yaml`` supplies
defaults; flags given on the command line win over the file; options left unset come from the base model's
profile (``models.profiles``, listed in ``--help``; ``--profile`` forces one). ``--show-defaults`` prints
the resolved options and where each came from, without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from models.cli_options import OneLineArgumentParser
from training.config import ConfigError, TrainConfig, read_config_file

_MULTI_VALUE = {"instance_data_dir", "targets"}
_NOT_FLAGS = {"adapter_config"}
_DIFFUSERS_NAMES = {"lora_rank": "--rank"}
"""Family flags that diffusers' DreamBooth-LoRA script spells differently (its ``--rank`` is the LoRA rank)."""


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f'expected a JSON value such as {{"to_v": 8}}, got {text!r}'
        ) from exc


def _scalar_type(annotation: str) -> Callable[[str], Any]:
    """The argparse type of a ``from __future__ import annotations`` field annotation such as ``'int | None'``."""
    text = annotation.replace("list[str]", "")
    if "dict" in text or "list" in text or "tuple" in text:
        return _json_value
    for name, kind in (("bool", bool), ("int", int), ("float", float)):
        if name in text:
            return kind
    return str


def family_fields() -> dict[str, list[dataclasses.Field]]:
    """Each adapter family's hyperparameter dataclass fields, keyed by family name."""
    from models.adapters import FAMILIES

    return {name: list(dataclasses.fields(family.config_cls)) for name, family in FAMILIES.items()}


def _epilog() -> str:
    from models.adapters import FAMILIES
    from models.profiles import PROFILES, describe

    lines = [
        "Base-model profiles (options left unset come from the model's profile, picked automatically;",
        "--profile forces one; --show-defaults prints what a run would use):",
    ]
    lines += [textwrap.indent(describe(profile), "  ") for profile in PROFILES.values()]
    lines += ["", "Adapter family hyperparameter defaults:"]
    for name, family in FAMILIES.items():
        hyper = ", ".join(f"{k}={v}" for k, v in family.default_config().to_dict().items())
        lines.append(f"  {name:<6} {hyper}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; every default is ``SUPPRESS`` so that explicitly given flags can be told apart."""
    parser = OneLineArgumentParser(
        prog="python -m training.dreambooth",
        description="Train a DreamBooth adapter (LoRA, DiffuseKronA, BOFT or HRA) on a few subject images.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    from models.adapters import FAMILIES
    from models.profiles import PROFILES

    parser.add_argument("--config", help="JSON or YAML file of options; command-line flags override it.")
    parser.add_argument(
        "--show-defaults",
        action="store_true",
        help="Print every option the base model's profile resolves (and where each came from), then exit.",
    )
    defaults = TrainConfig()
    for spec in dataclasses.fields(TrainConfig):
        if spec.name in _NOT_FLAGS:
            continue
        kind = _scalar_type(str(spec.type))
        default = getattr(defaults, spec.name)
        help_text = f"{spec.metadata['help']} [default: {default}]"
        flag = f"--{spec.name}"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif spec.name in _MULTI_VALUE:
            parser.add_argument(flag, nargs="+", help=help_text)
        elif spec.name == "adapter":
            parser.add_argument(flag, choices=sorted(FAMILIES), help=help_text)
        elif spec.name == "profile":
            parser.add_argument(flag, choices=list(PROFILES), help=help_text)
        else:
            parser.add_argument(flag, type=kind, help=help_text)
    for family, fields in family_fields().items():
        group = parser.add_argument_group(f"{family} hyperparameters (only with --adapter {family})")
        for spec in fields:
            kind = _scalar_type(str(spec.type))
            help_text = spec.metadata.get("help", "")
            flags = [f"--{family}_{spec.name}"]
            if f"{family}_{spec.name}" in _DIFFUSERS_NAMES:
                flags.append(_DIFFUSERS_NAMES[f"{family}_{spec.name}"])
            if kind is bool:
                group.add_argument(*flags, action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(*flags, type=kind, help=help_text)
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse ``argv`` into a validated-shape ``TrainConfig`` (``ConfigError`` on contradictions).

    Precedence: ``TrainConfig`` defaults < ``--config`` file < flags given on the command line.
    """
    given = vars(build_parser().parse_args(argv))
    given.pop("show_defaults", None)
    values: dict[str, Any] = read_config_file(given.pop("config")) if "config" in given else {}
    adapter_config = dict(values.pop("adapter_config", None) or {})
    for name in _MULTI_VALUE:
        if name in given and len(given[name]) == 1:
            given[name] = given[name][0]
    family_flags = {
        k: v for k, v in given.items() if k not in {f.name for f in dataclasses.fields(TrainConfig)}
    }
    values.update({k: v for k, v in given.items() if k not in family_flags})
    adapter = values.get("adapter", TrainConfig.adapter)
    fields = family_fields()
    for flag, value in family_flags.items():
        family = next((f for f in fields if flag.startswith(f + "_")), None)
        if family != adapter:
            also = f" ({_DIFFUSERS_NAMES[flag]})" if flag in _DIFFUSERS_NAMES else ""
            raise ConfigError(f"--{flag}{also} belongs to the {family} family, but --adapter is {adapter}")
        adapter_config[flag[len(family) + 1 :]] = value
    values["adapter_config"] = adapter_config
    return TrainConfig.from_dict(values)


def show_defaults(config: TrainConfig) -> str:
    """What ``--show-defaults`` prints: the profile and every option it resolves for this base model, on
    the device a run would use. Reads a diffusers folder's config files only; a hub id or single file is
    loaded to tell its kind. Nothing is trained or written."""
    from accelerate.state import PartialState
    from accelerate.utils import parse_flag_from_env

    from models.profiles import profile_for_spec, traits_of_folder
    from training.defaults import apply_profile, format_options, resolved_options
    from training.preflight import base_model_spec, load_with_profile

    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    spec = base_model_spec(config)
    profile = profile_for_spec(spec, config.profile)
    traits = traits_of_folder(spec)
    if profile is not None and (traits is not None or profile.resolution or config.resolution):
        resolved = apply_profile(config, profile, cuda=device.type == "cuda")
        if resolved.resolution is None:
            resolved = dataclasses.replace(resolved, resolution=traits.native_size)
    else:
        resolved, _, spec = load_with_profile(config, device, check=False)
    return f"base model: {spec}\nprofile: {resolved.profile}\nadapter: {resolved.adapter}\n" + format_options(
        resolved_options(config, resolved)
    )


class ProgressBar:
    """A ``progress`` callback drawing a tqdm bar with loss, it/s and ETA (created on first use)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, step: int, total: int, **info: Any) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)
        if "class_images" in info:
            done, count = info["class_images"]
            self.bar.set_description(f"class images {done}/{count}")
            return
        # the postfix and description are redrawn by update(), at most every tqdm `mininterval`, rather than
        # twice per step on their own (0.28 ms of a 31 ms toy-world step)
        self.bar.set_description("training", refresh=False)
        self.bar.total = total
        if "loss" in info:
            self.bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}", refresh=False)
        self.bar.update(step - self.bar.n)
        for path in info.get("validation_images") or []:
            self.bar.write(f"validation samples: {path}")

    def close(self) -> None:
        """Finish the bar's line (so a message printed next starts a line of its own); safe to call twice."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_cli(train: Callable[..., Any], argv: Sequence[str] | None = None) -> int:
    """Parse flags, run ``train`` with a progress bar; Ctrl-C once stops at the next step with a checkpoint.

    Exit codes: 0 done, 1 training failed (e.g. the loss diverged), 2 bad input (nothing was written),
    130 cancelled (resumable with ``--resume_from_checkpoint latest``).
    """
    from training.preflight import INPUT_ERRORS

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = config_from_args(argv)
        if "--show-defaults" in (sys.argv[1:] if argv is None else argv):
            print(show_defaults(config))
            return 0
    except SystemExit as exc:
        return int(exc.code or 0)
    except INPUT_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cancel = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():

        def on_interrupt(signum: int, frame: Any) -> None:
            print(
                "\nstopping at the next step and writing a checkpoint (Ctrl-C again to abort)",
                file=sys.stderr,
            )
            cancel.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)

        previous = signal.signal(signal.SIGINT, on_interrupt)
    progress = ProgressBar()
    try:
        result = train(config, progress=progress, cancel=cancel)
    except INPUT_ERRORS as exc:
        progress.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        progress.close()
        print(f"training failed: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if result.cancelled:
        print(
            f"cancelled at step {result.steps}; resume with --resume_from_checkpoint {result.checkpoint_path}"
        )
        return 130
    if result.adapter_path is not None:
        print(f"adapter: {result.adapter_path} ({result.steps} steps, final loss {result.final_loss:.4f})")
    return 0
