"""Tests of the output writer's HTTP endpoints, backed by an in-memory sink."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import logging
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Sequence

import brotli
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from fakes import MemorySink, disconnect_records, send_partial_body
from prometheus_client import REGISTRY

from agogosml import http, logs
from agogosml.config import WriterSettings
from agogosml.envelope import Envelope, trace_id
from agogosml.errors import SinkError
from agogosml.http import (
    MalformedRequestFilter,
    bound_port,
    server_logger,
    start_site,
)
from agogosml.logs import JsonFormatter
from agogosml.transports.file import FileSink
from agogosml.writer.service import OutputWriter

try:
    from compression import zstd  # Python 3.14 and newer
except ImportError:
    from backports import zstd

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
OTHER_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
JSON = {"Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def serve_writer(
    sink: MemorySink, **settings: object
) -> AsyncIterator[tuple[TestClient, OutputWriter]]:
    """Serve an OutputWriter over `sink` on a loopback port.

    As `start_site` does, the server leaves request bodies undecoded for the
    writer to decode.
    """
    writer = OutputWriter(WriterSettings(output="memory", **settings), sink)
    server = TestServer(writer.build_app())
    await server.start_server(auto_decompress=False)
    async with TestClient(server) as client:
        yield client, writer


async def started_sink() -> MemorySink:
    sink = MemorySink()
    await sink.start()
    return sink


async def wait_for(condition, timeout_seconds: float = 2.0) -> None:
    """Poll `condition` until it is true or the timeout passes."""
    async with asyncio.timeout(timeout_seconds):
        while not condition():
            await asyncio.sleep(0.005)


async def raw_post(
    client: TestClient, path: str, headers: bytes, body: bytes
) -> tuple[int, bytes, dict]:
    """POST with raw header bytes, which the aiohttp client would not send as is.

    Returns the status, the Content-Type header value and the decoded JSON body.
    """
    stream_reader, stream_writer = await asyncio.open_connection(
        client.host, client.port
    )
    stream_writer.write(
        b"POST %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        % (path.encode(), len(body), headers, body)
    )
    response = await stream_reader.read()
    stream_writer.close()
    await stream_writer.wait_closed()

    head, _, response_body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    content_type = next(
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-type:")
    )
    return status, content_type, orjson.loads(response_body)


async def test_post_one_writes_record():
    sink = await started_sink()
    headers = {
        **JSON,
        "X-Message-Id": "msg-1",
        "X-Message-Key": "card-7",
        "traceparent": TRACEPARENT,
        "X-Record-Header-Model-Version": "3",
    }

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b'{"score": 0.91}', headers=headers)
        body = await response.json()

    assert response.status == 200
    assert body == {"written": 1, "ids": ["msg-1"]}
    assert len(sink.envelopes) == 1
    record = sink.envelopes[0]
    assert record.value == b'{"score": 0.91}'
    assert record.key == b"card-7"
    assert record.id == "msg-1"
    assert trace_id(record.traceparent) == TRACE_ID
    assert record.traceparent != TRACEPARENT
    assert ("model-version", b"3") in record.headers


async def test_post_one_base64_record_header():
    sink = await started_sink()
    headers = {
        **JSON,
        "X-Record-Header-Trace-Bytes": "/wAB",
        "X-Record-Header-Model-Version": "3",
        "X-Base64-Record-Headers": "trace-bytes",
    }

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=headers)

    assert response.status == 200
    (record,) = sink.envelopes
    assert ("trace-bytes", b"\xff\x00\x01") in record.headers
    assert ("model-version", b"3") in record.headers


async def test_post_one_record_headers_keep_listed_spelling():
    sink = await started_sink()
    headers = {
        **JSON,
        "X-Record-Header-correlationid": "c-1",
        "X-Record-Header-Trace-Bytes": "/wAB",
        "X-Record-Header-Model-Version": "3",
        "X-Record-Header-K": "kelvin",
        "X-Base64-Record-Headers": "trace-bytes",
        "X-Cased-Record-Headers": "correlationId,Trace-Bytes,Not-Sent,\u212a",
    }

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=headers)

    assert response.status == 200
    (record,) = sink.envelopes
    # An unlisted name is written in lower case, whatever its case in HTTP,
    # and the Kelvin sign, whose lower case is "k", spells no header.
    assert sorted(record.headers) == [
        ("Trace-Bytes", b"\xff\x00\x01"),
        ("correlationId", b"c-1"),
        ("k", b"kelvin"),
        ("model-version", b"3"),
    ]


async def test_post_one_null_record_headers_written():
    sink = await started_sink()
    headers = {
        **JSON,
        "X-Record-Header-Region": "eu",
        "X-Null-Record-Headers": "Tombstoned-By,message-id",
    }

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=headers)

    assert response.status == 200
    (record,) = sink.envelopes
    assert record.headers == [("region", b"eu"), ("Tombstoned-By", None)]
    assert record.id


async def test_post_one_null_and_valued_header_400():
    sink = await started_sink()
    headers = {
        **JSON,
        "X-Record-Header-Region": "eu",
        "X-Null-Record-Headers": "Region",
    }

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=headers)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "lists Region, which the request also sends" in error
    assert sink.envelopes == []


async def test_post_one_invalid_null_header_name_400():
    sink = await started_sink()
    headers = {**JSON, "X-Null-Record-Headers": "ok, shop id"}

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=headers)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "lists 'shop id', which is not a valid header name" in error
    assert sink.envelopes == []


async def test_batch_headers_not_object_400():
    sink = await started_sink()
    items = [{"value": 1, "headers": ["tag", "x"]}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "batch element 0: 'headers' must be an object" in error


async def test_batch_null_record_header_written():
    sink = await started_sink()
    items = [{"value": 1, "headers": {"Tombstoned-By": None, "message-id": None}}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)

    assert response.status == 200
    (record,) = sink.envelopes
    assert record.headers == [("Tombstoned-By", None)]


async def test_batch_encoding_of_null_header_400():
    sink = await started_sink()
    items = [
        {
            "value": 1,
            "headers": {"tag": None},
            "header_encodings": {"tag": "base64"},
        }
    ]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "'header_encodings' names 'tag', whose value is null" in error


@pytest.mark.parametrize(
    ("headers", "problem"),
    [
        (
            {"X-Record-Header-Tag": "not base64!", "X-Base64-Record-Headers": "tag"},
            "header X-Record-Header-Tag is listed as base64-encoded, but "
            "'not base64!' is not valid base64",
        ),
        (
            {"X-Record-Header-Tag": "AA==", "X-Base64-Record-Headers": "tag, other"},
            "header X-Base64-Record-Headers lists other, but no X-Record-Header-",
        ),
    ],
)
async def test_post_one_bad_base64_record_header_400(headers, problem):
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers={**JSON, **headers})
        body = await response.json()

    assert response.status == 400
    assert problem in body["error"]
    assert sink.envelopes == []


async def test_batch_base64_headers_written_as_bytes():
    sink = await started_sink()
    items = [
        {
            "value": 1,
            "headers": {"raw": "/wA=", "text": "/wA="},
            "header_encodings": {"raw": "BASE64"},
        },
        {"value": 2, "headers": {"raw": "AA=="}, "header_encodings": None},
    ]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)

    assert response.status == 200
    first, second = sink.envelopes
    assert first.headers == [("raw", b"\xff\x00"), ("text", b"/wA=")]
    assert second.headers == [("raw", b"AA==")]


@pytest.mark.parametrize(
    ("element", "problem"),
    [
        (
            {"headers": {"a": "AA=="}, "header_encodings": ["a"]},
            "batch element 0: 'header_encodings' must be an object, got an array",
        ),
        (
            {"headers": {"a": "AA=="}, "header_encodings": {"b": "base64"}},
            "batch element 0: 'header_encodings' names 'b', which is not in 'headers'",
        ),
        (
            {"headers": {"a": "AA=="}, "header_encodings": {"a": "hex"}},
            "batch element 0: the encoding of header 'a' is '\"hex\"'; use 'base64'",
        ),
        (
            {"headers": {"a": "%%"}, "header_encodings": {"a": "base64"}},
            "batch element 0: header 'a' is listed as base64-encoded, but '%%' is "
            "not valid base64",
        ),
    ],
)
async def test_batch_bad_header_encodings_400(element, problem):
    sink = await started_sink()
    items = [{"value": 1, **element}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        body = await response.json()

    assert response.status == 400
    assert problem in body["error"]
    assert sink.envelopes == []


async def test_post_one_without_headers_gets_ids():
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"[1, 2]", headers=JSON)

    assert response.status == 200
    record = sink.envelopes[0]
    assert record.key is None
    assert len(record.id) == 32
    assert trace_id(record.traceparent) is not None


async def test_post_one_base64_key_decoded():
    sink = await started_sink()
    raw_key = b"\xff\x00key"
    headers = {
        **JSON,
        "X-Message-Key": base64.b64encode(raw_key).decode(),
        "X-Message-Key-Encoding": "base64",
    }

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=headers)

    assert response.status == 200
    assert sink.envelopes[0].key == raw_key


async def test_post_one_invalid_base64_key_400():
    sink = await started_sink()
    headers = {**JSON, "X-Message-Key": "@@@", "X-Message-Key-Encoding": "base64"}

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=headers)
        body = await response.json()

    assert response.status == 400
    assert "header X-Message-Key '@@@' is not valid base64" in body["error"]
    assert sink.envelopes == []


@pytest.mark.parametrize(
    ("header", "hint"),
    [
        ("X-Message-Key", "X-Message-Key-Encoding: base64"),
        ("X-Message-Id", "UTF-8 text"),
        ("X-Record-Header-Model-Version", "UTF-8 text"),
    ],
)
async def test_post_one_non_utf8_header_400(header, hint):
    sink = await started_sink()
    raw_header = header.encode() + b": caf\xe9\r\n"

    async with serve_writer(sink) as (client, _):
        status, content_type, body = await raw_post(client, "/", raw_header, b"1")

    assert status == 400
    assert content_type.startswith(b"application/json")
    assert f"header {header} is not valid UTF-8" in body["error"]
    assert hint in body["error"]
    assert sink.envelopes == []


async def test_non_utf8_id_logged_escaped(caplog):
    caplog.set_level(logging.INFO, logger="agogosml.writer.service")
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        status, _, _ = await raw_post(client, "/", b"X-Message-Id: caf\xe9\r\n", b"1")

    (record,) = [r for r in caplog.records if r.getMessage() == "request rejected"]
    assert status == 400
    assert record.message_id == "caf\\xe9"
    assert '"message_id":"caf\\\\xe9"' in JsonFormatter().format(record)


async def test_batch_writes_records_in_order():
    sink = await started_sink()
    items = [
        {"value": {"score": 0.1}, "key": "a", "id": "b-1", "traceparent": TRACEPARENT},
        {"value": [1, 2, 3], "headers": {"model-version": "3"}},
        {"value": None, "key": None, "id": "b-3"},
    ]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        body = await response.json()

    assert response.status == 200
    assert body["written"] == 3
    assert body["ids"][0] == "b-1"
    assert body["ids"][2] == "b-3"
    assert [record.value for record in sink.envelopes] == [
        b'{"score":0.1}',
        b"[1,2,3]",
        b"null",
    ]
    first, second, third = sink.envelopes
    assert first.key == b"a"
    assert first.id == "b-1"
    assert trace_id(first.traceparent) == TRACE_ID
    assert second.key is None
    assert ("model-version", b"3") in second.headers
    assert third.id == "b-3"


async def test_batch_of_tiny_values_stays_small():
    sink = await started_sink()
    body = orjson.dumps([{"value": 0}] * 2000)

    async with serve_writer(sink) as (client, _):
        tracemalloc.start()
        response = await client.post("/batch", data=body, headers=JSON)
        await response.read()
        retained, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()

    assert response.status == 200
    assert [record.value for record in sink.envelopes] == [b"0"] * 2000
    # About 1 KiB per record at most, where orjson's output buffers of 4 KiB
    # each would keep 8 MiB.
    assert retained < 2_000_000


@pytest.mark.parametrize(
    ("header_value", "json_type"),
    [({"major": 3}, "an object"), (3, "a number"), (True, "a boolean")],
)
async def test_batch_header_not_string_400(header_value, json_type):
    sink = await started_sink()
    items = [
        {"value": 1, "headers": {"model-version": "3"}},
        {"value": 2, "headers": {"model-version": header_value}},
    ]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "batch element 1: header 'model-version' must be a string or null" in error
    assert f"got {json_type}" in error
    assert sink.envelopes == []


async def test_batch_id_not_string_400():
    sink = await started_sink()
    items = [{"value": 1, "id": {"n": 1}}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "batch element 0: 'id' must be a string or null, got an object" in error
    assert sink.envelopes == []


@pytest.mark.parametrize("message_id", ["ctl\u0000", "line\nbreak", "del\u007f"])
async def test_batch_id_control_character_400(message_id):
    sink = await started_sink()
    items = [{"value": 1, "id": "fine"}, {"value": 2, "id": message_id}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert f"batch element 1: id {message_id!r} contains a control character" in error
    assert sink.envelopes == []


async def test_post_one_id_with_tab_400():
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        status, _, body = await raw_post(
            client, "/", b"X-Message-Id: in\t0\r\n", b'{"score": 1}'
        )

    assert status == 400
    assert "header X-Message-Id 'in\\t0' contains a control character" in body["error"]
    assert sink.envelopes == []


async def test_batch_unicode_id_kept():
    sink = await started_sink()
    items = [{"value": 1, "id": "commande-\u00e9t\u00e9 \u2014 42"}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)

    assert response.status == 200
    assert [envelope.id for envelope in sink.envelopes] == [
        "commande-\u00e9t\u00e9 \u2014 42"
    ]


async def test_long_ids_become_digests():
    """An id over 512 bytes of UTF-8 is written as the digest of those bytes."""
    sink = await started_sink()
    longest = "\u00e9" * 256  # 512 bytes
    too_long = longest + "x"
    header_id = "h" * 513
    items = [{"value": 1, "id": longest}, {"value": 2, "id": too_long}]

    async with serve_writer(sink) as (client, _):
        batch = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        one = await client.post(
            "/", data=b"3", headers={**JSON, "X-Message-Id": header_id}
        )
        listed = (await batch.json())["ids"] + (await one.json())["ids"]

    assert (batch.status, one.status) == (200, 200)
    expected = [
        longest,
        "sha256:" + hashlib.sha256(too_long.encode()).hexdigest(),
        "sha256:" + hashlib.sha256(header_id.encode()).hexdigest(),
    ]
    assert [envelope.id for envelope in sink.envelopes] == expected
    assert listed == expected


async def test_batch_invalid_base64_key_names_element():
    sink = await started_sink()
    items = [
        {"value": 1, "key": "a2V5", "key_encoding": "base64"},
        {"value": 2, "key": "!!", "key_encoding": "base64"},
    ]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "batch element 1: key '!!' is not valid base64" in error
    assert sink.envelopes == []


async def test_batch_reserved_headers_not_copied():
    sink = await started_sink()
    items = [
        {"value": 1, "id": "b-1", "headers": {"Message-Id": "other", "x": "y"}},
        {"value": 2, "headers": {"Message-Id": "b-2", "TraceParent": TRACEPARENT}},
    ]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)

    assert response.status == 200
    first, second = sink.envelopes
    assert first.id == "b-1"
    assert first.headers == [("x", b"y")]
    assert second.id == "b-2"
    assert trace_id(second.traceparent) == TRACE_ID
    assert second.headers == []


async def test_batch_base64_message_id_header_decoded():
    sink = await started_sink()
    items = [
        {
            "value": 1,
            "headers": {"message-id": "bXlpZA==", "raw": "/w=="},
            "header_encodings": {"message-id": "base64", "raw": "base64"},
        },
        {
            "value": 2,
            "headers": {"message-id": "/wBpZA=="},
            "header_encodings": {"message-id": "base64"},
        },
    ]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)

    assert response.status == 200
    first, second = sink.envelopes
    assert first.id == "myid"
    assert first.headers == [("raw", b"\xff")]
    assert second.id == "%FF%00id"


async def test_post_one_reserved_record_headers_ignored():
    sink = await started_sink()
    headers = {
        **JSON,
        "X-Message-Id": "msg-1",
        "traceparent": TRACEPARENT,
        "X-Record-Header-Message-Id": "forged-id",
        "X-Record-Header-Traceparent": OTHER_TRACEPARENT,
        "X-Record-Header-Model-Version": "3",
    }

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=headers)

    assert response.status == 200
    record = sink.envelopes[0]
    assert record.id == "msg-1"
    assert trace_id(record.traceparent) == TRACE_ID
    assert record.headers == [("model-version", b"3")]
    assert dict(record.record_headers())["message-id"] == b"msg-1"


async def test_batch_empty_array_writes_nothing():
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=b"[]", headers=JSON)
        body = await response.json()

    assert response.status == 200
    assert body == {"written": 0, "ids": []}
    assert sink.send_calls == 0


@pytest.mark.parametrize(
    "number",
    [
        b"18446744073709551616",
        b"123456789012345678901234567890",
        b"-9223372036854775809",
        b"1" + b"0" * 400,
    ],
)
async def test_batch_big_integer_written_exactly(number):
    sink = await started_sink()
    body = b'[{"value": {"id": %s}}, {"value": %s}, {"value": 0.5}]' % (
        number,
        number,
    )

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=body, headers=JSON)

    assert response.status == 200
    values = [record.value for record in sink.envelopes]
    assert values == [b'{"id":%s}' % number, number, b"0.5"]


async def test_batch_64_bit_integers_exact():
    sink = await started_sink()
    numbers = [b"18446744073709551615", b"-9223372036854775808", b"1e+16"]
    body = b"[%s]" % b",".join(b'{"value": %s}' % number for number in numbers)

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=body, headers=JSON)

    assert response.status == 200
    assert [record.value for record in sink.envelopes] == numbers


async def test_batch_big_integer_id_400():
    sink = await started_sink()
    body = b'[{"value": 1, "id": 18446744073709551616}]'

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=body, headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "batch element 0: 'id' must be a string or null, got a number" in error


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'[{"value": [%s, -Infinity]}]' % (b"1" * 400), "-Infinity is not valid JSON"),
        (b'{"b": %s, "a": "\\ud800"}' % (b"1" * 400), "lone surrogate"),
        (b'{"a": "\\ud800", "b": %s}' % (b"1" * 400), "no low surrogate"),
    ],
)
async def test_long_integer_body_names_real_problem(body, problem):
    sink = await started_sink()
    path = "/batch" if body.startswith(b"[") else "/"

    async with serve_writer(sink) as (client, _):
        response = await client.post(path, data=body, headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert problem in error
    assert "infinity when parsed" not in error
    assert sink.envelopes == []


async def test_post_one_huge_integer_accepted():
    sink = await started_sink()
    body = b"1" + b"0" * 400

    async with serve_writer(sink) as (client, _):
        accepted = await client.post("/", data=body, headers=JSON)
        infinite = await client.post("/", data=b"[1e400]", headers=JSON)

    assert accepted.status == 200
    assert infinite.status == 400
    assert [record.value for record in sink.envelopes] == [body]


async def test_batch_element_without_value_400():
    sink = await started_sink()
    items = [{"value": 1}, {"key": "a"}, {"value": 3}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        body = await response.json()

    assert response.status == 400
    assert "batch element 1" in body["error"]
    assert "'value'" in body["error"]
    assert sink.envelopes == []


async def test_batch_value_nested_too_deep_400():
    sink = await started_sink()
    deep = b"[" * 300 + b"]" * 300
    body = b'[{"value": 1}, {"value": %s}]' % deep

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=body, headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "batch element 1: 'value' cannot be encoded as JSON again" in error
    assert "POST it alone to /" in error
    assert sink.envelopes == []


async def test_batch_element_nested_too_deep_400():
    sink = await started_sink()
    body = b"[%s]" % (b"[" * 300 + b"]" * 300)

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=body, headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "batch element 0 must be an object" in error
    assert "nested too deeply" in error


async def test_batch_element_preview_cut_safely():
    sink = await started_sink()
    body = orjson.dumps(["\u00e9" * 120])

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=body, headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "batch element 0 must be an object" in error


async def test_unknown_path_and_method_json():
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        not_found = await client.get("/nothing")
        not_found_body = await not_found.json()
        wrong_method = await client.get("/batch")
        wrong_method_body = await wrong_method.json()

    assert not_found.status == 404
    assert "path '/nothing' not found" in not_found_body["error"]
    assert "POST /batch" in not_found_body["error"]
    assert wrong_method.status == 405
    assert wrong_method.headers["Allow"] == "POST"
    assert (
        "method GET is not allowed on '/batch'; use POST"
        in (wrong_method_body["error"])
    )


async def test_batch_not_array_400():
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=b'{"value": 1}', headers=JSON)
        body = await response.json()

    assert response.status == 400
    assert "expects a JSON array, got an object" in body["error"]


async def test_invalid_json_400():
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        single = await client.post("/", data=b"{not json", headers=JSON)
        single_body = await single.json()
        batch = await client.post("/batch", data=b"[1,", headers=JSON)

    assert single.status == 400
    assert "not valid JSON" in single_body["error"]
    assert batch.status == 400
    assert sink.envelopes == []


async def test_body_not_utf8_names_byte():
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b'{"city": "caf\xe9"}', headers=JSON)
        error = (await response.json())["error"]

    assert response.status == 400
    assert "not valid UTF-8: byte 0xe9 at position 13" in error
    assert "surrogates" not in error
    assert sink.envelopes == []


@pytest.mark.parametrize("name", [b"X-Message-Id", b"X-Message-Key"])
async def test_repeated_message_header_400(name):
    sink = await started_sink()
    headers = b"%s: a\r\n%s: b\r\n" % (name, name)

    async with serve_writer(sink) as (client, _):
        status, _, body = await raw_post(client, "/", headers, b"1")

    assert status == 400
    assert f"header {name.decode()} is sent more than once" in body["error"]
    assert sink.envelopes == []


async def test_body_over_limit_413():
    sink = await started_sink()
    body = orjson.dumps({"padding": "x" * 200})

    async with serve_writer(sink, max_body_bytes=100) as (client, _):
        response = await client.post("/", data=body, headers=JSON)
        error = (await response.json())["error"]
        small = await client.post("/", data=b"{}", headers=JSON)

    assert response.status == 413
    assert "WRITER_MAX_BODY_BYTES" in error
    assert small.status == 200
    assert len(sink.envelopes) == 1


async def test_body_that_stops_arriving_408(monkeypatch):
    monkeypatch.setattr(http, "BODY_TIMEOUT_SECONDS", 0.2)
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"half": '
        )
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
        writer.close()

    assert head.startswith(b"HTTP/1.1 408")
    assert "did not arrive within 0.2 s" in orjson.loads(body)["error"]
    assert sink.envelopes == []


async def test_wrong_content_type_415():
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        response = await client.post(
            "/", data=b"{}", headers={"Content-Type": "text/plain"}
        )
        body = await response.json()

    assert response.status == 415
    assert "'text/plain'" in body["error"]
    assert sink.envelopes == []


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        ("bearer writer-secret", 200),
        ("BEARER writer-secret", 200),
        ("Bearer  writer-secret", 200),
        ("Basic writer-secret", 401),
        ("writer-secret", 401),
        ("Bearer writer-secret2", 401),
    ],
)
async def test_token_scheme_case_insensitive(authorization, status):
    sink = await started_sink()

    async with serve_writer(sink, token="writer-secret") as (client, _):
        response = await client.post(
            "/", data=b"1", headers={**JSON, "Authorization": authorization}
        )

    assert response.status == status


async def test_token_required_when_set():
    sink = await started_sink()

    async with serve_writer(sink, token="writer-secret") as (client, _):
        missing = await client.post("/", data=b"1", headers=JSON)
        missing_body = await missing.json()
        wrong = await client.post(
            "/", data=b"1", headers={**JSON, "Authorization": "Bearer nope"}
        )
        wrong_batch = await client.post("/batch", data=b"[]", headers=JSON)
        right = await client.post(
            "/", data=b"1", headers={**JSON, "Authorization": "Bearer writer-secret"}
        )
        health = await client.get("/healthz")

    assert missing.status == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert "missing or wrong bearer token" in missing_body["error"]
    assert wrong.status == 401
    assert wrong_batch.status == 401
    assert right.status == 200
    assert health.status == 200
    assert len(sink.envelopes) == 1


async def test_wrong_token_counted_as_rejected():
    sink = await started_sink()
    labels = {"service": "output_writer", "status": "401"}
    before = REGISTRY.get_sample_value("agogosml_rejected_requests_total", labels) or 0

    async with serve_writer(sink, token="writer-secret") as (client, _):
        for _ in range(3):
            await client.post("/", data=b"1", headers=JSON)

    after = REGISTRY.get_sample_value("agogosml_rejected_requests_total", labels)
    assert after == before + 3


async def test_non_utf8_token_gets_401():
    sink = await started_sink()
    wrong_header = b"Authorization: Bearer caf\xe9\r\n"

    async with serve_writer(sink, token="writer-secret") as (client, _):
        status, _, body = await raw_post(client, "/", wrong_header, b"1")

    assert status == 401
    assert "bearer token" in body["error"]
    assert sink.envelopes == []


async def test_sink_failure_503_then_recovers():
    sink = await started_sink()
    sink.fail_next(1)

    async with serve_writer(sink) as (client, _):
        failed = await client.post("/", data=b'{"n": 1}', headers=JSON)
        error = (await failed.json())["error"]
        retried = await client.post("/", data=b'{"n": 1}', headers=JSON)
        ready = await client.get("/readyz")

    assert failed.status == 503
    assert "records were not written" in error
    assert retried.status == 200
    assert ready.status == 200
    assert [record.value for record in sink.envelopes] == [b'{"n": 1}']


async def test_sink_failure_counts_sink_errors():
    sink = await started_sink()
    sink.fail_next(1)
    labels = {"service": "output_writer"}
    before = REGISTRY.get_sample_value("agogosml_sink_errors_total", labels) or 0

    async with serve_writer(sink) as (client, _):
        failed = await client.post(
            "/batch", data=b'[{"value": 1}, {"value": 2}]', headers=JSON
        )
        retried = await client.post("/", data=b'{"n": 1}', headers=JSON)

    after = REGISTRY.get_sample_value("agogosml_sink_errors_total", labels)
    assert failed.status == 503
    assert retried.status == 200
    assert after == before + 2


async def test_file_sink_recovers_after_no_space(tmp_path):
    sink = FileSink(str(tmp_path / "out.jsonl"), retry_interval_seconds=0.05)
    await sink.start()
    assert sink._file is not None
    real_write = sink._file.write
    real_check = sink._check_writable

    def no_space(data: object = None) -> int:
        raise OSError(28, "No space left on device")

    try:
        async with serve_writer(sink) as (client, _):
            # The disk stays full for the sink's own check until it is freed.
            sink._check_writable = no_space  # type: ignore[method-assign]
            sink._file.write = no_space  # type: ignore[method-assign]
            failed = await client.post("/", data=b"1", headers=JSON)
            failed_error = (await failed.json())["error"]
            while_failing = await client.post("/", data=b"2", headers=JSON)
            while_failing_error = (await while_failing.json())["error"]
            ready_while_failing = await client.get("/readyz")

            sink._file.write = real_write  # type: ignore[method-assign]
            sink._check_writable = real_check  # type: ignore[method-assign]
            await wait_for(lambda: sink.connected)
            recovered = await client.post("/", data=b"3", headers=JSON)
            ready = await client.get("/readyz")
    finally:
        await sink.stop()

    assert failed.status == 503
    assert "No space left on device" in failed_error
    assert while_failing.status == 503
    assert "No space left on device" in while_failing_error
    assert "not connected yet" not in while_failing_error
    assert ready_while_failing.status == 503
    assert recovered.status == 200
    assert ready.status == 200


class RejectingSink(MemorySink):
    """A sink that rejects every send with a SinkError that is not retriable."""

    async def send(self, envelopes: Sequence[Envelope]) -> None:
        self.send_calls += 1
        raise SinkError(
            "record 'r-1' is 2000000 bytes, over message.max.bytes=1000000",
            retriable=False,
        )


async def test_sink_permanent_failure_422():
    sink = RejectingSink()
    await sink.start()

    async with serve_writer(sink) as (client, _):
        single = await client.post("/", data=b'{"n": 1}', headers=JSON)
        single_error = (await single.json())["error"]
        batch = await client.post("/batch", data=b'[{"value": 1}]', headers=JSON)
        batch_error = (await batch.json())["error"]

    assert single.status == 422
    assert "a retry would fail the same way" in single_error
    assert "message.max.bytes=1000000" in single_error
    assert batch.status == 422
    assert "'r-1'" in batch_error
    assert sink.send_calls == 2


async def test_sink_errors_logged_at_most_ten_a_minute(caplog):
    caplog.set_level(logging.INFO, logger="agogosml.writer.service")
    sink = RejectingSink()
    await sink.start()
    labels = {"service": "output_writer"}
    errors = REGISTRY.get_sample_value("agogosml_sink_errors_total", labels) or 0

    async with serve_writer(sink) as (client, _):
        for _ in range(15):
            response = await client.post("/", data=b'{"n": 1}', headers=JSON)
            assert response.status == 422

    message = "sink did not acknowledge records"
    logged = [r for r in caplog.records if r.getMessage() == message]
    assert len(logged) == 10
    assert [r.not_logged_before for r in logged] == [0] * 10
    counted = REGISTRY.get_sample_value("agogosml_sink_errors_total", labels)
    assert counted == errors + 15


async def test_sink_rejection_logged_unmasked(caplog):
    caplog.set_level(logging.INFO, logger="agogosml.writer.service")
    sink = RejectingSink()
    await sink.start()

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b'{"n": 1}', headers=JSON)

    (record,) = [r for r in caplog.records if r.getMessage() == "request rejected"]
    # The filter of the services' log handler masks quoted values of other errors.
    logs._ContentFilter().filter(record)
    assert response.status == 422
    assert "record 'r-1' is 2000000 bytes" in record.error


@pytest.mark.parametrize("rejection", ["size_rejected", "batch_rejected"])
async def test_rejected_503_without_retry_after(rejection):
    sink = await started_sink()
    sink.fail_next(2, **{rejection: True})

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b'{"n": 1}', headers=JSON)
        batch = await client.post(
            "/batch", data=b'[{"value": 1}, {"value": 2}]', headers=JSON
        )
        batch_error = (await batch.json())["error"]

    assert response.status == 503
    assert "Retry-After" not in response.headers
    # Several records: 422, so that the app sends them one at a time.
    assert batch.status == 422
    assert "Send the 2 records one at a time" in batch_error


async def test_sink_not_connected_503():
    sink = MemorySink()

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=JSON)
        ready = await client.get("/readyz")

    assert response.status == 503
    assert response.headers["Retry-After"] == "5"
    assert ready.status == 503
    assert sink.send_calls == 0


async def test_draining_rejects_new_waits_in_flight():
    sink = await started_sink()
    sink.gate.clear()

    async with serve_writer(sink) as (client, writer):
        in_flight = asyncio.create_task(client.post("/", data=b"1", headers=JSON))
        await wait_for(lambda: sink.send_calls == 1)
        drain = asyncio.create_task(writer.drain(timeout_seconds=5))
        await wait_for(lambda: not writer.ready)

        rejected = await client.post("/", data=b"2", headers=JSON)
        rejected_error = (await rejected.json())["error"]
        ready = await client.get("/readyz")
        drain_finished_early = drain.done()

        sink.gate.set()
        accepted = await in_flight
        await asyncio.wait_for(drain, 2)

    assert rejected.status == 503
    assert rejected.headers["Retry-After"] == "1"
    assert "shutting down" in rejected_error
    assert ready.status == 503
    assert drain_finished_early is False
    assert accepted.status == 200
    assert [record.value for record in sink.envelopes] == [b"1"]


async def test_sink_failure_503_asks_retry_after():
    sink = await started_sink()
    sink.fail_next(1)

    async with serve_writer(sink) as (client, _):
        failed = await client.post("/", data=b"1", headers=JSON)
        retried = await client.post("/", data=b"1", headers=JSON)

    assert failed.status == 503
    assert failed.headers["Retry-After"] == "5"
    assert retried.status == 200


async def test_permanent_sink_error_no_retry_after():
    sink = await started_sink()
    sink.fail_next(1, retriable=False)

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=JSON)

    assert response.status == 422
    assert "Retry-After" not in response.headers


async def test_tap_gets_written_records():
    sink = await started_sink()
    tapped = []
    writer = OutputWriter(WriterSettings(output="memory"), sink, tap=tapped.extend)

    async with TestClient(TestServer(writer.build_app())) as client:
        response = await client.post(
            "/", data=b"7", headers={**JSON, "X-Message-Id": "t-1"}
        )

    assert response.status == 200
    assert [envelope.id for envelope in tapped] == ["t-1"]


@pytest.mark.parametrize(
    "error", [RuntimeError("tap bug"), SystemExit(4), KeyboardInterrupt()]
)
async def test_tap_error_does_not_fail_write(error):
    sink = await started_sink()

    def broken_tap(envelopes):
        raise error

    writer = OutputWriter(WriterSettings(output="memory"), sink, tap=broken_tap)

    async with TestClient(TestServer(writer.build_app())) as client:
        response = await client.post("/", data=b"7", headers=JSON)

    assert response.status == 200
    assert len(sink.envelopes) == 1


async def test_slow_request_head_closed(monkeypatch):
    monkeypatch.setattr(http, "IDLE_TIMEOUT_SECONDS", 0.3)
    sink = await started_sink()
    writer = OutputWriter(WriterSettings(output="memory"), sink)
    runner = await start_site(
        writer.build_app(), "127.0.0.1", 0, "WRITER_", shutdown_timeout_seconds=1.0
    )

    try:
        reader, stream = await asyncio.open_connection("127.0.0.1", bound_port(runner))
        stream.write(b"POST / HTTP/1.1\r\nHost: test\r\n")
        lines_sent = 0
        # A header line every 0.1 s, for up to 5 s, so that no read waits long.
        while lines_sent < 50 and not reader.at_eof():
            await asyncio.sleep(0.1)
            try:
                stream.write(b"X-Slow: 1\r\n")
                await stream.drain()
            except ConnectionError:
                break
            lines_sent += 1
        stream.close()
    finally:
        await runner.cleanup()

    assert lines_sent < 50
    assert sink.send_calls == 0


async def test_client_disconnect_logged_once_debug(caplog):
    caplog.set_level(logging.DEBUG)
    sink = await started_sink()
    writer = OutputWriter(WriterSettings(output="memory"), sink)
    # start_site, as in production: aiohttp's TestServer cancels the handler
    # of a lost connection, so it never logs the disconnect.
    runner = await start_site(
        writer.build_app(), "127.0.0.1", 0, "WRITER_", shutdown_timeout_seconds=1.0
    )

    try:
        for _ in range(3):
            await send_partial_body(bound_port(runner))
        await wait_for(lambda: len(disconnect_records(caplog)) == 3)
    finally:
        await runner.cleanup()

    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []
    assert all(r.levelno == logging.DEBUG for r in disconnect_records(caplog))
    assert sink.send_calls == 0


@pytest.mark.parametrize("encoding", ["hex", "utf-16"])
async def test_post_one_unsupported_key_encoding_400(encoding):
    sink = await started_sink()
    headers = {**JSON, "X-Message-Key": "6b6579", "X-Message-Key-Encoding": encoding}

    async with serve_writer(sink) as (client, _):
        response = await client.post("/", data=b"1", headers=headers)
        body = await response.json()

    assert response.status == 400
    assert f"X-Message-Key-Encoding {encoding!r} is not supported" in body["error"]
    assert "'base64'" in body["error"]
    assert sink.envelopes == []


@pytest.mark.parametrize(
    ("encoding", "expected"),
    [
        ("hex", "'key_encoding' 'hex' is not supported"),
        ({"a": 1}, "'key_encoding' must be a string or null, got an object"),
        (64, "'key_encoding' must be a string or null, got a number"),
    ],
)
async def test_batch_unsupported_key_encoding_400(encoding, expected):
    sink = await started_sink()
    items = [{"value": 1}, {"value": 2, "key": "6b6579", "key_encoding": encoding}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        body = await response.json()

    assert response.status == 400
    assert body["error"].startswith("batch element 1: ")
    assert expected in body["error"]
    assert "'base64'" in body["error"]
    assert sink.envelopes == []


async def test_batch_null_key_encoding_means_utf8():
    sink = await started_sink()
    items = [{"value": 1, "key": "k", "key_encoding": None}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)

    assert response.status == 200
    assert sink.envelopes[0].key == b"k"


async def test_batch_unknown_field_400():
    sink = await started_sink()
    items = [{"value": 1}, {"value": 2, "vaule": 3}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        body = await response.json()

    assert response.status == 400
    assert "batch element 1: unknown field 'vaule'" in body["error"]
    for field in ("headers", "id", "key", "key_encoding", "traceparent", "value"):
        assert repr(field) in body["error"]
    assert sink.envelopes == []


async def test_batch_empty_header_name_400():
    sink = await started_sink()
    items = [{"value": 1, "headers": {"": "v"}}]

    async with serve_writer(sink) as (client, _):
        response = await client.post("/batch", data=orjson.dumps(items), headers=JSON)
        body = await response.json()

    assert response.status == 400
    assert "batch element 0: a header has an empty name" in body["error"]
    assert sink.envelopes == []


async def test_post_one_empty_record_header_name_400():
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        status, _, body = await raw_post(client, "/", b"X-Record-Header-: v\r\n", b"1")

    assert status == 400
    assert "header X-Record-Header- has no record header name" in body["error"]
    assert sink.envelopes == []


async def test_post_one_repeated_record_header_400():
    sink = await started_sink()
    repeated = b"X-Record-Header-Foo: a\r\nx-record-header-foo: b\r\n"

    async with serve_writer(sink) as (client, _):
        status, _, body = await raw_post(client, "/", repeated, b"1")

    assert status == 400
    assert "header X-Record-Header-foo is sent more than once" in body["error"]
    assert sink.envelopes == []


async def send_raw_request(port: int, request: bytes) -> bytes:
    """Send raw bytes as a request and return the whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    return response


