"""Checkpoints: model files in object storage, uploaded in parts through presigned URLs,
downloaded from a URL, renamed, disabled, deleted, and registered when another service made
the file (a trained LoRA). Each use case loads the checkpoint, asks the domain, stores the
outcome and publishes what happened."""

from __future__ import annotations

import time
import uuid
from datetime import datetime

import structlog
from botocore.exceptions import ClientError
from faststream.rabbit import RabbitBroker

from services.checkpoint import domain
from services.checkpoint.domain import Checkpoint
from services.checkpoint.downloads import Downloader
from services.checkpoint.store import CheckpointStore
from shared.contracts.checkpoint import (
    DOWNLOADS,
    RENAMES,
    CheckFileName,
    CheckpointActivated,
    CheckpointDeleted,
    CheckpointDisabled,
    CheckpointFailed,
    CheckpointItem,
    CheckpointPage,
    CheckpointRenamed,
    CheckpointStatus,
    CreateCheckpoint,
    CreatedCheckpoint,
    DeleteCheckpoints,
    DownloadCheckpoint,
    FileNameUse,
    FindCheckpoint,
    GetCheckpoint,
    ListCheckpoints,
    RegisterCheckpoint,
    RenameCheckpoint,
    UpdateCheckpoint,
    UpdatedCheckpoint,
)
from shared.contracts.identity import Principal
from shared.errors import Invalid, NotFound
from shared.messaging import Names, send_work
from shared.storage import ObjectStore

log = structlog.get_logger(__name__)

MAX_DOWNLOAD_ATTEMPTS = 3
S3_COPY_LIMIT = 5 * 1024**3


