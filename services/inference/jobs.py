"""Inference jobs: created against an endpoint and the catalog's checkpoints, started by
sending them to the endpoint's queue, and carried to `succeed` or `failed` by what the workers
report (a report is stored before the worker acks its message, so nothing is lost when a
process dies). A worker asks for the go-ahead first: a redelivered job that already finished
is not run twice, and one that keeps killing its workers is given up."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import TypeVar
from urllib.parse import urlsplit

import structlog
from faststream.rabbit import RabbitBroker

from services.inference import domain
from services.inference.domain import Endpoint, InferenceJob
from services.inference.store import InferenceStore
from shared.contracts.identity import Principal
from shared.contracts.inference import (
    CancelInference,
    CreatedInference,
    CreateInference,
    DeleteInferences,
    GetInference,
    InferenceCanceled,
    InferenceCreated,
    InferenceFailed,
    InferencePage,
    InferenceParams,
    InferenceProgress,
    InferenceStart,
    InferenceStarted,
    InferenceSucceeded,
    InferenceView,
    JobStatus,
    ListInferences,
    ModelFile,
    ModelRef,
    ReportInferenceFailed,
    ReportInferenceStarted,
    ReportInferenceSucceeded,
    RunInference,
    StartedInference,
    StartInference,
    UsedModel,
    queue_of,
)
from shared.contracts.workers import GoAhead, WorkerState
from shared.errors import Invalid, NotFound, Unavailable
from shared.esd import decode_position, encode_position, esd_time
from shared.messaging import Names, QueueDepths, send_work
from shared.metrics import JOBS_BY_STATUS
from shared.net import check_public_host
from shared.storage import ObjectStore
from shared.untrusted import PAYLOAD_SETTING, load_json, too_large

log = structlog.get_logger(__name__)

T = TypeVar("T")

MAX_JOB_ATTEMPTS = 3
MAX_INFO_BYTES = 1024 * 1024  # of a job's `info` kept in its record
PROGRESS_STORE_SECONDS = 0.25
_UNFINISHED = [JobStatus.IN_PROGRESS.value, JobStatus.CREATED.value]


class Jobs:
    def __init__(
        self,
        store: InferenceStore,
        storage: ObjectStore,
        broker: RabbitBroker,
        names: Names,
        depths: QueueDepths,
        *,
        live_within: float,
        allow_private_webhooks: bool = False,
        max_json_depth: int = 64,
        max_payload_bytes: int = 32 * 1024 * 1024,
        storage_seconds: float = 5.0,
    ) -> None:
        self.store = store
        self.storage = storage
        self.broker = broker
        self.names = names
        self.depths = depths
        self.live_within = live_within
        self.allow_private_webhooks = allow_private_webhooks
        self.max_json_depth = max_json_depth
        self.max_payload_bytes = max_payload_bytes
        # Storage calls made before a job is created or dispatched must end well within the
        # caller's wait (the RPC timeout): a caller told 503 retries, so the job must not
        # then be carried out anyway.
        self.storage_seconds = storage_seconds
        self.progress_written: dict[str, float] = {}  # job -> when its progress was last stored

    async def create(self, command: CreateInference) -> CreatedInference:
        domain.check_task_type(command.task_type)
        if command.webhook is not None:
            await check_public_host(
                urlsplit(command.webhook).hostname or "",
                allow_private=self.allow_private_webhooks,
                doing="send webhooks to",
                setting="ESD_WEBHOOK_ALLOW_PRIVATE_URLS",
            )
        if command.payload_string is not None:  # before an endpoint is chosen, as ESD checks it
            self._check_payload(command.payload_string)
        candidates = domain.candidate_endpoints(
            await self.store.all_endpoints(),
            inference_type=command.inference_type,
            named=command.sagemaker_endpoint_name,
            username=command.actor.username,
            roles=command.actor.roles,
        )
        endpoint = (
            candidates[0] if len(candidates) == 1 else domain.least_busy(candidates, await self._loads(candidates))
        )
        domain.check_runnable(command.task_type, command.models)
        files, refs = await self._models(command.models, command.actor)
        inference_id = str(uuid.uuid4())
        job = InferenceJob(
            id=inference_id,
            task_type=command.task_type,
            inference_type=command.inference_type,
            status=JobStatus.CREATED,
            owner=command.actor.username,
            roles=command.actor.roles,
            endpoint_name=endpoint.name,
            endpoint_id=endpoint.id,
            instance_type=endpoint.instance_type,
            models=refs,
            files=files,
            payload_key=domain.payload_key(command.task_type, inference_id),
            created=time.time(),
            preview_every=command.preview_every,
        )
        if command.payload_string is not None:
            await self._in_time(
                self.storage.put(job.payload_key, command.payload_string.encode(), "application/json"),
                "storing payload_string",
            )
        await self.store.add_job(
            job,
            [
                InferenceCreated(
                    inference_id=inference_id,
                    task_type=job.task_type,
                    endpoint_name=endpoint.name,
                    owner=job.owner,
                    webhook=command.webhook,
                    webhook_events_filter=command.webhook_events_filter,
                )
            ],
        )
        JOBS_BY_STATUS.labels(kind="inference", status=JobStatus.CREATED.value).inc()
        log.info("inference.created", inference_id=inference_id, endpoint=endpoint.name, actor=command.actor.username)
        return CreatedInference(
            id=inference_id,
            type=command.task_type,
            api_params_s3_location=self.storage.uri(job.payload_key),
            api_params_s3_upload_url=await self.storage.presign_put(job.payload_key),
            models=job.models,
        )

    def _check_payload(self, payload: str) -> None:
        try:
            load_json(
                payload.encode(),
                what="payload_string",
                max_depth=self.max_json_depth,
                max_bytes=self.max_payload_bytes,
                setting=PAYLOAD_SETTING,
            )
        except Invalid as error:
            # ESD's phrasing for what is not JSON; the limits say which one was broken
            message = error.message if "valid JSON" not in error.message else "payload_string must be valid json string"
            raise Invalid(message) from None

    async def _in_time(self, call: Awaitable[T], doing: str) -> T:
        try:
            return await asyncio.wait_for(call, self.storage_seconds)
        except TimeoutError:
            log.warning("inference.storage_stalled", doing=doing, seconds=self.storage_seconds)
            raise Unavailable(
                f"object storage did not answer within {self.storage_seconds:g} s ({doing}); nothing was started, "
                "try again"
            ) from None

    async def _loads(self, endpoints: list[Endpoint]) -> dict[str, float]:
        loads = {}
        for endpoint in endpoints:
            live = await self.store.live_workers(endpoint.name, self.live_within)
            busy = sum(1 for worker in live if worker.state is WorkerState.BUSY)
            queued = await self.depths.depth(self.names.work_queue(queue_of(endpoint.name)).name)
            loads[endpoint.name] = domain.load_of(queued, busy, len(live))
        return loads

    async def _models(self, models: dict[str, list[str]], actor: Principal) -> tuple[list[ModelFile], list[ModelRef]]:
        """The files a worker fetches, and ESD's list of the models by type; every named
        checkpoint must be in the catalog and shared with the actor (another role's is not
        there for it)."""
        files: list[ModelFile] = []
        refs: dict[str, ModelRef] = {}
        missing: list[str] = []
        for checkpoint_type, name in domain.requested_models(models):
            entry = await self.store.find_model(checkpoint_type, name)
            if entry is None or not domain.may_use(entry, actor):
                missing.append(f"checkpoint with name {name}, type {checkpoint_type} is not found")
                continue
            files.append(
                ModelFile(
                    type=checkpoint_type, checkpoint_id=entry.checkpoint_id, name=name, key=f"{entry.prefix}/{name}"
                )
            )
            refs.setdefault(
                checkpoint_type, ModelRef(id=entry.checkpoint_id, name=[], type=checkpoint_type)
            ).name.append(name)
        if missing:
            raise Invalid(" ".join(missing))
        for vae in models.get("VAE", []):
            if vae in domain.PASS_THROUGH_VAES:
                refs.setdefault("VAE", ModelRef(id="VAE", name=[], type="VAE")).name.append(vae)
        return files, list(refs.values())

    async def start(self, command: StartInference) -> StartedInference:
        job = await self.store.job(command.inference_id)
        if job is None:
            raise Invalid(f"InferenceJobId {command.inference_id} not found")
        domain.check_owner(command.actor, job)
        if job.status is JobStatus.CREATED:
            size = await self._in_time(self.storage.size(job.payload_key), "checking api_param.json")
            if size is None:
                raise Invalid("api_param.json has not been uploaded yet: PUT it to api_params_s3_upload_url first")
            if size > self.max_payload_bytes:
                raise too_large("api_param.json", size, self.max_payload_bytes, PAYLOAD_SETTING)
            if await self.store.endpoint(job.endpoint_name) is None:
                raise Invalid(f"endpoint {job.endpoint_name} no longer exists")
            if await self.store.transition_job(
                job.id,
                [JobStatus.CREATED.value],
                status=JobStatus.IN_PROGRESS,
                start_time=time.time(),
                dispatched=False,
            ):
                await self._dispatch(job)
                JOBS_BY_STATUS.labels(kind="inference", status=JobStatus.IN_PROGRESS.value).inc()
            job = await self.store.job(command.inference_id) or job
        elif job.status is JobStatus.IN_PROGRESS and not job.dispatched:
            # a start that was recorded but never reached the queue (its service was killed, or
            # the broker went, in between): the client's retry dispatches it. Should two retries
            # both send it, the worker's go-ahead keeps a finished job from running again.
            await self._dispatch(job)
            job = await self.store.job(command.inference_id) or job
        return StartedInference(
            inference=InferenceStart(
                inference_id=job.id,
                status=job.status,
                endpoint_name=job.endpoint_name,
                output_path=self.storage.uri(domain.output_prefix(job.id)),
            ),
            inference_type=job.inference_type,
        )

    async def _dispatch(self, job: InferenceJob) -> None:
        run = RunInference(
            inference_id=job.id,
            task_type=job.task_type,
            payload_key=job.payload_key,
            output_prefix=domain.output_prefix(job.id),
            models=job.files,
            owner=job.owner,
            preview_every=job.preview_every,
        )
        await send_work(self.broker, self.names, queue_of(job.endpoint_name), run)
        await self.store.transition_job(job.id, [status.value for status in JobStatus], dispatched=True)
        log.info("inference.dispatched", inference_id=job.id, endpoint=job.endpoint_name)

    async def get(self, command: GetInference) -> InferenceView:
        job = await self.store.job(command.inference_id)
        if job is None:
            raise NotFound(f"inference with id {command.inference_id} not found")
        domain.check_owner(command.actor, job)
        return await self._view(job)

    async def _view(self, job: InferenceJob) -> InferenceView:
        prefix = domain.output_prefix(job.id)
        succeeded = job.status is JobStatus.SUCCEEDED
        images = [await self.storage.presign_get(f"{prefix}/{name}") for name in job.image_names] if succeeded else []
        outputs = [await self.storage.presign_get(f"{prefix}/{job.id}_param.json")] if succeeded else []
        used: dict[str, list[UsedModel]] = {}
        for file in job.files:
            used.setdefault(file.type.value, []).append(
                UsedModel(
                    s3=self.storage.uri(file.key.rsplit("/", 1)[0]),
                    id=file.checkpoint_id,
                    model_name=file.name,
                    type=file.type.value,
                )
            )
        for ref in job.models:
            if ref.id == "VAE":
                used.setdefault("VAE", []).extend(
                    UsedModel(s3="None", id="VAE", model_name=name, type="VAE") for name in ref.name
                )
        return InferenceView(
            img_presigned_urls=images,
            output_presigned_urls=outputs,
            inference_info_name=f"{job.id}_param.json",
            InferenceJobId=job.id,
            status=job.status,
            taskType=job.task_type,
            inference_type=job.inference_type,
            createTime=esd_time(job.created),
            startTime=esd_time(job.start_time),
            completeTime=esd_time(job.complete_time),
            image_names=job.image_names,
            owner_group_or_role=[job.owner],
            params=InferenceParams(
                input_body_presign_url=await self.storage.presign_get(job.payload_key),
                input_body_s3=self.storage.uri(job.payload_key),
                used_models=used,
                sagemaker_inference_endpoint_id=job.endpoint_id,
                sagemaker_inference_endpoint_name=job.endpoint_name,
                sagemaker_inference_instance_type=job.instance_type,
            ),
            error=job.error or None,
            progress=job.progress if job.status is JobStatus.IN_PROGRESS else None,
            info=job.info or None,
        )

    async def list(self, command: ListInferences) -> InferencePage:
        owner = domain.jobs_listed_owner(command.actor, command.username)
        limit = max(1, min(command.limit, 100))
        jobs = await self.store.page_jobs(
            task_type=command.task_type, owner=owner, before=decode_position(command.exclusive_start_key), limit=limit
        )
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return InferencePage(
            inferences=[await self._view(job) for job in jobs],
            last_evaluated_key=encode_position(jobs[-1].created) if more else None,
        )

    async def delete(self, command: DeleteInferences) -> None:
        for inference_id in dict.fromkeys(command.inference_id_list):
            job = await self.store.job(inference_id)
            if job is None:
                continue
            domain.check_owner(command.actor, job)
            await self.storage.delete_prefix(job.payload_key.rsplit("/", 1)[0] + "/")
            await self.storage.delete_prefix(f"out/{inference_id}/")
            await self.store.remove_job(inference_id)
            log.info("inference.deleted", inference_id=inference_id, actor=command.actor.username)

    # --- what workers report ---

    async def started(self, report: ReportInferenceStarted) -> GoAhead:
        job = await self.store.job(report.inference_id)
        if job is None:
            return GoAhead(run=False, reason="the job was deleted")
        if job.finished:
            return GoAhead(run=False, reason=f"the job already {job.status.value}")
        if await self.store.count_attempt(report.inference_id) > MAX_JOB_ATTEMPTS:
            await self.fail(
                report.inference_id, f"gave up after {MAX_JOB_ATTEMPTS} attempts: workers stopped while running it"
            )
            return GoAhead(run=False, reason="too many attempts")
        started = InferenceStarted(
            inference_id=report.inference_id,
            endpoint_name=job.endpoint_name,
            worker_id=report.worker_id,
            owner=job.owner,
        )
        await self.store.update_job(
            report.inference_id,
            [started],
            status=JobStatus.IN_PROGRESS,
            worker_id=report.worker_id,
            run_started=time.time(),
        )
        return GoAhead(run=True)

    async def succeeded(self, report: ReportInferenceSucceeded) -> None:
        job = await self.store.job(report.inference_id)
        if job is None:
            return
        prefix = domain.output_prefix(report.inference_id)
        succeeded = InferenceSucceeded(
            inference_id=report.inference_id,
            endpoint_name=job.endpoint_name,
            image_keys=[f"{prefix}/{name}" for name in report.image_names],
            owner=job.owner,
        )
        if await self.store.transition_job(
            report.inference_id,
            _UNFINISHED,
            [succeeded],
            status=JobStatus.SUCCEEDED,
            complete_time=time.time(),
            image_names=report.image_names,
            info=await self._info(report),
        ):
            JOBS_BY_STATUS.labels(kind="inference", status=JobStatus.SUCCEEDED.value).inc()
            log.info("inference.succeeded", inference_id=report.inference_id, images=len(report.image_names))

    async def _info(self, report: ReportInferenceSucceeded) -> dict:
        """The A1111 `info` GET /inferences/{id} shows, from the record the worker stored; one
        too large to keep in the job (a long prompt times many images) stays in that record
        alone, which the job links to."""
        if report.info_key is None:
            return report.info
        if not report.info_key.startswith(domain.output_prefix(report.inference_id) + "/"):
            return {}  # not this job's record
        size = await self.storage.size(report.info_key)
        if size is None or size > MAX_INFO_BYTES:
            return {}
        try:
            record = load_json(
                await self.storage.get(report.info_key), what="the job's record", max_depth=self.max_json_depth
            )
        except Invalid:
            return {}
        info = record.get("info") if isinstance(record, dict) else None
        return info if isinstance(info, dict) else {}

    async def failed(self, report: ReportInferenceFailed) -> None:
        await self.fail(report.inference_id, report.error)

    async def fail(self, inference_id: str, error: str) -> None:
        job = await self.store.job(inference_id)
        if job is None:
            return
        failed = InferenceFailed(
            inference_id=inference_id, endpoint_name=job.endpoint_name, error=error, owner=job.owner
        )
        if await self.store.transition_job(
            inference_id, _UNFINISHED, [failed], status=JobStatus.FAILED, complete_time=time.time(), error=error
        ):
            JOBS_BY_STATUS.labels(kind="inference", status=JobStatus.FAILED.value).inc()
            log.warning("inference.failed", inference_id=inference_id, error=error)

    async def progressed(self, event: InferenceProgress) -> None:
        """Stored a few times a second at most (a worker reports every step): enough for a
        client that polls GET /inferences/{id}; one that follows the events sees each."""
        now = time.monotonic()
        last = self.progress_written.get(event.inference_id, 0.0)
        if event.step < event.total and now - last < PROGRESS_STORE_SECONDS:
            return
        if len(self.progress_written) > 10_000:
            self.progress_written.clear()
        self.progress_written[event.inference_id] = now
        progress = domain.progress_of(event.step, event.total, event.eta)
        await self.store.transition_job(
            event.inference_id, [JobStatus.IN_PROGRESS.value], progress=progress.model_dump()
        )

    async def cancel(self, command: CancelInference) -> InferenceView:
        """A queued job never runs (its worker is refused the go-ahead); a running one stops at
        its next step (its worker hears `inference.canceled`)."""
        job = await self.store.job(command.inference_id)
        if job is None:
            raise NotFound(f"inference with id {command.inference_id} not found")
        domain.check_owner(command.actor, job)
        domain.check_cancelable(job)
        canceled = InferenceCanceled(inference_id=job.id, endpoint_name=job.endpoint_name, owner=job.owner)
        if await self.store.transition_job(
            job.id, _UNFINISHED, [canceled], status=JobStatus.CANCELED, complete_time=time.time()
        ):
            JOBS_BY_STATUS.labels(kind="inference", status=JobStatus.CANCELED.value).inc()
            log.info("inference.canceled", inference_id=job.id, actor=command.actor.username)
        else:  # it finished meanwhile
            domain.check_cancelable(await self.store.job(job.id) or job)
        return await self._view(await self.store.job(job.id) or job)
