"""The input reader service: source → model app, with retries and dead letters."""

from agogosml.reader.client import AppClient, Outcome
from agogosml.reader.engine import InputReader, Transform

__all__ = ["AppClient", "InputReader", "Outcome", "Transform"]
