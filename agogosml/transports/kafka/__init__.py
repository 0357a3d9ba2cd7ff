"""Kafka transport on confluent-kafka."""

from agogosml.transports.kafka.sink import KafkaSink
from agogosml.transports.kafka.source import KafkaSource

__all__ = ["KafkaSink", "KafkaSource"]
