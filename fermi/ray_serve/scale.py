"""How many fermi replicas run on Ray, and what each asks of it (no Ray imported here)."""

from __future__ import annotations

from dataclasses import dataclass

from fermi.errors import InvalidRequest


@dataclass(frozen=True)
class ScaleOptions:
    """How many replicas, and what each asks of Ray.

    `num_replicas` fixes the count; otherwise the count moves between `min_replicas` and
    `max_replicas`, aiming at `target_ongoing_requests` requests (running + queued) per replica
    (default: the replica's engine pool, so a replica with waiting requests asks for another).
    `replica_cpus` is the CPUs Ray reserves per replica, which is also its onnxruntime threads
    unless the settings name a thread count; `replica_gpus` likewise (0 on a CPU cluster)."""

    num_replicas: int | None = None
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    router_replicas: int = 1  # FermiFront replicas (the HTTP ingress)

    def check(self) -> ScaleOptions:
        """Raises InvalidRequest naming a count out of range."""
        if self.num_replicas is not None and self.num_replicas < 1:
            raise InvalidRequest("--replicas must be 1 or more", param="replicas")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise InvalidRequest(
                f"replicas: need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}), "
                "max at least 1",
                param="max_replicas",
            )
        if self.replica_cpus <= 0 or self.router_replicas < 1:
            raise InvalidRequest("replica_cpus must be above 0 and router_replicas at least 1")
        return self
