"""The prefix cache's bookkeeping alone (no model): the Transformers store's runs and eviction,
llama.cpp's slot choice, and the KV events both publish."""

from __future__ import annotations

from llmgrpc.engines.llamacpp_slots import SlotTable
from llmgrpc.engines.prefix_cache import BLOCK_TOKENS, KvEventLog, PrefixStore, block_hashes


def events(log: KvEventLog) -> list[tuple[bool, int]]:
    """(stored?, how many blocks) of every event so far."""
    return [(e.stored, len(e.block_hashes)) for b in log.since(0, timeout=0) for e in b.events]


def test_the_store_serves_the_longest_prefix_and_evicts_the_least_recently_used():
    store = PrefixStore(capacity_tokens=100, events=KvEventLog())
    store.store(list(range(40)), lambda: "a")
    store.store(list(range(100, 140)), lambda: "b")
    run, length = store.longest_prefix([*range(30), 999])
    assert (run.kv, length) == ("a", 30)
    store.store(list(range(200, 240)), lambda: "c")  # 120 tokens: "b", used least recently, goes
    assert store.tokens == 80
    assert store.longest_prefix([100, 101, 102])[0] is None
    # At most all but the prompt's last token: its logits must be computed.
    assert store.longest_prefix(list(range(40)))[1] == 39


def test_a_run_that_extends_another_replaces_it_and_a_covered_one_is_not_stored_twice():
    store = PrefixStore(capacity_tokens=1000, events=KvEventLog())
    store.store(list(range(50)), lambda: "turn 1")
    store.store(list(range(80)), lambda: "turn 2")
    assert store.tokens == 80
    assert store.covers(list(range(60)))
    store.store(list(range(60)), lambda: "part of turn 2")
    assert store.tokens == 80 and store.longest_prefix(list(range(70)))[0].kv == "turn 2"


def test_a_run_adding_less_than_a_block_to_a_cached_one_is_not_copied():
    """A long prompt sent again and answered in a few tokens: its KV is not copied out again."""
    store = PrefixStore(capacity_tokens=1000, events=KvEventLog())
    prompt = list(range(200))
    store.store([*prompt, 1, 2, 3], lambda: "first answer")
    copies = []
    store.store([*prompt, 4, 5, 6], lambda: copies.append("second answer"))
    assert copies == [] and store.tokens == 203
    # A whole block more is worth keeping: its KV serves the next turn.
    store.store([*prompt, *range(300, 300 + BLOCK_TOKENS)], lambda: "next turn")
    assert store.longest_prefix([*prompt, *range(300, 300 + BLOCK_TOKENS), 9])[0].kv == "next turn"
    # A short run sharing nothing is stored as before.
    store.store([900, 901], lambda: "short")
    assert store.longest_prefix([900, 901, 902])[0].kv == "short"


def test_runs_of_another_adapter_are_never_served():
    store = PrefixStore(capacity_tokens=1000, events=KvEventLog())
    store.store(list(range(50)), lambda: "base")
    assert store.longest_prefix(list(range(60)), adapter="a") == (None, 0)
    assert not store.covers(list(range(10)), adapter="a")


def test_shared_blocks_are_announced_once_and_removed_with_their_last_holder():
    log = KvEventLog()
    store = PrefixStore(capacity_tokens=100, events=log)
    system = list(range(2 * BLOCK_TOKENS))
    store.store([*system, *range(500, 500 + BLOCK_TOKENS)], lambda: "one")  # 3 blocks
    store.store([*system, *range(600, 600 + BLOCK_TOKENS)], lambda: "two")  # 1 new block
    assert events(log) == [(True, 3), (True, 1)]
    # Evicts "one": its last block only.
    store.store(list(range(700, 700 + 3 * BLOCK_TOKENS)), lambda: "three")
    assert events(log)[-2:] == [(True, 3), (False, 1)]
    # Chained: the same block after another parent, or under an adapter, hashes otherwise.
    assert block_hashes(system)[1] != block_hashes(system[BLOCK_TOKENS:])[0]
    assert block_hashes(system) != block_hashes(system, adapter="a")


def test_a_slot_is_reused_only_for_a_prompt_that_keeps_enough_of_it():
    table = SlotTable(2, KvEventLog(), similarity=0.5)
    conversation = list(range(100))
    slot, kept = table.take(conversation)
    assert kept == 0
    table.give_back(slot, [*conversation, 7, 8])
    # The next turn takes that slot and keeps all it holds.
    assert table.take([*conversation, 7, 8, 9, 10]) == (slot, 102)
    table.give_back(slot, [*conversation, 7, 8, 9, 10])
    # Sharing 40 of 104 tokens is below the similarity: the other (empty) slot, nothing kept.
    other, kept = table.take([*range(40), 555])
    assert other != slot and kept == 0
    table.give_back(other, [])
    # Another adapter's KV is never kept.
    assert table.take([*conversation, 7], adapter="a")[1] == 0
