"""Trainings: LoRA training jobs on a base checkpoint and a dataset, sent to the durable
`training.jobs` queue and carried to Completed or Failed by what the training workers report.
A finished LoRA is registered with the checkpoint service, so it can be used at once."""

from __future__ import annotations

import time
import uuid
from urllib.parse import urlsplit

import structlog
from faststream.rabbit import RabbitBroker

from services.training import domain
from services.training.domain import TrainingJob
from services.training.store import TrainingStore
from shared.contracts import checkpoint as checkpoints
from shared.contracts.identity import Principal
from shared.contracts.kohya import TrainingConfig
from shared.contracts.training import (
    JOBS,
    CreatedTraining,
    CreateTraining,
    DatasetStatus,
    DeleteTrainings,
    GetTraining,
    ListTrainings,
    ReportTrainingFailed,
    ReportTrainingStarted,
    ReportTrainingStopped,
    ReportTrainingSucceeded,
    RunTraining,
    StopTraining,
    TrainingCompleted,
    TrainingCreated,
    TrainingFailed,
    TrainingPage,
    TrainingProgress,
    TrainingStarted,
    TrainingStatus,
    TrainingStopped,
    TrainingStopRequested,
    TrainingView,
)
from shared.contracts.workers import GoAhead
from shared.errors import Invalid, NotFound
from shared.esd import decode_position, encode_position, esd_time
from shared.messaging import Names, send_work
from shared.metrics import JOBS_BY_STATUS
from shared.net import check_public_host
from shared.rpc import RpcClient
from shared.storage import ObjectStore

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3
_UNFINISHED = [status.value for status in domain.UNFINISHED]


