"""The local backend: runs as processes on this machine (warm worker pools or one process a run)."""
