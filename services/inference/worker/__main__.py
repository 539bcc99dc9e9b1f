"""An inference worker: one member of an endpoint's pool.

It consumes `inference.<endpoint>` one job at a time (prefetch 1). For each job it tells the
service it starts (a redelivered job that already finished is skipped), fetches the payload and
the model files (kept in a local disk cache), runs the engine off the event loop while
reporting progress, stores the images and `<id>_param.json`, reports the outcome, and only then
acks: a worker killed mid-job leaves its job to be redelivered to another worker. It beats a
heartbeat so the service knows the pool's live size.

    python -m services.inference.worker --endpoint esd-async-test --worker-id w1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from contextlib import AsyncExitStack
from pathlib import Path

import structlog
from faststream import AckPolicy
from faststream.rabbit import Channel

from shared.contracts.inference import (
    HEARTBEATS,
    SERVICE,
    InferenceProgress,
    JobFailed,
    JobStartDecision,
    JobStarted,
    JobSucceeded,
    ModelFile,
    RunInference,
    WorkerHeartbeat,
    queue_of,
)
from shared.errors import Invalid
from shared.jobs import JobError, go_ahead, run_and_report
from shared.logging import configure_logging
from shared.messaging import EventPublisher, Names, RpcClient, create_broker, declare_work_queue
from shared.service import run
from shared.settings import Settings, get_settings
from shared.storage import ObjectStore

log = structlog.get_logger(__name__)

RUNNABLE = ("txt2img", "img2img")
PROGRESS_EVERY_SECONDS = 0.25


class Worker:
    def __init__(self, settings: Settings, endpoint: str, worker_id: str) -> None:
        self.settings = settings
        self.endpoint = endpoint
        self.worker_id = worker_id
        self.names = Names(settings.broker_prefix)
        # on SIGTERM the job in hand may finish: allow it as long as a Real-time caller waits
        self.broker = create_broker(settings, graceful_timeout=settings.realtime_timeout)
        self.rpc = RpcClient(self.broker, self.names, timeout=30)
        self.events = EventPublisher(self.broker, self.names)
        self.cache = settings.var_dir.resolve() / "models"
        self.state = "starting"
        self.phases: dict[str, float] = {}  # milliseconds of the current job's steps, for its log line
        self.engine = None
        self.storage: ObjectStore | None = None

    async def run(self) -> None:
        async with AsyncExitStack() as stack:
            self.storage = await ObjectStore.open(self.settings, stack)
            self.engine = await asyncio.to_thread(self._make_engine)
            self.broker.subscriber(
                self.names.work_queue(queue_of(self.endpoint)),
                channel=Channel(prefetch_count=1),
                ack_policy=AckPolicy.NACK_ON_ERROR,
            )(self.handle)
            await self.broker.connect()
            stack.push_async_callback(self.broker.stop)
            await declare_work_queue(self.broker, self.names, queue_of(self.endpoint))
            await self.broker.start()
            self.state = "ready"
            beating = asyncio.create_task(self._beat_forever())
            log.info("worker.ready", endpoint=self.endpoint, worker_id=self.worker_id, device=str(self.engine.device))
            stopping = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
            await stopping.wait()
            log.info("worker.stopping", worker_id=self.worker_id)
            beating.cancel()
            await self.broker.stop()  # waits for the job in hand, then stops consuming
            self.state = "stopping"
            await self._beat()

    def _make_engine(self):
        from diffusion.device import choose_device  # the heavy imports: torch, diffusers
        from services.inference.worker.engine import Engine

        return Engine(device=choose_device(self.settings.worker_device))

    async def _beat(self) -> None:
        beat = WorkerHeartbeat(endpoint_name=self.endpoint, worker_id=self.worker_id, state=self.state, at=time.time())
        await self.broker.publish(
            beat.model_dump_json(), queue=self.names.work_queue(HEARTBEATS),
            content_type="application/json", expiration=30,
        )

    async def _beat_forever(self) -> None:
        while True:
            try:
                await self._beat()
            except Exception:
                log.warning("worker.heartbeat_failed", exc_info=True)
            await asyncio.sleep(self.settings.worker_heartbeat_seconds)

    # --- one job ---

    async def handle(self, run: RunInference) -> None:
        structlog.contextvars.bind_contextvars(inference_id=run.inference_id)
        try:
            decision = await go_ahead(lambda: self.rpc.call(
                SERVICE, "job_started", JobStarted(inference_id=run.inference_id, worker_id=self.worker_id), JobStartDecision
            ))
            if not decision.run:
                log.info("worker.job_skipped", reason=decision.reason)
                return
            self.state = "busy"
            await self._beat()
            started = time.perf_counter()
            self.phases = {}

            async def succeeded(outcome: tuple[list[str], dict]) -> None:
                image_names, info = outcome
                await self.rpc.call(SERVICE, "job_succeeded", JobSucceeded(
                    inference_id=run.inference_id, worker_id=self.worker_id, image_names=image_names, info=info,
                ))
                log.info("worker.job_done", images=len(image_names), seconds=round(time.perf_counter() - started, 3), **self.phases)

            await run_and_report(lambda: self._run(run), succeeded=succeeded, failed=lambda error: self._report_failure(run, error))
        finally:
            self.state = "ready"
            structlog.contextvars.unbind_contextvars("inference_id")

    async def _report_failure(self, run: RunInference, error: str) -> None:
        log.warning("worker.job_failed", error=error)
        await self.rpc.call(SERVICE, "job_failed", JobFailed(inference_id=run.inference_id, worker_id=self.worker_id, error=error))

    async def _run(self, run: RunInference) -> tuple[list[str], dict]:
        from services.inference.worker.engine import GenerationRequest

        if run.task_type not in RUNNABLE:
            raise JobError(f"task type {run.task_type} is not supported by this platform's workers (they run {', '.join(RUNNABLE)})")
        assert self.storage is not None and self.engine is not None
        mark = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            self.phases[f"{name}_ms"] = round((now - mark) * 1000, 1)
            mark = now

        try:
            payload = json.loads(await self.storage.get(run.payload_key))
        except ValueError as error:
            raise JobError(f"api_param.json is not valid JSON: {error}") from None
        try:
            request = GenerationRequest.from_payload(run.task_type, payload)
        except Invalid as error:
            raise JobError(f"bad payload: {error.message}") from None
        phase("payload")
        files = await self._model_files(run.models)
        phase("models")
        loop = asyncio.get_running_loop()
        last = [0.0]

        def progress(step: int, total: int) -> None:
            now = time.monotonic()
            if step == total or now - last[0] >= PROGRESS_EVERY_SECONDS:
                last[0] = now
                loop.call_soon_threadsafe(
                    asyncio.ensure_future,
                    self.events.publish(InferenceProgress(inference_id=run.inference_id, step=step, total=total)),
                )

        try:
            result = await asyncio.to_thread(self.engine.generate, request, files, progress=progress)
        except Invalid as error:
            raise JobError(error.message) from None
        phase("generate")
        names = [f"image_{n}.png" for n in range(len(result.images))]
        for name, image in zip(names, result.images):
            await self.storage.put(f"{run.output_prefix}/{name}", image, "image/png")
        record = {"parameters": result.parameters, "info": result.info, "endpoint_name": self.endpoint, "inference_id": run.inference_id}
        await self.storage.put(f"{run.output_prefix}/{run.inference_id}_param.json", json.dumps(record).encode(), "application/json")
        phase("store")
        return names, result.info

    async def _model_files(self, models: list[ModelFile]):
        from services.inference.worker.engine import ModelFiles

        checkpoint, vae = None, None
        loras: dict[str, Path] = {}
        embeddings: dict[str, Path] = {}
        for model in models:
            path = await self._local(model)
            stem = Path(model.name).stem
            if model.type == "Stable-diffusion" and checkpoint is None:
                checkpoint = path
            elif model.type == "VAE":
                vae = path
            elif model.type == "Lora":
                loras[stem] = loras[model.name] = path
            elif model.type == "embeddings":
                embeddings[stem] = path
        if checkpoint is None:
            raise JobError("the job names no Stable-diffusion checkpoint")
        return ModelFiles(checkpoint=checkpoint, vae=vae, loras=loras, embeddings=embeddings)

    async def _local(self, model: ModelFile) -> Path:
        """The model file on local disk, downloaded once (by checkpoint id and name)."""
        assert self.storage is not None
        path = self.cache / model.checkpoint_id / model.name
        if path.exists():
            return path
        try:
            await self.storage.download_to(model.key, path)
        except Exception as error:
            raise JobError(f"could not fetch model {model.name}: {error}") from None
        log.info("worker.model_cached", name=model.name, bytes=path.stat().st_size)
        return path


def main() -> None:
    parser = argparse.ArgumentParser(description="An inference worker of one endpoint's pool")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--worker-id", required=True)
    args = parser.parse_args()
    settings = get_settings()
    configure_logging("worker", fmt=settings.log_format, level=settings.log_level)
    structlog.contextvars.bind_contextvars(worker_id=args.worker_id, endpoint=args.endpoint)
    run(Worker(settings, args.endpoint, args.worker_id).run())


if __name__ == "__main__":
    main()
