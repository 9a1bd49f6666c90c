"""The Gradio app through its HTTP API with ``gradio_client``, served on 127.0.0.1 in this process.

Upload → train a few steps on the tiny SD model → the adapter appears in the library → compose two adapters
→ the gallery returns images → score them; bad uploads show their message and start nothing; the login and
the file-serving rules hold.
"""

from __future__ import annotations

import io
import socket
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app.library import download_stem
from app.studio import Settings, Studio
from app.tabs.compose import TABLE_COLUMNS
from app.ui import serve
from tests.test_app_jobs import make_subject_images

UNCHANGED = {"__type__": "update"}
"""What ``gr.skip()`` looks like to an API client: the output is left as it was."""
TRAIN_ARGS = dict(n=3, val=2, n_val_images=1, val_steps=2, tgt="vo", fam="lora")


@dataclass
class RunningApp:
    url: str
    studio: Studio
    images: list[Path]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(
    data_dir: Path, base_model: Path, clip_model: Path, auth: tuple[str, str] | None = None
) -> tuple:
    studio = Studio(
        Settings(data_dir=data_dir, base_model=str(base_model), clip_model=str(clip_model), device="cpu")
    )
    port = free_port()
    demo = serve(studio, host="127.0.0.1", port=port, auth=auth, block=False)
    return demo, studio, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.evaluation_models import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip"))[0]


