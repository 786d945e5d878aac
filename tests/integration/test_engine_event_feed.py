"""The engine-event feed over real ZMQ, with batches encoded by vLLM's own publisher code
path (msgspec, as ``ZmqEventPublisher`` sends them): chunk keys reach the index, a sequence
gap forgets what may be stale, a retired replica is forgotten."""

from __future__ import annotations

import msgspec
import zmq
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from cluster.runtime import free_port, wait_until
from kvstore.hashing import KVNamespace, chunk_keys
from router.index import EngineEventFeed
from router.policy.state import EngineCacheIndex

NS = KVNamespace("m", "float32", "cpu/bs32", chunk_tokens=32)
IDS = list(range(1000, 1128))  # 4 blocks of 32


def block(hashes: list[bytes], parent: bytes | None, tokens: list[int]) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=32,
                       lora_id=None, medium="CPU", lora_name=None)


class Publisher:
    """What vLLM's ZmqEventPublisher puts on the wire: (topic, 8-byte seq, msgpack batch)."""

    def __init__(self, topic: str) -> None:
        self.port = free_port()
        self.sock = zmq.Context.instance().socket(zmq.PUB)
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.topic, self.seq = topic.encode(), 0
        self.encoder = msgspec.msgpack.Encoder()

    def send(self, *events: object, skip: int = 0) -> None:
        self.seq += skip
        batch = KVEventBatch(ts=0.0, events=list(events))
        self.sock.send_multipart((self.topic, self.seq.to_bytes(8, "big"), self.encoder.encode(batch)))
        self.seq += 1


def test_feed_turns_events_into_chunk_keys_and_forgets_on_gaps() -> None:
    index = EngineCacheIndex()
    feed = EngineEventFeed(index, NS, poll_ms=20)
    feed.start()
    pub = Publisher("replica-a")
    try:
        feed.watch("replica-a", f"tcp://127.0.0.1:{pub.port}")
        keys = chunk_keys(NS, IDS)
        hashes = [bytes([i]) * 32 for i in range(4)]

        def prefix() -> int:
            return index.prefix_by_replica(keys).get("replica-a", 0)

        # PUB/SUB drops what is sent before the subscription lands: resend until it is seen.
        wait_until(lambda: pub.send(block(hashes[:2], None, IDS[:64])) is None and prefix() == 2, 10,
                   "the first blocks to reach the index")
        pub.send(block(hashes[2:], hashes[1], IDS[64:]))
        wait_until(lambda: prefix() == 4, 5, "the chained blocks")
        pub.send(BlockRemoved(block_hashes=[hashes[3]], medium="CPU"))
        wait_until(lambda: prefix() == 3, 5, "the removal")
        pub.send(block([b"x" * 32], None, list(range(32))), skip=3)  # events were lost in between
        wait_until(lambda: prefix() == 0 and feed.gaps == 1, 5, "the gap to forget the replica")
        pub.send(AllBlocksCleared())
        feed.retire("replica-a")
        wait_until(lambda: index.replicas() == [], 5, "the retired replica to go")
    finally:
        feed.stop()
        pub.sock.close(0)
