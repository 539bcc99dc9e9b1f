from shared.permissions import ALL_PERMISSIONS, allows, allows_any, is_valid, not_grantable


def test_all_implies_list_and_create_on_the_same_resource():
    assert allows(["user:all"], "user:list")
    assert allows(["user:all"], "user:create")
    assert allows(["user:all"], "user:all")


def test_all_on_one_resource_grants_nothing_on_another():
    assert not allows(["user:all"], "role:list")


def test_list_does_not_imply_create_or_all():
    assert not allows(["user:list"], "user:create")
    assert not allows(["user:list"], "user:all")


def test_allows_any_needs_one_match():
    assert allows_any(["role:list"], ["role:all", "role:list"])
    assert not allows_any(["role:create"], ["role:all", "role:list"])
    assert not allows_any([], ["role:all"])


def test_only_held_permissions_can_be_passed_on():
    assert not_grantable(["train:all", "inference:list"], ["train:create", "inference:list"]) == []
    assert not_grantable(["inference:list"], ["inference:all", "user:list"]) == [
        "inference:all",
        "user:list",
    ]


def test_permission_names_are_resource_colon_action():
    assert len(ALL_PERMISSIONS) == 18
    assert is_valid("sagemaker_endpoint:list")
    assert not is_valid("endpoint:all")
    assert not is_valid("user:delete")
    assert not is_valid("user")
