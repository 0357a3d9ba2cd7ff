"""Benchmarks of agogosml against a raw Kafka relay on the same broker.

``python -m benchmarks`` (or ``make bench``) runs the suite; docs/benchmarks.md
describes the method and the results.
"""
