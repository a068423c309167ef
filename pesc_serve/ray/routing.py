"""``--router prefix``: prompt-prefix affinity on Ray Serve's pluggable request router API.

Ray 2.60 lets a deployment name its own request router (``RequestRouterConfig``, public API
``ray.serve.request_router``, alpha).  Ray's own prefix-aware router ships in ``ray.serve.llm``,
whose import needs vLLM or SGLang installed, so pesc-serve carries this small one instead.

Policy: a request that names a delta first narrows the candidates to the replicas holding it
(Serve's multiplex ranking, as with the default router).  A request with a prompt then ranks
the candidates by rendezvous hashing of the prompt's first characters (forwarding.py) and
offers the top two to Serve, which sends it to the less loaded of them: requests sharing a
system prompt or a few-shot preamble keep landing on the same two replicas, whose prefix
caches hold it, while load still spreads between the two.  If both are full, the other
candidates are offered.  With two replicas this is exactly power of two choices; the affinity
shows from three replicas on.  Requests without a prompt go by power of two choices.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

from ray.serve.request_router import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

PREFERRED = 2  # replicas a prefix may land on (the two choices)


def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[str]:
    """``replica_ids`` from most to least preferred for ``key`` (highest random weight hashing:
    adding or removing a replica moves only the prefixes that ranked it first)."""

    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{replica_id}\x00{key}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class PrefixAffinityRouter(FIFOMixin, LocalityMixin, MultiplexMixin, RequestRouter):
    """Power of two choices among the two replicas a prompt prefix hashes to."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ids = self.apply_multiplex_routing(pending_request=pending_request)
        else:
            ids = self.apply_locality_routing(pending_request=pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        candidates = [by_id[i] for i in ids if i in by_id]
        if not candidates:
            return []
        key = _prefix_key(pending_request)
        if key is None or len(candidates) <= PREFERRED:
            return [random.sample(candidates, min(PREFERRED, len(candidates)))]
        order = rendezvous_order(key, [r.replica_id.unique_id for r in candidates])
        by_unique = {r.replica_id.unique_id: r for r in candidates}
        preferred = [by_unique[u] for u in order[:PREFERRED]]
        return [preferred, [by_unique[u] for u in order[PREFERRED:]]]


def _prefix_key(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None or not pending_request.args:
        return None
    return getattr(pending_request.args[0], "prefix_key", None)
