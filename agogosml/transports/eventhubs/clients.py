"""Build the Event Hubs clients and convert between events and envelopes."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from azure.core.exceptions import ResourceExistsError
from azure.eventhub import EventData, TransportType
from azure.eventhub.aio import EventHubConsumerClient, EventHubProducerClient
from azure.eventhub.amqp import AmqpMessageBodyType
from azure.eventhub.extensions.checkpointstoreblobaio import BlobCheckpointStore

from agogosml.config import EventHubSettings, EventHubsTransportType
from agogosml.envelope import Envelope, Position
from agogosml.errors import ConfigurationError

logger = logging.getLogger(__name__)

#: AMQP message annotations that the service sets on every received event, as
#: listed in ``EventData.system_properties`` (azure-eventhub 5.15).
SEQUENCE_NUMBER_ANNOTATION = b"x-opt-sequence-number"
OFFSET_ANNOTATION = b"x-opt-offset"

_TRANSPORT_TYPES = {
    EventHubsTransportType.AMQP: TransportType.Amqp,
    EventHubsTransportType.WEBSOCKET: TransportType.AmqpOverWebsocket,
}


def check_hub(settings: EventHubSettings, hub: str, variable: str) -> None:
    """Raise `ConfigurationError` if a hub-level connection string names another hub.

    A hub-level key grants access to its own hub only, so using it for `hub`
    would fail later with an authorization error.
    """
    entity = settings.hub_in_connection_string()
    if not entity or entity == hub:
        return
    if variable in ("READER_INPUT", "READER_DEAD_LETTER"):
        # The reader writes dead letters to a hub other than its input, so one
        # hub's key is never enough for it.
        raise ConfigurationError(
            f"{variable}={hub!r} is not the hub of EVENTHUB_CONNECTION_STRING "
            f"(EntityPath={entity}), and the reader needs access to both its "
            "input and its dead-letter hub; use a namespace-level connection "
            "string"
        )
    raise ConfigurationError(
        f"{variable}={hub!r} is not the hub of EVENTHUB_CONNECTION_STRING "
        f"(EntityPath={entity}); set {variable} to {entity!r}, or use a "
        "namespace-level connection string"
    )


def _client_options(settings: EventHubSettings) -> dict[str, Any]:
    return {"transport_type": _TRANSPORT_TYPES[settings.transport_type]}


def _credential() -> Any:
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential()


def new_producer(
    settings: EventHubSettings, hub: str
) -> tuple[EventHubProducerClient, Any]:
    """Return a producer of `hub` and the Azure AD credential to close (or None)."""
    connection_string = settings.connection_string.get_secret_value()
    if connection_string:
        producer = EventHubProducerClient.from_connection_string(
            connection_string, eventhub_name=hub, **_client_options(settings)
        )
        return producer, None
    credential = _credential()
    producer = EventHubProducerClient(
        settings.fully_qualified_namespace,
        hub,
        credential,
        **_client_options(settings),
    )
    return producer, credential


def new_consumer(
    settings: EventHubSettings, hub: str, checkpoint_store: BlobCheckpointStore
) -> tuple[EventHubConsumerClient, Any]:
    """Return a load-balancing consumer of `hub` and the credential to close."""
    options = {
        **_client_options(settings),
        "checkpoint_store": checkpoint_store,
        "load_balancing_interval": settings.load_balancing_interval_ms / 1000,
    }
    connection_string = settings.connection_string.get_secret_value()
    if connection_string:
        consumer = EventHubConsumerClient.from_connection_string(
            connection_string,
            settings.consumer_group,
            eventhub_name=hub,
            **options,
        )
        return consumer, None
    credential = _credential()
    consumer = EventHubConsumerClient(
        settings.fully_qualified_namespace,
        hub,
        settings.consumer_group,
        credential,
        **options,
    )
    return consumer, credential


def new_checkpoint_store(settings: EventHubSettings) -> tuple[BlobCheckpointStore, Any]:
    """Return the blob checkpoint store of the settings and its credential.

    Raises:
        ConfigurationError: when no storage account or container is set.
    """
    # The vendored copy of azure-storage-blob that BlobCheckpointStore itself
    # uses (azure-eventhub-checkpointstoreblob-aio 1.2). Its container client is
    # passed in, so the source can create a missing container.
    from azure.eventhub.extensions.checkpointstoreblobaio._vendor.storage.blob.aio import (  # noqa: E501
        ContainerClient,
    )

    container = settings.checkpoint_store_container
    connection_string = settings.checkpoint_store_connection_string.get_secret_value()
    if not container or not (
        connection_string or settings.checkpoint_store_account_url
    ):
        raise ConfigurationError(
            "the eventhubs source needs a checkpoint store: set "
            "EVENTHUB_CHECKPOINT_STORE_CONTAINER, and "
            "EVENTHUB_CHECKPOINT_STORE_CONNECTION_STRING or (for Azure AD) "
            "EVENTHUB_CHECKPOINT_STORE_ACCOUNT_URL"
        )
    credential = None
    if connection_string:
        client = ContainerClient.from_connection_string(connection_string, container)
    else:
        credential = _credential()
        client = ContainerClient(
            settings.checkpoint_store_account_url, container, credential=credential
        )
    store = BlobCheckpointStore(
        client.url, container, credential=credential, container_client=client
    )
    return store, credential


async def ensure_container(store: BlobCheckpointStore) -> None:
    """Create the checkpoint store's blob container unless it exists."""
    client = store._container_client
    try:
        await client.create_container()
    except ResourceExistsError:
        return
    logger.info("created checkpoint container", extra={"container": client.url})


