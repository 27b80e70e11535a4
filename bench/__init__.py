"""The tidings benchmark harness: ``python -m bench``."""
