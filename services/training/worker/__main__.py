"""A training worker: takes LoRA training jobs from `training.jobs` one at a time.

For each job it tells the service it starts (a redelivered job that already finished is
skipped), fetches the base model and the dataset (kohya folders kept), trains off the event
loop while publishing progress, stores the LoRA files, reports, and only then acks: a worker
killed mid-training leaves its job to be redelivered.

    python -m services.training.worker --endpoint training --worker-id t1
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

import structlog
from faststream import AckPolicy
from faststream.rabbit import Channel

from shared.contracts.training import (
    JOBS,
    SERVICE,
    TrainingDecision,
    TrainingDone,
    TrainingError,
    TrainingProgress,
    TrainingStarted,
    TrainLora,
)
from shared.errors import Invalid
from shared.jobs import JobError, go_ahead, run_and_report
from shared.logging import configure_logging
from shared.messaging import EventPublisher, Names, RpcClient, create_broker, declare_work_queue
from shared.service import run
from shared.settings import Settings, get_settings
from shared.storage import ObjectStore

log = structlog.get_logger(__name__)

PROGRESS_EVERY_SECONDS = 1.0


class TrainingWorker:
    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.names = Names(settings.broker_prefix)
        # a training in hand may finish on SIGTERM only if short: past this it is redelivered
        self.broker = create_broker(settings, graceful_timeout=30)
        self.rpc = RpcClient(self.broker, self.names, timeout=60)
        self.events = EventPublisher(self.broker, self.names)
        self.cache = settings.var_dir.resolve() / "models"
        self.storage: ObjectStore | None = None

    async def run(self) -> None:
        async with AsyncExitStack() as stack:
            self.storage = await ObjectStore.open(self.settings, stack)
            # the heavy imports (torch, diffusers, peft) before taking work, not in a job's time
            await asyncio.to_thread(importlib.import_module, "services.training.worker.trainer.training")
            self.broker.subscriber(
                self.names.work_queue(JOBS), channel=Channel(prefetch_count=1), ack_policy=AckPolicy.NACK_ON_ERROR
            )(self.handle)
            await self.broker.connect()
            stack.push_async_callback(self.broker.stop)
            await declare_work_queue(self.broker, self.names, JOBS)
            await self.broker.start()
            log.info("training_worker.ready", worker_id=self.worker_id)
            stopping = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
            await stopping.wait()

    async def handle(self, job: TrainLora) -> None:
        structlog.contextvars.bind_contextvars(training_id=job.training_id)
        try:
            decision = await go_ahead(lambda: self.rpc.call(
                SERVICE, "job_started", TrainingStarted(training_id=job.training_id, worker_id=self.worker_id), TrainingDecision
            ))
            if not decision.run:
                log.info("training_worker.skipped", reason=decision.reason)
                return

            async def succeeded(done: TrainingDone) -> None:
                await self.rpc.call(SERVICE, "job_done", done, timeout=180)

            await run_and_report(lambda: self._train(job), succeeded=succeeded, failed=lambda error: self._fail(job, error))
        finally:
            structlog.contextvars.unbind_contextvars("training_id")

    async def _fail(self, job: TrainLora, error: str) -> None:
        log.warning("training_worker.failed", error=error)
        await self.rpc.call(SERVICE, "job_failed", TrainingError(training_id=job.training_id, worker_id=self.worker_id, error=error))

    async def _train(self, job: TrainLora) -> TrainingDone:
        from services.training.worker.trainer import TrainingConfig, train_lora  # torch, diffusers, peft

        assert self.storage is not None
        try:
            config = TrainingConfig.from_esd({**job.config_params, "fm_type": job.fm_type})
        except Invalid as error:
            raise JobError(f"bad config_params: {error.message}") from None
        model = await self._model(job)
        loop = asyncio.get_running_loop()
        last = [0.0]

        def progress(report) -> None:
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_SECONDS or report.step == report.steps:
                last[0] = now
                event = TrainingProgress(training_id=job.training_id, epoch=report.epoch, epochs=report.epochs, step=report.step, steps=report.steps, loss=float(report.loss))
                loop.call_soon_threadsafe(asyncio.ensure_future, self.events.publish(event))

        with tempfile.TemporaryDirectory(prefix="esd-train-") as work:
            data = Path(work) / "data"
            await self._dataset(job.data_prefix, data)
            out = Path(work) / "out"
            device = self._device()
            try:
                result = await asyncio.to_thread(train_lora, model, data, config, out, device=device, progress=progress)
            except Invalid as error:
                raise JobError(error.message) from None
            keys = []
            for path in [*result.checkpoints, result.final]:
                key = f"{job.output_prefix}/{path.name}"
                await self.storage.put(key, path.read_bytes())
                keys.append(key)
        info = {"steps": result.steps, "epochs": result.epochs, "seed": result.seed, "seconds": round(result.seconds, 3),
                "final_loss": result.losses[-1] if result.losses else None, "warnings": result.warnings}
        log.info("training_worker.done", **{k: v for k, v in info.items() if k != "warnings"})
        return TrainingDone(training_id=job.training_id, worker_id=self.worker_id, final_key=keys[-1], output_keys=keys, info=info)

    def _device(self) -> str:
        from diffusion.device import choose_device

        return str(choose_device(self.settings.worker_device))

    async def _model(self, job: TrainLora) -> Path:
        """The base model on local disk, downloaded once."""
        assert self.storage is not None
        path = self.cache / "by-key" / job.model_key
        if path.exists():
            return path
        try:
            await self.storage.download_to(job.model_key, path)
        except Exception as error:
            raise JobError(f"could not fetch the base model {job.model_name}: {error}") from None
        return path

    async def _dataset(self, prefix: str, folder: Path) -> None:
        """Every object under the prefix, its kohya folders (`10_concept/`) kept."""
        assert self.storage is not None
        keys = await self.storage.keys(prefix)
        if not keys:
            raise JobError(f"the dataset {prefix} holds no files")
        for key in keys:
            relative = Path(key.removeprefix(prefix))
            if relative.is_absolute() or ".." in relative.parts:
                continue  # keys are ours, but never write outside the folder
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(await self.storage.get(key))


def main() -> None:
    parser = argparse.ArgumentParser(description="A LoRA training worker")
    parser.add_argument("--endpoint", default="training", help="the pool's name")
    parser.add_argument("--worker-id", required=True)
    args = parser.parse_args()
    settings = get_settings()
    configure_logging("training-worker", fmt=settings.log_format, level=settings.log_level)
    structlog.contextvars.bind_contextvars(worker_id=args.worker_id)
    run(TrainingWorker(settings, args.worker_id).run())


if __name__ == "__main__":
    main()
