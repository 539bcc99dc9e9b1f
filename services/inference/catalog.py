"""The catalog: which checkpoints jobs may use, kept from the checkpoint service's events
(activated and renamed ones are usable, disabled and deleted ones are not) and filled at start
from its listing, so that a checkpoint activated while this service was away is not missed."""

from __future__ import annotations

from services.inference.domain import CatalogEntry
from services.inference.store import InferenceStore
from shared.contracts import checkpoint as checkpoints
from shared.contracts.identity import Principal
from shared.rpc import RpcClient
from shared.storage import parse_s3_uri

# who the catalog asks the checkpoint service as
SYSTEM = Principal(username="inference-service", roles=[], permissions=["checkpoint:all"])


def _entry(
    checkpoint_id: str, checkpoint_type: str, names: list[str], s3_location: str, roles: list[str]
) -> CatalogEntry:
    return CatalogEntry(
        checkpoint_id=checkpoint_id,
        type=checkpoint_type,
        names=names,
        prefix=parse_s3_uri(s3_location)[1],
        allowed_roles=roles,
    )


class Catalog:
    def __init__(self, store: InferenceStore) -> None:
        self.store = store

    async def usable(self, event: checkpoints.CheckpointChanged) -> None:
        await self.store.put_model(
            _entry(
                event.checkpoint_id, event.checkpoint_type.value, event.names, event.s3_location, event.allowed_roles
            )
        )

    async def unusable(self, event: checkpoints.CheckpointChanged) -> None:
        await self.store.drop_model(event.checkpoint_id)

    async def backfill(self, rpc: RpcClient) -> None:
        page = 1
        while True:
            listing = await rpc.call(
                checkpoints.LIST_CHECKPOINTS,
                checkpoints.ListCheckpoints(
                    actor=SYSTEM, page=page, per_page=500, status=[checkpoints.CheckpointStatus.ACTIVE]
                ),
            )
            for item in listing.checkpoints:
                await self.store.put_model(
                    _entry(item.id, item.type.value, item.name, item.s3Location, item.allowed_roles_or_users)
                )
            if page >= listing.pages:
                return
            page += 1
