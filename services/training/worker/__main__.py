"""A training worker: takes LoRA training jobs from `training.jobs` one at a time (see
`shared/worker.py` for what every worker does around a job).

For each job it fetches the base model (into the shared model cache) and the dataset (kohya
folders kept), trains off the event loop while publishing progress, stores the LoRA files and
reports them.

    python -m services.training.worker --endpoint training --worker-id t1
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import tempfile
import time
from pathlib import Path

import structlog

from shared.contracts.kohya import TrainingConfig
from shared.contracts.training import (
    HEARTBEATS,
    JOBS,
    POOL,
    REPORT_TRAINING_FAILED,
    REPORT_TRAINING_STARTED,
    REPORT_TRAINING_STOPPED,
    REPORT_TRAINING_SUCCEEDED,
    ReportTrainingFailed,
    ReportTrainingStarted,
    ReportTrainingStopped,
    ReportTrainingSucceeded,
    RunTraining,
    TrainingProgress,
    TrainingStopRequested,
)
from shared.errors import Invalid
from shared.logging import configure_logging
from shared.metrics import TRAINING_EPOCH, TRAINING_LOSS, TRAINING_STEP_SECONDS, StepClock
from shared.pools import default_worker_id
from shared.service import run
from shared.settings import Settings, get_settings
from shared.worker import WorkerRuntime

log = structlog.get_logger(__name__)

PROGRESS_EVERY_SECONDS = 1.0
# a training in hand may finish on SIGTERM only if short: past this it is redelivered
GRACE_SECONDS = 30.0


class TrainingWorker:
    def __init__(self, settings: Settings, pool: str, worker_id: str) -> None:
        self.worker_id = worker_id
        self.runtime = WorkerRuntime(
            settings,
            pool=pool,
            worker_id=worker_id,
            heartbeats=HEARTBEATS,
            grace_seconds=GRACE_SECONDS,
        )

    async def run(self, once: bool = False) -> None:
        # the heavy imports (torch, diffusers, peft) before taking work, not in a job's time
        await self.runtime.serve(
            JOBS,
            RunTraining,
            self.handle,
            warm_up=lambda: importlib.import_module("services.training.worker.trainer.training"),
            cancel_on=(TrainingStopRequested.routing_key, "training_id"),
            once=once,
        )

    async def handle(self, job: RunTraining) -> None:
        structlog.contextvars.bind_contextvars(training_id=job.training_id)

        async def succeeded(done: ReportTrainingSucceeded) -> None:
            await self.runtime.rpc.call(REPORT_TRAINING_SUCCEEDED, done, timeout=180)

        async def failed(error: str) -> None:
            log.warning("training_worker.failed", error=error)
            await self.runtime.rpc.call(
                REPORT_TRAINING_FAILED,
                ReportTrainingFailed(
                    training_id=job.training_id,
                    worker_id=self.worker_id,
                    error=error,
                ),
            )

        saved: list[str] = []  # the epochs stored before a stop

        async def stopped() -> None:
            await self.runtime.rpc.call(
                REPORT_TRAINING_STOPPED,
                ReportTrainingStopped(training_id=job.training_id, worker_id=self.worker_id, saved_keys=saved),
                timeout=180,
            )

        try:
            await self.runtime.job(
                REPORT_TRAINING_STARTED,
                ReportTrainingStarted(training_id=job.training_id, worker_id=self.worker_id),
                lambda: self._train(job, saved),
                job_id=job.training_id,
                succeeded=succeeded,
                failed=failed,
                canceled=stopped,
            )
        finally:
            structlog.contextvars.unbind_contextvars("training_id")

    async def _train(self, job: RunTraining, saved: list[str]) -> ReportTrainingSucceeded:
        from services.training.worker.trainer import train_lora  # torch, diffusers, peft

        storage = self.runtime.storage
        assert storage is not None
        config = TrainingConfig.from_esd({**job.config_params, "fm_type": job.fm_type})
        model = await self.runtime.model(job.model_key, f"the base model {job.model_name}")
        began = time.monotonic()
        progress = self.runtime.progress(
            lambda report: TrainingProgress(
                training_id=job.training_id,
                owner=job.owner,
                epoch=report.epoch,
                epochs=report.epochs,
                step=report.step,
                steps=report.steps,
                loss=float(report.loss),
                eta=round((time.monotonic() - began) / report.step * (report.steps - report.step), 2)
                if report.step
                else None,
            ),
            every=PROGRESS_EVERY_SECONDS,
        )
        clock = StepClock(TRAINING_STEP_SECONDS.labels(pool=self.runtime.pool))

        def stepped(report) -> None:
            clock.step()
            TRAINING_LOSS.labels(pool=self.runtime.pool).set(float(report.loss))
            TRAINING_EPOCH.labels(pool=self.runtime.pool).set(report.epoch)
            progress(report, final=report.step == report.steps)

        with tempfile.TemporaryDirectory(prefix="esd-train-") as work:
            data = Path(work) / "data"
            await self._dataset(job.data_prefix, data)
            out = Path(work) / "out"
            try:
                result = await asyncio.to_thread(
                    train_lora,
                    model,
                    data,
                    config,
                    out,
                    device=self.runtime.device(),
                    progress=stepped,
                    cancelled=self.runtime.cancelled,
                )
            except Exception:
                if self.runtime.cancelled():  # stopped: the epochs saved so far are kept
                    saved += await self._store(job, sorted(out.glob("*.safetensors")))
                raise
            keys = await self._store(job, [*result.checkpoints, result.final])
        info = {
            "steps": result.steps,
            "epochs": result.epochs,
            "seed": result.seed,
            "seconds": round(result.seconds, 3),
            "final_loss": result.losses[-1] if result.losses else None,
            "loss_curve": loss_curve(result.losses),
            "warnings": result.warnings,
        }
        log.info("training_worker.done", **{k: v for k, v in info.items() if k != "warnings"})
        return ReportTrainingSucceeded(
            training_id=job.training_id, worker_id=self.worker_id, final_key=keys[-1], output_keys=keys, info=info
        )

    async def _store(self, job: RunTraining, paths: list[Path]) -> list[str]:
        storage = self.runtime.storage
        assert storage is not None
        keys = []
        for path in paths:
            key = f"{job.output_prefix}/{path.name}"
            await storage.put(key, path.read_bytes())
            keys.append(key)
        return keys

    async def _dataset(self, prefix: str, folder: Path) -> None:
        """Every object under the prefix, its kohya folders (`10_concept/`) kept."""
        storage = self.runtime.storage
        assert storage is not None
        keys = await storage.keys(prefix)
        if not keys:
            raise Invalid(f"the dataset {prefix} holds no files")
        for key in keys:
            relative = Path(key.removeprefix(prefix))
            if relative.is_absolute() or ".." in relative.parts:
                continue  # keys are ours, but never write outside the folder
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(await storage.get(key))


def loss_curve(losses: list[float], points: int = 200) -> list[list[float]]:
    """[step, loss] pairs for a chart: every step's, or `points` of them evenly spread (the
    first and the last included) when there are more."""
    if len(losses) <= points:
        chosen = range(len(losses))
    else:
        chosen = sorted({round(i * (len(losses) - 1) / (points - 1)) for i in range(points)})
    return [[index + 1, round(float(losses[index]), 6)] for index in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description="A LoRA training worker")
    parser.add_argument("--endpoint", default=POOL, help="the pool's name")
    # one training, then exit: a Kubernetes Job per training (KEDA's ScaledJob)
    parser.add_argument("--once", action="store_true", help="exit after one training")
    parser.add_argument("--worker-id", default=default_worker_id())
    args = parser.parse_args()
    settings = get_settings()
    configure_logging("training-worker", fmt=settings.log_format, level=settings.log_level)
    structlog.contextvars.bind_contextvars(worker_id=args.worker_id)
    run(TrainingWorker(settings, args.endpoint, args.worker_id).run(once=args.once))


if __name__ == "__main__":
    main()
