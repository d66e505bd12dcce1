"""sandboxd: a security-hardened sandbox service. See docs/architecture.md."""

__version__ = "0.1.0"
