"""A served class's settings when nobody names them, written once.

Three parties fill in the same gaps: the SDK (``Model.deploy()``, ``serve_asgi()``), the platform
(``PUT /services/{name}`` without a field, and ``ServiceInfo``) and the runtime (``opbox.runtime
serve`` without ``OPBOX_CONCURRENCY``/``OPBOX_QUEUE``). This module sits at the SDK's root and
imports nothing, so all three may import it and none can drift from the others.
"""

from __future__ import annotations

REPLICAS = 1  # replicas while the service is active
CONCURRENCY = 16  # calls at once per replica (Knative's containerConcurrency); 0: no limit
QUEUE = 64  # calls waiting per replica beyond that; then 429 with Retry-After
SCALE_TO_ZERO: float | None = 900.0  # idle seconds before the replicas stop; None: never

SERVICE = {"replicas": REPLICAS, "concurrency": CONCURRENCY, "queue": QUEUE, "scale_to_zero": SCALE_TO_ZERO}
