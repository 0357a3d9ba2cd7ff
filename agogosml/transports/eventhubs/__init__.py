"""Azure Event Hubs transport on the azure-eventhub async clients."""

from agogosml.transports.eventhubs.sink import EventHubsSink
from agogosml.transports.eventhubs.source import EventHubsSource

__all__ = ["EventHubsSink", "EventHubsSource"]
