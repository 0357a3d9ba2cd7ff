"""The ``agogosml`` command-line interface."""
