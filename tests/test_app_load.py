"""Load: 20 concurrent generation requests through ``gradio_client`` against ``python -m app`` on 127.0.0.1.

The app runs as its own process (the way ``make app`` runs it) over a library of two adapters made in code.
Requests are submitted one after another, each once it has joined the queue, then left to run together; they
must all complete, in the order they were queued (generation has a concurrency limit of 1), and the server's
resident memory must stop growing once the pipeline and adapter bank are loaded. Prints latency p50/p95.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from gradio_client import Client
from gradio_client.utils import Status

from app.library import Library
from app.store import Store
from app.tabs.compose import TABLE_COLUMNS
from tests.test_app_api import free_port

REQUESTS = 20
MEMORY_GROWTH_LIMIT_MB = 150

pytestmark = pytest.mark.slow


def make_adapter_library(data_dir: Path, base_model: Path) -> list[list[object]]:
    """Two adapters (LoRA and HRA, small random updates) saved with the real writer and imported."""
    from models.adapters import FAMILIES, attach, resolve_targets
    from models.adapters.files import save_adapter_file
    from models.pipelines import load_pipeline

    pipe = load_pipeline(base_model, device="cpu", dtype="fp32")
    store = Store(data_dir)
    library = Library(store)
    rows = []
    for seed, (family, trigger) in enumerate([("lora", "sks dog"), ("hra", "zwx cat")]):
        handle = attach(
            pipe.unet, family, FAMILIES[family].default_config(), resolve_targets(pipe.unet, "vo")
        )
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in handle.trainable_parameters():
                param.add_(0.05 * torch.randn_like(param))
        path = save_adapter_file(
            data_dir / f"{family}.safetensors",
            handle,
            unet=pipe.unet,
            base_model_id=str(base_model),
            trigger_phrase=trigger,
            train_steps=1,
        )
        handle.detach()
        record = library.import_file(path, lambda: pipe.unet, name=trigger)
        rows.append([record.id, record.name, trigger, 1.0, trigger.split()[1]])
    store.close()
    return rows


def test_twenty_concurrent_generations_complete_in_queue_order_with_bounded_memory(
    tiny_sd_path: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    binding = {"headers": TABLE_COLUMNS, "data": make_adapter_library(data_dir, tiny_sd_path)}
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--base-model",
            str(tiny_sd_path),
            "--data-dir",
            str(data_dir),
        ],
        env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = Client(url, verbose=False)
        form = dict(
            prompt="a photo of sks dog and zwx cat",
            method="merge",
            negative="",
            steps=2,
            guidance=5.0,
            num_images=1,
            api_name="/compose",
        )
        client.predict(table=binding, seed=999, **form)  # warm-up: loads the pipeline and the adapter bank
        process = psutil.Process(server.pid)
        rss_after_warmup = process.memory_info().rss

        peak = [rss_after_warmup]
        sampling = threading.Event()

        def sample_memory() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        finished: list[tuple[int, float]] = []
        lock = threading.Lock()
        submitted: list[float] = []
        jobs = []
        ranks = []
        for index in range(REQUESTS):

            def done(*_outputs: object, index: int = index) -> None:
                with lock:
                    finished.append((index, time.perf_counter()))

            submitted.append(time.perf_counter())
            job = client.submit(table=binding, seed=index, result_callbacks=[done], **form)
            while job.status().code in (Status.STARTING, Status.JOINING_QUEUE):
                time.sleep(0.01)
            ranks.append(job.status().rank)
            jobs.append(job)
        results = [job.result(timeout=600) for job in jobs]
        sampling.set()
        sampler.join()
        time.sleep(0.5)  # let the last callbacks land
    finally:
        server.terminate()
        server.wait(timeout=60)

    assert len(results) == REQUESTS
    assert all(len(gallery) == 1 and Path(gallery[0]["image"]).is_file() for gallery, *_ in results)
    captions = [gallery[0]["caption"] for gallery, *_ in results]
    assert all(caption.startswith(f"seed {i} · ") for i, caption in enumerate(captions)), captions
    order = [index for index, _ in sorted(finished, key=lambda item: item[1])]
    assert order == list(range(REQUESTS)), f"completion order {order}"
    latencies = np.array([end - submitted[index] for index, end in finished])
    growth_mb = (peak[0] - rss_after_warmup) / 2**20
    print(
        f"\n{REQUESTS} concurrent /compose requests: latency p50 {np.percentile(latencies, 50):.2f} s, "
        f"p95 {np.percentile(latencies, 95):.2f} s; queue ranks at submit {ranks}; server RSS after warm-up "
        f"{rss_after_warmup / 2**20:.0f} MB, peak {peak[0] / 2**20:.0f} MB (+{growth_mb:.0f} MB)"
    )
    assert growth_mb < MEMORY_GROWTH_LIMIT_MB
