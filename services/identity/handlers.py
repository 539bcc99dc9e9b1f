"""Where identity's requests enter: each command is handed to the use case that answers it."""

from __future__ import annotations

from services.identity.roles import Roles
from services.identity.users import Users
from shared.contracts import identity as contract
from shared.service import Runtime


def register(runtime: Runtime, users: Users, roles: Roles) -> None:
    runtime.rpc.register_all({
        contract.AUTHENTICATE_USER: users.authenticate,
        contract.CREATE_USER: users.create,
        contract.LIST_USERS: users.list,
        contract.DELETE_USERS: users.delete,
        contract.CREATE_ROLE: roles.create,
        contract.LIST_ROLES: roles.list,
        contract.DELETE_ROLES: roles.delete,
    })
