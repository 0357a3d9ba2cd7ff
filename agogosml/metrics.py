"""Prometheus metrics of the agogosml services.

Every metric of more than one service carries a ``service`` label
(``input_reader``, ``output_writer`` or ``app``), so one scrape config can read
all three. Those of the reader's source alone, consumer lag and commits, do not.
Counters and histograms export no ``_created`` series, which would double the
number of series for a timestamp that no alert needs.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()

#: Latency buckets up to 60 s, so that the default timeouts (20 s for a Kafka
#: delivery, 25 s for a writer request, 30 s for an app request) fall in a
#: finite bucket.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 30.0, 60.0,
)  # fmt: skip

MESSAGES_IN = Counter(
    "agogosml_messages_in_total",
    "Messages received: read from the source, or accepted in requests.",
    ["service"],
)
MESSAGES_OUT = Counter(
    "agogosml_messages_out_total",
    "Messages finished: acknowledged by the app, or written to the sink.",
    ["service"],
)
RETRIES = Counter(
    "agogosml_retries_total",
    "Messages sent to the app again after a failed request, one per message.",
    ["service"],
)
DEAD_LETTERED = Counter(
    "agogosml_dead_lettered_total",
    "Messages written to the dead-letter sink.",
    ["service", "reason"],
)
IN_FLIGHT = Gauge(
    "agogosml_in_flight_messages",
    "Messages read or accepted but not yet finished.",
    ["service"],
)
REQUEST_SECONDS = Histogram(
    "agogosml_request_duration_seconds",
    "Duration of HTTP requests to the next stage, in seconds.",
    ["service", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
SINK_SECONDS = Histogram(
    "agogosml_sink_duration_seconds",
    "Time from handing records to the sink to their acknowledgement, in seconds.",
    ["service"],
    buckets=_LATENCY_BUCKETS,
)
SCORE_SECONDS = Histogram(
    "agogosml_score_duration_seconds",
    "Duration of calls of the model app's scoring function, in seconds.",
    ["service", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
SCORED_VALUES = Counter(
    "agogosml_scored_values_total",
    "Values passed to the model app's scoring function, by outcome.",
    ["service", "outcome"],
)
MODEL_INFO = Gauge(
    "agogosml_model_info",
    "The model app's name, model version and blue/green slot (empty outside "
    "one); the value is always 1.",
    ["service", "name", "version", "slot"],
)
SINK_ERRORS = Counter(
    "agogosml_sink_errors_total",
    "Records that a sink failed to write, one per failed attempt: the output "
    "writer's records, and the input reader's dead letters.",
    ["service"],
)
READY = Gauge(
    "agogosml_ready",
    "1 while the service is ready (GET /readyz answers 200), else 0.",
    ["service"],
)
CONSUMER_LAG = Gauge(
    "agogosml_consumer_lag_messages",
    "Messages between the committed offset and the end of each partition.",
    ["topic", "partition"],
)
COMMITS = Counter(
    "agogosml_commits_total",
    "Partition positions that the input reader committed: Kafka offsets or "
    "Event Hubs checkpoints, by outcome.",
    ["outcome"],
)
REJECTED_REQUESTS = Counter(
    "agogosml_rejected_requests_total",
    "Requests rejected with a 4xx or 5xx status.",
    ["service", "status"],
)


def start_at_zero(counter: Counter, *label_sets: tuple[str, ...]) -> None:
    """Create the series of `counter` with each of `label_sets` at 0.

    rate() and increase() show no increase in a series that first appears
    with the value 1, so an alert on the first event after a start would not
    fire.
    """
    for labels in label_sets:
        counter.labels(*labels)
