"""The Prometheus metrics' definitions, as a scrape shows them."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from agogosml.app import AppSettings
from agogosml.config import KafkaSettings, ReaderSettings
from agogosml.metrics import REQUEST_SECONDS, SCORE_SECONDS, SINK_SECONDS

DEFAULT_TIMEOUTS_SECONDS = {
    "READER_REQUEST_TIMEOUT_MS": (
        ReaderSettings.model_fields["request_timeout_ms"].default / 1000
    ),
    "APP_WRITER_TIMEOUT_MS": (
        AppSettings.model_fields["writer_timeout_ms"].default / 1000
    ),
    "KAFKA_DELIVERY_TIMEOUT_MS": (
        KafkaSettings.model_fields["delivery_timeout_ms"].default / 1000
    ),
}


def finite_bucket_bounds(name: str) -> list[float]:
    """Return the finite ``le`` bounds of a histogram in the default registry."""
    bounds = {
        float(sample.labels["le"])
        for metric in REGISTRY.collect()
        if metric.name == name
        for sample in metric.samples
        if sample.name == f"{name}_bucket"
    }
    return sorted(bound for bound in bounds if bound != float("inf"))


@pytest.mark.parametrize("setting", sorted(DEFAULT_TIMEOUTS_SECONDS))
def test_latency_buckets_cover_default_timeouts(setting: str) -> None:
    REQUEST_SECONDS.labels("input_reader", "ok")
    SINK_SECONDS.labels("output_writer")
    SCORE_SECONDS.labels("app", "ok")
    timeout = DEFAULT_TIMEOUTS_SECONDS[setting]

    for name in (
        "agogosml_request_duration_seconds",
        "agogosml_sink_duration_seconds",
        "agogosml_score_duration_seconds",
    ):
        bounds = finite_bucket_bounds(name)
        assert bounds, f"{name} has no buckets"
        assert bounds[-1] >= timeout, f"{name} ends below {setting}"
