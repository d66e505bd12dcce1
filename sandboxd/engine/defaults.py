"""Where the daemon listens and reads its configuration unless told otherwise.

Apart from engine/config.py, which uses them in its schema, so that the command line and the client
can name them without importing the configuration loader (and the policy schema behind it)."""

DEFAULT_SOCKET = "/run/sandboxd/sandboxd.sock"
DEFAULT_CONFIG = "/etc/sandboxd/server.yaml"
