"""The router's prefix index: which chunks are cached where, built from the store's change
stream (store nodes) and the prefill engines' KV events (their own caches)."""

from router.index.engine_feed import EngineEventFeed
from router.index.feed import StoreIndexFeed
from router.index.store_index import StoreIndex, stream_id_after

__all__ = ["EngineEventFeed", "StoreIndex", "StoreIndexFeed", "stream_id_after"]
