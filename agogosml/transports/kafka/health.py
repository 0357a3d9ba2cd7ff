"""Broker connectivity of a librdkafka client, for readiness checks."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from confluent_kafka import KafkaError

logger = logging.getLogger(__name__)

#: How often librdkafka reports statistics, and so how fast readiness follows
#: the broker connection.
STATS_INTERVAL_MS = 2000


class BrokerHealth:
    """Track whether a client can reach a broker, from its statistics and errors.

    The client is up once a statistics report shows a broker connection in state
    ``UP``. It is down after an all-brokers-down or fatal error, until a later
    report shows a connection again (librdkafka reconnects by itself). A report
    without connections does not mark it down, because librdkafka may close idle
    connections on purpose.

    NOTE: checked against Apache Kafka only; Azure Event Hubs, which closes idle
    connections, is not tested here.
    """

    def __init__(self, client: str) -> None:
        self._client = client
        self.up = False
        self.fatal = False

    def on_statistics(self, stats: dict[str, Any]) -> None:
        """Update from one parsed statistics report."""
        brokers = stats.get("brokers", {}).values()
        if self.fatal or not any(broker.get("state") == "UP" for broker in brokers):
            return
        if not self.up:
            logger.info("kafka %s connected", self._client)
        self.up = True

    def on_error(self, error: KafkaError) -> None:
        """Update from an error callback, logging the error."""
        if error.fatal():
            self.fatal = True
            self.up = False
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.up = False
        logger.error("kafka %s error: %s", self._client, error)

    def config(self, on_statistics: Any = None) -> dict[str, Any]:
        """Return the client properties that feed this tracker."""

        def stats_cb(stats_json: str) -> None:
            stats = orjson.loads(stats_json)
            self.on_statistics(stats)
            if on_statistics is not None:
                on_statistics(stats)

        return {
            "statistics.interval.ms": STATS_INTERVAL_MS,
            "stats_cb": stats_cb,
            "error_cb": self.on_error,
        }
