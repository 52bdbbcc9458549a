"""Placement policies: rankings, the healthy filter, prefix affinity against the engine's own KV cache,
KV event snapshots / deltas / gaps, session stickiness and the registry."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter

import pytest

from shoal.router.placement import (BasePolicy, PlacementRequest, PrefixAwarePolicy, WorkerView,
                                    available_policies, make_policy, register_policy)
from shoal.workers.engine.kv_cache_manager import KVCacheManager
from shoal.workers.engine.request import Request
from shoal.workers.engine.sampling_params import SamplingParams
from shoal.workers.protocol import KVEventBatch, WorkerLoad, block_hashes

BS = 16


def load(running: int = 0, waiting: int = 0, kv: float = 0.0) -> WorkerLoad:
    return WorkerLoad(num_running=running, num_waiting=waiting, kv_usage=kv, num_free_blocks=100,
                      num_total_blocks=100)


def view(wid: str, running: int = 0, waiting: int = 0, kv: float = 0.0, healthy: bool = True,
         in_flight: int = 0) -> WorkerView:
    return WorkerView(wid, load(running, waiting, kv), healthy=healthy, in_flight=in_flight)


def req(tokens, rid: str = "r", session: str | None = None, extra_keys: tuple = ()) -> PlacementRequest:
    return PlacementRequest(rid, tuple(tokens), session_key=session, extra_keys=extra_keys)


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 30000) for _ in range(n)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_placement_does_not_import_torch():
    code = "import sys, shoal.router.placement; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- registry -----------------------------------------------------------------------------------------

def test_registry_names_and_fresh_instances():
    assert {"round_robin", "least_load", "session", "prefix_aware"} <= set(available_policies())
    a, b = make_policy("round_robin"), make_policy("round_robin")
    assert a is not b and a.name == "round_robin"
    p = make_policy("prefix_aware", block_size=32, balance_abs_threshold=4)
    assert isinstance(p, PrefixAwarePolicy) and p.block_size == 32


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown placement policy 'nope'.*least_load.*prefix_aware"):
        make_policy("nope")
    with pytest.raises(ValueError, match=r"no option\(s\) \['blok_size'\].*block_size"):
        make_policy("prefix_aware", blok_size=16)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        make_policy("prefix_aware", block_size=0)
    with pytest.raises(ValueError, match="balance_rel_threshold must be >= 1"):
        make_policy("prefix_aware", balance_rel_threshold=0.5)
    with pytest.raises(ValueError, match="home_ttl_s must be >= 0"):
        make_policy("prefix_aware", home_ttl_s=-1.0)
    with pytest.raises(ValueError, match="virtual_nodes must be >= 1"):
        make_policy("session", virtual_nodes=0)
    with pytest.raises(ValueError, match="already registered"):
        register_policy("round_robin")(type("Other", (BasePolicy,), {}))


def test_register_custom_policy():
    @register_policy("test_first_by_id")
    class FirstById(BasePolicy):
        def choose(self, request, workers):
            return sorted(w.worker_id for w in workers if w.healthy)

    policy = make_policy("test_first_by_id")
    assert policy.name == "test_first_by_id"
    assert policy.choose(req([1]), [view("b"), view("a")]) == ["a", "b"]
    policy.on_kv_events("a", KVEventBatch(0, "snapshot", ()))  # the base hooks are no-ops
    policy.on_request_placed(req([1]), "a")
    policy.on_worker_removed("a")


# -- round robin, least load --------------------------------------------------------------------------

def test_round_robin_rotates_over_healthy_workers_by_id():
    p = make_policy("round_robin")
    workers = [view("w2"), view("w0"), view("w1", healthy=False), view("w3")]
    firsts = [p.choose(req([1]), workers)[0] for _ in range(6)]
    assert firsts == ["w0", "w2", "w3", "w0", "w2", "w3"]
    assert p.choose(req([1]), workers) == ["w0", "w2", "w3"]  # the full ranking, healthy only
    assert p.choose(req([1]), [view("x", healthy=False)]) == []


def test_least_load_never_picks_the_most_loaded_and_ranks_the_rest():
    p = make_policy("least_load", rng=random.Random(0))
    workers = [view("a", running=1), view("b", running=5), view("c", running=3), view("d", healthy=False)]
    picks = Counter()
    for _ in range(300):
        ranked = p.choose(req([1]), workers)
        assert sorted(ranked) == ["a", "b", "c"]
        assert ranked[1:] == sorted(ranked[1:], key="acb".index)  # the rest by load: a < c < b
        picks[ranked[0]] += 1
    assert picks["b"] == 0 and picks["a"] > picks["c"] > 0
    # two workers: always the lighter one
    assert all(p.choose(req([1]), workers[:2])[0] == "a" for _ in range(20))


def test_least_load_score_uses_in_flight_waiting_and_kv_usage():
    p = make_policy("least_load", rng=random.Random(1))
    # the report says idle, but this router has 4 requests open on it since
    assert p.choose(req([1]), [view("a", in_flight=4), view("b", running=2)])[0] == "b"
    # same open requests: the queued ones weigh more
    assert p.choose(req([1]), [view("a", running=1, waiting=2), view("b", running=3)])[0] == "b"
    # same requests: the fuller KV cache loses
    assert p.choose(req([1]), [view("a", running=2, kv=0.9), view("b", running=2, kv=0.1)])[0] == "b"


def test_least_load_is_seeded():
    workers = [view(f"w{i}") for i in range(8)]
    runs = [[make_policy("least_load", rng=random.Random(7)).choose(req([1]), workers)[0]]
            for _ in range(2)]
    assert runs[0] == runs[1]


# -- session ------------------------------------------------------------------------------------------

def test_session_is_sticky_and_spreads_keys():
    p = make_policy("session")
    workers = [view(f"w{i}") for i in range(5)]
    owners = {f"user-{k}": p.choose(req([1], session=f"user-{k}"), workers)[0] for k in range(1000)}
    for key, owner in list(owners.items())[:50]:
        assert p.choose(req([2, 3], session=key), workers)[0] == owner  # the prompt does not matter
    counts = Counter(owners.values())
    assert len(counts) == 5 and min(counts.values()) > 100  # 128 virtual nodes: roughly even
    # another instance (another router replica, another process salt) agrees
    other = make_policy("session")
    assert all(other.choose(req([1], session=k), workers)[0] == w for k, w in owners.items())


def test_session_removal_moves_only_the_removed_workers_sessions():
    p = make_policy("session")
    workers = [view(f"w{i}") for i in range(5)]
    keys = [f"s{k}" for k in range(1000)]
    before = {k: p.choose(req([1], session=k), workers) for k in keys}
    p.on_worker_removed("w2")
    after = {k: p.choose(req([1], session=k), [w for w in workers if w.worker_id != "w2"])[0] for k in keys}
    moved = [k for k in keys if after[k] != before[k][0]]
    assert moved and all(before[k][0] == "w2" for k in moved)
    assert all(after[k] == before[k][1] for k in moved)  # each goes to its ring successor
    # unhealthy acts like removed, and recovery brings the sessions back
    sick = [view("w2", healthy=False) if w.worker_id == "w2" else w for w in workers]
    assert all(p.choose(req([1], session=k), sick)[0] == after[k] for k in keys)
    assert all(p.choose(req([1], session=k), workers)[0] == before[k][0] for k in keys)


def test_session_without_key_uses_least_load():
    p = make_policy("session", rng=random.Random(0))
    workers = [view("a", running=9), view("b", running=1)]
    assert p.choose(req([1]), workers)[0] == "b"
    assert p.choose(req([1], session=""), workers)[0] == "b"
    assert p.choose(req([1], session="k"), [view("a", healthy=False)]) == []


# -- prefix aware -------------------------------------------------------------------------------------

def snapshot(prompt, seq: int = 0, upto: int | None = None) -> KVEventBatch:
    return KVEventBatch(seq, "snapshot", tuple(block_hashes(prompt, BS)[:upto]))


def test_prefix_aware_prefers_the_longest_cached_prefix():
    p = make_policy("prefix_aware", block_size=BS)
    system = tokens(8 * BS, seed=1)
    p.on_kv_events("a", snapshot(system, upto=2))
    p.on_kv_events("b", snapshot(system, upto=6))
    p.on_kv_events("c", KVEventBatch(0, "snapshot", ()))
    r = req(system + tokens(40, seed=2))
    workers = [view("a"), view("b", running=3), view("c")]
    assert p.choose(r, workers)[:2] == ["b", "a"]  # 96 cached tokens beat 3 running requests
    assert [p.predicted_cached_tokens(r, w) for w in "abc"] == [2 * BS, 6 * BS, 0]
    assert p.choose(r, [view("a"), view("b", healthy=False), view("c")])[0] == "a"
    # a chain: without block 1, b's blocks 2..5 are no use
    p.on_kv_events("b", KVEventBatch(1, "removed", (block_hashes(system, BS)[1],)))
    assert p.predicted_cached_tokens(r, "b") == BS


def test_prefix_aware_extra_keys_separate_prefixes():
    p = make_policy("prefix_aware", block_size=BS)
    prompt = tokens(4 * BS + 1, seed=3)
    p.on_kv_events("a", snapshot(prompt))
    assert p.predicted_cached_tokens(req(prompt), "a") == 4 * BS
    assert p.predicted_cached_tokens(req(prompt, extra_keys=("lora-x",)), "a") == 0


def test_prefix_aware_predicts_the_engines_real_cache_hits():
    """Blocks stored by the real KV cache manager, sent as events: the router's guess is the hit."""
    cache = KVCacheManager(num_blocks=64, block_size=BS, record_events=True)
    first = Request("r0", tokens(5 * BS + 3, seed=4), SamplingParams())
    assert cache.allocate_slots(first, first.num_tokens)
    p = make_policy("prefix_aware", block_size=BS)
    p.on_kv_events("w", KVEventBatch(0, "snapshot", ()))
    for seq, ev in enumerate(cache.pool.take_events(), start=1):
        p.on_kv_events("w", KVEventBatch(seq, ev.kind, ev.block_hashes))
    for n in (3 * BS, 5 * BS, 5 * BS + 1, 5 * BS + 3):  # shorter, exactly full, one past, the same
        again = Request(f"r{n}", first.prompt_token_ids[:n] + [7, 8], SamplingParams())
        same = Request(f"s{n}", first.prompt_token_ids[:n], SamplingParams())
        for probe in (again, same):
            _, hit = cache.get_computed_blocks(probe)
            assert p.predicted_cached_tokens(req(probe.prompt_token_ids), "w") == hit, (n, probe)