class Checkpoints:
    def __init__(
        self,
        store: CheckpointStore,
        storage: ObjectStore,
        downloader: Downloader,
        broker: RabbitBroker,
        names: Names,
    ) -> None:
        self.store = store
        self.storage = storage
        self.downloader = downloader
        self.broker = broker
        self.names = names

    # --- commands ---

    async def create(self, command: CreateCheckpoint) -> CreatedCheckpoint:
        if command.filenames is not None:
            return await self._create_multipart(command)
        return await self._create_from_urls(command)

    def _new(self, command: CreateCheckpoint, names: list[str], urls: list[str] | None = None) -> Checkpoint:
        params = {key: value for key, value in command.params.items() if key != "multipart_upload"}
        params.update(creator=command.actor.username, created=str(datetime.now()))
        return Checkpoint(
            id=str(uuid.uuid4()),
            type=command.checkpoint_type,
            status=CheckpointStatus.INITIAL,
            names=names,
            bucket=self.storage.bucket,
            params=params,
            allowed_roles=list(command.actor.roles) or [command.actor.username],
            created=time.time(),
            urls=urls or [],
        )

    async def _create_multipart(self, command: CreateCheckpoint) -> CreatedCheckpoint:
        files = command.filenames or []
        names = [file.filename for file in files]
        if (twice := domain.duplicates_within(names)) is not None:
            raise Invalid(f"{twice} is given twice")
        checkpoint = self._new(command, names)
        await self.store.reserve_names(names, checkpoint.id)
        uploads: dict[str, dict] = {}
        presigned: dict[str, list[str]] = {}
        try:
            for file in files:
                key = checkpoint.key(file.filename)
                upload_id = await self.storage.start_multipart(key)
                uploads[file.filename] = {"upload_id": upload_id, "bucket": self.storage.bucket, "key": key}
                presigned[file.filename] = [
                    await self.storage.presign_part(key, upload_id, part) for part in range(1, file.parts_number + 1)
                ]
            checkpoint.params["multipart_upload"] = uploads
            await self.store.insert(checkpoint)
        except BaseException:
            for upload in uploads.values():
                await self.storage.abort_multipart(upload["key"], upload["upload_id"])
            await self.store.release_names(names, checkpoint.id)
            raise
        log.info("checkpoint.created", checkpoint_id=checkpoint.id, files=names, actor=command.actor.username)
        return CreatedCheckpoint(checkpoint=checkpoint.view(), s3PresignUrl=presigned)

    async def _create_from_urls(self, command: CreateCheckpoint) -> CreatedCheckpoint:
        urls = list(dict.fromkeys(url.strip() for url in command.urls or []))
        for url in urls:
            domain.check_url(url)
        created: list[Checkpoint] = []
        for url in urls:
            checkpoint = self._new(command, [], urls=[url])
            checkpoint.names = [domain.provisional_name(url, checkpoint.id)]
            await self.store.reserve_names(checkpoint.names, checkpoint.id)
            await self.store.insert(checkpoint)
            await send_work(self.broker, self.names, DOWNLOADS, DownloadCheckpoint(checkpoint_id=checkpoint.id))
            log.info("checkpoint.download_queued", checkpoint_id=checkpoint.id, url=url)
            created.append(checkpoint)
        return CreatedCheckpoint(checkpoints=[checkpoint.view() for checkpoint in created])

    async def _get(self, checkpoint_id: str) -> Checkpoint:
        checkpoint = await self.store.get(checkpoint_id)
        if checkpoint is None:
            raise NotFound(f"checkpoint not found with id {checkpoint_id}")
        return checkpoint

    async def _reachable(self, checkpoint_id: str, actor: Principal) -> Checkpoint:
        """The checkpoint, if the actor may reach it; another role's is not found."""
        checkpoint = await self._get(checkpoint_id)
        if not domain.reachable(checkpoint, actor):
            raise NotFound(f"checkpoint not found with id {checkpoint_id}")
        return checkpoint

    async def update(self, command: UpdateCheckpoint) -> UpdatedCheckpoint:
        checkpoint = await self._reachable(command.checkpoint_id, command.actor)
        if command.status is not None:
            await self._change_status(checkpoint, command)
            return UpdatedCheckpoint(status=200, checkpoint=(await self._get(checkpoint.id)).view())
        if command.name is not None:
            new_name = domain.renamed(checkpoint, command.name)
            if new_name is None:
                return UpdatedCheckpoint(status=200, message="no need to update")
            await self.store.reserve_names([new_name], checkpoint.id)
            await send_work(
                self.broker,
                self.names,
                RENAMES,
                RenameCheckpoint(checkpoint_id=checkpoint.id, old_name=checkpoint.names[0], new_name=new_name),
            )
            return UpdatedCheckpoint(status=202, message="rename is processing, please wait")
        return UpdatedCheckpoint(status=200)

    async def _change_status(self, checkpoint: Checkpoint, command: UpdateCheckpoint) -> None:
        wanted = command.status
        assert wanted is not None
        if wanted is CheckpointStatus.ACTIVE and checkpoint.status is CheckpointStatus.INITIAL:
            if checkpoint.urls:
                raise Invalid("this checkpoint is still downloading; it turns Active by itself")
            domain.check_activation(checkpoint, command.multi_parts_tags)
            for name, tags in (command.multi_parts_tags or {}).items():
                await self._complete(checkpoint, name, [(tag.PartNumber, tag.ETag) for tag in tags])
            if await self.store.transition(
                checkpoint.id,
                [CheckpointStatus.INITIAL],
                [CheckpointActivated(**self._changed(checkpoint))],
                status=CheckpointStatus.ACTIVE,
            ):
                log.info("checkpoint.activated", checkpoint_id=checkpoint.id, actor=command.actor.username)
            return
        domain.check_status_change(checkpoint, wanted)
        if wanted is checkpoint.status:
            return
        event = CheckpointActivated if wanted is CheckpointStatus.ACTIVE else CheckpointDisabled
        if await self.store.transition(
            checkpoint.id, [checkpoint.status], [event(**self._changed(checkpoint))], status=wanted
        ):
            log.info("checkpoint.status_changed", checkpoint_id=checkpoint.id, status=wanted.value)

    async def _complete(self, checkpoint: Checkpoint, name: str, parts: list[tuple[int, str]]) -> None:
        upload = checkpoint.params.get("multipart_upload", {}).get(name)
        if upload is None:
            raise Invalid(f"{name} has no multipart upload")
        try:
            await self.storage.complete_multipart(upload["key"], upload["upload_id"], parts)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code == "NoSuchUpload" and await self.storage.size(upload["key"]) is not None:
                return  # completed by an earlier try of this same request
            detail = error.response.get("Error", {}).get("Message") or code or str(error)
            raise Invalid(f"could not complete the upload of {name}: {detail}") from None

    async def delete(self, command: DeleteCheckpoints) -> None:
        for checkpoint_id in dict.fromkeys(command.checkpoint_id_list):
            checkpoint = await self.store.get(checkpoint_id)
            if checkpoint is None or not domain.reachable(checkpoint, command.actor):
                continue  # another role's checkpoint is as unknown as a missing one
            for upload in checkpoint.params.get("multipart_upload", {}).values():
                if checkpoint.status is CheckpointStatus.INITIAL and upload:
                    await self.storage.abort_multipart(upload["key"], upload["upload_id"])
            removed = await self.storage.delete_prefix(checkpoint.prefix + "/")
            await self.store.delete(checkpoint.id, CheckpointDeleted(**self._changed(checkpoint)))
            await self.store.release_names(checkpoint.names, checkpoint.id)
            log.info("checkpoint.deleted", checkpoint_id=checkpoint.id, objects=removed, actor=command.actor.username)

    async def list(self, command: ListCheckpoints) -> CheckpointPage:
        total, checkpoints = await self.store.page(
            types=command.types,
            statuses=command.status,
            owners=domain.owner_filters(command.actor, command.subject),
            skip=(command.page - 1) * command.per_page,
            limit=command.per_page,
        )
        return CheckpointPage(
            page=command.page,
            per_page=command.per_page,
            pages=domain.page_count(total, command.per_page),
            total=total,
            checkpoints=[checkpoint.item() for checkpoint in checkpoints],
        )

    async def get(self, command: GetCheckpoint) -> CheckpointItem:
        return (await self._reachable(command.checkpoint_id, command.actor)).item()

    async def find(self, command: FindCheckpoint) -> CheckpointItem:
        not_found = NotFound(f"checkpoint with name {command.name}, type {command.checkpoint_type.value} is not found")
        holder = await self.store.holder(command.name)
        checkpoint = await self.store.get(holder) if holder else None
        if (
            checkpoint is None
            or checkpoint.type is not command.checkpoint_type
            or checkpoint.status is not CheckpointStatus.ACTIVE
            or not domain.reachable(checkpoint, command.actor)  # another role's is not there for it
        ):
            raise not_found
        return checkpoint.item()

    async def check_file_name(self, command: CheckFileName) -> FileNameUse:
        holder = await self.store.holder(command.name)
        return FileNameUse(taken=holder is not None, checkpoint_id=holder)

    async def register(self, command: RegisterCheckpoint) -> CheckpointItem:
        existing = await self.store.get(command.checkpoint_id)
        if existing is not None:
            return existing.item()  # registered by an earlier delivery of this request
        name = command.name
        if await self.store.holder(name) is not None:  # keep the file's name when free
            stem, dot, extension = name.rpartition(".")
            name = (
                f"{stem}-{command.checkpoint_id[:8]}{dot}{extension}" if dot else f"{name}-{command.checkpoint_id[:8]}"
            )
        params = {**command.params, "creator": command.actor.username, "created": str(datetime.now())}
        checkpoint = Checkpoint(
            id=command.checkpoint_id,
            type=command.checkpoint_type,
            status=CheckpointStatus.INITIAL,
            names=[name],
            bucket=self.storage.bucket,
            params=params,
            allowed_roles=list(command.actor.roles) or [command.actor.username],
            created=time.time(),
        )
        await self.store.reserve_names([name], checkpoint.id)
        size = await self.storage.size(command.source_key)
        if size is None:
            await self.store.release_names([name], checkpoint.id)
            raise Invalid(f"{command.source_key} does not exist in storage")
        await self._copy(command.source_key, checkpoint.key(name), size)
        checkpoint.status = CheckpointStatus.ACTIVE
        await self.store.insert(checkpoint, [CheckpointActivated(**self._changed(checkpoint))])
        log.info("checkpoint.registered", checkpoint_id=checkpoint.id, file=name, actor=command.actor.username)
        return checkpoint.item()

    # --- work ---

    async def download(self, message: DownloadCheckpoint) -> None:
        checkpoint = await self.store.get(message.checkpoint_id)
        if checkpoint is None or checkpoint.status is not CheckpointStatus.INITIAL:
            return  # deleted meanwhile, or done by an earlier delivery
        if checkpoint.attempts >= MAX_DOWNLOAD_ATTEMPTS:
            await self._fail(checkpoint, f"gave up after {checkpoint.attempts} interrupted attempts")
            return
        await self.store.count_attempt(checkpoint.id)
        url = checkpoint.urls[0]
        log.info("checkpoint.download_started", checkpoint_id=checkpoint.id, url=url)

        async def name_found(name: str) -> str:
            if name != checkpoint.names[0]:
                await self.store.reserve_names([name], checkpoint.id)
                await self.store.release_names(checkpoint.names, checkpoint.id)
                checkpoint.names = [name]
                await self.store.update(checkpoint.id, names=checkpoint.names)
            return checkpoint.key(name)

        async def progress(done: int, total: int | None) -> None:
            await self.store.update(checkpoint.id, progress={"downloaded_bytes": done, "total_bytes": total})

        try:
            name, size = await self.downloader.download(
                url, name_found=name_found, progress=progress, checkpoint_type=checkpoint.type
            )
        except Invalid as error:
            await self._fail(checkpoint, error.message)
            return
        except Exception as error:  # a bug, or storage away mid-stream: said, never left Initial
            log.exception("checkpoint.download_crashed", checkpoint_id=checkpoint.id)
            await self._fail(checkpoint, f"the download failed: {type(error).__name__}: {error}")
            return
        activated = CheckpointActivated(**self._changed(checkpoint))
        if not await self.store.transition(
            checkpoint.id, [CheckpointStatus.INITIAL], [activated], status=CheckpointStatus.ACTIVE
        ):
            # deleted while downloading: what was written has no owner
            await self.storage.delete_prefix(checkpoint.prefix + "/")
            return
        log.info("checkpoint.downloaded", checkpoint_id=checkpoint.id, file=name, bytes=size)

    async def _fail(self, checkpoint: Checkpoint, error: str) -> None:
        """A failed download holds no file: its name is free for the next try."""
        log.warning("checkpoint.failed", checkpoint_id=checkpoint.id, error=error)
        await self.store.update(
            checkpoint.id,
            [CheckpointFailed(checkpoint_id=checkpoint.id, error=error)],
            status=CheckpointStatus.FAILED,
            error=error,
        )
        await self.store.release_names(checkpoint.names, checkpoint.id)

    async def rename(self, message: RenameCheckpoint) -> None:
        checkpoint = await self.store.get(message.checkpoint_id)
        if checkpoint is None or checkpoint.names[:1] != [message.old_name]:
            return  # deleted, or renamed by an earlier delivery
        source, target = checkpoint.key(message.old_name), checkpoint.key(message.new_name)
        size = await self.storage.size(source)
        if size is not None:
            await self._copy(source, target, size)
            await self.storage.client.delete_object(Bucket=self.storage.bucket, Key=source)
        checkpoint.names = [message.new_name, *checkpoint.names[1:]]
        await self.store.update(checkpoint.id, [CheckpointRenamed(**self._changed(checkpoint))], names=checkpoint.names)
        await self.store.release_names([message.old_name], checkpoint.id)
        log.info("checkpoint.renamed", checkpoint_id=checkpoint.id, old=message.old_name, new=message.new_name)

    async def _copy(self, source: str, target: str, size: int) -> None:
        bucket = self.storage.bucket
        if size <= S3_COPY_LIMIT:
            await self.storage.client.copy_object(
                Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": source}
            )
            return
        upload_id = await self.storage.start_multipart(target)
        parts = []
        part_size = 1024**3
        for number, start in enumerate(range(0, size, part_size), start=1):
            reply = await self.storage.client.upload_part_copy(
                Bucket=bucket,
                Key=target,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": bucket, "Key": source},
                CopySourceRange=f"bytes={start}-{min(start + part_size, size) - 1}",
            )
            parts.append((number, reply["CopyPartResult"]["ETag"]))
        await self.storage.complete_multipart(target, upload_id, parts)

    @staticmethod
    def _changed(checkpoint: Checkpoint) -> dict:
        return {
            "checkpoint_id": checkpoint.id,
            "checkpoint_type": checkpoint.type,
            "names": checkpoint.names,
            "s3_location": checkpoint.s3_location,
            "allowed_roles": checkpoint.allowed_roles,
        }
