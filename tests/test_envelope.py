import base64
import hashlib

import pytest

from agogosml.envelope import (
    MAX_ID_BYTES,
    Envelope,
    Position,
    bounded_id,
    child_traceparent,
    trace_id,
)


@pytest.mark.parametrize(
    ("key", "expected_text", "encoded"),
    [
        (b"card-1", "card-1", False),
        (b"", "", False),
        (b"  padded  ", base64.b64encode(b"  padded  ").decode(), True),
        (b"line\nbreak", base64.b64encode(b"line\nbreak").decode(), True),
        (b"\xff\xfe", base64.b64encode(b"\xff\xfe").decode(), True),
    ],
)
def test_key_text_survives_http_headers(key, expected_text, encoded):
    text, is_base64 = Envelope(b"{}", key=key).key_text()

    assert text == expected_text
    assert is_base64 is encoded


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"order-17", "order-17"),
        (b"a\r\nb", "a%0D%0Ab"),
        (b"\xff", "%FF"),
        (b" x ", "%20x%20"),
    ],
)
def test_message_id_header_made_header_safe(raw, expected):
    envelope = Envelope.from_record(b"{}", None, [("message-id", raw)], None)

    assert envelope.id == expected


def test_long_message_id_header_hashed():
    raw = b"x" * 513
    longest = b"y" * 512

    long_id = Envelope.from_record(b"{}", None, [("message-id", raw)], None).id
    longest_id = Envelope.from_record(b"{}", None, [("message-id", longest)], None).id

    assert long_id == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert longest_id == longest.decode()


def test_id_derived_from_position():
    position = Position("données.jsonl", 0, 42, 50, 1)

    envelope = Envelope.from_record(b"{}", None, None, position)

    assert envelope.id == "donn%C3%A9es.jsonl:0:42"


@pytest.mark.parametrize("empty", [b"", None])
def test_empty_id_and_trace_context_headers_left_out(empty):
    position = Position("in", 0, 7, 8, 1)
    headers = [("message-id", empty), ("traceparent", empty), ("tag", b"x")]

    envelope = Envelope.from_record(b"{}", None, headers, position)

    assert envelope.id == "in:0:7"
    assert trace_id(envelope.traceparent) is not None
    assert [name for name, _ in envelope.record_headers()] == [
        "message-id",
        "traceparent",
        "tag",
    ]


def test_child_traceparent_keeps_trace_id():
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    child = child_traceparent(parent)

    assert trace_id(child) == "0af7651916cd43dd8448eb211c80319c"
    assert child != parent


@pytest.mark.parametrize(
    "parent",
    [
        "",
        "garbage",
        "00-" + "0" * 32 + "-" + "1" * 16 + "-01",
        "00-" + "a" * 32 + "-" + "0" * 16 + "-01",
    ],
)
def test_invalid_traceparent_starts_new_trace(parent):
    child = child_traceparent(parent)

    assert trace_id(child) is not None
    assert trace_id(child) not in ("0" * 32, "a" * 32)


@pytest.mark.parametrize(
    ("parent", "flags"),
    [
        ("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "01"),
        ("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-more", "00"),
    ],
    ids=["version-01", "later-version-with-more-fields"],
)
def test_later_traceparent_version_read_as_00(parent, flags):
    child = child_traceparent(parent)

    assert child.startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert child.endswith(f"-{flags}")


@pytest.mark.parametrize(
    "parent",
    [
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-more",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01more",
    ],
    ids=["version-ff", "version-00-with-more", "no-dash-after-flags"],
)
def test_invalid_traceparent_version_starts_new_trace(parent):
    assert trace_id(child_traceparent(parent)) != "0af7651916cd43dd8448eb211c80319c"


def test_position_id_encodes_percent():
    literal = Envelope(value=b"{}", position=Position("%C3%A9", 0, 7, 8))
    encoded = Envelope(value=b"{}", position=Position("é", 0, 7, 8))

    assert literal.id != encoded.id
    assert encoded.id == "%C3%A9:0:7"


def test_http_headers_text_and_base64():
    envelope = Envelope(
        value=b"{}",
        headers=[
            ("Source-System", b"pos-7"),
            ("region", b"eu"),
            ("Region", b"us"),
            ("binary", b"\xff\x00"),
            ("multi-line", b"a\r\nb"),
            ("utf8", "café".encode()),
            ("padded", b"  pad  "),
        ],
    )

    headers = envelope.http_headers()

    # Of names that differ only in case the last spelling and value count.
    assert headers.values == {
        "Source-System": "pos-7",
        "Region": "us",
        "binary": "/wA=",
        "multi-line": "YQ0KYg==",
        "utf8": "café",
        "padded": "ICBwYWQgIA==",
    }
    assert headers.base64_names == ["binary", "multi-line", "padded"]
    assert headers.cased_names() == ["Source-System", "Region"]
    assert headers.non_token_name() is None


def test_http_headers_base64_names_keep_spelling():
    envelope = Envelope(value=b"{}", headers=[("Raw-Id", b"\xff"), ("ok", b"1")])

    headers = envelope.http_headers()

    assert headers.values == {"Raw-Id": "/w==", "ok": "1"}
    assert headers.base64_names == ["Raw-Id"]
    assert headers.cased_names() == ["Raw-Id"]


def test_http_headers_last_value_sets_encoding():
    envelope = Envelope(value=b"{}", headers=[("tag", b"\xff"), ("tag", b"plain")])

    headers = envelope.http_headers()

    assert headers.values == {"tag": "plain"}
    assert headers.base64_names == []


@pytest.mark.parametrize("name", ["bad name", "caf\u00e9"])
def test_http_headers_non_token_name(name):
    envelope = Envelope(value=b"{}", headers=[("ok", b"1"), (name, b"x")])

    assert envelope.http_headers().non_token_name() == name


def test_http_headers_leave_out_empty_name():
    envelope = Envelope(value=b"{}", headers=[("", b"x"), ("ok", b"1")])

    headers = envelope.http_headers()

    assert headers.values == {"ok": "1"}
    assert headers.non_token_name() is None


def test_http_headers_empty_without_headers():
    headers = Envelope(value=b"{}").http_headers()

    assert headers.values == {}
    assert headers.base64_names == []


def test_null_header_value_kept():
    headers = [("Tombstoned-By", None), ("empty", b""), ("tag", b"\xff")]

    envelope = Envelope.from_record(b"{}", None, headers, Position("in", 0, 7, 8, 1))
    http = envelope.http_headers()

    assert envelope.record_headers()[2:] == headers
    assert http.values == {"Tombstoned-By": None, "empty": "", "tag": "/w=="}
    assert http.null_names == ["Tombstoned-By"]
    assert http.base64_names == ["tag"]


@pytest.mark.parametrize(
    ("message_id", "kept"),
    [
        ("\U0001f600" * (MAX_ID_BYTES // 4), True),
        ("\U0001f600" * (MAX_ID_BYTES // 4) + "x", False),
        ("x" * MAX_ID_BYTES, True),
        ("x" * (MAX_ID_BYTES + 1), False),
        ("", True),
    ],
)
def test_bounded_id_limit_counts_utf8_bytes(message_id, kept):
    digest = "sha256:" + hashlib.sha256(message_id.encode()).hexdigest()

    assert bounded_id(message_id) == (message_id if kept else digest)
