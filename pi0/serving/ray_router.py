"""How Ray Serve's proxy picks a replica for a new robot connection (`pi0 serve --replicas N`): the one with the
fewest open connections, ties at random.

Ray's default (power of two choices over cached queue lengths) sent every connection of a burst to one replica
(8 of 8, measured on 2 replicas): a replica missing from its cache is only probed in the background while the one
in it keeps winning. A websocket counts as one ongoing request for its whole life, so the router's queue lengths
(incremented as each connection is routed, corrected by probes) are open connections; every replica is ranked by
them, so that a burst alternates. Imported by path (`RequestRouterConfig`), so this module needs Ray.
"""

from __future__ import annotations

import random

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)


class FewestConnections(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Every candidate, one per rank, fewest open connections first (a replica not yet probed counts 0)."""
        opened = self.replica_queue_len_cache
        ranked = sorted(candidate_replicas, key=lambda r: (opened.get(r.replica_id) or 0, random.random()))
        return [[r] for r in ranked]
