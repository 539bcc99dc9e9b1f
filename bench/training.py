"""Time per LoRA training step through the platform, beside the same peft training loop run
directly in one process (the trainer's `Trainer.step()`, no service around it).

Through the platform: POST /trainings on the tiny model and a small dataset, until
`training.completed` arrives on the events exchange. Printed: the direct loop's median step,
the platform's steps per second inside the worker, and end to end (set-up, dataset and model
transfer, saving, registering the LoRA included), each as a ratio to the direct step.

    .venv/bin/python bench/training.py [--steps 1000] [--resolution 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from deploy.local.events import EventListener


def images(folder: Path, count: int, size: int) -> None:
    concept = folder / "4_cube"
    concept.mkdir(parents=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(concept / f"img{i}.png")
        (concept / f"img{i}.txt").write_text("a red cube")


def direct(model: Path, data: Path, steps: int, resolution: int) -> float:
    from services.training.worker.trainer import Trainer, TrainingConfig

    config = TrainingConfig(max_train_steps=steps + 20, resolution=resolution, seed=1, network_dim=8)
    trainer = Trainer(model, data, config, device="cpu")
    trainer.prepare()
    for _ in range(20):  # warm up
        trainer.step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - started)
    trainer.release()
    return statistics.median(times)


def through_platform(stack, model_name: str, data: Path, steps: int, resolution: int) -> tuple[float, dict]:
    http = httpx.Client(
        base_url=stack.gateway_url, headers={"x-api-key": stack.api_key, "username": stack.admin_username}, timeout=120
    )
    name = f"bench-{uuid.uuid4().hex[:6]}"
    files = sorted(p for p in data.rglob("*") if p.is_file())
    created = http.post(
        "/datasets", json={"dataset_name": name, "prefix": "4_cube", "content": [{"filename": p.name} for p in files]}
    ).json()["data"]
    for path in files:
        httpx.put(created["s3PresignUrl"][path.name], content=path.read_bytes()).raise_for_status()
    assert http.put(f"/datasets/{name}", json={"status": "Enabled"}).status_code == 200
    with EventListener(stack.amqp_url, f"{stack.env['ESD_BROKER_PREFIX']}esd.events", "training.*") as events:
        started = time.perf_counter()
        training_id = http.post(
            "/trainings",
            json={
                "params": {
                    "training_params": {"model": model_name, "dataset": name},
                    "config_params": {
                        "training": {
                            "max_train_steps": steps,
                            "resolution": resolution,
                            "seed": 1,
                            "network_dim": 8,
                            "output_name": name,
                        }
                    },
                }
            },
        ).json()["data"]["id"]
        events.until(
            lambda key, body: key in ("training.completed", "training.failed") and body["training_id"] == training_id,
            timeout=1800,
        )
        wall = time.perf_counter() - started
    training = http.get(f"/trainings/{training_id}").json()["data"]
    assert training["job_status"] == "Completed", training.get("error")
    return wall, training["info"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()

    from deploy.local.first_image import TINY_MODEL, Client, _ensure_model
    from deploy.local.stack import LocalStack, free_port
    from diffusion.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="esd-bench-") as var:
        model = make_tiny_checkpoint(Path(var) / "tiny.safetensors", seed=0)
        data = Path(var) / "data"
        images(data, 4, args.resolution)
        step = direct(model, data, args.steps, args.resolution)

        stack = LocalStack(
            Path(var) / "stack",
            gateway_port=free_port(),
            mongo_port=free_port(),
            s3_port=free_port(),
            env={"ESD_BROKER_PREFIX": f"bench-{uuid.uuid4().hex[:6]}.", "ESD_LOG_LEVEL": "WARNING"},
            quiet=True,
        )
        stack.up()
        try:
            _ensure_model(Client(stack.gateway_url, stack.api_key, stack.admin_username), Path(var), lambda _: None)
            wall, info = through_platform(stack, TINY_MODEL, data, args.steps, args.resolution)
        finally:
            stack.down()

    in_worker = info["seconds"] / info["steps"]
    end_to_end = wall / info["steps"]
    print(f"tiny model, {args.resolution}x{args.resolution}, batch 1, {args.steps} steps, CPU")
    print(f"  direct Trainer.step() (median)                {step * 1000:7.2f} ms per step")
    print(
        f"  platform, inside the worker (train_lora)      {in_worker * 1000:7.2f} ms per step   {in_worker / step:5.2f}x"
    )
    print(
        f"  platform, end to end (POST -> completed)      {end_to_end * 1000:7.2f} ms per step   {end_to_end / step:5.2f}x"
    )
    print(f"  fixed cost of a training through the platform {wall - step * info['steps']:7.2f} s")


if __name__ == "__main__":
    main()