@contextmanager
def app_running(
    tiny_sd_path: Path, tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    """A served app on the tiny model with fresh data and subject folders, closed afterwards."""
    demo, studio, url = start_app(tmp_path_factory.mktemp("atelier-data"), tiny_sd_path, tiny_clip)
    try:
        yield RunningApp(url, studio, make_subject_images(tmp_path_factory.mktemp("subject")))
    finally:
        demo.close()
        studio.close()


@pytest.fixture(scope="module")
def running_app(
    tiny_sd_path: Path, tiny_clip: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    with app_running(tiny_sd_path, tiny_clip, tmp_path_factory) as app:
        yield app


def train_through_api(client: Client, images: list[Path], trigger: str, class_word: str) -> str:
    """Start a job through the Train tab's API and follow it to the end; returns the job id."""
    job_update, status = client.predict(
        paths=[handle_file(str(p)) for p in images],
        trig=trigger,
        cls=class_word,
        api_name="/start_training",
        **TRAIN_ARGS,
    )
    job_id = job_update["value"]  # the job selector comes back as a component update (new choices + value)
    assert job_id.startswith("job-") and job_id in status
    assert job_id in [value for _, value in job_update["choices"]]
    return job_id


def test_upload_train_library_compose_and_score_through_the_api(running_app: RunningApp) -> None:
    client = Client(running_app.url, verbose=False)
    report, thumbs = client.predict(
        paths=[handle_file(str(p)) for p in running_app.images], api_name="/check_uploads"
    )
    assert report.count("✓") == 3 and "✗" not in report and len(thumbs) == 3

    dog = train_through_api(client, running_app.images, "sks", "dog")
    cat = train_through_api(client, running_app.images, "zwx", "cat")
    progress, status, losses, validation, log = client.predict(job_id=dog, api_name="/follow_job")
    assert progress == "Step 3/3"
    assert "**completed**" in status and "is in the Library" in status, status
    assert log.strip(), "the log tail shows the worker's output"
    assert [row[0] for row in losses["data"]] == [1, 2, 3, 1, 2, 3]  # per-step loss, then smoothed
    assert len(validation) == 2 and all(Path(item["image"]).is_file() for item in validation)
    assert [item["caption"] for item in validation] == ["step 3 (final)", "step 2"]
    _, status, *_ = client.predict(job_id=cat, api_name="/follow_job")
    assert "**completed**" in status, status

    table, _ = client.predict(api_name="/library")
    rows = {row[5]: row for row in table["data"]}
    assert set(rows) == {"sks dog", "zwx cat"}
    assert all(row[1] == "lora" and row[2] > 0 for row in rows.values())
    details, sample, downloads = client.predict(adapter_id=rows["sks dog"][7], api_name="/adapter_details")
    assert "sks dog" in details and Path(sample).is_file()
    assert {Path(d).name for d in downloads} >= {"sks-dog-lora.safetensors", "sks-dog-kohya_lora.safetensors"}
    assert "`kohya_lora.safetensors` (lora → lora, exact)" in details, details

    binding = {
        "headers": TABLE_COLUMNS,
        "data": [
            [rows["sks dog"][7], rows["sks dog"][0], "sks dog", 1.0, "dog"],
            [rows["zwx cat"][7], rows["zwx cat"][0], "zwx cat", 0.8, "cat"],
        ],
    }
    gallery, info, _, _ = client.predict(
        table=binding,
        prompt="a photo of sks dog and zwx cat",
        method="merge",
        negative="",
        seed=3,
        steps=2,
        guidance=5.0,
        num_images=2,
        api_name="/compose",
    )
    assert len(gallery) == 2 and "2 image(s)" in info
    for item in gallery:
        with Image.open(item["image"]) as image:
            assert image.size == (32, 32)
    assert [item["caption"].split(" · ")[0] for item in gallery] == ["seed 3", "seed 4"]

    summary, _, scores, thumbs, explained, csv_file = client.predict(
        uploaded=[], from_gallery=True, text="a photo of sks dog and zwx cat", refs=[], api_name="/evaluate"
    )
    assert len(scores["data"]) == 2 and "clipscore_100" in scores["headers"]
    assert "2 image(s)" in summary and "clipscore_100: mean" in summary
    assert Path(csv_file).read_text().count("\n") == 3
    column = scores["headers"].index("clipscore_100")
    assert all(row[column] == round(row[column], 3) for row in scores["data"])
    assert [item["caption"].split(" · ")[0] for item in thumbs] == ["#1", "#2"]
    shown = running_app.studio.public.shown
    assert len(list(shown.rglob("*-thumb.png"))) >= 2, "thumbnails are published copies under public/"
    assert "**clipscore_100**" in explained and "Hessel" in explained

    # The same images as a zip upload and as a server folder under the evaluation root score the same.
    (folder,) = running_app.studio.public.folder("outputs").iterdir()  # the gallery's files, in order
    with zipfile.ZipFile(folder.parent / "gallery.zip", "w") as bundle:
        for image in sorted(folder.glob("*.png")):
            bundle.write(image, image.name)
    running_app.studio.settings.eval_root = folder.parent
    for source in (
        dict(zipped=handle_file(str(folder.parent / "gallery.zip"))),
        dict(server_folder=folder.name),
    ):
        _, _, again, _, _, _ = client.predict(
            uploaded=[],
            from_gallery=False,
            text="a photo of sks dog and zwx cat",
            refs=[],
            api_name="/evaluate",
            **source,
        )
        assert [row[column] for row in again["data"]] == [row[column] for row in scores["data"]], source
    refused = client.predict(
        uploaded=[], from_gallery=False, text="x", refs=[], server_folder="../../", api_name="/evaluate"
    )
    assert refused == (UNCHANGED,) * 6


def test_import_rename_and_delete_through_the_api(running_app: RunningApp, tmp_path: Path) -> None:
    library = running_app.studio.library
    if not library.records():
        pytest.skip("needs the adapters trained by the flow test")
    trained = library.records()[0]
    duplicate = tmp_path / "shared.safetensors"
    duplicate.write_bytes(library.path(trained).read_bytes())
    client = Client(running_app.url, verbose=False)
    table, selected, message = client.predict(
        path=handle_file(str(duplicate)), name="dog copy", trigger="sks dog", api_name="/import_adapter"
    )
    assert (table, selected, message) == (UNCHANGED,) * 3, "a refusal is a toast and changes no output"
    assert len(library.records()) == 2, "the same file is not added twice"

    source = tmp_path / "dog-kohya.safetensors"  # another file: the trained adapter's kohya export
    kohya = next(p for p in library.export_paths(trained) if p.name == "kohya_lora.safetensors")
    source.write_bytes(kohya.read_bytes())
    table, selected, message = client.predict(
        path=handle_file(str(source)), name="dog copy", trigger="sks dog", api_name="/import_adapter"
    )
    new_id = selected["value"]
    assert "Imported **dog copy** (lora" in message
    assert [row[0] for row in table["data"] if row[7] == new_id] == ["dog copy"]
    assert library.get(new_id).source == "imported-kohya"
    assert library.path(library.get(new_id)).read_bytes() == source.read_bytes()

    table, _, message, details, downloads = client.predict(
        adapter_id=new_id, name="  renamed dog ", api_name="/rename_adapter"
    )
    assert [row[0] for row in table["data"] if row[7] == new_id] == ["renamed dog"]
    assert details.startswith("### renamed dog")
    assert [Path(d).name for d in downloads] == ["renamed-dog-lora.safetensors"]
    unchanged = client.predict(adapter_id=new_id, name="   ", api_name="/rename_adapter")
    assert unchanged == (UNCHANGED,) * 5 and library.get(new_id).name == "renamed dog"

    folder = library.path(library.get(new_id)).parent
    table, selected, message = client.predict(adapter_id=new_id, api_name="/delete_adapter")
    assert new_id not in [row[7] for row in table["data"]] and "Deleted **renamed dog**" in message
    assert not folder.exists()
    with pytest.raises(AppError, match=f"{new_id} is not in the list of choices"):
        client.predict(adapter_id=new_id, api_name="/adapter_details")


def test_bad_uploads_show_their_message_and_start_nothing(running_app: RunningApp, tmp_path: Path) -> None:
    fake = tmp_path / "holiday.png"
    fake.write_text("not an image at all")
    huge = tmp_path / "huge.png"
    Image.new("L", (20000, 20000)).save(huge)
    client = Client(running_app.url, verbose=False)
    jobs_before = running_app.studio.store.list_jobs()

    report, thumbs = client.predict(
        paths=[handle_file(str(fake)), handle_file(str(huge))], api_name="/check_uploads"
    )
    assert "✗ holiday.png" in report and "not a readable image" in report
    assert "✗ huge.png" in report and "decompression bomb" in report
    assert thumbs == []
    for files in ([fake], [huge], []):
        refused = client.predict(
            paths=[handle_file(str(p)) for p in files],
            trig="sks",
            cls="dog",
            api_name="/start_training",
            **TRAIN_ARGS,
        )
        assert refused == (UNCHANGED,) * 2, (
            "a refusal is a toast; the job selector and status stay as they were"
        )
    notes = tmp_path / "notes.txt"
    notes.write_text("a text file with its real name")
    with pytest.raises(AppError, match="Invalid file type"):
        client.predict(paths=[handle_file(str(notes))], api_name="/check_uploads")
    oversized = httpx.post(
        f"{running_app.url}gradio_api/upload",
        files={"files": ("big.png", b"\x89PNG" + bytes(21 * 2**20), "image/png")},
        timeout=120,
    )
    assert oversized.status_code == 413
    assert running_app.studio.store.list_jobs() == jobs_before


def test_only_what_the_page_shows_is_served(running_app: RunningApp, tmp_path: Path) -> None:
    """The database, job state, logs and adapter folders answer no file request; the sample grid, the
    downloads a person chose and the generated images still load (#35, item 2)."""
    data_dir = running_app.studio.settings.data_dir
    library = running_app.studio.library
    if not library.records():
        pytest.skip("needs the adapters trained by the flow test")

    def get(path: Path | str) -> httpx.Response:
        return httpx.get(f"{running_app.url}gradio_api/file={path}", timeout=30)

    record = library.records()[0]
    private = [
        data_dir / "atelier.sqlite3",
        data_dir / "atelier.sqlite3-wal",
        library.path(record),
        library.sample_path(record),
        *data_dir.glob("jobs/*/job.json"),
        *data_dir.glob("jobs/*/worker.log"),
        *data_dir.glob("jobs/*/events.jsonl"),
        *data_dir.glob("jobs/*/output/validation/*.png"),
    ]
    assert len(private) >= 10 and all(p.is_file() for p in private if not p.name.endswith("-wal"))
    outside = tmp_path / "secret.txt"
    outside.write_text("outside")
    for path in [*private, outside, Path(__file__).resolve()]:
        assert get(path).status_code in (403, 404), path

    client = Client(running_app.url, verbose=False)
    client.predict(api_name="/library")  # the Library tab's refresh: the adapter becomes a choice
    _, sample, downloads = client.predict(adapter_id=record.id, api_name="/adapter_details")
    named = f"{download_stem(record.name)}-{record.family}.safetensors"  # downloads carry the adapter's name
    assert {Path(d).name: Path(d).read_bytes() for d in downloads}[named] == library.path(record).read_bytes()
    with Image.open(library.sample_path(record)) as original, Image.open(sample) as enlarged:
        factor = enlarged.width // original.width  # the grid is shown enlarged, from a copy made for the page
        assert factor >= 1 and enlarged.size == (original.width * factor, original.height * factor)
        assert enlarged.resize(original.size, Image.Resampling.NEAREST).tobytes() == original.tobytes()
        shown_sample = enlarged.tobytes()
    published = {p.name: p for p in (data_dir / "public" / "shown").rglob("*") if p.is_file()}
    response = get(published[named])
    assert response.status_code == 200 and response.content == library.path(record).read_bytes()
    response = get(published["sample.png"])
    assert response.status_code == 200
    with Image.open(io.BytesIO(response.content)) as served:
        assert served.tobytes() == shown_sample
    generated = sorted((data_dir / "public" / "outputs").rglob("*.png"))
    assert generated and get(generated[0]).status_code == 200


def test_auth_protects_the_app(tiny_sd_path: Path, tiny_clip: Path, tmp_path: Path) -> None:
    demo, studio, url = start_app(tmp_path / "data", tiny_sd_path, tiny_clip, auth=("ada", "lovelace"))
    try:
        assert httpx.get(f"{url}config").status_code == 401
        with pytest.raises(Exception, match="(?i)login|auth|401"):
            Client(url, verbose=False, auth=("ada", "wrong"))
        table, _ = Client(url, verbose=False, auth=("ada", "lovelace")).predict(api_name="/library")
        assert table["data"] == [] or all(not any(row) for row in table["data"])
    finally:
        demo.close()
        studio.close()
