"""The identity service over the real RabbitMQ and the MongoDB wire server."""

import asyncio

import pytest

from services.identity.__main__ import setup
from services.identity.roles import Roles
from services.identity.store import IdentityStore
from services.identity.users import Users
from shared.contracts.identity import (
    AUTHENTICATE_USER,
    CREATE_ROLE,
    CREATE_USER,
    DELETE_ROLES,
    DELETE_USERS,
    LIST_ROLES,
    LIST_USERS,
    SERVICE,
    AuthenticateUser,
    CreateRole,
    CreateUser,
    DeleteRoles,
    DeleteUsers,
    ListRoles,
    ListUsers,
    Principal,
)
from shared.db import mongo_client
from shared.errors import Forbidden, Invalid, Unauthorized
from shared.messaging import EventPublisher, Names
from shared.outbox import Outbox
from shared.rpc import RpcClient

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def identity(settings_factory, service_runner):
    settings = settings_factory()
    await service_runner(SERVICE, setup, settings)
    return settings


@pytest.fixture(scope="module")
async def admin(identity, rpc_factory) -> Principal:
    rpc = await rpc_factory(identity)
    return await rpc.call(AUTHENTICATE_USER, AuthenticateUser(username="admin"))


@pytest.fixture(scope="module")
async def rpc(identity, rpc_factory):
    return await rpc_factory(identity)


async def test_first_start_creates_the_admin_with_every_permission(admin):
    assert admin.roles == ["IT Operator"]
    assert admin.permissions == sorted(
        ["train:all", "checkpoint:all", "inference:all", "sagemaker_endpoint:all", "user:all", "role:all"]
    )


async def test_bootstrap_again_changes_nothing(identity):
    client = mongo_client(identity)
    db = client[identity.database_name(SERVICE)]
    before = await db.users.find_one({"username": "admin"})
    store = IdentityStore(db, Outbox(EventPublisher(None, Names())))  # type: ignore[arg-type]
    await Roles(store, "admin").bootstrap()  # publishes nothing: everything exists
    await Users(store, "admin").bootstrap("another password")
    assert await db.users.count_documents({"username": "admin"}) == 1
    assert await db.roles.count_documents({}) >= 2
    assert (await db.users.find_one({"username": "admin"}))["password_hash"] == before["password_hash"]
    await client.close()


async def test_unknown_user_is_unauthorized(rpc):
    with pytest.raises(Unauthorized):
        await rpc.call(AUTHENTICATE_USER, AuthenticateUser(username="nobody"))


async def test_created_user_is_stored_with_a_hash_and_announced(identity, rpc, admin, event_log):
    events = await event_log(identity, "user.*")
    await rpc.call(
        CREATE_USER,
        CreateUser(username="hashme", password="s3cret-pw", roles=["byoc"], actor=admin),
    )
    client = mongo_client(identity)
    doc = await client[identity.database_name(SERVICE)].users.find_one({"username": "hashme"})
    await client.close()
    assert doc["password_hash"].startswith("$argon2id$")
    assert "s3cret-pw" not in str(doc)
    created = await events.next("user.created")
    assert {key: created[key] for key in ("username", "roles", "creator", "version")} == {
        "username": "hashme",
        "roles": ["byoc"],
        "creator": "admin",
        "version": 1,
    }
    assert len(created["id"]) == 32 and created["occurred_at"] > 0

    await rpc.call(
        CREATE_USER,
        CreateUser(username="hashme", password="other", roles=["IT Operator"], actor=admin),
    )
    assert (await events.next("user.updated"))["roles"] == ["IT Operator"]


async def test_initial_user_is_created_once_and_never_changed(rpc):
    first = CreateUser(username="firstrun", password="a", initial=True)
    await rpc.call(CREATE_USER, first)
    await rpc.call(CREATE_USER, first.model_copy(update={"password": "b"}))
    me = await rpc.call(AUTHENTICATE_USER, AuthenticateUser(username="firstrun"))
    assert me.roles == ["IT Operator"]


async def test_a_limited_creator_cannot_hand_out_more_than_it_has(rpc, admin):
    await rpc.call(
        CREATE_ROLE,
        CreateRole(role_name="Lead", permissions=["user:create", "role:create", "train:list"], actor=admin),
    )
    await rpc.call(CREATE_USER, CreateUser(username="lead", password="x", roles=["Lead"], actor=admin))
    lead = await rpc.call(AUTHENTICATE_USER, AuthenticateUser(username="lead"))
    with pytest.raises(Forbidden, match="lead has no permission to assign"):
        await rpc.call(
            CREATE_USER,
            CreateUser(username="intern", password="x", roles=["IT Operator"], actor=lead),
        )
    with pytest.raises(Forbidden):
        await rpc.call(
            CREATE_ROLE,
            CreateRole(role_name="Sneaky", permissions=["train:all"], actor=lead),
        )
    role = await rpc.call(CREATE_ROLE, CreateRole(role_name="Trainee", permissions=["train:list"], actor=lead))
    assert role.creator == "lead"