def test_prefix_aware_spreads_unrelated_prompts():
    p = make_policy("prefix_aware", block_size=BS)
    names = ["w0", "w1", "w2", "w3"]
    in_flight = Counter()
    for i in range(40):
        r = req(tokens(6 * BS, seed=100 + i), rid=f"r{i}")
        wid = p.choose(r, [view(n, in_flight=in_flight[n]) for n in names])[0]
        p.on_request_placed(r, wid)
        in_flight[wid] += 1
    assert sorted(in_flight.values()) == [10, 10, 10, 10]
    # with frozen load reports too, the prompt-head tie-break spreads them
    static = Counter(p.choose(req(tokens(6 * BS, seed=500 + i)), [view(n) for n in names])[0]
                     for i in range(40))
    assert len(static) == 4


def test_prefix_aware_burst_sticks_before_kv_events_then_spills_when_imbalanced():
    system = tokens(10 * BS, seed=5)
    names = ["w0", "w1", "w2"]

    def run(policy, n):
        in_flight = Counter()
        order = []
        for i in range(n):
            r = req(system + tokens(20, seed=200 + i), rid=f"r{i}")
            wid = policy.choose(r, [view(w, in_flight=in_flight[w]) for w in names])[0]
            policy.on_request_placed(r, wid)
            in_flight[wid] += 1
            order.append(wid)
        return order, in_flight

    order, counts = run(make_policy("prefix_aware", block_size=BS), 20)
    assert len(set(order)) == 1  # no KV events yet: the router's own placements make the affinity
    order, counts = run(make_policy("prefix_aware", block_size=BS, balance_abs_threshold=4,
                                    balance_rel_threshold=1.5), 20)
    assert order[:5] == [order[0]] * 5  # sticks while within the thresholds
    assert len(set(order)) > 1 and max(counts.values()) - min(counts.values()) <= 5