MALFORMED_REQUESTS = {
    "bad Content-Length": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
    "long header": b"GET /healthz HTTP/1.1\r\nX-Long: %s\r\n\r\n" % (b"a" * 9000),
    "101 headers": b"GET /healthz HTTP/1.1\r\n"
    + b"".join(b"X-H%d: v\r\n" % n for n in range(101))
    + b"\r\n",
}


async def send_to_site(writer: OutputWriter, *requests: bytes) -> list[bytes]:
    """Send raw requests to the writer served as in production; return the responses."""
    runner = await start_site(
        writer.build_app(), "127.0.0.1", 0, "WRITER_", shutdown_timeout_seconds=1.0
    )
    try:
        return [await send_raw_request(bound_port(runner), r) for r in requests]
    finally:
        await runner.cleanup()


async def test_malformed_requests_logged_one_line(caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(server_logger, "filters", [MalformedRequestFilter(limit=2)])
    labels = {"service": "output_writer", "status": "400"}
    before = REGISTRY.get_sample_value("agogosml_rejected_requests_total", labels)
    writer = OutputWriter(WriterSettings(output="memory"), await started_sink())

    responses = await send_to_site(writer, *MALFORMED_REQUESTS.values())

    for response in responses:
        status_line = response.split(b"\r\n", 1)[0]
        assert status_line.endswith(b" 400 Bad Request")
    logged = [r for r in caplog.records if r.name == server_logger.name]
    assert len(logged) == 2
    for record in logged:
        assert record.levelno == logging.WARNING
        assert record.exc_info is None
        assert record.getMessage().startswith("malformed HTTP request from 127.0.0.1")
    assert "Content-Length" in logged[0].getMessage()
    # Counted even when not logged.
    after = REGISTRY.get_sample_value("agogosml_rejected_requests_total", labels)
    assert after == (before or 0) + 3


async def test_malformed_request_log_leaves_out_header(caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(server_logger, "filters", [MalformedRequestFilter()])
    writer = OutputWriter(WriterSettings(output="memory"), await started_sink())
    request = (
        b"POST / HTTP/1.1\r\nHost: t\r\n"
        b"Authorization: Bearer sup3r-s3cret\x01\r\nContent-Length: 0\r\n\r\n"
    )

    (response,) = await send_to_site(writer, request)

    logged = [r for r in caplog.records if r.name == server_logger.name]
    assert response.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert len(logged) == 1
    # aiohttp's C parser writes "Invalid header value char", its Python one
    # "Invalid HTTP header".
    assert "rejected with 400: Invalid " in logged[0].getMessage()
    assert "sup3r" not in caplog.text


def compress(coding: str, data: bytes) -> bytes:
    """Compress `data` with an HTTP content coding other than identity."""
    if coding == "br":
        return brotli.compress(data)
    if coding == "zstd":
        return zstd.compress(data)
    if coding in ("gzip", "x-gzip"):
        return gzip.compress(data)
    return zlib.compress(data)


@pytest.mark.parametrize(
    "coding", ["gzip", "x-gzip", "deflate", "br", "zstd", "identity"]
)
async def test_compressed_body_written(coding):
    sink = await started_sink()
    body = b'{"n": 1}' if coding == "identity" else compress(coding, b'{"n": 1}')

    async with serve_writer(sink) as (client, _):
        status, _, document = await raw_post(
            client, "/", b"Content-Encoding: %s\r\n" % coding.encode(), body
        )

    assert status == 200, document
    assert [envelope.value for envelope in sink.envelopes] == [b'{"n": 1}']


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        (b"Content-Encoding: foo\r\n", "'foo'"),
        (b"Content-Encoding: gzip, identity\r\n", "'gzip, identity'"),
        (
            b"Content-Encoding: identity\r\nContent-Encoding: gzip\r\n",
            "'identity, gzip'",
        ),
    ],
)
async def test_unknown_content_encoding_415(headers, named):
    sink = await started_sink()

    async with serve_writer(sink) as (client, _):
        status, content_type, document = await raw_post(client, "/", headers, b"{}")

    assert status == 415
    assert content_type.startswith(b"application/json")
    assert f"Content-Encoding {named} is not supported" in document["error"]
    assert "br, deflate, gzip, identity, zstd" in document["error"]
    assert sink.send_calls == 0


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br", "zstd"])
async def test_truncated_compressed_body_400(coding):
    sink = await started_sink()
    data = compress(coding, b'{"n": "' + b"1234567890" * 2000 + b'"}')

    async with serve_writer(sink) as (client, _):
        status, _, document = await raw_post(
            client,
            "/",
            b"Content-Encoding: %s\r\n" % coding.encode(),
            data[: len(data) // 2],
        )

    assert status == 400, document
    assert (
        f"cannot be decoded as its Content-Encoding {coding!r} declares"
        in (document["error"])
    )
    assert f"it ends before the end of its {coding} stream" in document["error"]
    assert sink.send_calls == 0


async def test_invalid_gzip_body_400_through_site(caplog):
    sink = await started_sink()
    writer = OutputWriter(WriterSettings(output="memory"), sink)
    request = (
        b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 2\r\n\r\nxx"
    )

    (response,) = await send_to_site(writer, request)

    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert b"application/json" in head
    error = orjson.loads(body)["error"]
    assert "cannot be decoded as its Content-Encoding 'gzip' declares" in error
    assert "it is not valid gzip data" in error
    assert sink.send_calls == 0
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
async def test_compressed_body_over_limit_413(coding):
    sink = await started_sink()
    data = compress(coding, b'{"n": "' + b"0" * 2_000_000 + b'"}')

    async with serve_writer(sink, max_body_bytes=1_000_000) as (client, _):
        status, _, document = await raw_post(
            client, "/", b"Content-Encoding: %s\r\n" % coding.encode(), data
        )

    assert status == 413, document
    assert "exceeds the limit of 1000000 bytes" in document["error"]
    assert sink.send_calls == 0


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_client_reset_logged_one_debug_line(caplog, level):
    caplog.set_level(level, logger=server_logger.name)
    log_filter = MalformedRequestFilter(limit=1, interval_seconds=0.0)
    error = ConnectionResetError("Cannot write to closing transport")
    record = logging.LogRecord(
        "x", logging.ERROR, "f", 1, "Error handling request", None,
        (ConnectionResetError, error, None),
    )  # fmt: skip

    passed = log_filter.filter(record)

    assert passed is (level == logging.DEBUG)
    if passed:
        assert record.levelno == logging.DEBUG
        assert record.exc_info is None
        assert "closing transport" in record.getMessage()


def test_malformed_filter_passes_other_errors():
    log_filter = MalformedRequestFilter(limit=1, interval_seconds=0.0)
    error = ValueError("not a parse error")
    unrelated = logging.LogRecord(
        "x", logging.ERROR, "f", 1, "handler failed", None, (ValueError, error, None)
    )

    assert log_filter.filter(unrelated) is True
    assert unrelated.levelno == logging.ERROR
    assert unrelated.exc_info is not None


async def test_rejected_requests_logged_at_most_limit(caplog, monkeypatch):
    caplog.set_level(logging.INFO, "agogosml.http")
    monkeypatch.setattr(http, "MALFORMED_LOG_LIMIT", 3)
    monkeypatch.setattr(http, "MALFORMED_LOG_INTERVAL_SECONDS", 0.5)
    sink = await started_sink()
    labels = {"service": "output_writer", "status": "404"}
    before = REGISTRY.get_sample_value("agogosml_rejected_requests_total", labels)

    async with serve_writer(sink) as (client, _):
        for _ in range(10):
            response = await client.get("/nowhere")
            assert response.status == 404
        await asyncio.sleep(0.6)  # the next interval
        await client.get("/nowhere")

    lines = [r for r in caplog.records if r.getMessage() == "request rejected"]
    after = REGISTRY.get_sample_value("agogosml_rejected_requests_total", labels)
    assert [r.not_logged_before for r in lines] == [0, 0, 0, 7]
    assert after - (before or 0) == 11
