"""The checkpoint service's wire contracts: HTTP bodies, commands, replies, work messages and
events."""

from __future__ import annotations

from enum import StrEnum
from pathlib import PurePosixPath
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from shared.contracts.identity import Body, Idempotent, Principal
from shared.messaging import Event
from shared.rpc import command
from shared.untrusted import excerpt

SERVICE = "checkpoint"
ALLOWED_EXTENSIONS = (".pt", ".pth", ".ckpt", ".safetensors", ".yaml")
ONNX_EXTENSIONS = (".onnx",)


class CheckpointType(StrEnum):
    STABLE_DIFFUSION = "Stable-diffusion"
    EMBEDDINGS = "embeddings"
    LORA = "Lora"
    HYPERNETWORKS = "hypernetworks"
    CONTROLNET = "ControlNet"
    VAE = "VAE"
    # image models of the extras (A1111's folder names under `models/`): upscalers, then face
    # restorers; spandrel recognises the architecture from the weights
    ESRGAN = "ESRGAN"
    REAL_ESRGAN = "RealESRGAN"
    SWINIR = "SwinIR"
    HAT = "HAT"
    DAT = "DAT"
    SCUNET = "ScuNET"
    GFPGAN = "GFPGAN"
    CODEFORMER = "Codeformer"
    # background removal models of the rembg family, as ONNX files (`u2net.onnx`, ...)
    REMBG = "rembg"


UPSCALER_TYPES = (
    CheckpointType.ESRGAN,
    CheckpointType.REAL_ESRGAN,
    CheckpointType.SWINIR,
    CheckpointType.HAT,
    CheckpointType.DAT,
    CheckpointType.SCUNET,
)
FACE_RESTORER_TYPES = (CheckpointType.GFPGAN, CheckpointType.CODEFORMER)


class CheckpointStatus(StrEnum):
    INITIAL = "Initial"
    ACTIVE = "Active"
    DISABLED = "Disabled"
    FAILED = "Failed"


MAX_NAME_BYTES = 255  # what file systems hold in one name


def safe_file_name(name: str) -> str:
    """A plain file name: no folders, no `..`, no control characters, at most 255 bytes (it
    becomes an S3 key and, on workers, a path on disk, where longer names do not fit)."""
    name = name.strip()
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(ord(char) < 32 or ord(char) == 127 for char in name)
        or PurePosixPath(name).name != name
    ):
        raise ValueError(f'"{excerpt(name)}" is not a plain file name')
    if len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f'"{excerpt(name)}" is longer than {MAX_NAME_BYTES} bytes')
    return name


# What the OpenAPI document says of a plain file name (`safe_file_name` decides): no folder
# separators or control characters, and something besides spaces and dots.
PLAIN_NAME_PATTERN = r"^[^/\\\x00-\x1f\x7f]*[^/\\\x00-\x1f\x7f\s.][^/\\\x00-\x1f\x7f]*$"

FileName = Annotated[
    str,
    Field(min_length=1, max_length=255, json_schema_extra={"pattern": PLAIN_NAME_PATTERN}),
    AfterValidator(safe_file_name),
]


def allowed_extensions(checkpoint_type: CheckpointType | None = None) -> tuple[str, ...]:
    """The file kinds a checkpoint of this type may hold: ONNX graphs for rembg, weights (and
    their yaml configs) for the others."""
    return ONNX_EXTENSIONS if checkpoint_type is CheckpointType.REMBG else ALLOWED_EXTENSIONS


def extension_allowed(name: str, checkpoint_type: CheckpointType | None = None) -> bool:
    return name.lower().endswith(allowed_extensions(checkpoint_type))


# --- HTTP bodies -------------------------------------------------------------------------


class MultipartFile(Body):
    filename: FileName
    parts_number: int = Field(ge=1, le=100)


class CreateCheckpointBody(Body):
    # one source or the other, as the OpenAPI document can say it (the validator decides)
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "oneOf": [
                {"required": ["filenames"], "properties": {"filenames": {"type": "array"}}},
                {"required": ["urls"], "properties": {"urls": {"type": "array"}}},
            ]
        },
    )

    checkpoint_type: CheckpointType
    filenames: Annotated[list[MultipartFile], Field(min_length=1, max_length=20)] | None = None
    urls: (
        Annotated[
            list[
                Annotated[str, Field(min_length=1, max_length=4096, json_schema_extra={"pattern": "^https?://[^/?#]+"})]
            ],
            Field(min_length=1, max_length=20),
        ]
        | None
    ) = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> CreateCheckpointBody:
        if (self.filenames is None) == (self.urls is None):
            raise ValueError("give either filenames (multipart upload) or urls (download), not both")
        return self


class PartTag(Body):
    ETag: str = Field(min_length=1)
    PartNumber: int = Field(ge=1, le=10_000)


class UpdateCheckpointBody(Body):
    # only these two may be asked for; others get a message saying so
    status: Annotated[CheckpointStatus, WithJsonSchema({"enum": ["Active", "Disabled"]})] | None = None
    multi_parts_tags: dict[str, list[PartTag]] | None = None
    name: FileName | None = None