def test_prefix_aware_falls_back_to_least_load_only_when_both_thresholds_pass():
    system = tokens(8 * BS, seed=6)
    r = req(system + [1, 2, 3])
    p = make_policy("prefix_aware", block_size=BS, balance_abs_threshold=8, balance_rel_threshold=1.5)
    p.on_kv_events("a", snapshot(system))
    assert p.choose(r, [view("a", running=8), view("b")])[0] == "a"  # diff 8: not more than 8
    assert p.choose(r, [view("a", running=9), view("b")])[0] == "b"  # 9 - 0 > 8 and 9 > 0 * 1.5
    assert p.choose(r, [view("a", running=100), view("b", running=90)])[0] == "a"  # 100 < 90 * 1.5
    assert p.choose(r, [view("a", running=140), view("b", running=90)])[0] == "b"
    # the overloaded best match drops behind everyone, the next best match leads
    p.on_kv_events("c", snapshot(system, upto=3))
    ranked = p.choose(r, [view("a", running=140), view("b", running=90), view("c", running=95)])
    assert ranked == ["c", "b", "a"]


def test_prefix_aware_min_match_tokens():
    system = tokens(4 * BS, seed=7)
    r = req(system + [5])
    p = make_policy("prefix_aware", block_size=BS, min_match_tokens=3 * BS)
    p.on_kv_events("a", snapshot(system, upto=2))
    assert p.choose(r, [view("a", running=1), view("b")])[0] == "b"  # 32 cached tokens count as none
    p.on_kv_events("a", snapshot(system, seq=1, upto=3))
    assert p.choose(r, [view("a", running=1), view("b")])[0] == "a"


