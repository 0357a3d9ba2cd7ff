"""Dead letters that the Kafka sink rejects for good still finish their message."""

from __future__ import annotations

from fakes import MemorySource
from test_kafka_transport import mock_bootstrap  # noqa: F401
from test_reader import TOPIC, accept, reader_settings, running_reader, stub_app
from test_reader import wait_for as wait_until

from agogosml.config import KafkaSettings
from agogosml.envelope import Envelope
from agogosml.transports.kafka import KafkaSink
from agogosml.transports.kafka.records import record_size


async def test_oversized_key_dead_lettered_without_it(mock_bootstrap: str) -> None:  # noqa: F811
    # The key fits the input record, but not a dead letter with its context
    # headers; single-message requests cannot carry it in a header either.
    key = b"k" * 999_500
    value = b'{"n": 0}'
    assert record_size(value, key, Envelope(value, key).record_headers()) < 1_000_000
    source = MemorySource(TOPIC)
    source.add(value, key=key)
    source.add(b'{"n": 1}')
    settings = KafkaSettings(bootstrap_servers=mock_bootstrap)
    dead_letter = KafkaSink(settings, "input.dlq")

    async with stub_app(accept) as app:
        reader_config = reader_settings(app.url, stop_at_end=False)
        async with running_reader(reader_config, source, dead_letter) as (reader, _):
            await wait_until(lambda: source.committed == {(TOPIC, 0): 2})
            failing = reader.dead_letter_failing

    assert failing is False
    assert app.numbers() == [1]
    assert reader.dead_lettered_count == 1
