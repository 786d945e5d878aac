"""The router's prefix index: which chunks are cached where, built from the store's change
stream (and, with the routing issue's next slice, the engines' own KV events)."""

from router.index.feed import StoreIndexFeed
from router.index.store_index import StoreIndex, stream_id_after

__all__ = ["StoreIndex", "StoreIndexFeed", "stream_id_after"]
