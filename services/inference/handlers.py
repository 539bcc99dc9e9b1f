"""The inference service's subscribers: endpoint and job commands from the gateway, worker
heartbeats and reports, and the checkpoint events that keep its models read model; plus the
autoscaler, which sizes every pool by its backlog."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import structlog
from faststream.rabbit import RabbitBroker, RabbitMessage

from services.inference import domain
from shared.pools import PoolBackend
from services.inference.scaling import PoolLimits, PoolState, desired_workers
from services.inference.store import InferenceStore
from shared.contracts import checkpoint as checkpoints
from shared.contracts.inference import (
    HEARTBEATS,
    SERVICE,
    CreatedInference,
    CreateEndpoint,
    CreateInference,
    DeleteEndpoints,
    DeleteInferences,
    EndpointDeleted,
    EndpointFailed,
    EndpointInService,
    EndpointPage,
    EndpointStatus,
    EndpointType,
    EndpointView,
    GetInference,
    InferenceFailed,
    InferencePage,
    InferenceProgress,
    InferenceStarted,
    InferenceSucceeded,
    JobFailed,
    JobStartDecision,
    JobStarted,
    JobStatus,
    JobSucceeded,
    ListEndpoints,
    ListInferences,
    ModelFile,
    RunInference,
    StartedInference,
    StartInference,
    WorkerHeartbeat,
    queue_of,
)
from shared.errors import Invalid, NotFound
from shared.esd import decode_position, encode_position, esd_time
from shared.messaging import EventPublisher, Names, QueueDepths, RpcClient, declare_work_queue, register_rpc, send_work
from shared.permissions import allows
from shared.storage import ObjectStore

log = structlog.get_logger(__name__)

HEARTBEAT_SECONDS = 2.0
LIVE_WITHIN = 3 * HEARTBEAT_SECONDS
MAX_JOB_ATTEMPTS = 3
SYSTEM = checkpoints.Principal(username="inference-service", roles=[], permissions=["checkpoint:all"])


class Inference:
    def __init__(
        self,
        store: InferenceStore,
        storage: ObjectStore,
        pools: PoolBackend,
        events: EventPublisher,
        broker: RabbitBroker,
        names: Names,
        depths: QueueDepths,
        *,
        start_timeout: float,
        scale_down_after: float,
    ) -> None:
        self.store = store
        self.storage = storage
        self.pools = pools
        self.events = events
        self.broker = broker
        self.names = names
        self.depths = depths
        self.start_timeout = start_timeout
        self.scale_down_after = scale_down_after
        self.last_busy: dict[str, float] = {}

    # --- endpoints ---

    async def create_endpoint(self, command: CreateEndpoint) -> EndpointView:
        minimum, maximum = command.limits()
        endpoint = {
            "id": str(uuid.uuid4()),
            "name": domain.endpoint_name(command.endpoint_type, command.endpoint_name),
            "type": command.endpoint_type.value,
            "status": EndpointStatus.CREATING.value,
            "instance_type": command.instance_type,
            "autoscaling": command.autoscaling_enabled,
            "initial": command.initial_instance_count,
            "min": minimum,
            "max": maximum,
            "roles": list(dict.fromkeys(command.assign_to_roles)),
            "owner": command.actor.username,
            "created": time.time(),
        }
        await self.store.add_endpoint(endpoint)
        await declare_work_queue(self.broker, self.names, queue_of(endpoint["name"]))
        count = command.initial_instance_count if not command.autoscaling_enabled else max(minimum, min(command.initial_instance_count, maximum))
        await self.pools.scale(endpoint["name"], count)
        log.info("endpoint.created", endpoint=endpoint["name"], workers=count, actor=command.actor.username)
        return domain.endpoint_view(endpoint, 0)

    async def list_endpoints(self, command: ListEndpoints) -> EndpointPage:
        roles = command.as_roles if command.as_roles is not None else command.actor.roles
        everything = command.as_roles is None and allows(command.actor.permissions, "sagemaker_endpoint:all")
        views = []
        for endpoint in await self.store.all_endpoints():
            if everything or domain.shares_a_role(endpoint["roles"], roles):
                live = await self.store.live_workers(endpoint["name"], LIVE_WITHIN)
                views.append(domain.endpoint_view(endpoint, len(live)))
        return EndpointPage(endpoints=views)

    async def delete_endpoints(self, command: DeleteEndpoints) -> None:
        for name in dict.fromkeys(command.endpoint_name_list):
            endpoint = await self.store.endpoint(name)
            if endpoint is None:
                continue
            await self.store.update_endpoint(name, status=EndpointStatus.DELETING.value)
            await self.pools.stop(name)  # running jobs finish first
            await self._fail_queued(name)
            await self.store.remove_endpoint(name)
            log.info("endpoint.deleted", endpoint=name, actor=command.actor.username)
            await self.events.publish(EndpointDeleted(endpoint_name=name, endpoint_status=EndpointStatus.DELETING, current_instance_count=0))

    async def _fail_queued(self, name: str) -> None:
        queue = await self.broker.declare_queue(self.names.work_queue(queue_of(name)))
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            run = RunInference.model_validate_json(message.body)
            await self._finish_failed(run.inference_id, f"endpoint {name} was deleted before the job ran")
        # The empty queue stays: declarations are cached per process, so a queue deleted here
        # would not be declared again for a new endpoint of the same name.

    async def heartbeat(self, beat: WorkerHeartbeat) -> None:
        if beat.state == "stopping":
            await self.store.forget_worker(beat.worker_id)
            return
        await self.store.heartbeat(beat.worker_id, beat.endpoint_name, beat.state, beat.at)
        endpoint = await self.store.endpoint(beat.endpoint_name)
        if endpoint and endpoint["status"] in (EndpointStatus.CREATING, EndpointStatus.FAILED) and beat.state in ("ready", "busy"):
            await self.store.update_endpoint(beat.endpoint_name, status=EndpointStatus.IN_SERVICE.value, ready_at=time.time(), error=None)
            log.info("endpoint.in_service", endpoint=beat.endpoint_name, worker_id=beat.worker_id)
            await self.events.publish(EndpointInService(endpoint_name=beat.endpoint_name, endpoint_status=EndpointStatus.IN_SERVICE, current_instance_count=1))

    async def autoscale_once(self) -> None:
        now = time.time()
        for endpoint in await self.store.all_endpoints():
            name = endpoint["name"]
            if endpoint["status"] == EndpointStatus.DELETING:
                continue
            live = await self.store.live_workers(name, LIVE_WITHIN)
            busy = sum(1 for worker in live if worker["state"] == "busy")
            queued = await self.depths.depth(self.names.work_queue(queue_of(name)).name)
            if queued or busy:
                self.last_busy[name] = now
            # idle counts from when the pool went into service: never while it is starting
            since = max(self.last_busy.get(name, 0.0), endpoint.get("ready_at") or now)
            state = PoolState(queued=queued, busy=busy, current=self.pools.count(name), idle_seconds=now - since)
            limits = PoolLimits(minimum=endpoint["min"], maximum=endpoint["max"], autoscaling=endpoint["autoscaling"], scale_down_after=self.scale_down_after)
            wanted = desired_workers(state, limits, endpoint["initial"])
            if wanted != state.current:
                log.info("pool.scaling", endpoint=name, queued=queued, busy=busy, current=state.current, wanted=wanted)
                await self.pools.scale(name, wanted)
            if endpoint["status"] == EndpointStatus.CREATING and not live and now - endpoint["created"] > self.start_timeout:
                error = f"no worker reported ready within {self.start_timeout:g} s; see the worker logs"
                await self.store.update_endpoint(name, status=EndpointStatus.FAILED.value, error=error)
                log.warning("endpoint.failed", endpoint=name, error=error)
                await self.events.publish(EndpointFailed(endpoint_name=name, endpoint_status=EndpointStatus.FAILED, current_instance_count=0))

    async def autoscale_forever(self, interval: float = 1.0) -> None:
        while True:
            try:
                await self.autoscale_once()
            except Exception:
                log.exception("autoscaler.failed")
            await asyncio.sleep(interval)

    # --- the models read model ---

    async def on_checkpoint(self, event: dict[str, Any], routing_key: str) -> None:
        checkpoint_id = event.get("checkpoint_id")
        if not checkpoint_id:
            return
        if routing_key in (checkpoints.CheckpointActivated.routing_key, checkpoints.CheckpointRenamed.routing_key):
            await self.store.put_model(
                checkpoint_id,
                type=event["checkpoint_type"],
                names=event["names"],
                prefix=event["s3_location"].split("/", 3)[3],
                allowed_roles=event["allowed_roles"],
            )
        elif routing_key in (checkpoints.CheckpointDisabled.routing_key, checkpoints.CheckpointDeleted.routing_key):
            await self.store.drop_model(checkpoint_id)

    async def backfill_models(self, rpc: RpcClient) -> None:
        """At start, learn the checkpoints activated while this service was not listening."""
        page = 1
        while True:
            listing = await rpc.call(
                checkpoints.SERVICE, "list",
                checkpoints.ListCheckpoints(actor=SYSTEM, page=page, per_page=500, status=[checkpoints.CheckpointStatus.ACTIVE]),
                checkpoints.CheckpointPage,
            )
            for item in listing.checkpoints:
                await self.store.put_model(
                    item.id, type=item.type.value, names=item.name,
                    prefix=item.s3Location.split("/", 3)[3], allowed_roles=item.allowed_roles_or_users,
                )
            if page >= listing.pages:
                return
            page += 1

    # --- jobs ---

    async def create_inference(self, command: CreateInference) -> CreatedInference:
        domain.check_task_type(command.task_type)
        endpoint = domain.choose_endpoint(
            await self.store.all_endpoints(),
            inference_type=command.inference_type,
            named=command.sagemaker_endpoint_name,
            username=command.actor.username,
            roles=command.actor.roles,
        )
        domain.check_runnable(command.task_type, command.models)
        files: list[ModelFile] = []
        refs: dict[str, dict[str, Any]] = {}
        missing: list[str] = []
        for checkpoint_type, name in domain.requested_models(command.models):
            model = await self.store.find_model(checkpoint_type, name)
            if model is None:
                missing.append(f"checkpoint with name {name}, type {checkpoint_type} is not found")
                continue
            files.append(ModelFile(type=checkpoint_type, checkpoint_id=model["checkpoint_id"], name=name, key=f"{model['prefix']}/{name}"))
            ref = refs.setdefault(checkpoint_type, {"id": model["checkpoint_id"], "name": [], "type": checkpoint_type})
            ref["name"].append(name)
        if missing:
            raise Invalid(" ".join(missing))
        for vae in command.models.get("VAE", []):
            if vae in domain.PASS_THROUGH_VAES:
                refs.setdefault("VAE", {"id": "VAE", "name": [], "type": "VAE"})["name"].append(vae)
        payload = None
        if command.payload_string is not None:
            try:
                payload = json.loads(command.payload_string)
            except ValueError:
                raise Invalid("payload_string must be valid json string") from None
        inference_id = str(uuid.uuid4())
        key = domain.payload_key(command.task_type, inference_id)
        job = {
            "id": inference_id,
            "task_type": command.task_type,
            "inference_type": command.inference_type.value,
            "status": JobStatus.CREATED.value,
            "owner": command.actor.username,
            "roles": command.actor.roles,
            "endpoint_name": endpoint["name"],
            "endpoint_id": endpoint["id"],
            "instance_type": endpoint["instance_type"],
            "models": list(refs.values()),
            "files": [file.model_dump(mode="json") for file in files],
            "payload_key": key,
            "created": time.time(),
            "image_names": [],
            "attempts": 0,
        }
        if payload is not None:
            await self.storage.put(key, command.payload_string.encode(), "application/json")
        await self.store.add_job(job)
        log.info("inference.created", inference_id=inference_id, endpoint=endpoint["name"], actor=command.actor.username)
        reply = {
            "id": inference_id,
            "type": command.task_type,
            "api_params_s3_location": self.storage.uri(key),
            "api_params_s3_upload_url": await self.storage.presign_put(key),
            "models": job["models"],
        }
        return CreatedInference(inference=reply)

    async def start_inference(self, command: StartInference) -> StartedInference:
        job = await self.store.job(command.inference_id)
        if job is None:
            raise Invalid(f"InferenceJobId {command.inference_id} not found")
        self._check_owner(command.actor, job)
        if job["status"] == JobStatus.CREATED:
            if await self.storage.size(job["payload_key"]) is None:
                raise Invalid("api_param.json has not been uploaded yet: PUT it to api_params_s3_upload_url first")
            endpoint = await self.store.endpoint(job["endpoint_name"])
            if endpoint is None:
                raise Invalid(f"endpoint {job['endpoint_name']} no longer exists")
            if await self.store.transition_job(job["id"], [JobStatus.CREATED.value], status=JobStatus.IN_PROGRESS.value, start_time=time.time()):
                run = RunInference(
                    inference_id=job["id"],
                    task_type=job["task_type"],
                    payload_key=job["payload_key"],
                    output_prefix=domain.output_prefix(job["id"]),
                    models=[ModelFile.model_validate(file) for file in job["files"]],
                )
                await send_work(self.broker, self.names, queue_of(job["endpoint_name"]), run)
                log.info("inference.dispatched", inference_id=job["id"], endpoint=job["endpoint_name"])
        job = await self.store.job(command.inference_id) or job
        return StartedInference(
            inference={
                "inference_id": job["id"],
                "status": job["status"],
                "endpoint_name": job["endpoint_name"],
                "output_path": self.storage.uri(domain.output_prefix(job["id"])),
            },
            inference_type=EndpointType(job["inference_type"]),
        )

    def _check_owner(self, actor, job: dict[str, Any]) -> None:
        if job["owner"] != actor.username and not allows(actor.permissions, "inference:all"):
            raise NotFound(f"inference with id {job['id']} not found")

    async def get_inference(self, command: GetInference) -> dict[str, Any]:
        job = await self.store.job(command.inference_id)
        if job is None:
            raise NotFound(f"inference with id {command.inference_id} not found")
        self._check_owner(command.actor, job)
        return await self._view(job)

    async def _view(self, job: dict[str, Any]) -> dict[str, Any]:
        prefix = domain.output_prefix(job["id"])
        succeeded = job["status"] == JobStatus.SUCCEEDED
        images = [await self.storage.presign_get(f"{prefix}/{name}") for name in job["image_names"]] if succeeded else []
        outputs = [await self.storage.presign_get(f"{prefix}/{job['id']}_param.json")] if succeeded else []
        used: dict[str, list[dict[str, Any]]] = {}
        for file in job["files"]:
            used.setdefault(file["type"], []).append({
                "s3": self.storage.uri(file["key"].rsplit("/", 1)[0]),
                "id": file["checkpoint_id"], "model_name": file["name"], "type": file["type"],
            })
        for ref in job["models"]:
            if ref["id"] == "VAE":
                used.setdefault("VAE", []).extend({"s3": "None", "id": "VAE", "model_name": n, "type": "VAE"} for n in ref["name"])
        view = {
            "img_presigned_urls": images,
            "output_presigned_urls": outputs,
            "inference_info_name": f"{job['id']}_param.json",
            "InferenceJobId": job["id"],
            "status": job["status"],
            "taskType": job["task_type"],
            "inference_type": job["inference_type"],
            "createTime": esd_time(job["created"]),
            "startTime": esd_time(job.get("start_time")),
            "completeTime": esd_time(job.get("complete_time")),
            "image_names": job["image_names"],
            "owner_group_or_role": [job["owner"]],
            "params": {
                "input_body_presign_url": await self.storage.presign_get(job["payload_key"]),
                "input_body_s3": self.storage.uri(job["payload_key"]),
                "used_models": used,
                "sagemaker_inference_endpoint_id": job["endpoint_id"],
                "sagemaker_inference_endpoint_name": job["endpoint_name"],
                "sagemaker_inference_instance_type": job["instance_type"],
            },
        }
        if job.get("error"):
            view["error"] = job["error"]
        if job.get("progress") and job["status"] == JobStatus.IN_PROGRESS:
            view["progress"] = job["progress"]
        if job.get("info"):
            view["info"] = job["info"]
        return view

    async def list_inferences(self, command: ListInferences) -> InferencePage:
        owner = command.username
        if owner is None and not allows(command.actor.permissions, "inference:all"):
            owner = command.actor.username
        limit = max(1, min(command.limit, 100))
        jobs = await self.store.page_jobs(
            task_type=command.task_type, owner=owner, before=decode_position(command.exclusive_start_key), limit=limit
        )
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return InferencePage(
            inferences=[await self._view(job) for job in jobs],
            last_evaluated_key=encode_position(jobs[-1]["created"]) if more else None,
        )

    async def delete_inferences(self, command: DeleteInferences) -> None:
        for inference_id in dict.fromkeys(command.inference_id_list):
            job = await self.store.job(inference_id)
            if job is None:
                continue
            self._check_owner(command.actor, job)
            await self.storage.delete_prefix(job["payload_key"].rsplit("/", 1)[0] + "/")
            await self.storage.delete_prefix(f"out/{inference_id}/")
            await self.store.remove_job(inference_id)
            log.info("inference.deleted", inference_id=inference_id, actor=command.actor.username)

    # --- worker reports ---

    async def job_started(self, report: JobStarted) -> JobStartDecision:
        job = await self.store.job(report.inference_id)
        if job is None:
            return JobStartDecision(run=False, reason="the job was deleted")
        if job["status"] in (JobStatus.SUCCEEDED, JobStatus.FAILED):
            return JobStartDecision(run=False, reason=f"the job already {job['status']}")
        attempts = await self.store.count_attempt(report.inference_id)
        if attempts > MAX_JOB_ATTEMPTS:
            await self._finish_failed(report.inference_id, f"gave up after {MAX_JOB_ATTEMPTS} attempts: workers stopped while running it")
            return JobStartDecision(run=False, reason="too many attempts")
        await self.store.update_job(report.inference_id, status=JobStatus.IN_PROGRESS.value, worker_id=report.worker_id, run_started=time.time())
        await self.events.publish(InferenceStarted(inference_id=report.inference_id, endpoint_name=job["endpoint_name"], worker_id=report.worker_id))
        return JobStartDecision(run=True)

    async def job_succeeded(self, report: JobSucceeded) -> None:
        job = await self.store.job(report.inference_id)
        if job is None:
            return
        done = await self.store.transition_job(
            report.inference_id, [JobStatus.IN_PROGRESS.value, JobStatus.CREATED.value],
            status=JobStatus.SUCCEEDED.value, complete_time=time.time(), image_names=report.image_names, info=report.info,
        )
        if done:
            prefix = domain.output_prefix(report.inference_id)
            log.info("inference.succeeded", inference_id=report.inference_id, images=len(report.image_names))
            await self.events.publish(InferenceSucceeded(
                inference_id=report.inference_id, endpoint_name=job["endpoint_name"],
                image_keys=[f"{prefix}/{name}" for name in report.image_names], owner=job["owner"],
            ))

    async def job_failed(self, report: JobFailed) -> None:
        await self._finish_failed(report.inference_id, report.error)

    async def _finish_failed(self, inference_id: str, error: str) -> None:
        job = await self.store.job(inference_id)
        if job is None:
            return
        if await self.store.transition_job(
            inference_id, [JobStatus.IN_PROGRESS.value, JobStatus.CREATED.value],
            status=JobStatus.FAILED.value, complete_time=time.time(), error=error,
        ):
            log.warning("inference.failed", inference_id=inference_id, error=error)
            await self.events.publish(InferenceFailed(inference_id=inference_id, endpoint_name=job["endpoint_name"], error=error, owner=job["owner"]))

    async def on_progress(self, event: InferenceProgress) -> None:
        await self.store.update_job(event.inference_id, progress={"step": event.step, "total": event.total})


def register(broker: RabbitBroker, names: Names, inference: Inference) -> None:
    register_rpc(broker, names, SERVICE, {
        "create_endpoint": inference.create_endpoint,
        "list_endpoints": inference.list_endpoints,
        "delete_endpoints": inference.delete_endpoints,
        "create": inference.create_inference,
        "start": inference.start_inference,
        "get": inference.get_inference,
        "list": inference.list_inferences,
        "delete": inference.delete_inferences,
        "job_started": inference.job_started,
        "job_succeeded": inference.job_succeeded,
        "job_failed": inference.job_failed,
    })
    broker.subscriber(names.work_queue(HEARTBEATS))(inference.heartbeat)

    @broker.subscriber(names.event_queue(SERVICE, "checkpoints", "checkpoint.*"), names.events)
    async def checkpoint_changed(event: dict, message: RabbitMessage) -> None:
        await inference.on_checkpoint(event, message.raw_message.routing_key or "")

    broker.subscriber(names.event_queue(SERVICE, "progress", InferenceProgress.routing_key), names.events)(inference.on_progress)
