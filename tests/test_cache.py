"""The request path's local caches never hold anything past one second."""

from __future__ import annotations

from sidecar.cache import MAX_STALENESS, TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_and_never_outlive_the_staleness_bound() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(ttl=60, clock=clock)  # asks for a minute
    cache.put("a", 1)
    cache.put("b", 2, ttl=0.25)
    assert cache.get("a") == 1 and cache.get("b") == 2
    clock.now += 0.3
    assert cache.get("b") is None and cache.get("a") == 1
    clock.now += MAX_STALENESS
    assert cache.get("a") is None
    assert (cache.hits, cache.misses) == (3, 2)


def test_a_full_cache_drops_its_oldest_entry() -> None:
    cache: TtlCache[int, int] = TtlCache(max_size=3, clock=Clock())
    for n in range(4):
        cache.put(n, n)
    assert cache.get(0) is None and [cache.get(n) for n in (1, 2, 3)] == [1, 2, 3]
    assert len(cache) == 3


def test_discard_clear_and_non_positive_lifetimes() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(clock=clock)
    cache.put("a", 1)
    assert 0 < cache.expires_in("a") <= MAX_STALENESS
    cache.discard("a")
    assert cache.get("a") is None and cache.expires_in("a") == 0
    cache.put("b", 2, ttl=0)
    assert cache.get("b") is None
    cache.put("c", 3)
    cache.clear()
    assert len(cache) == 0


def test_a_stream_of_distinct_keys_keeps_only_the_live_ones() -> None:
    # A million distinct keys an hour must not fill the cache to max_size:
    # the sidecar's memory would grow with every key ever seen.
    clock = Clock()
    cache: TtlCache[int, int] = TtlCache(max_size=100_000, clock=clock)
    for n in range(10_000):
        cache.put(n, n)
        clock.now += 0.001  # 1,000 new keys a second, each kept a second
    assert len(cache) <= 1_002
    assert cache.get(9_999) == 9_999 and cache.get(0) is None


def test_putting_a_key_again_renews_it_and_moves_it_last() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(max_size=2, clock=clock)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.put("a", 3)  # now the newest: "b" is dropped first
    cache.put("c", 4)
    assert cache.get("b") is None and cache.get("a") == 3 and cache.get("c") == 4
