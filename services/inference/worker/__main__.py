"""An inference worker: one member of an endpoint's pool.

It takes jobs from `inference.<endpoint>` one at a time (see `shared/worker.py` for what every
worker does around a job). For each job it fetches the payload and the model files (kept in the
shared model cache), runs the engine off the event loop while reporting progress, stores the
images and `<id>_param.json`, and reports the outcome.

    python -m services.inference.worker --endpoint esd-async-test --worker-id w1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import structlog

from shared.contracts.checkpoint import FACE_RESTORER_TYPES, UPSCALER_TYPES, CheckpointType
from shared.contracts.inference import (
    HEARTBEATS,
    REPORT_INFERENCE_FAILED,
    REPORT_INFERENCE_STARTED,
    REPORT_INFERENCE_SUCCEEDED,
    InferenceCanceled,
    InferenceProgress,
    ModelFile,
    ReportInferenceFailed,
    ReportInferenceStarted,
    ReportInferenceSucceeded,
    RunInference,
    queue_of,
)
from shared.errors import Invalid
from shared.logging import configure_logging
from shared.metrics import INFERENCE_IMAGE_SECONDS, INFERENCE_STEP_SECONDS, StepClock
from shared.pools import default_worker_id
from shared.service import run
from shared.settings import Settings, get_settings
from shared.untrusted import PAYLOAD_SETTING, load_json, too_large
from shared.worker import WorkerRuntime

log = structlog.get_logger(__name__)

RUNNABLE = ("txt2img", "img2img")
IMAGE_TASKS = ("extra-single-image", "extra-batch-images", "rembg")  # no diffusion: see _run_image_task
# every step is an event (a client following a job sees each); the service stores some of them
PROGRESS_EVERY_SECONDS = 0.0


class InferenceWorker:
    def __init__(self, settings: Settings, endpoint: str, worker_id: str) -> None:
        self.endpoint = endpoint
        self.worker_id = worker_id
        # a job in hand may finish on SIGTERM as long as a Real-time caller may wait for it
        self.runtime = WorkerRuntime(
            settings,
            pool=endpoint,
            worker_id=worker_id,
            heartbeats=HEARTBEATS,
            grace_seconds=settings.realtime_timeout,
        )
        self.engine: Any = None

    async def run(self) -> None:
        await self.runtime.serve(
            queue_of(self.endpoint),
            RunInference,
            self.handle,
            warm_up=self._make_engine,
            cancel_on=(InferenceCanceled.routing_key, "inference_id"),
        )

    def _make_engine(self) -> None:
        # the heavy imports: torch, diffusers
        from services.inference.worker.engine import BackgroundRemover, Engine, Extras, Upscalers

        settings = self.runtime.settings
        device = self.runtime.device()
        # one set of upscalers (and their loaded models) for the extras and the hires fix
        upscalers = Upscalers(
            device=device, tile_size=settings.upscaler_tile_size, tile_overlap=settings.upscaler_tile_overlap
        )
        self.engine = Engine(device=device, upscalers=upscalers)
        self.extras = Extras(upscalers)
        self.rembg = BackgroundRemover(
            models_dir=settings.rembg_models_dir, device=str(device), threads=settings.worker_threads
        )
        log.info("worker.engine_ready", device=str(self.engine.device))

    async def handle(self, job: RunInference) -> None:
        structlog.contextvars.bind_contextvars(inference_id=job.inference_id)
        started = time.perf_counter()
        phases: dict[str, float] = {}  # milliseconds of the job's steps, for its log line

        async def succeeded(outcome: tuple[list[str], dict]) -> None:
            image_names, _ = outcome  # the info is in the job's record, at info_key
            await self.runtime.rpc.call(
                REPORT_INFERENCE_SUCCEEDED,
                ReportInferenceSucceeded(
                    inference_id=job.inference_id,
                    worker_id=self.worker_id,
                    image_names=image_names,
                    info_key=info_key(job),
                ),
            )
            log.info(
                "worker.job_done", images=len(image_names), seconds=round(time.perf_counter() - started, 3), **phases
            )

        async def failed(error: str) -> None:
            log.warning("worker.job_failed", error=error)
            await self.runtime.rpc.call(
                REPORT_INFERENCE_FAILED,
                ReportInferenceFailed(
                    inference_id=job.inference_id,
                    worker_id=self.worker_id,
                    error=error,
                ),
            )

        try:
            await self.runtime.job(
                REPORT_INFERENCE_STARTED,
                ReportInferenceStarted(inference_id=job.inference_id, worker_id=self.worker_id),
                lambda: self._run(job, phases),
                job_id=job.inference_id,
                succeeded=succeeded,
                failed=failed,
            )
        finally:
            structlog.contextvars.unbind_contextvars("inference_id")

    async def _run(self, job: RunInference, phases: dict[str, float]) -> tuple[list[str], dict]:
        from services.inference.worker.engine import GenerationRequest, Preview

        if job.task_type in IMAGE_TASKS:
            return await self._run_image_task(job, phases)
        if job.task_type not in RUNNABLE:
            raise Invalid(
                f"task type {job.task_type} is not supported by this platform's workers "
                f"(they run {', '.join(RUNNABLE + IMAGE_TASKS)})"
            )
        storage = self.runtime.storage
        assert storage is not None and self.engine is not None
        mark = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[f"{name}_ms"] = round((now - mark) * 1000, 1)
            mark = now

        payload = await self._payload(job)
        request = GenerationRequest.from_payload(
            job.task_type, payload, max_prompt_chars=self.runtime.settings.max_prompt_chars
        )
        phase("payload")
        files = await self._model_files(job.models)
        phase("models")
        began = time.monotonic()
        previews: list[bytes] = []  # the latest preview, for the progress event of its step

        def progressed(step: int, total: int) -> InferenceProgress:
            return InferenceProgress(
                inference_id=job.inference_id,
                step=step,
                total=total,
                owner=job.owner,
                eta=round((time.monotonic() - began) / step * (total - step), 2) if step else None,
                preview="data:image/png;base64," + base64.b64encode(previews.pop()).decode() if previews else None,
            )

        progress = self.runtime.progress(progressed, every=PROGRESS_EVERY_SECONDS)
        preview = (
            Preview(every=job.preview_every, show=lambda _, png: previews.append(png)) if job.preview_every else None
        )
        clock = StepClock(INFERENCE_STEP_SECONDS.labels(endpoint=self.endpoint))

        def stepped(step: int, total: int) -> None:
            clock.step()
            progress(step, total, final=step == total)

        generating = time.perf_counter()
        result = await asyncio.to_thread(
            self.engine.generate, request, files, progress=stepped, cancelled=self.runtime.cancelled, preview=preview
        )
        per_image = (time.perf_counter() - generating) / max(1, len(result.images))
        for _ in result.images:  # one observation per image: the sum is the time, the count the images
            INFERENCE_IMAGE_SECONDS.labels(endpoint=self.endpoint).observe(per_image)
        phase("generate")
        names = [f"image_{n}.png" for n in range(len(result.images))]
        for name, image in zip(names, result.images, strict=True):
            await storage.put(f"{job.output_prefix}/{name}", image, "image/png")
        record = {
            "parameters": result.parameters,
            "info": result.info,
            "endpoint_name": self.endpoint,
            "inference_id": job.inference_id,
        }
        await storage.put(info_key(job), json.dumps(record).encode(), "application/json")
        phase("store")
        return names, result.info

    async def _run_image_task(self, job: RunInference, phases: dict[str, float]) -> tuple[list[str], dict]:
        """The extras and background removal: the payload's images through upscalers or a
        rembg model; PNGs named as the task names them, and `<id>_param.json`."""
        from services.inference.worker.engine import ExtrasModels, ExtrasRequest, RembgRequest

        storage = self.runtime.storage
        assert storage is not None
        mark = time.perf_counter()
        payload = await self._payload(job)
        files: dict[str, dict[str, Path]] = {}
        for model in job.models:
            if model.type in (*UPSCALER_TYPES, *FACE_RESTORER_TYPES, CheckpointType.REMBG):
                path = await self.runtime.model(model.key, f"model {model.name}")
                files.setdefault(model.type.value, {})[model.name] = path
        phases["models_ms"] = round((time.perf_counter() - mark) * 1000, 1)
        mark = time.perf_counter()
        if job.task_type == "rembg":
            request = RembgRequest.from_payload(payload)
            result = await asyncio.to_thread(self.rembg.run, request, files.get(CheckpointType.REMBG.value, {}))
        else:
            request = ExtrasRequest.from_payload(job.task_type, payload)
            models = ExtrasModels(
                upscalers={name: path for kind in UPSCALER_TYPES for name, path in files.get(kind.value, {}).items()},
                face_restorers={kind.value: files.get(kind.value, {}) for kind in FACE_RESTORER_TYPES},
            )
            result = await asyncio.to_thread(self.extras.run, request, models)
        phases["process_ms"] = round((time.perf_counter() - mark) * 1000, 1)
        for image in result.images:
            await storage.put(f"{job.output_prefix}/{image.name}", image.png, "image/png")
        record = {
            "parameters": result.parameters,
            "info": result.info,
            "endpoint_name": self.endpoint,
            "inference_id": job.inference_id,
        }
        await storage.put(info_key(job), json.dumps(record).encode(), "application/json")
        return [image.name for image in result.images], result.info

    async def _payload(self, job: RunInference) -> Any:
        """The job's api_param.json: refused by its size before it is downloaded (and while it
        is, were it replaced meanwhile), then by its nesting."""
        storage, settings = self.runtime.storage, self.runtime.settings
        assert storage is not None
        limit = settings.max_payload_bytes
        size = await storage.size(job.payload_key)
        if size is None:
            raise Invalid("api_param.json is not in storage (deleted meanwhile?)")
        if size > limit:
            raise too_large("api_param.json", size, limit, PAYLOAD_SETTING)
        raw = bytearray()
        async for chunk in storage.stream(job.payload_key):
            raw += chunk
            if len(raw) > limit:
                raise too_large("api_param.json", len(raw), limit, PAYLOAD_SETTING)
        return load_json(bytes(raw), what="api_param.json", max_depth=settings.max_json_depth)

    async def _model_files(self, models: list[ModelFile]):
        from services.inference.worker.engine import ModelFiles

        checkpoint, vae = None, None
        checkpoints: dict[str, Path] = {}
        loras: dict[str, Path] = {}
        embeddings: dict[str, Path] = {}
        controlnets: dict[str, Path] = {}
        upscalers: dict[str, Path] = {}
        for model in models:
            path = await self.runtime.model(model.key, f"model {model.name}")
            stem = Path(model.name).stem
            if model.type == "Stable-diffusion":
                checkpoints[model.name] = path  # `override_settings.sd_model_checkpoint` picks among them
                checkpoint = checkpoint or path
            elif model.type == "ControlNet":
                controlnets[stem] = controlnets[model.name] = path
            elif model.type == "VAE":
                vae = path
            elif model.type == "Lora":
                loras[stem] = loras[model.name] = path
            elif model.type == "embeddings":
                embeddings[stem] = path
            elif model.type in UPSCALER_TYPES:
                upscalers[model.name] = path  # the hires fix's `hr_upscaler`
        if checkpoint is None:
            raise Invalid("the job names no Stable-diffusion checkpoint")
        return ModelFiles(
            checkpoint=checkpoint,
            vae=vae,
            loras=loras,
            embeddings=embeddings,
            checkpoints=checkpoints,
            controlnets=controlnets,
            upscalers=upscalers,
        )


def info_key(job: RunInference) -> str:
    """Where a job's record (`parameters` and A1111's `info`) is stored."""
    return f"{job.output_prefix}/{job.inference_id}_param.json"


def main() -> None:
    parser = argparse.ArgumentParser(description="An inference worker of one endpoint's pool")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--worker-id", default=default_worker_id())
    args = parser.parse_args()
    settings = get_settings()
    configure_logging("worker", fmt=settings.log_format, level=settings.log_level)
    structlog.contextvars.bind_contextvars(worker_id=args.worker_id, endpoint=args.endpoint)
    run(InferenceWorker(settings, args.endpoint, args.worker_id).run())


if __name__ == "__main__":
    main()