class Trainings:
    def __init__(
        self,
        store: TrainingStore,
        storage: ObjectStore,
        broker: RabbitBroker,
        names: Names,
        rpc: RpcClient,
        *,
        allow_private_webhooks: bool = False,
    ) -> None:
        self.store = store
        self.storage = storage
        self.broker = broker
        self.names = names
        self.rpc = rpc
        self.allow_private_webhooks = allow_private_webhooks

    async def create(self, command: CreateTraining) -> CreatedTraining:
        params = command.params.training_params
        if command.webhook is not None:
            await check_public_host(
                urlsplit(command.webhook).hostname or "",
                allow_private=self.allow_private_webhooks,
                doing="send webhooks to",
                setting="ESD_WEBHOOK_ALLOW_PRIVATE_URLS",
            )
        training_id = str(uuid.uuid4())
        command = self._named(command, training_id)
        await self._check_output_name(command)
        model_key, model_name = await self._base_model(command.actor, params.model, params.s3_model_path)
        data_prefix = await self._data(command.actor, params.dataset, params.s3_data_path)
        training = TrainingJob(
            id=training_id,
            status=TrainingStatus.INITIAL,
            owner=command.actor.username,
            roles=command.actor.roles,
            params=command.params.model_dump(mode="json"),
            model_key=model_key,
            model_name=model_name,
            data_prefix=data_prefix,
            output_prefix=domain.output_prefix(training_id),
            fm_type=params.fm_type,
            created=time.time(),
        )
        await self.store.add_training(
            training,
            [
                TrainingCreated(
                    training_id=training_id,
                    owner=training.owner,
                    webhook=command.webhook,
                    webhook_events_filter=command.webhook_events_filter,
                )
            ],
        )
        await send_work(
            self.broker,
            self.names,
            JOBS,
            RunTraining(
                training_id=training_id,
                owner=training.owner,
                model_key=model_key,
                model_name=model_name,
                data_prefix=data_prefix,
                output_prefix=training.output_prefix,
                config_params=command.params.config_params,
                fm_type=params.fm_type,
            ),
        )
        JOBS_BY_STATUS.labels(kind="training", status=TrainingStatus.INITIAL.value).inc()
        log.info("training.queued", training_id=training_id, actor=command.actor.username)
        return CreatedTraining(
            id=training_id,
            status=training.status,
            params=training.params,
            input_location=self.storage.uri(data_prefix),
            output_location=self.storage.uri(training.output_prefix),
        )

    @staticmethod
    def _named(command: CreateTraining, training_id: str) -> CreateTraining:
        """A training that does not name its LoRA (kohya's `output_name`) gets a name of its
        own: one fixed default would be taken from the second such training on."""
        config = TrainingConfig.from_esd(command.params.config_params, fm_type=command.params.training_params.fm_type)
        if "output_name" in config.model_fields_set:
            return command
        config_params = {**command.params.config_params, "output_name": domain.default_output_name(training_id)}
        return command.model_copy(update={"params": command.params.model_copy(update={"config_params": config_params})})

    async def _check_output_name(self, command: CreateTraining) -> None:
        """The LoRA will be a checkpoint named after `output_name`: a name already taken is a
        400 now (as later ESD versions answer), not a silently renamed file later."""
        config = TrainingConfig.from_esd(command.params.config_params, fm_type=command.params.training_params.fm_type)
        name = domain.lora_file_name(config.output_name)
        use = await self.rpc.call(checkpoints.CHECK_FILE_NAME, checkpoints.CheckFileName(name=name))
        if use.taken:
            raise Invalid(
                f"output_name {config.output_name}: {name} already exists, please use another or rename/delete exists"
            )

    async def _base_model(self, actor: Principal, name: str | None, s3_path: str | None) -> tuple[str, str]:
        """The base model's key and file name: an Active Stable-diffusion checkpoint shared with
        the actor, named by its file name or by its file's `s3://` path (a path is not a way
        around whom the checkpoint is shared with)."""
        key = self.storage.key_of(s3_path) if not name and s3_path else None
        wanted = name or (key or "").rsplit("/", 1)[-1]
        try:
            item = await self.rpc.call(
                checkpoints.FIND_CHECKPOINT,
                checkpoints.FindCheckpoint(
                    actor=actor, checkpoint_type=checkpoints.CheckpointType.STABLE_DIFFUSION, name=wanted
                ),
            )
        except NotFound as missing:  # for this request, a bad base model is a bad input
            if key is not None:
                raise Invalid(f"s3_model_path {s3_path} is not an Active Stable-diffusion checkpoint") from None
            raise Invalid(missing.message) from None
        found = f"{self.storage.key_of(item.s3Location)}/{wanted}"
        if key is not None and key != found:
            raise Invalid(f"s3_model_path {s3_path} is not an Active Stable-diffusion checkpoint")
        return found, wanted

    async def _data(self, actor: Principal, dataset: str | None, s3_path: str | None) -> str:
        """The training data's prefix: a dataset shared with the actor, by name or by an
        `s3://` path inside it (a path is not a way around whom the dataset is shared with)."""
        subfolder = ""
        if not dataset:
            prefix = self.storage.key_of(s3_path or "").rstrip("/") + "/"
            dataset, subfolder = domain.dataset_of(prefix)
            if dataset is None:
                raise Invalid(f"s3_data_path {s3_path} is not in a dataset (s3://<bucket>/dataset/<name>/...)")
        found = await self.store.dataset(dataset)
        if found is None or not domain.dataset_reachable(actor, found):
            raise Invalid(f"dataset {dataset} is not found")
        if found.status is not DatasetStatus.ENABLED:
            raise Invalid(f"dataset {dataset} is not Enabled yet: upload its files, then PUT status Enabled")
        prefix = domain.dataset_prefix(dataset) + subfolder
        if subfolder and not await self.storage.keys(prefix):
            raise Invalid(f"s3_data_path {s3_path} holds no files")
        return prefix

    def _view(self, training: TrainingJob) -> TrainingView:
        return TrainingView(
            id=training.id,
            job_status=training.status,
            status=training.status,
            model_id=training.model_name,
            params=training.params,
            input_location=self.storage.uri(training.data_prefix),
            output_location=self.storage.uri(training.output_prefix),
            checkpoint_id=training.checkpoint_id,
            timestamp=training.created,
            created=esd_time(training.created),
            completed=esd_time(training.completed),
            owner=training.owner,
            error=training.error,
            progress=training.progress,
            lora_name=training.lora_name,
            info=training.info or None,
            stop_requested=training.stop_requested or None,
            saved_checkpoint_ids=training.saved_checkpoint_ids or None,
        )

    async def get(self, command: GetTraining) -> TrainingView:
        training = domain.check_visible(
            command.actor, await self.store.training(command.training_id), command.training_id
        )
        return self._view(training)

    async def list(self, command: ListTrainings) -> TrainingPage:
        limit = max(1, min(command.limit, 100))
        rows = await self.store.page(owner=None, before=decode_position(command.exclusive_start_key), limit=limit)
        more, rows = len(rows) > limit, rows[:limit]
        return TrainingPage(
            trainings=[self._view(row) for row in rows],
            last_evaluated_key=encode_position(rows[-1].created) if more else None,
        )

    async def delete(self, command: DeleteTrainings) -> None:
        for training_id in dict.fromkeys(command.training_id_list):
            training = await self.store.training(training_id)
            if training is None:
                continue
            await self.storage.delete_prefix(training.output_prefix + "/")
            await self.store.remove_training(training_id)
            log.info("training.deleted", training_id=training_id, actor=command.actor.username)

    # --- what workers report ---

    async def started(self, report: ReportTrainingStarted) -> GoAhead:
        training = await self.store.training(report.training_id)
        if training is None:
            return GoAhead(run=False, reason="the training was deleted")
        if training.status in domain.FINISHED:
            return GoAhead(run=False, reason=f"the training is {training.status.value}")
        if training.stop_requested:  # asked to stop while no worker had it (one died, say)
            await self._stopped(training, [])
            return GoAhead(run=False, reason="the training was stopped")
        if await self.store.count_attempt(report.training_id) > MAX_ATTEMPTS:
            await self._fail(training, f"gave up after {MAX_ATTEMPTS} attempts: workers stopped while training")
            return GoAhead(run=False, reason="too many attempts")
        await self.store.update_training(
            report.training_id,
            [TrainingStarted(training_id=training.id, worker_id=report.worker_id, owner=training.owner)],
            status=TrainingStatus.TRAINING,
            worker_id=report.worker_id,
            started=time.time(),
        )
        JOBS_BY_STATUS.labels(kind="training", status=TrainingStatus.TRAINING.value).inc()
        return GoAhead(run=True)

    async def succeeded(self, report: ReportTrainingSucceeded) -> None:
        training = await self.store.training(report.training_id)
        if training is None or training.status is TrainingStatus.COMPLETED:
            return
        item = await self._register(training, report.final_key, domain.lora_checkpoint_id(training.id))
        completed = TrainingCompleted(
            training_id=training.id, checkpoint_id=item.id, lora_name=item.name[0], owner=training.owner
        )
        if await self.store.transition(
            training.id,
            _UNFINISHED,
            [completed],
            status=TrainingStatus.COMPLETED,
            completed=time.time(),
            checkpoint_id=item.id,
            lora_name=item.name[0],
            output_keys=report.output_keys,
            info=report.info,
        ):
            JOBS_BY_STATUS.labels(kind="training", status=TrainingStatus.COMPLETED.value).inc()
            log.info("training.completed", training_id=training.id, checkpoint_id=item.id, lora=item.name[0])

    async def _register(self, training: TrainingJob, key: str, checkpoint_id: str) -> checkpoints.CheckpointItem:
        """A LoRA file of the training as an Active checkpoint of its owner's roles (once: the
        id is the caller's)."""
        return await self.rpc.call(
            checkpoints.REGISTER_CHECKPOINT,
            checkpoints.RegisterCheckpoint(
                actor=Principal(username=training.owner, roles=training.roles, permissions=[]),
                checkpoint_id=checkpoint_id,
                checkpoint_type=checkpoints.CheckpointType.LORA,
                name=key.rsplit("/", 1)[-1],
                source_key=key,
                params={"message": f"trained by training {training.id}", "training_id": training.id},
            ),
            timeout=120,
        )

    async def stop(self, command: StopTraining) -> TrainingView:
        """A queued training never runs; a running one stops at its next step, and the epochs
        it has saved become checkpoints."""
        training = domain.check_visible(
            command.actor, await self.store.training(command.training_id), command.training_id
        )
        domain.check_stoppable(training)
        if training.status is TrainingStatus.INITIAL:
            await self._stopped(training, [])
        elif not training.stop_requested:
            requested = TrainingStopRequested(training_id=training.id, owner=training.owner)
            await self.store.update_training(training.id, [requested], stop_requested=True)
            log.info("training.stop_requested", training_id=training.id, actor=command.actor.username)
        return self._view(await self.store.training(training.id) or training)

    async def stopped(self, report: ReportTrainingStopped) -> None:
        training = await self.store.training(report.training_id)
        if training is None or training.status in domain.FINISHED:
            return
        saved = [
            await self._register(training, key, domain.lora_checkpoint_id(training.id, key))
            for key in report.saved_keys
        ]
        await self._stopped(training, [item.id for item in saved])

    async def _stopped(self, training: TrainingJob, checkpoint_ids: list[str]) -> None:
        stopped = TrainingStopped(training_id=training.id, owner=training.owner, checkpoint_ids=checkpoint_ids)
        if await self.store.transition(
            training.id,
            _UNFINISHED,
            [stopped],
            status=TrainingStatus.STOPPED,
            completed=time.time(),
            saved_checkpoint_ids=checkpoint_ids,
        ):
            JOBS_BY_STATUS.labels(kind="training", status=TrainingStatus.STOPPED.value).inc()
            log.info("training.stopped", training_id=training.id, saved=len(checkpoint_ids))

    async def failed(self, report: ReportTrainingFailed) -> None:
        training = await self.store.training(report.training_id)
        if training is not None:
            await self._fail(training, report.error)

    async def _fail(self, training: TrainingJob, error: str) -> None:
        failed = TrainingFailed(training_id=training.id, error=error, owner=training.owner)
        if await self.store.transition(
            training.id, _UNFINISHED, [failed], status=TrainingStatus.FAILED, completed=time.time(), error=error
        ):
            JOBS_BY_STATUS.labels(kind="training", status=TrainingStatus.FAILED.value).inc()
            log.warning("training.failed", training_id=training.id, error=error)

    async def progressed(self, event: TrainingProgress) -> None:
        progress = domain.progress_of(event.epoch, event.epochs, event.step, event.steps, event.loss, event.eta)
        await self.store.transition(event.training_id, [TrainingStatus.TRAINING.value], progress=progress.model_dump())
