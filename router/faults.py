"""What an engine call's failure means for the request: the one place that reads Ray's and
Serve's exception types, so the pipeline sees only pdserve's.

    replica lost   the replica's process died, is unreachable, or its engine died inside it,
                   or its tokens stopped arriving (``kvstore.token_channel.TokensLost``)
                   -> ``ReplicaLost``: the pipeline retries the prefill elsewhere, or resumes
                      the decode elsewhere from the tokens already streamed
    pool full      Serve's handle refused the call (the pool's ``max_queued_requests``)
                   -> ``Overloaded`` (429 with Retry-After)
    anything else  the request's own failure (an engine rejected it): not retried
"""

from __future__ import annotations

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from kvstore.token_channel import TokensLost
from router.errors import Overloaded

# vLLM's exceptions for an engine core that died under a live replica (its health check
# fails next and Serve replaces the replica). Matched by name: the router never imports vLLM.
_ENGINE_DEAD = frozenset({"EngineDeadError", "EngineGenerateError"})


class ReplicaLost(Exception):
    """The replica serving a call went away mid-call; another one can take the request."""

    def __init__(self, replica: str, cause: BaseException) -> None:
        super().__init__(f"replica {replica or '?'} lost: {type(cause).__name__}: {cause}")
        self.replica, self.cause = replica, cause


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen and len(seen) < 8:
        seen.append(e)
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return seen


def replica_lost(exc: BaseException) -> bool:
    """True when ``exc`` says the replica (process or engine) is gone, not that the request
    was bad: these are safe to retry, since nothing of the request survives on that replica."""
    for e in _chain(exc):
        if isinstance(e, RayActorError | ActorUnavailableError | TokensLost) or type(e).__name__ in _ENGINE_DEAD:
            return True
    return False


def translate(exc: BaseException, replica: str = "") -> BaseException:
    """The exception the pipeline should see for a failed engine call."""
    if isinstance(exc, BackPressureError):
        return Overloaded("the engine pools are at their queue limit; retry later", code="pool_queue_full")
    if replica_lost(exc):
        return ReplicaLost(replica, exc)
    return exc
