"""The container backend: runs and services as podman containers of the versions' images."""
