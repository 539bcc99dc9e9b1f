"""MongoDB through PyMongo's native async client. Plain PyMongo, so nx-27017 locally and a
real MongoDB in production work unchanged."""

from __future__ import annotations

from pymongo import AsyncMongoClient

from shared.settings import Settings


def mongo_client(settings: Settings) -> AsyncMongoClient:
    return AsyncMongoClient(settings.mongo_url, tz_aware=True, serverSelectionTimeoutMS=10_000)
