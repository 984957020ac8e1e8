"""The kubernetes backend: runs as Jobs, services as Knative Services, image builds with kaniko."""
