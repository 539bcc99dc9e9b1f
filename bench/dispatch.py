"""What the platform adds to a generation job, end to end.

Runs txt2img jobs of the tiny Stable-Diffusion-shaped model, at a size that takes about half a
second per image on this machine's CPU, through the public API (create, upload api_param.json,
start, until GET /inferences/{id} shows `succeed`) and beside the limit: the same diffusers
pipeline called directly in one process, per image. Two cases:

- 1 job at a time on a pool of 1 worker: median seconds per job, ratio, overhead per job;
- 20 queued jobs on a pool of 2 workers: wall time for all, beside 2 processes calling the
  pipeline directly 10 times each at the same time, and beside one process calling it 20
  times (on a machine with fewer cores than 2 x torch's threads, the two direct processes
  oversubscribe the CPU and the single process is the real limit).

    .venv/bin/python bench/dispatch.py [--size 288] [--steps 10] [--jobs 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from deploy.local.events import EventListener


def direct_images(model: str, size: int, steps: int, count: int, ready=None, go=None) -> list[float]:
    """Seconds per image, calling the pipeline directly (the same loader the workers use)."""
    import torch
    from diffusers import EulerDiscreteScheduler

    from services.inference.worker.engine.pipelines import load_checkpoint

    pipe = load_checkpoint(Path(model), device=torch.device("cpu"), dtype=torch.float32).pipeline
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the jobs' sampler
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(
        prompt="a lighthouse",
        negative_prompt="",
        num_inference_steps=steps,
        guidance_scale=7.0,
        width=size,
        height=size,
    )
    with torch.inference_mode():
        pipe(**arguments, generator=torch.Generator().manual_seed(0))  # warm up
        if ready is not None:
            ready.set()
            go.wait()
        times = []
        for seed in range(count):
            started = time.perf_counter()
            pipe(**arguments, generator=torch.Generator().manual_seed(seed))
            times.append(time.perf_counter() - started)
    return times


def _parallel_worker(model, size, steps, count, ready, go, results) -> None:
    results.put(sum(direct_images(model, size, steps, count, ready, go)))


def direct_parallel(model: str, size: int, steps: int, per_process: int, processes: int = 2) -> float:
    """Wall seconds for `processes` processes each calling the pipeline `per_process` times."""
    context = multiprocessing.get_context("spawn")
    readies = [context.Event() for _ in range(processes)]
    go, results = context.Event(), context.Queue()
    workers = [
        context.Process(target=_parallel_worker, args=(model, size, steps, per_process, ready, go, results))
        for ready in readies
    ]
    for worker in workers:
        worker.start()
    for ready in readies:
        ready.wait()
    started = time.perf_counter()
    go.set()
    for _ in workers:
        results.get()
    wall = time.perf_counter() - started
    for worker in workers:
        worker.join()
    return wall


class Platform:
    """The API as a client uses it, waiting for jobs on the events exchange rather than by
    polling (polling a 2-core machine steals the CPU the workers need)."""

    def __init__(self, stack, model_name: str, events) -> None:
        self.http = httpx.Client(
            base_url=stack.gateway_url,
            headers={"x-api-key": stack.api_key, "username": stack.admin_username},
            timeout=120,
        )
        self.model_name = model_name
        self.events = events
        self.started_at: dict[str, float] = {}
        self.dispatch: list[float] = []

    def endpoint(self, name: str, workers: int) -> str:
        response = self.http.post(
            "/endpoints",
            json={
                "endpoint_name": name,
                "endpoint_type": "Async",
                "instance_type": "local",
                "initial_instance_count": workers,
                "autoscaling_enabled": False,
                "assign_to_roles": ["IT Operator"],
            },
        )
        full = response.json()["data"]["endpoint_name"]
        while True:
            listed = {e["endpoint_name"]: e for e in self.http.get("/endpoints").json()["data"]["endpoints"]}
            if listed[full]["current_instance_count"] == str(workers):
                return full
            time.sleep(0.2)

    def create(self, endpoint: str, payload: dict) -> str:
        inference = self.http.post(
            "/inferences",
            json={
                "task_type": "txt2img",
                "inference_type": "Async",
                "sagemaker_endpoint_name": endpoint,
                "models": {"Stable-diffusion": [self.model_name]},
            },
        ).json()["data"]["inference"]
        httpx.put(inference["api_params_s3_upload_url"], content=json.dumps(payload).encode()).raise_for_status()
        return inference["id"]

    def start(self, inference_id: str) -> None:
        self.started_at[inference_id] = time.perf_counter()
        assert self.http.put(f"/inferences/{inference_id}/start").status_code == 202

    def wait(self, inference_id: str) -> None:
        """Until the job's `inference.succeeded` arrives, then once GET shows it."""

        def observe(key: str, body: dict) -> bool:
            if key == "inference.started" and body["inference_id"] in self.started_at:
                self.dispatch.append(time.perf_counter() - self.started_at[body["inference_id"]])
            return key in ("inference.succeeded", "inference.failed") and body["inference_id"] == inference_id

        self.events.until(observe)
        assert self.http.get(f"/inferences/{inference_id}").json()["data"]["status"] == "succeed", inference_id

    def one_job(self, endpoint: str, payload: dict) -> float:
        started = time.perf_counter()
        inference_id = self.create(endpoint, payload)
        self.start(inference_id)
        self.wait(inference_id)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=288)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--sequential", type=int, default=8, help="jobs in the one-at-a-time case")
    args = parser.parse_args()

    from deploy.local.first_image import TINY_MODEL, Client, _ensure_model
    from deploy.local.stack import LocalStack, free_port
    from diffusion.testing import make_tiny_checkpoint

    payload = {
        "prompt": "a lighthouse",
        "steps": args.steps,
        "sampler_name": "Euler",
        "cfg_scale": 7,
        "width": args.size,
        "height": args.size,
        "seed": 1,
    }
    with tempfile.TemporaryDirectory(prefix="esd-bench-") as var:
        model = make_tiny_checkpoint(Path(var) / "tiny.safetensors", seed=0)
        print(f"tiny model, {args.size}x{args.size}, {args.steps} steps (Euler), CPU")
        direct = direct_images(str(model), args.size, args.steps, args.sequential)
        parallel_wall = direct_parallel(str(model), args.size, args.steps, args.jobs // 2)

        stack = LocalStack(
            Path(var) / "stack",
            gateway_port=free_port(),
            mongo_port=free_port(),
            s3_port=free_port(),
            env={"ESD_BROKER_PREFIX": f"bench-{uuid.uuid4().hex[:6]}.", "ESD_LOG_LEVEL": "WARNING"},
            quiet=True,
        )
        stack.up()
        events = EventListener(stack.amqp_url, f"{stack.env['ESD_BROKER_PREFIX']}esd.events", "inference.*")
        try:
            events.__enter__()
            _ensure_model(Client(stack.gateway_url, stack.api_key, stack.admin_username), Path(var), lambda _: None)
            platform = Platform(stack, TINY_MODEL, events)
            single = platform.endpoint("bench1", 1)
            platform.one_job(single, payload)  # the worker loads the model once
            platform.dispatch.clear()
            through = [platform.one_job(single, payload) for _ in range(args.sequential)]
            single_dispatch = list(platform.dispatch)

            pool = platform.endpoint("bench2", 2)
            for _ in range(2):
                platform.one_job(pool, payload)  # both workers load the model... most likely
            ids = [platform.create(pool, payload) for _ in range(args.jobs)]
            started = time.perf_counter()
            for inference_id in ids:
                platform.start(inference_id)
            pending = set(ids)
            platform.dispatch.clear()
            events.until(
                lambda key, body: (
                    key == "inference.succeeded" and pending.discard(body["inference_id"]) is None and not pending
                )
            )
            pool_wall = time.perf_counter() - started
        finally:
            events.__exit__(None, None, None)
            stack.down()

    d, p = statistics.median(direct), statistics.median(through)
    print(f"\n1 job at a time, 1 worker (median of {args.sequential})")
    print(f"  direct pipeline call        {d * 1000:8.0f} ms per image")
    print(f"  through the API, end to end {p * 1000:8.0f} ms per job")
    print(f"  API / direct                {p / d:8.2f}x   overhead {1000 * (p - d):.0f} ms per job")
    print(f"  dispatch: start -> the worker begins, median {1000 * statistics.median(single_dispatch):.1f} ms")
    print(f"\n{args.jobs} queued jobs, 2 workers")
    print(f"  2 processes calling the pipeline directly, {args.jobs // 2} images each   {parallel_wall:6.2f} s")
    print(f"  {args.jobs} jobs through the API on a pool of 2                   {pool_wall:6.2f} s")
    print(
        f"  API / direct {pool_wall / parallel_wall:.2f}x   overhead {1000 * (pool_wall - parallel_wall) / args.jobs:.0f} ms per job"
    )
    # With fewer cores than torch threads the two direct processes above oversubscribe the CPU;
    # one process doing every image back to back is then the true limit of the machine.
    serial = d * args.jobs
    print(f"  1 process calling the pipeline {args.jobs} times (machine limit)   {serial:6.2f} s")
    print(
        f"  API / machine limit {pool_wall / serial:.2f}x   overhead {1000 * (pool_wall - serial) / args.jobs:.0f} ms per job"
    )


if __name__ == "__main__":
    main()