def test_prefix_aware_snapshot_delta_and_gap():
    prompt = tokens(6 * BS + 1, seed=8)
    hs = block_hashes(prompt, BS)
    r = req(prompt)
    p = make_policy("prefix_aware", block_size=BS)

    p.on_kv_events("w", KVEventBatch(3, "stored", tuple(hs[:2])))  # a delta before any snapshot
    assert p.needs_resync("w") and p.predicted_cached_tokens(r, "w") == 0

    p.on_kv_events("w", KVEventBatch(10, "snapshot", tuple(hs[:2])))
    assert not p.needs_resync("w") and p.predicted_cached_tokens(r, "w") == 2 * BS
    p.on_kv_events("w", KVEventBatch(11, "stored", tuple(hs[2:5])))
    assert p.predicted_cached_tokens(r, "w") == 5 * BS
    p.on_kv_events("w", KVEventBatch(12, "removed", (hs[3],)))
    assert p.predicted_cached_tokens(r, "w") == 3 * BS
    p.on_kv_events("w", KVEventBatch(13, "snapshot", tuple(hs[:1])))  # replaces, does not add
    assert p.predicted_cached_tokens(r, "w") == BS

    p.on_kv_events("w", KVEventBatch(15, "stored", tuple(hs[1:6])))  # 14 was lost
    assert p.needs_resync("w") and p.predicted_cached_tokens(r, "w") == 0
    assert p.choose(r, [view("w"), view("v")]) == p.choose(r, [view("v"), view("w")])  # no affinity left
    p.on_kv_events("w", KVEventBatch(16, "stored", tuple(hs)))  # ignored until a snapshot
    assert p.needs_resync("w") and p.predicted_cached_tokens(r, "w") == 0

    p.on_kv_events("w", KVEventBatch(20, "snapshot", tuple(hs[:4])))
    assert not p.needs_resync("w") and p.predicted_cached_tokens(r, "w") == 4 * BS
    p.on_kv_events("w", KVEventBatch(21, "stored", (hs[4],)))
    assert p.predicted_cached_tokens(r, "w") == 5 * BS
    with pytest.raises(ValueError, match="kind must be"):
        p.on_kv_events("w", KVEventBatch(22, "evicted", ()))

    p.on_worker_removed("w")
    assert not p.needs_resync("w") and p.predicted_cached_tokens(r, "w") == 0
    assert p.index.num_blocks("w") == (0, 0)
    assert not p.index._confirmed and not p.index._predicted  # no empty entries left behind


def test_prefix_aware_predictions_expire_and_are_capped():
    clock = FakeClock()
    p = make_policy("prefix_aware", block_size=BS, predicted_ttl_s=10.0, max_predicted_blocks=6,
                    clock=clock)
    a = req(tokens(4 * BS + 1, seed=9))
    p.on_request_placed(a, "w")
    assert p.predicted_cached_tokens(a, "w") == 4 * BS
    clock.now += 11
    assert p.predicted_cached_tokens(a, "w") == 0

    long_req = req(tokens(10 * BS + 1, seed=10))
    p.on_request_placed(long_req, "w")  # 10 blocks into a cap of 6: the head survives
    assert p.index.num_blocks("w") == (0, 6)
    assert p.predicted_cached_tokens(long_req, "w") == 6 * BS
    p.on_kv_events("w", KVEventBatch(0, "snapshot", ()))
    p.on_kv_events("w", KVEventBatch(1, "removed", (long_req.block_hashes(BS)[2],)))
    assert p.predicted_cached_tokens(long_req, "w") == 2 * BS  # an eviction event beats a prediction


