"""The checkpoint service's decisions: key layout, names, who sees what, which status changes
are allowed, and which download addresses are safe. Pure functions."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from shared.contracts.checkpoint import (
    CheckpointItem,
    CheckpointStatus,
    CheckpointType,
    CheckpointView,
    allowed_extensions,
    extension_allowed,
    safe_file_name,
)
from shared.contracts.identity import Principal
from shared.errors import Invalid
from shared.net import check_http_url
from shared.permissions import EVERYONE, allows, shared_with


@dataclass
class Checkpoint:
    id: str
    type: CheckpointType
    status: CheckpointStatus
    names: list[str]
    bucket: str
    params: dict[str, Any] = field(default_factory=dict)
    allowed_roles: list[str] = field(default_factory=list)
    created: float = 0.0
    urls: list[str] = field(default_factory=list)
    error: str | None = None
    progress: dict[str, Any] | None = None
    attempts: int = 0

    @property
    def prefix(self) -> str:
        return key_prefix(self.type, self.id)

    @property
    def s3_location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def view(self) -> CheckpointView:
        return CheckpointView(
            id=self.id, type=self.type, s3_location=self.s3_location, status=self.status, params=self.params
        )

    def item(self) -> CheckpointItem:
        return CheckpointItem(
            id=self.id,
            s3Location=self.s3_location,
            type=self.type,
            status=self.status,
            name=self.names,
            created=str(self.created),
            params=self.params,
            allowed_roles_or_users=self.allowed_roles,
            error=self.error,
            progress=self.progress,
        )


def key_prefix(checkpoint_type: CheckpointType, checkpoint_id: str) -> str:
    """ESD's layout: `<type>/checkpoint/custom/<id>`."""
    return f"{checkpoint_type.value}/checkpoint/custom/{checkpoint_id}"


def duplicate_name_error(name: str) -> Invalid:
    return Invalid(f"{name} already exists, please use another or rename/delete exists")


def duplicates_within(names: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


# --- who sees what -------------------------------------------------------------------------


def visible_to(checkpoint: Checkpoint, roles: Iterable[str], username: str) -> bool:
    """Shared with everyone, with the user by name, or with one of its roles."""
    return shared_with(checkpoint.allowed_roles, roles, username)


def sees_everything(actor: Principal) -> bool:
    return allows(actor.permissions, "checkpoint:all")


def reachable(checkpoint: Checkpoint, actor: Principal) -> bool:
    """Whether the actor may see and change the checkpoint: what its roles own (ESD's
    `allowed_roles_or_users`), or every checkpoint with `checkpoint:all`."""
    return sees_everything(actor) or visible_to(checkpoint, actor.roles, actor.username)


def owner_filters(actor: Principal, subject: Principal | None) -> list[list[str]]:
    """What a listing may show, as lists of owners of which a checkpoint must match one each:
    the actor's (unless it sees everything) and, with `?username=`, the named user's too, so
    that naming a user narrows the list and never widens it."""
    filters = []
    if not sees_everything(actor):
        filters.append([*actor.roles, actor.username, EVERYONE])
    if subject is not None:
        filters.append([*subject.roles, subject.username, EVERYONE])
    return filters


def page_count(total: int, per_page: int) -> int:
    return math.ceil(total / per_page)


# --- status changes ------------------------------------------------------------------------


def check_activation(checkpoint: Checkpoint, tags: dict[str, list] | None) -> None:
    """Activating an Initial (uploading) checkpoint completes its multipart uploads, so it needs
    every file's part tags."""
    if not tags:
        raise Invalid("multi parts tags is empty")
    missing = [name for name in checkpoint.names if name not in tags]
    if missing:
        raise Invalid(f"multi parts tags are missing for {missing}")
    unknown = [name for name in tags if name not in checkpoint.names]
    if unknown:
        raise Invalid(f"multi parts tags name files that are not in the checkpoint: {unknown}")


def check_status_change(checkpoint: Checkpoint, wanted: CheckpointStatus) -> None:
    if wanted in (CheckpointStatus.INITIAL, CheckpointStatus.FAILED):
        raise Invalid(f"status can only be set to Active or Disabled, not {wanted.value}")
    if checkpoint.status is CheckpointStatus.FAILED:
        raise Invalid(f"checkpoint {checkpoint.id} failed ({checkpoint.error}); delete it and upload again")
    if wanted is CheckpointStatus.DISABLED and checkpoint.status is CheckpointStatus.INITIAL:
        raise Invalid("only an uploaded checkpoint can be disabled")


def renamed(checkpoint: Checkpoint, new_name: str) -> str | None:
    """The file name a rename gives (keeping the old extension when the new name has none), or
    None when nothing changes."""
    if checkpoint.status is not CheckpointStatus.ACTIVE:
        raise Invalid("only active can update name")
    old = checkpoint.names[0]
    if not extension_allowed(new_name, checkpoint.type):
        new_name += PurePosixPath(old).suffix
        try:
            safe_file_name(new_name)  # the extension may make it too long
        except ValueError as error:
            raise Invalid(str(error)) from None
    return None if new_name == old else new_name


# --- downloads -----------------------------------------------------------------------------


def file_name_from_url(url: str, content_disposition: str | None = None) -> str:
    """The file a URL serves: Content-Disposition's file name when given, else the last
    segment of the URL's path."""
    if content_disposition:
        message = Message()
        message["content-disposition"] = content_disposition
        name = message.get_filename()
        if name:
            try:
                return safe_file_name(PurePosixPath(name.replace("\\", "/")).name)
            except ValueError:
                pass
    path = unquote(urlsplit(url).path)
    name = PurePosixPath(path).name
    try:
        return safe_file_name(name)
    except ValueError:
        raise Invalid(f"cannot tell a file name from {url}") from None


def check_download_name(name: str, checkpoint_type: CheckpointType | None = None) -> None:
    if not extension_allowed(name, checkpoint_type):
        raise Invalid(f"{name} is not a model file: only {', '.join(allowed_extensions(checkpoint_type))} are accepted")


check_url = check_http_url


def provisional_name(url: str, checkpoint_id: str) -> str:
    """The name a by-URL checkpoint carries until its download tells the real one."""
    try:
        return file_name_from_url(url)
    except Invalid:
        return f"download-{checkpoint_id[:8]}"
