"""Where the checkpoint service's messages enter: commands from the gateway and other services,
and the download and rename work queues (acked once the outcome is stored)."""

from __future__ import annotations

from faststream.rabbit import Channel

from services.checkpoint.checkpoints import Checkpoints
from shared.contracts import checkpoint as contract
from shared.idempotency import Idempotency
from shared.service import Runtime


def register(runtime: Runtime, checkpoints: Checkpoints, once: Idempotency) -> None:
    runtime.rpc.register_all(
        {
            contract.CREATE_CHECKPOINT: once.wrap(contract.CREATE_CHECKPOINT, checkpoints.create),
            contract.UPDATE_CHECKPOINT: checkpoints.update,
            contract.DELETE_CHECKPOINTS: checkpoints.delete,
            contract.LIST_CHECKPOINTS: checkpoints.list,
            contract.GET_CHECKPOINT: checkpoints.get,
            contract.FIND_CHECKPOINT: checkpoints.find,
            contract.REGISTER_CHECKPOINT: checkpoints.register,
            contract.CHECK_FILE_NAME: checkpoints.check_file_name,
        }
    )
    broker, names = runtime.broker, runtime.names
    # Downloads are slow and mostly waiting: a few at once per replica.
    broker.subscriber(names.work_queue(contract.DOWNLOADS), channel=Channel(prefetch_count=4))(checkpoints.download)
    broker.subscriber(names.work_queue(contract.RENAMES), channel=Channel(prefetch_count=2))(checkpoints.rename)