def to_event(envelope: Envelope) -> EventData:
    """Return the event to send for an envelope; headers become properties.

    Header values that are UTF-8 are sent as AMQP strings, which every Event
    Hubs client reads as text; other values are sent as binary. A header name
    that occurs twice keeps its last value, because properties are a map. A
    null value is sent as an AMQP null.
    """
    event = EventData(envelope.value)
    properties: dict[str | bytes, Any] = {}
    for name, value in envelope.record_headers():
        if value is None:
            properties[name] = None
            continue
        try:
            properties[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            properties[name] = value
    event.properties = properties
    return event


def partition_key(envelope: Envelope) -> str | None:
    """Return the partition key of an envelope's key, or None for no key.

    A key that is not UTF-8 text is base64-encoded, so equal keys still land
    in the same partition.
    """
    text, _ = envelope.key_text()
    return text or None


def to_envelope(event: EventData, position: Position) -> Envelope:
    """Return the envelope of a received event.

    An event that cannot be read whole gets an envelope with a `problem`, which
    the reader dead-letters: an exception here would end the partition's
    receiver, and the next owner would meet the same event again.
    """
    try:
        value, problem = _body_value(event)
        key = event.partition_key
        if isinstance(key, str):
            key = key.encode()
        headers = [
            (_text(name), _header_bytes(raw))
            for name, raw in (event.properties or {}).items()
        ]
        envelope = Envelope.from_record(value or b"", key, headers, position)
    except Exception as exc:  # noqa: BLE001 - any malformed event is dead-lettered
        envelope = Envelope(value=b"", position=position)
        envelope.problem = f"cannot read the event: {type(exc).__name__}: {exc}"
        return envelope
    envelope.null_value = value is None
    envelope.problem = problem
    return envelope


def _body_value(event: EventData) -> tuple[bytes | None, str]:
    """Return the bytes of an event's body, or None for an AMQP null, and a problem.

    Event Hubs clients send data bodies, which are bytes. An AMQP value body
    (sent by some AMQP clients) is taken as its text, or as JSON when it is a
    number, boolean, list or map. A sequence body has no such reading.
    """
    body_type = event.body_type
    if body_type == AmqpMessageBodyType.DATA:
        body = event.body
        return (body if isinstance(body, bytes) else b"".join(_chunks(body))), ""
    if body_type == AmqpMessageBodyType.VALUE:
        body = event.body
        if body is None:
            return None, ""
        if isinstance(body, bytes):
            return body, ""
        if isinstance(body, str):
            return body.encode(), ""
        try:
            return orjson.dumps(_as_json(body)), ""
        except (TypeError, UnicodeDecodeError) as exc:
            return b"", (
                f"the event has an AMQP value body of type {type(body).__name__} "
                f"that is not JSON ({exc}); send the value as an event data body"
            )
    return b"", (
        f"the event has an AMQP {body_type.value} body, which agogosml does not "
        "read; send the value as an event data body"
    )


def checkpoint_event(sequence_number: int, offset: str) -> EventData:
    """Return an event that carries only what ``update_checkpoint`` reads."""
    event = EventData(b"")
    annotations = event.raw_amqp_message.annotations
    assert annotations is not None
    annotations[SEQUENCE_NUMBER_ANNOTATION] = sequence_number
    annotations[OFFSET_ANNOTATION] = offset.encode()
    return event


def _as_json(value: Any) -> Any:
    """Return an AMQP value with its strings as text, for JSON encoding.

    The AMQP decoder gives strings and symbols as bytes, map keys included.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {_as_json(key): _as_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(item) for item in value]
    return value


def _chunks(body: Any) -> list[bytes]:
    return [_bytes(chunk) for chunk in body]


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _header_bytes(value: Any) -> bytes | None:
    """Return a property value as a header value, keeping an AMQP null as None."""
    return None if value is None else _bytes(value)


def _bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()
