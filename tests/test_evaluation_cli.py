"""`python -m evaluation.clipscore`: prompt sources, name/order matching, JSON/CSV output, exit code 2 on bad input."""

from __future__ import annotations

import csv
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

import evaluation
from evaluation.clipscore import main
from tests.evaluation_models import random_images, save_tiny_clip

PROMPTS = ["a red circle", "a blue square", "a green striped triangle", "a dog"]


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("cli-clip"), seed=1)[0]


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """Four images, named so that file-name order differs from creation order, with sidecar captions."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, image, prompt in zip(["b", "d", "a", "c"], random_images(4, seed=3), PROMPTS, strict=True):
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(prompt + "\n", encoding="utf-8")
    return folder


def _sorted_prompts(folder: Path) -> list[str]:
    return [(folder / f"{n}.txt").read_text().strip() for n in "abcd"]


def test_prompts_file_in_order_writes_json_that_matches_the_api(
    image_dir: Path, clip_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(_sorted_prompts(image_dir)) + "\n", encoding="utf-8")
    out = tmp_path / "results.json"
    args = ["--images", str(image_dir), "--prompts", str(prompts_file), "--model", str(clip_path)]
    code = main([*args, "--device", "cpu", "--batch-size", "3", "--out", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    files = sorted(image_dir.glob("*.png"))
    expected = evaluation.score(files, _sorted_prompts(image_dir), model=clip_path, device="cpu")
    assert [row["image"] for row in document["images"]] == [str(p) for p in files]
    got = torch.tensor([row["clip_t_cosine"] for row in document["images"]])
    torch.testing.assert_close(got, expected.text_cosine, atol=1e-6, rtol=0)
    assert document["summary"]["clipscore_hessel"]["mean"] == pytest.approx(
        float(expected.clipscore_hessel.mean()), abs=1e-6
    )
    assert set(document["metrics"]) == {"clip_t_cosine", "clipscore_hessel", "clipscore_100"}
    table = capsys.readouterr().out
    assert "clipscore_hessel" in table and "clipscore_100" in table and "mean" in table


def test_name_matched_tsv_json_mapping_and_sidecars_agree(
    image_dir: Path, clip_path: Path, tmp_path: Path
) -> None:
    by_name = {f"{n}.png": p for n, p in zip("abcd", _sorted_prompts(image_dir), strict=True)}
    tsv = tmp_path / "prompts.tsv.txt"
    tsv.write_text("".join(f"{name}\t{p}\n" for name, p in reversed(by_name.items())), encoding="utf-8")
    mapping = tmp_path / "prompts.json"
    mapping.write_text(json.dumps({Path(k).stem: v for k, v in by_name.items()}), encoding="utf-8")
    results = []
    for i, source in enumerate(
        [["--prompts", str(tsv)], ["--prompts", str(mapping)], ["--captions-from-sidecar-txt"]]
    ):
        out = tmp_path / f"r{i}.json"
        assert main(["--images", str(image_dir), *source, "--model", str(clip_path), "--out", str(out)]) == 0
        results.append(json.loads(out.read_text())["images"])
    for rows in results:
        assert [r["prompt"] for r in rows] == _sorted_prompts(image_dir)
        assert [r["clip_t_cosine"] for r in rows] == [r["clip_t_cosine"] for r in results[0]]


def test_csv_with_references_and_concepts(image_dir: Path, clip_path: Path, tmp_path: Path) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, image in enumerate(random_images(2, seed=9)):
        image.save(refs / f"{i}.jpg")
    out = tmp_path / "results.csv"
    args = ["--images", str(image_dir), "--prompt", "a red circle", "--references", str(refs)]
    args += ["--concepts", "a red circle", "a dog", "--model", str(clip_path), "--out", str(out)]
    assert main(args) == 0
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4
    assert list(rows[0]) == [
        "image", "prompt", "clip_t_cosine", "clipscore_hessel", "clipscore_100", "clip_i",
        "concept:a red circle", "concept:a dog", "concept_min",
    ]  # fmt: skip
    for row in rows:
        assert float(row["concept_min"]) == pytest.approx(
            min(float(row["concept:a red circle"]), float(row["concept:a dog"]))
        )
        assert float(row["concept:a red circle"]) == pytest.approx(float(row["clipscore_hessel"]), abs=1e-5)
    files = sorted(image_dir.glob("*.png"))
    expected = evaluation.score(files, references=sorted(refs.iterdir()), model=clip_path, device="cpu")
    torch.testing.assert_close(
        torch.tensor([float(r["clip_i"]) for r in rows]), expected.clip_i, atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("three_prompts", "4 images but 3 prompts"),
        ("broken_image", "is not a readable image"),
        ("missing_sidecar", "has no sidecar caption"),
        ("missing_model", "does not exist"),
        ("bad_out", "choose a .json or .csv"),
        ("nothing", "nothing to score"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(
    setup: str,
    message: str,
    image_dir: Path,
    clip_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n", encoding="utf-8")
    args = ["--images", str(image_dir), "--model", str(clip_path), "--prompts", str(prompts)]
    if setup == "three_prompts":
        pass
    elif setup == "broken_image":
        (image_dir / "e.png").write_bytes(b"not an image")
        (prompts).write_text("1\n2\n3\n4\n5\n", encoding="utf-8")
    elif setup == "missing_sidecar":
        (image_dir / "c.txt").unlink()
        args = [*args[:4], "--captions-from-sidecar-txt"]
    elif setup == "missing_model":
        args = ["--images", str(image_dir), "--model", str(tmp_path / "absent.pt"), "--prompt", "a"]
    elif setup == "bad_out":
        args = [*args[:4], "--prompt", "a", "--out", str(tmp_path / "r.xlsx")]
    elif setup == "nothing":
        args = args[:4]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


@pytest.mark.filterwarnings("ignore:'evaluation.clipscore' found in sys.modules:RuntimeWarning")
def test_module_entry_point_runs(
    image_dir: Path, clip_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluation.clipscore", "--images", str(image_dir), "--captions-from-sidecar-txt"]
    monkeypatch.setattr(sys, "argv", [*argv, "--model", str(clip_path), "--device", "cpu"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("evaluation.clipscore", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "clipscore_hessel" in out and "images: 4" in out
