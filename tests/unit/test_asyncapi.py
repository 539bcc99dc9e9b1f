"""The bus's AsyncAPI document: built from the contracts, so every command and event is in it
with its message's schema, and every reference in it resolves."""

import json

from fastapi.testclient import TestClient

from services.gateway.app import create_app
from shared import rpc
from shared.asyncapi import asyncapi_document
from shared.contracts.inference import InferenceSucceeded
from shared.settings import Settings


def resolve(document: dict, ref: str) -> dict:
    node = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_command_and_event_is_documented_and_every_reference_resolves():
    document = asyncapi_document("1.5.0", prefix="p.")
    assert document["asyncapi"] == "3.0.0"
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert {command.queue("p.") for command in rpc._DECLARED.values()} <= addresses
    assert {"inference.succeeded", "inference.canceled", "training.stopped", "checkpoint.activated"} <= addresses
    assert "p.inference.{endpoint_name}" in addresses
    text = json.dumps(document)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        assert resolve(document, ref) is not None, ref
    payload = resolve(document, document["components"]["messages"]["InferenceSucceeded"]["payload"]["$ref"])
    assert set(InferenceSucceeded.model_fields) <= set(payload["properties"])


def test_the_gateway_serves_it_to_a_key_holder():
    client = TestClient(create_app(Settings(api_key="k")))
    assert client.get("/asyncapi.json").status_code == 403
    served = client.get("/asyncapi.json", headers={"x-api-key": "k"})
    assert served.status_code == 200 and served.json()["asyncapi"] == "3.0.0"
    page = client.get("/asyncapi", headers={"x-api-key": "k"})
    assert page.status_code == 200 and "inference.succeeded" in page.text
