"""Sources and sinks: one subpackage per transport, the same interface for all."""

from agogosml.transports.base import OffsetTracker, RevokeHandler, Sink, Source

__all__ = ["OffsetTracker", "RevokeHandler", "Sink", "Source"]
