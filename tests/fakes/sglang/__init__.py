"""A fake SGLang for fault tests: put ``tests/fakes`` first on ``PYTHONPATH`` and ``python -m
sglang.launch_server`` runs :mod:`sglang.launch_server` here (the simulated server with fault switches)."""

__version__ = "0.5.11"
