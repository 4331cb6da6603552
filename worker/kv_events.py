"""The engine's prefix-cache events as the vLLM engine contract's KvEventBatch messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from smg_grpc_proto.generated import common_pb2

from llmgrpc.engines.prefix_cache import BLOCK_TOKENS, KvEvent, KvEventBatch, KvEventLog

# How long one wait for new events lasts: a subscriber that left is noticed within it.
WAIT_S = 1.0


def event_to_pb(event: KvEvent, event_id: int) -> common_pb2.KvCacheEvent:
    if not event.stored:
        return common_pb2.KvCacheEvent(
            event_id=event_id, removed=common_pb2.KvBlocksRemoved(block_hashes=event.block_hashes)
        )
    stored = common_pb2.KvBlocksStored(
        blocks=[
            common_pb2.KvBlock(block_hash=block, token_ids=tokens, block_size=BLOCK_TOKENS)
            for block, tokens in zip(event.block_hashes, event.token_ids, strict=True)
        ],
        tier=common_pb2.KV_CACHE_TIER_DEVICE,
        locality=common_pb2.KV_CACHE_LOCALITY_LOCAL,
    )
    if event.parent_hash is not None:
        stored.parent_block_hash = event.parent_hash
    if event.adapter:
        stored.lora_name = event.adapter
    return common_pb2.KvCacheEvent(event_id=event_id, stored=stored)


def batch_to_pb(batch: KvEventBatch) -> common_pb2.KvEventBatch:
    return common_pb2.KvEventBatch(
        sequence_number=batch.sequence_number,
        timestamp=batch.timestamp,
        events=[event_to_pb(event, batch.sequence_number) for event in batch.events],
    )


async def watch(log: KvEventLog, start_sequence_number: int) -> AsyncIterator[common_pb2.KvEventBatch]:
    """The log's batches after start_sequence_number, then each new one, until the caller leaves."""
    cursor = start_sequence_number
    while True:
        for batch in await asyncio.to_thread(log.since, cursor, WAIT_S):
            cursor = batch.sequence_number
            yield batch_to_pb(batch)
