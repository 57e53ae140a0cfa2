"""Temporal client factory, task queue, data converter and search attribute keys."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter

from core.config import Settings

TASK_QUEUE = "signgate"
DATA_CONVERTER = pydantic_data_converter

SIGNING_STATUS = SearchAttributeKey.for_keyword("SigningStatus")
SIGNER_NAME = SearchAttributeKey.for_keyword("SignerName")
REQUESTER_NAME = SearchAttributeKey.for_keyword("RequesterName")
SIGNING_POLICY = SearchAttributeKey.for_keyword("SigningPolicy")
SEARCH_ATTRIBUTE_KEYS = (SIGNING_STATUS, SIGNER_NAME, REQUESTER_NAME, SIGNING_POLICY)


def workflow_id_for(request_id: str) -> str:
    return f"signing-request-{request_id}"


async def connect(settings: Settings, *, lazy: bool = False) -> Client:
    """Connect to Temporal; lazy clients (the API's) connect on first use, so the API starts
    while Temporal is down and recovers when it returns."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=DATA_CONVERTER,
        lazy=lazy,
    )
