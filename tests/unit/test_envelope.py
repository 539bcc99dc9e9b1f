import json

import pytest
from pydantic import ValidationError

from services.gateway.envelope import respond, validation_message
from shared.contracts.identity import CreateUserBody, DeleteRolesBody
from shared.errors import ErrorInfo, Forbidden, Invalid, NotFound, Unavailable


def body(response) -> dict:
    return json.loads(response.body)


def test_envelope_carries_status_data_and_reason_phrase():
    response = respond(200, {"users": []}, None)
    assert response.status_code == 200
    assert body(response) == {"statusCode": 200, "data": {"users": []}, "message": "OK"}


def test_empty_data_is_omitted_and_message_defaults():
    assert body(respond(201)) == {"statusCode": 201, "message": "Created"}
    assert body(respond(202, {}, "later")) == {"statusCode": 202, "message": "later"}


def test_no_content_has_an_empty_body():
    response = respond(204)
    assert response.status_code == 204
    assert response.body == b""


def errors_of(model, data) -> list:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return caught.value.errors()


def test_missing_fields_use_esds_phrasing():
    message = validation_message(errors_of(CreateUserBody, {"roles": []}))
    assert message == 'object has missing required properties (["password","username"])'


def test_empty_string_names_the_minimum():
    message = validation_message(errors_of(CreateUserBody, {"username": "", "password": "x"}))
    assert "required minimum: 1" in message
    assert message.startswith("username:")


def test_empty_list_names_the_minimum():
    message = validation_message(errors_of(DeleteRolesBody, {"role_name_list": []}))
    assert message == "role_name_list: array is too short (length: 0, required minimum: 1)"


def test_wrong_type_is_a_readable_sentence():
    message = validation_message(errors_of(CreateUserBody, {"username": 3, "password": "x"}))
    assert message == "username: Input should be a valid string"


def test_list_items_are_named_by_position():
    message = validation_message(errors_of(DeleteRolesBody, {"role_name_list": ["ok", ""]}))
    assert message.startswith("role_name_list.1:")


@pytest.mark.parametrize("error", [Invalid("bad"), Forbidden("no"), NotFound("gone"), Unavailable("slow")])
def test_errors_cross_process_boundaries_unchanged(error):
    info = ErrorInfo.model_validate_json(error.to_info().model_dump_json())
    again = info.to_error()
    assert type(again) is type(error)
    assert (again.status, again.message) == (error.status, error.message)
