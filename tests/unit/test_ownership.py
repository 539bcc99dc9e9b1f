"""Who reaches whose checkpoints, jobs, endpoints and datasets: a named user sees what its roles
own (ESD's `allowed_roles_or_users`), and `?username=` narrows that, never widens it."""

from services.checkpoint import domain as checkpoints
from services.inference import domain as inference
from services.training import domain as training
from shared.contracts.checkpoint import CheckpointStatus, CheckpointType
from shared.contracts.identity import Principal
from shared.contracts.inference import EndpointStatus, EndpointType
from shared.contracts.training import DatasetStatus

ADMIN = Principal(username="admin", roles=["IT Operator"], permissions=["user:all", "checkpoint:all", "train:all"])
ANN = Principal(username="ann", roles=["Designer"], permissions=["checkpoint:create", "inference:list", "train:all"])
BOB = Principal(username="bob", roles=["Painter"], permissions=["checkpoint:list", "sagemaker_endpoint:list"])


def checkpoint(*owners: str) -> checkpoints.Checkpoint:
    return checkpoints.Checkpoint(
        id="c1",
        type=CheckpointType.LORA,
        status=CheckpointStatus.ACTIVE,
        names=["a.safetensors"],
        bucket="b",
        allowed_roles=list(owners),
    )


def test_a_checkpoint_is_reached_through_a_role_the_user_by_name_or_checkpoint_all():
    painters = checkpoint("Painter")
    assert checkpoints.reachable(painters, BOB)
    assert not checkpoints.reachable(painters, ANN)  # checkpoint:create does not cross roles
    assert checkpoints.reachable(painters, ADMIN)
    assert checkpoints.reachable(checkpoint("ann"), ANN)
    assert checkpoints.reachable(checkpoint("*"), ANN)


def test_naming_a_user_in_a_checkpoint_listing_narrows_and_never_widens():
    assert checkpoints.owner_filters(ADMIN, None) == []  # everything
    assert checkpoints.owner_filters(ANN, None) == [["Designer", "ann", "*"]]
    # ann naming bob: what both may see, so nothing of bob's roles that ann's do not share
    assert checkpoints.owner_filters(ANN, BOB) == [["Designer", "ann", "*"], ["Painter", "bob", "*"]]
    assert checkpoints.owner_filters(ADMIN, BOB) == [["Painter", "bob", "*"]]


def test_naming_a_user_in_a_job_listing_narrows_and_never_widens():
    everything = Principal(username="root", roles=[], permissions=["inference:all"])
    assert inference.jobs_listed_owner(everything, None) is None
    assert inference.jobs_listed_owner(everything, "bob") == "bob"
    assert inference.jobs_listed_owner(ANN, None) == "ann"
    assert inference.jobs_listed_owner(ANN, "ann") == "ann"
    assert inference.jobs_listed_owner(ANN, "bob") == ""  # a name no job has: nothing


def endpoint(*roles: str) -> inference.Endpoint:
    return inference.Endpoint(
        id="e1",
        name="esd-async-x",
        type=EndpointType.ASYNC,
        status=EndpointStatus.IN_SERVICE,
        instance_type="local",
        autoscaling=False,
        initial=1,
        min=0,
        max=1,
        roles=list(roles),
        owner="admin",
        created=0.0,
    )


def test_naming_a_user_in_an_endpoint_listing_narrows_and_never_widens():
    painters = endpoint("Painter")
    everything = Principal(username="root", roles=[], permissions=["sagemaker_endpoint:all"])
    assert inference.endpoint_listed(painters, BOB, None)
    assert not inference.endpoint_listed(painters, ANN, None)
    assert not inference.endpoint_listed(painters, ANN, BOB)  # bob's endpoint, not ann's to see
    assert inference.endpoint_listed(painters, everything, BOB)
    assert not inference.endpoint_listed(painters, everything, ANN)


def dataset(owner: str, *roles: str) -> training.Dataset:
    return training.Dataset(
        name="d",
        status=DatasetStatus.ENABLED,
        prefix="",
        files=[],
        description="",
        owner=owner,
        roles=list(roles),
        created=0.0,
    )


def test_a_dataset_belongs_to_its_creators_roles_and_train_all_does_not_cross_them():
    painters = dataset("bob", "Painter")
    assert training.dataset_reachable(BOB, painters)
    assert not training.dataset_reachable(ANN, painters)  # train:all, another role
    assert training.dataset_reachable(ADMIN, painters)  # user:all, ESD's superuser
    assert training.dataset_reachable(Principal(username="cy", roles=["Painter"], permissions=[]), painters)
    assert training.visible_datasets(ANN, [painters, dataset("ann", "Designer")]) == [dataset("ann", "Designer")]
