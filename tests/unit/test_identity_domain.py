import pytest

from services.identity import domain
from services.identity.domain import Role, User
from shared.contracts.identity import Principal
from shared.errors import Forbidden, Invalid, TooManyRequests

ROLES = {
    "IT Operator": Role("IT Operator", ["user:all", "role:all", "train:all"], "admin"),
    "Designer": Role("Designer", ["inference:all", "checkpoint:list"], "admin"),
    "Viewer": Role("Viewer", ["checkpoint:list"], "admin"),
}


def principal(name: str, *roles: str) -> Principal:
    return domain.principal_of(User(name, list(roles), "admin"), ROLES)


def test_permissions_are_the_sorted_union_of_the_roles():
    assert domain.permissions_of(["Designer", "Viewer"], ROLES) == [
        "checkpoint:list",
        "inference:all",
    ]


def test_unknown_roles_grant_nothing():
    assert domain.permissions_of(["Gone"], ROLES) == []


def test_user_view_masks_the_password():
    view = domain.user_view(User("bob", ["Viewer"], "admin", password_hash="$argon2id$..."), ROLES)
    assert view.password == "********"
    assert view.permissions == ["checkpoint:list"]


def test_without_user_list_a_user_sees_only_itself():
    users = [User("alice", [], "admin"), User("bob", [], "admin")]
    assert [u.username for u in domain.visible_users(principal("bob", "Designer"), users)] == ["bob"]
    assert len(domain.visible_users(principal("root", "IT Operator"), users)) == 2


def test_creator_without_role_all_cannot_grant_what_it_lacks():
    designer = principal("dana", "Designer")
    domain.check_grant(designer, ["inference:list", "checkpoint:list"])
    with pytest.raises(Forbidden, match=r"dana has no permission to assign permissions \['user:all'\]"):
        domain.check_grant(designer, ["inference:all", "user:all"])


def test_role_all_may_grant_anything():
    domain.check_grant(principal("root", "IT Operator"), ["sagemaker_endpoint:all"])


def test_roles_must_exist():
    with pytest.raises(Invalid, match='user roles "Ghost" not exist'):
        domain.check_roles_exist(["Designer", "Ghost"], ROLES)


def test_changing_someone_elses_user_takes_user_all():
    limited = Principal(username="lead", roles=[], permissions=["user:create"])
    domain.check_user_change(limited, None)  # a new user is fine
    domain.check_user_change(limited, User("mine", [], "lead"))  # its own creation too
    with pytest.raises(Invalid, match="username theirs has already exists, creator lead"):
        domain.check_user_change(limited, User("theirs", [], "admin"))
    domain.check_user_change(principal("root", "IT Operator"), User("theirs", [], "admin"))


def test_changing_someone_elses_role_takes_role_all():
    limited = Principal(username="lead", roles=[], permissions=["role:create"])
    with pytest.raises(Invalid, match="does not have permission to update role Designer"):
        domain.check_role_change(limited, ROLES["Designer"])
    domain.check_role_change(limited, Role("Mine", [], "lead"))


def test_unknown_permission_names_are_refused():
    domain.check_permission_names(["train:all", "user:list"])
    with pytest.raises(Invalid, match=r"unknown permissions \['train:delete'\]"):
        domain.check_permission_names(["train:all", "train:delete"])


def test_the_default_role_cannot_be_deleted():
    with pytest.raises(Invalid, match="cannot delete default role"):
        domain.check_role_deletion(["Designer", "IT Operator"])
    domain.check_role_deletion(["Designer"])


def test_a_user_cannot_delete_itself():
    with pytest.raises(Invalid, match="cannot delete itself"):
        domain.check_user_deletion(principal("root", "IT Operator"), ["bob", "root"])


# --- bearer tokens and sign-in limits ---


def test_a_token_is_256_random_bits_behind_its_prefix_and_stored_as_a_keyed_digest():
    first, second = domain.new_token(), domain.new_token()
    assert first.startswith("esd_") and first != second
    assert len(first) - len("esd_") >= 43  # 32 bytes, base64url
    digest = domain.token_digest(first, b"key")
    assert digest == domain.token_digest(first, b"key") and first not in digest
    assert digest != domain.token_digest(first, b"other key")


LIMIT = domain.SignInLimit(per_user=3, per_address=10, window=60.0)


def test_sign_ins_pass_under_the_limits():
    LIMIT.check(username="ann", user_failures=2, address_failures=9, now=1000.0)


@pytest.mark.parametrize(("user_failures", "address_failures", "who"), [(3, 0, "user ann"), (0, 10, "this address")])
def test_too_many_failures_for_a_user_or_an_address_are_a_429_saying_when(user_failures, address_failures, who):
    with pytest.raises(TooManyRequests) as refused:
        LIMIT.check(username="ann", user_failures=user_failures, address_failures=address_failures, now=1010.0)
    assert refused.value.status == 429
    # the window 960..1020 ends in 10 s; its failures count through the next one too
    assert refused.value.message == f"too many failed sign-ins for {who}: try again in 70 seconds"
