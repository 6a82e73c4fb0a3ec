"""imagefs: a lazy, shared, read-only container image filesystem."""

__version__ = "0.1.0"