async def test_deleting_a_role_removes_it_from_its_users(identity, rpc, admin, event_log):
    events = await event_log(identity, "role.*")
    await rpc.call(CREATE_ROLE, CreateRole(role_name="Temp", permissions=["inference:list"], actor=admin))
    await rpc.call(CREATE_USER, CreateUser(username="temp1", password="x", roles=["Temp", "byoc"], actor=admin))
    await rpc.call(DELETE_ROLES, DeleteRoles(role_name_list=["Temp", "NoSuch"], actor=admin))
    users = await rpc.call(LIST_USERS, ListUsers(actor=admin, username="temp1"))
    assert users.users[0].roles == ["byoc"]
    roles = await rpc.call(LIST_ROLES, ListRoles(actor=admin, role="Temp"))
    assert roles.roles == []
    assert (await events.next("role.deleted"))["role_name"] == "Temp"


async def test_the_default_role_stays(rpc, admin):
    with pytest.raises(Invalid, match="cannot delete default role"):
        await rpc.call(DELETE_ROLES, DeleteRoles(role_name_list=["IT Operator"], actor=admin))


async def test_deleting_users_skips_unknown_names(rpc, admin):
    await rpc.call(CREATE_USER, CreateUser(username="gone", password="x", roles=[], actor=admin))
    await rpc.call(DELETE_USERS, DeleteUsers(user_name_list=["gone", "never-was"], actor=admin))
    with pytest.raises(Unauthorized):
        await rpc.call(AUTHENTICATE_USER, AuthenticateUser(username="gone"))


async def test_concurrent_commands_are_served(rpc, admin):
    replies = await asyncio.gather(*[rpc.call(LIST_USERS, ListUsers(actor=admin)) for _ in range(50)])
    assert all(any(u.username == "admin" for u in reply.users) for reply in replies)


async def test_replicas_keep_users_in_memory_and_hear_each_others_changes(settings_factory, service_runner, event_log):
    """Two replicas answer the same queues in turn; each lists users from its own memory. A
    change made through one is in every listing once its event is out, not after the
    snapshot's TTL."""
    settings = settings_factory()
    await service_runner(SERVICE, setup, settings)
    await service_runner(SERVICE, setup, settings)
    client = RpcClient(settings.amqp_url, settings.broker_prefix, settings.rpc_timeout)
    await client.start()
    try:
        for _ in range(100):  # the second replica answers health checks before it serves every command
            if await client.replicas(LIST_USERS) == 2:
                break
            await asyncio.sleep(0.1)
        admin = await client.call(AUTHENTICATE_USER, AuthenticateUser(username="admin"))
        listing = ListUsers(actor=admin)

        async def names_in_listings() -> list[set[str]]:
            # one at a time, so that the two replicas answer in turn
            return [{user.username for user in (await client.call(LIST_USERS, listing)).users} for _ in range(6)]

        assert all(names == {"admin"} for names in await names_in_listings())  # both hold a snapshot now
        users = await event_log(settings, "user.*")
        roles = await event_log(settings, "role.*")

        await client.call(CREATE_ROLE, CreateRole(role_name="Temp", permissions=["train:list"], actor=admin))
        await roles.next("role.created")
        await client.call(CREATE_USER, CreateUser(username="newcomer", password="x", roles=["Temp"], actor=admin))
        await users.next("user.created")
        await asyncio.sleep(0.3)  # the other replica's own copy of the event
        assert all(names == {"admin", "newcomer"} for names in await names_in_listings())

        await client.call(DELETE_ROLES, DeleteRoles(role_name_list=["Temp"], actor=admin))
        await roles.next("role.deleted")
        await asyncio.sleep(0.3)
        for _ in range(6):
            listed = {user.username: user.roles for user in (await client.call(LIST_USERS, listing)).users}
            assert listed["newcomer"] == []

        await client.call(DELETE_USERS, DeleteUsers(user_name_list=["newcomer"], actor=admin))
        await users.next("user.deleted")
        await asyncio.sleep(0.3)
        assert all(names == {"admin"} for names in await names_in_listings())
    finally:
        await client.close()
