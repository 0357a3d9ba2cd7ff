"""File transport: JSON Lines files, stdin and stdout."""

from agogosml.transports.file.sink import FileSink
from agogosml.transports.file.source import FileSource

__all__ = ["FileSink", "FileSource"]