class DeleteCheckpointsBody(Body):
    checkpoint_id_list: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=64)]], Field(min_length=1, max_length=100)
    ]


# --- commands (RPC) ------------------------------------------------------------------------


class CreateCheckpoint(CreateCheckpointBody, Idempotent):
    actor: Principal


class UpdateCheckpoint(UpdateCheckpointBody):
    actor: Principal
    checkpoint_id: str


class DeleteCheckpoints(DeleteCheckpointsBody):
    actor: Principal


class ListCheckpoints(BaseModel):
    actor: Principal
    page: int = Field(1, ge=1)
    per_page: int = Field(10, ge=1, le=1000)
    types: list[CheckpointType] = Field(default_factory=list)
    status: list[CheckpointStatus] = Field(default_factory=list)
    # `?username=`, resolved by the gateway: only what this user may use (and the actor may see)
    subject: Principal | None = None


class GetCheckpoint(BaseModel):
    actor: Principal
    checkpoint_id: str


class FindCheckpoint(BaseModel):
    """An Active checkpoint by type and file name."""

    actor: Principal
    checkpoint_type: CheckpointType
    name: str


class CheckFileName(BaseModel):
    """Whether a file name is free: file names are unique across all checkpoints."""

    name: str


class FileNameUse(BaseModel):
    taken: bool
    checkpoint_id: str | None = None


class RegisterCheckpoint(BaseModel):
    """Make a file another service produced (a trained LoRA) an Active checkpoint. The caller
    chooses the id, so a repeated request registers once."""

    actor: Principal  # the owner: its roles may use the checkpoint
    checkpoint_id: str
    checkpoint_type: CheckpointType
    name: FileName
    source_key: str
    params: dict[str, Any] = Field(default_factory=dict)


# --- replies -------------------------------------------------------------------------------


class CheckpointView(BaseModel):
    """A checkpoint as POST/PUT answer it (ESD's `data.checkpoint`)."""

    id: str
    type: CheckpointType
    s3_location: str
    status: CheckpointStatus
    params: dict[str, Any]


class CheckpointItem(BaseModel):
    """A checkpoint as GET /checkpoints lists it (ESD's field names)."""

    id: str
    s3Location: str
    type: CheckpointType
    status: CheckpointStatus
    name: list[str]
    created: str
    params: dict[str, Any]
    allowed_roles_or_users: list[str]
    source_path: str | None = None
    target_path: str | None = None
    error: str | None = None
    progress: dict[str, Any] | None = None


class CheckpointPage(BaseModel):
    page: int
    per_page: int
    pages: int
    total: int
    checkpoints: list[CheckpointItem]


class CreatedCheckpoint(BaseModel):
    """Multipart: the checkpoint and a presigned PUT URL per part; by URL: the checkpoints
    that will be downloaded."""

    checkpoint: CheckpointView | None = None
    s3PresignUrl: dict[str, list[str]] | None = None
    checkpoints: list[CheckpointView] | None = None


class UpdatedCheckpoint(BaseModel):
    status: int
    message: str | None = None
    checkpoint: CheckpointView | None = None


# --- the commands (request -> reply) ---------------------------------------------------------

CREATE_CHECKPOINT = command(SERVICE, CreateCheckpoint, CreatedCheckpoint)
UPDATE_CHECKPOINT = command(SERVICE, UpdateCheckpoint, UpdatedCheckpoint)
DELETE_CHECKPOINTS = command(SERVICE, DeleteCheckpoints)
LIST_CHECKPOINTS = command(SERVICE, ListCheckpoints, CheckpointPage)
GET_CHECKPOINT = command(SERVICE, GetCheckpoint, CheckpointItem)
FIND_CHECKPOINT = command(SERVICE, FindCheckpoint, CheckpointItem)
REGISTER_CHECKPOINT = command(SERVICE, RegisterCheckpoint, CheckpointItem)
CHECK_FILE_NAME = command(SERVICE, CheckFileName, FileNameUse)


# --- work queues ---------------------------------------------------------------------------

DOWNLOADS = "checkpoint.downloads"
RENAMES = "checkpoint.renames"


class DownloadCheckpoint(BaseModel):
    checkpoint_id: str


class RenameCheckpoint(BaseModel):
    checkpoint_id: str
    old_name: str
    new_name: str


# --- events --------------------------------------------------------------------------------


class CheckpointChanged(Event):
    checkpoint_id: str
    checkpoint_type: CheckpointType
    names: list[str]
    s3_location: str
    allowed_roles: list[str]


class CheckpointActivated(CheckpointChanged):
    routing_key = "checkpoint.activated"


class CheckpointRenamed(CheckpointChanged):
    routing_key = "checkpoint.renamed"


class CheckpointDisabled(CheckpointChanged):
    routing_key = "checkpoint.disabled"


class CheckpointDeleted(CheckpointChanged):
    routing_key = "checkpoint.deleted"


class CheckpointFailed(Event):
    routing_key = "checkpoint.failed"
    checkpoint_id: str
    error: str
