"""agogosml: put a machine-learning model on a data stream.

The input reader consumes a stream and posts each message to a model app over
HTTP; the app posts its result to the output writer, which produces it to a
stream. Delivery is at least once: nothing is committed upstream before it is
durable downstream or dead-lettered.
"""

from agogosml.envelope import Envelope, Position
from agogosml.errors import (
    AgogosmlError,
    AppRequestError,
    ConfigurationError,
    SinkError,
    SourceError,
    TransportError,
)
from agogosml.transports.base import Sink, Source

__all__ = [
    "AgogosmlError",
    "AppRequestError",
    "ConfigurationError",
    "Envelope",
    "Position",
    "Sink",
    "SinkError",
    "Source",
    "SourceError",
    "TransportError",
]

__version__ = "0.1.0"
