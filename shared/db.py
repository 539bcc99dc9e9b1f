"""MongoDB through PyMongo's native async client. Plain PyMongo, so nx-27017 locally and a
real MongoDB in production work unchanged."""

from __future__ import annotations

from pymongo import AsyncMongoClient

from shared.settings import Settings

# A database that is away fails an operation after this long, well within the caller's RPC
# timeout (10 s), so that the caller hears "the database is unavailable" and not a timeout.
SERVER_SELECTION_MS = 3_000


def mongo_client(settings: Settings) -> AsyncMongoClient:
    return AsyncMongoClient(settings.mongo_url, tz_aware=True, serverSelectionTimeoutMS=SERVER_SELECTION_MS)