def test_prefix_aware_choose_is_fast_enough():
    """16 workers, 200 cached 4k-token prompts each, a 4k-token query: well under a millisecond or so."""
    import time

    p = make_policy("prefix_aware", block_size=BS)
    prompts = [tokens(4096, seed=1000 + i) for i in range(20)]
    for w in range(16):
        hs = [h for pr in prompts[w % 4::4] for h in block_hashes(pr, BS)]
        p.on_kv_events(f"w{w}", KVEventBatch(0, "snapshot", tuple(hs)))
    workers = [view(f"w{w}") for w in range(16)]
    r = req(prompts[5] + [1])
    r.block_hashes(BS)  # hashing is the router edge's job, once per request
    start = time.perf_counter()
    for _ in range(100):
        ranked = p.choose(r, workers)
    per_call = (time.perf_counter() - start) / 100
    assert ranked[0] in {f"w{w}" for w in range(1, 16, 4)}
    assert per_call < 0.01, per_call


def test_prefix_aware_places_a_new_prefix_on_the_worker_with_fewer_prefixes():
    policy = PrefixAwarePolicy(block_size=16)
    views = [view("a"), view("b")]
    first = req(tokens(200, seed=1))
    policy.on_request_placed(first, "a")  # a now holds one prefix (predicted)
    # b holds none: it gets the next unseen prefix even with one more request in flight
    assert policy.choose(req(tokens(200, seed=2)), [view("a"), view("b", running=1)])[0] == "b"
    # a prompt that a holds still goes to a
    assert policy.choose(req(list(first.prompt_token_ids) + [7]), views)[0] == "a"


def test_prefix_aware_sends_an_evicted_prefix_back_to_its_home():
    """A prefix its worker's cache evicted while clients still use it returns to that worker: moving it
    would put one more prefix into the other worker's working set (and evict one there in turn)."""
    p = make_policy("prefix_aware", block_size=BS)
    x, y, z = (tokens(8 * BS, seed=s) for s in (11, 12, 13))
    for prefix, wid in ((x, "a"), (y, "a"), (z, "b")):
        p.on_request_placed(req(prefix + [1]), wid)
    p.on_kv_events("a", KVEventBatch(0, "snapshot", block_hashes(x, BS) + block_hashes(y, BS)))
    p.on_kv_events("a", KVEventBatch(1, "removed", tuple(block_hashes(x, BS))))  # a's cache evicted x
    p.on_kv_events("b", snapshot(z))
    busy_a = [view("a", running=1), view("b")]
    assert p.predicted_cached_tokens(req(x + [2]), "a") == 0
    assert p.choose(req(x + [2]), busy_a)[0] == "a"  # home, though a is busier and holds as much as b
    # A prefix nobody has seen balances on homes: a is home to two (x, y), b to one.
    assert p.choose(req(tokens(8 * BS, seed=14)), [view("a"), view("b", running=1)])[0] == "b"
    # A prompt shorter than a block leaves nothing in any cache: load alone decides.
    assert p.choose(req(tokens(BS - 1, seed=15)), [view("a"), view("b", running=1)])[0] == "a"
    # A cached copy elsewhere beats the home: the match is a sure hit.
    p.on_kv_events("b", snapshot(z + x, seq=1))
    assert p.choose(req(z + x + [3]), busy_a)[0] == "b"
    p.on_worker_removed("a")  # its homes go with it
    assert p.homes.home(block_hashes(x, BS)[0]) is None and p.homes.count("a") == 0


def test_prefix_homes_are_renewed_expire_and_are_capped():
    from shoal.router.placement.prefix_index import PrefixHomes

    clock = FakeClock()
    homes = PrefixHomes(ttl_s=10.0, max_roots=3, clock=clock)
    homes.place(b"x", "a")
    clock.now += 6
    homes.place(b"y", "a")
    homes.place(b"x", "b")  # placed again elsewhere: it moved, and its use is renewed
    assert (homes.home(b"x"), homes.count("a"), homes.count("b")) == ("b", 1, 1)
    clock.now += 6  # y and x were last used 6 s ago: both stay
    assert homes.home(b"y") == "a" and homes.home(b"x") == "b"
    clock.now += 5  # 11 s idle: forgotten
    assert homes.home(b"y") is None and homes.count("a") == homes.count("b") == 0
    for root in (b"1", b"2", b"3", b"4"):  # a cap of 3: the least recently used goes
        homes.place(root, "a")
    assert homes.home(b"1") is None and homes.count("a") == 3
    off = PrefixHomes(ttl_s=0.0, clock=clock)
    off.place(b"x", "a")
    assert off.home(b"x") is None and off.count("a") == 0
