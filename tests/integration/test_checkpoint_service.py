"""The checkpoint service over the real RabbitMQ, the MongoDB wire server and SeaweedFS, with
the production default of refusing internal download addresses."""

import asyncio
import json

import httpx
import pytest
from faststream.rabbit import RabbitBroker

from services.checkpoint.__main__ import setup
from shared.contracts.checkpoint import (
    CREATE_CHECKPOINT,
    DELETE_CHECKPOINTS,
    DOWNLOADS,
    GET_CHECKPOINT,
    SERVICE,
    UPDATE_CHECKPOINT,
    CheckpointItem,
    CreateCheckpoint,
    DeleteCheckpoints,
    GetCheckpoint,
    MultipartFile,
    PartTag,
    UpdateCheckpoint,
)
from shared.contracts.identity import Principal
from shared.messaging import Names, create_broker
from tests.support import wait_for_async

pytestmark = pytest.mark.asyncio(loop_scope="session")

ADMIN = Principal(username="admin", roles=["IT Operator"], permissions=["checkpoint:all"])


@pytest.fixture(scope="module")
async def service(settings_factory, service_runner, s3):
    settings = settings_factory(**s3)  # internal addresses refused: the default
    assert settings.checkpoint_allow_private_urls is False
    await service_runner(SERVICE, setup, settings)
    return settings


@pytest.fixture(scope="module")
async def rpc(service, rpc_factory):
    return await rpc_factory(service)


async def wait_settled(rpc, checkpoint_id: str) -> CheckpointItem:
    async def settled():
        item = await rpc.call(GET_CHECKPOINT, GetCheckpoint(actor=ADMIN, checkpoint_id=checkpoint_id))
        return item if item.status != "Initial" else None

    return await wait_for_async(settled, what="the download to settle")


async def test_internal_addresses_are_refused_by_default(rpc, file_server):
    (file_server.folder / "inside.safetensors").write_bytes(b"x" * 100)
    created = await rpc.call(
        CREATE_CHECKPOINT,
        CreateCheckpoint(checkpoint_type="Lora", urls=[f"{file_server.url}/files/inside.safetensors"], actor=ADMIN),
    )
    item = await wait_settled(rpc, created.checkpoints[0].id)
    assert item.status == "Failed"
    assert "resolves to the internal address 127.0.0.1" in item.error


async def test_activation_and_deletion_are_announced(service, rpc, event_log):
    events = await event_log(service, "checkpoint.*")
    created = await rpc.call(
        CREATE_CHECKPOINT,
        CreateCheckpoint(
            checkpoint_type="VAE", filenames=[MultipartFile(filename="announce.pt", parts_number=1)], actor=ADMIN
        ),
    )
    async with httpx.AsyncClient() as client:
        response = await client.put(created.s3PresignUrl["announce.pt"][0], content=b"vae weights")
    tags = {"announce.pt": [PartTag(ETag=response.headers["etag"], PartNumber=1)]}
    checkpoint_id = created.checkpoint.id
    await rpc.call(
        UPDATE_CHECKPOINT,
        UpdateCheckpoint(checkpoint_id=checkpoint_id, status="Active", multi_parts_tags=tags, actor=ADMIN),
    )
    activated = await events.next("checkpoint.activated")
    for metadata in ("id", "occurred_at", "version"):
        activated.pop(metadata)
    assert activated == {
        "checkpoint_id": checkpoint_id,
        "checkpoint_type": "VAE",
        "names": ["announce.pt"],
        "s3_location": created.checkpoint.s3_location,
        "allowed_roles": ["IT Operator"],
    }
    # activating again (a client retrying) changes and announces nothing
    await rpc.call(
        UPDATE_CHECKPOINT,
        UpdateCheckpoint(checkpoint_id=checkpoint_id, status="Active", multi_parts_tags=tags, actor=ADMIN),
    )
    await rpc.call(DELETE_CHECKPOINTS, DeleteCheckpoints(checkpoint_id_list=[checkpoint_id], actor=ADMIN))
    assert (await events.next("checkpoint.deleted"))["checkpoint_id"] == checkpoint_id


async def test_a_message_that_cannot_be_handled_goes_to_the_dead_letter_queue(service):
    names = Names(service.broker_prefix)
    broker: RabbitBroker = create_broker(service)
    await broker.connect()
    try:
        await broker.publish(
            json.dumps({"not": "a download"}),
            queue=names.work_queue(DOWNLOADS),
            persist=True,
            content_type="application/json",
        )
        dead = await broker.declare_queue(names.dead_letter_queue(DOWNLOADS))

        async def dead_lettered():
            message = await dead.get(no_ack=True, fail=False)
            return message

        message = await wait_for_async(dead_lettered, what="the dead letter")
        assert json.loads(message.body) == {"not": "a download"}
    finally:
        await broker.stop()


async def test_a_redelivered_download_of_a_settled_checkpoint_does_nothing(service, rpc, file_server):
    from shared.contracts.checkpoint import DownloadCheckpoint
    from shared.messaging import send_work

    created = await rpc.call(
        CREATE_CHECKPOINT,
        CreateCheckpoint(checkpoint_type="Lora", urls=[f"{file_server.url}/files/never.safetensors"], actor=ADMIN),
    )
    first = await wait_settled(rpc, created.checkpoints[0].id)
    broker = create_broker(service)
    await broker.connect()
    await send_work(broker, Names(service.broker_prefix), DOWNLOADS, DownloadCheckpoint(checkpoint_id=first.id))
    await broker.stop()
    await asyncio.sleep(0.5)
    again = await rpc.call(GET_CHECKPOINT, GetCheckpoint(actor=ADMIN, checkpoint_id=first.id))
    assert (again.status, again.error) == (first.status, first.error)
