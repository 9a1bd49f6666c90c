"""CLIP tokenizer files derived offline from the BPE vocabulary that clip-anytorch ships.

Stable Diffusion's tokenizer is OpenAI CLIP's byte-level BPE (Radford et al. 2021): 256 byte symbols, the same
256 with the end-of-word marker, 48,894 merges and two special tokens — 49,408 ids. clip-anytorch ships the
merge list; this module writes the `vocab.json` + `merges.txt` pair that transformers' `CLIPTokenizer` reads,
so tiny test pipelines and the toy world tokenize prompts exactly as real SD does, with no download.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from models.atomic_write import atomic_write_text
from models.clip_compat import clip

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters, in id order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id) and merge list, read from clip-anytorch's packaged BPE file."""
    bpe_path = clip.simple_tokenizer.default_bpe()
    with gzip.open(bpe_path) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += [START_TOKEN, END_TOKEN]
    if len(tokens) != VOCAB_SIZE:
        raise RuntimeError(f"clip-anytorch's BPE file gave {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write `vocab.json`, `merges.txt` and the tokenizer configs into `folder`; returns the folder.

    The result loads with `transformers.CLIPTokenizer.from_pretrained(folder)` and matches `clip.tokenize`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(
            {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN}
        ),
        "tokenizer_config.json": json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "bos_token": START_TOKEN,
                "eos_token": END_TOKEN,
                "unk_token": END_TOKEN,
                "pad_token": END_TOKEN,
                "do_lower_case": True,
            }
        ),
    }
    for name, text in files.items():
        atomic_write_text(folder / name, text)
    return folder
