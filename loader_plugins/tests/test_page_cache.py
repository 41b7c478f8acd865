"""What a load leaves in the page cache (``page_cache``: auto / keep / bypass): files read past
it with O_DIRECT are read back into it after the load, unless told not to."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from loader_plugins import SafetensorsStreamer, StreamerConfig
from loader_plugins.bench.peers import evict
from loader_plugins.core import pagecache
from loader_plugins.errors import ConfigError

from .helpers import assert_bit_exact


@pytest.fixture
def shard(tmp_path):
    """A 24 MiB shard on a file system that takes O_DIRECT, out of the page cache."""
    path = str(tmp_path / "model.safetensors")
    g = torch.Generator().manual_seed(7)
    save_file({"a": torch.randn(1024, 4096, generator=g), "b": torch.randn(2048, 1024, generator=g).bfloat16(),
               "c": torch.arange(7, dtype=torch.int32)}, path)
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("this file system refuses O_DIRECT")
    evict(path)
    if pagecache.uncached_bytes(path) is None:
        pytest.skip("this kernel has no cachestat: what is cached cannot be asked")
    if pagecache.uncached_bytes(path) < os.path.getsize(path) // 2:
        pytest.skip("the file would not leave the page cache here")
    return path


def _load(path: str, **config):
    with SafetensorsStreamer(StreamerConfig(**config)) as s:
        s.stream_files(path)
        got = dict(s.get_tensors())
        stats = dict(s.stats)
    for t in list(pagecache._threads):
        t.join(30)
    return got, stats


def test_keep_reads_the_bypassed_file_back_into_the_page_cache(shard):
    got, stats = _load(shard, page_cache="keep", direct_io="auto")
    assert stats["page_cache"] == "page_cache is keep"
    assert pagecache.uncached_bytes(shard) == 0
    assert_bit_exact(got, st_load_file(shard))     # (safetensors' mmap reads through the cache: after the check)


def test_auto_keeps_a_file_that_fits_in_available_memory(shard):
    got, stats = _load(shard)        # the defaults: direct_io auto, page_cache auto
    assert stats["page_cache"].startswith("page_cache is auto and") and "fits" in stats["page_cache"]
    assert pagecache.uncached_bytes(shard) == 0
    assert_bit_exact(got, st_load_file(shard))


def test_bypass_leaves_the_page_cache_as_it_was(shard):
    size = os.path.getsize(shard)
    got, stats = _load(shard, page_cache="bypass")
    assert stats["page_cache"] == "page_cache is bypass"
    assert pagecache.uncached_bytes(shard) > size * 0.9      # only the header was read through the cache
    assert_bit_exact(got, st_load_file(shard))


def test_buffered_reads_leave_nothing_to_refill(shard):
    _, stats = _load(shard, page_cache="keep", direct_io="off")
    assert stats["page_cache"] == "nothing was read past the page cache"
    assert pagecache.uncached_bytes(shard) == 0               # the buffered reads cached it themselves


def test_auto_bypasses_a_checkpoint_larger_than_half_the_available_memory(shard, monkeypatch):
    # a mock, named as such: a machine with 1 MiB available cannot be made for real in a test
    monkeypatch.setattr(pagecache, "mem_available", lambda: 1 << 20)
    wanted, why = pagecache.decide([shard], "auto")
    assert wanted == []
    assert "more than 50% of the 0.00 GB available" in why
    assert pagecache.decide([shard], "keep")[0] == [shard]


def test_an_already_cached_file_is_not_refilled(shard):
    with open(shard, "rb") as f:
        while f.read(1 << 20):
            pass
    assert pagecache.decide([shard], "keep") == ([], "already cached")


def test_page_cache_option_words():
    assert StreamerConfig().page_cache == "auto"
    assert StreamerConfig.from_dict({"page_cache": "bypass"}).page_cache == "bypass"
    with pytest.raises(ConfigError, match="page_cache"):
        StreamerConfig.from_dict({"page_cache": "sometimes"})
