"""The benchmark's run order: every method once per round, never after the same one twice."""

import math

import pytest

from loader_plugins.bench.runner import round_order


@pytest.mark.parametrize("n", range(0, 16))
def test_every_round_runs_every_method_once(n):
    items = [f"m{i}" for i in range(n)]
    for r in range(8):
        assert sorted(round_order(items, r)) == sorted(items)


@pytest.mark.parametrize("n", range(3, 16))
def test_a_method_follows_a_different_one_each_round(n):
    items = list(range(n))
    rounds = sum(1 for a in range(1, n) if math.gcd(a, n) == 1)   # distinct orders available
    before: dict[int, set] = {i: set() for i in items}
    for r in range(rounds):
        order = round_order(items, r)
        for prev, cur in zip(order, order[1:]):
            assert prev not in before[cur], f"round {r}: {cur} after {prev} again ({order})"
            before[cur].add(prev)


def test_the_bench_methods_in_three_rounds():
    """The local bench's twelve methods over three rounds (the default --repeat): nobody runs
    right after the same method twice, unlike a rotation (the old order), which kept every pair."""
    methods = ["streamer", "streamer-into", "pread-4t", "pread-direct-8t", "pread-into-4t", "pread-direct-into-8t",
               "safetensors", "runai-c4", "runai-c8", "runai-c16", "tensorizer", "fastsafetensors"]
    pairs = [list(zip(o, o[1:])) for o in (round_order(methods, r) for r in range(3))]
    flat = [p for rnd in pairs for p in rnd]
    assert len(flat) == len(set(flat))
    rotation = [methods[r:] + methods[:r] for r in range(3)]
    assert len({p for o in rotation for p in zip(o, o[1:])}) < sum(len(o) - 1 for o in rotation)


def test_two_methods_alternate():
    assert round_order(["a", "b"], 0) == ["a", "b"]
    assert round_order(["a", "b"], 1) == ["b", "a"]
