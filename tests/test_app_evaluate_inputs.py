"""The Evaluate tab's inputs and display without a browser: server folders only under the configured root,
zips extracted safely (no path traversal, no links, size and count limits), natural image order, the chart's
numbered labels in scoring order, scores rounded, and a plain explanation for each score."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app.eval_inputs import InputError, extract_zip, folder_images, natural_key
from app.score_help import EXPLANATIONS, glossary, score_frames


def png_bytes(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
        if link:
            info = zipfile.ZipInfo(link)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            bundle.writestr(info, "/etc/passwd")
    return path


def test_a_zip_of_images_is_extracted_in_natural_order(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "run.zip",
        {"out/10.png": png_bytes(), "out/2.png": png_bytes(), "out/1.png": png_bytes(), "notes.txt": b"x"},
    )
    paths = extract_zip(archive, tmp_path / "extracted")
    assert [p.name for p in paths] == ["0000-1.png", "0001-2.png", "0002-10.png"]
    assert all(p.parent == tmp_path / "extracted" for p in paths)


@pytest.mark.parametrize(
    ("members", "link", "message"),
    [
        ({"../escape.png": b"x"}, None, "points outside the archive"),
        ({"/abs/escape.png": b"x"}, None, "points outside the archive"),
        ({"ok.png": b"x"}, "link.png", "points outside the archive"),
        ({"notes.txt": b"x"}, None, "holds no PNG, JPEG or WebP images"),
    ],
)
def test_unsafe_or_empty_zips_are_refused_before_anything_is_written(
    tmp_path: Path, members: dict[str, bytes], link: str | None, message: str
) -> None:
    archive = make_zip(tmp_path / "bad.zip", members, link)
    with pytest.raises(InputError, match=message):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.png").exists()


def test_zip_limits_and_non_zips(tmp_path: Path) -> None:
    big = make_zip(tmp_path / "big.zip", {"a.png": bytes(4096), "b.png": bytes(4096)})
    with pytest.raises(InputError, match="over the"):
        extract_zip(big, tmp_path / "out", max_bytes=4096)
    with pytest.raises(InputError, match="at most 1 are scored"):
        extract_zip(big, tmp_path / "out", max_files=1)
    fake = tmp_path / "fake.zip"
    fake.write_text("not a zip")
    with pytest.raises(InputError, match="not a readable zip"):
        extract_zip(fake, tmp_path / "out")


def test_server_folders_only_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    for name in ("img10.png", "img2.png", "notes.txt"):
        (root / "run" / name).write_bytes(png_bytes())
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "x.png").write_bytes(png_bytes())
    (root / "sneaky").symlink_to(tmp_path / "secret")
    assert [p.name for p in folder_images(root, "run")] == ["img2.png", "img10.png"]
    assert [p.name for p in folder_images(root, str(root / "run"))] == ["img2.png", "img10.png"]
    for outside in ("../secret", str(tmp_path / "secret"), "sneaky"):
        with pytest.raises(InputError, match="outside the evaluation root"):
            folder_images(root, outside)
    with pytest.raises(InputError, match="not a folder"):
        folder_images(root, "missing")
    with pytest.raises(InputError, match="--eval-root"):
        folder_images(None, "run")


def test_chart_labels_follow_scoring_order_and_scores_are_rounded() -> None:
    rows = [{"image": f"{i}.png", "clipscore_100": 30 + i / 7, "clip_i": 0.123456789} for i in range(12)]
    frame, long, order = score_frames(rows)
    assert order == [f"#{i}" for i in range(1, 13)]
    assert sorted(order, key=natural_key) == order and sorted(order) != order, "text order would differ"
    assert frame["clipscore_100"].tolist()[1] == 30.143 and frame["clip_i"].tolist()[0] == 0.123
    assert list(long["#"][:12]) == order and set(long["metric"]) == {"clipscore_100", "clip_i x100"}
    assert long[long["metric"] == "clip_i x100"]["score"].tolist()[0] == 12.346
    assert max(len(label) for label in order) <= 4, "short labels do not overlap"


def test_every_score_the_app_shows_has_a_plain_explanation() -> None:
    from evaluation.scores import METRIC_DESCRIPTIONS

    shown = [m for m in METRIC_DESCRIPTIONS if not m.startswith("concept")]
    from app.tabs.compose import COMPARISON_COLUMNS

    for name in [*shown, "UNet evals", *COMPARISON_COLUMNS[3:]]:
        assert name in EXPLANATIONS, name
    text = glossary(["clipscore_hessel", "UNet evals", "image"])
    assert text.count("\n") == 1 and "Hessel" in text and "denoising network" in text
