"""uspan: userspace WireGuard in Python, and a KubeSpan-style mesh built on it."""

__version__ = "0.1.0"
