"""Cache-aware replica choice, as a Ray Serve RequestRouter.

A request that carries a routing key (the front passes it as the handle's `session_id`, see
fermi/ray_serve/routing.py) goes where its key lies on a consistent-hash ring of the replicas
(Ray Serve's ConsistentHashRouter): the replica that holds its session or prefilled prefix. When
that replica is at its `max_ongoing_requests` the next replicas on the ring are tried. When a
replica dies or one is added, only the keys of that replica move (its sessions are prefilled
again on their new replica from the history the client resends), the rest keep their replica.

A request without a key goes to the least loaded of two random replicas (Ray Serve's "power of
two choices": the replicas are asked for their queue lengths)."""

from __future__ import annotations

import random

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.request_router import PendingRequest, RunningReplica


class CacheAwareRouter(ConsistentHashRouter):
    """Keyed requests: consistent hashing on the key; the others: least loaded of two."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.session_id:
            return await super().choose_replicas(candidate_replicas, pending_request)
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
