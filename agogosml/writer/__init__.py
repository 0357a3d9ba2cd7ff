"""The output writer service: HTTP requests → durable records on a sink."""

from agogosml.writer.service import OutputWriter, serve_writer

__all__ = ["OutputWriter", "serve_writer"]
