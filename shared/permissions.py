"""Permissions are `<resource>:<action>`; `:all` implies every other action on the resource.

Pure functions, used by the gateway to guard routes and by identity to decide who may grant
what."""

from __future__ import annotations

from collections.abc import Iterable

RESOURCES = ("inference", "user", "train", "role", "sagemaker_endpoint", "checkpoint")
ACTIONS = ("all", "list", "create")
ALL_PERMISSIONS = tuple(f"{resource}:{action}" for resource in RESOURCES for action in ACTIONS)
# What the bootstrap roles hold: every `:all`, in ESD's order.
EVERY_ALL = (
    "train:all",
    "checkpoint:all",
    "inference:all",
    "sagemaker_endpoint:all",
    "user:all",
    "role:all",
)


def is_valid(permission: str) -> bool:
    return permission in ALL_PERMISSIONS


def allows(held: Iterable[str], required: str) -> bool:
    """Whether the held permissions grant `required` (`user:list` is granted by `user:all`)."""
    resource, _, _ = required.partition(":")
    held = set(held)
    return required in held or f"{resource}:all" in held


def allows_any(held: Iterable[str], required: Iterable[str]) -> bool:
    held = set(held)
    return any(allows(held, permission) for permission in required)


def not_grantable(held: Iterable[str], wanted: Iterable[str]) -> list[str]:
    """The permissions in `wanted` that someone holding `held` may not pass on."""
    held = set(held)
    return [permission for permission in wanted if not allows(held, permission)]


# An owner entry sharing a thing with everyone (ESD's `allowed_roles_or_users: ["*"]`).
EVERYONE = "*"


def shared_with(owners: Iterable[str], roles: Iterable[str], username: str) -> bool:
    """Whether a thing owned by `owners` (ESD's `allowed_roles_or_users`) is shared with a
    user: with everyone, with the user by name, or with one of its roles. A thing with no
    owners is everyone's."""
    owners = set(owners)
    return not owners or EVERYONE in owners or username in owners or bool(owners & set(roles))
