"""Page sizes for the tensors the reader allocates (``hugepages``: auto / on / off)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file

from loader_plugins import StreamerConfig, load_file
from loader_plugins.core.sinks import cpu
from loader_plugins.core.sinks.cpu import PageSizeChooser
from loader_plugins.errors import ConfigError

from .helpers import assert_bit_exact

HUGE = 2 << 20
THP = cpu._thp_mode()
needs_thp = pytest.mark.skipif(THP == "never", reason="transparent huge pages are off in this kernel")


def _vm_flags(addr: int) -> set[str]:
    """The VmFlags of the mapping holding ``addr`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"{addr:#x} is not mapped")


def test_chooser_explores_both_sizes_then_takes_the_cheaper():
    chooser = PageSizeChooser(explore_bytes=64, recheck=4)
    first = [chooser.choose(32) for _ in range(2)]
    assert sorted(first) == [False, True]                 # one of each before anything is measured
    chooser.record(True, 64, 1.0)                         # huge: 64 bytes per second
    chooser.record(False, 64, 4.0)                        # small: 16 bytes per second
    picks = [chooser.choose(32) for _ in range(16)]
    assert picks.count(True) == 12 and picks.count(False) == 4   # every 4th decision rechecks small
    assert chooser.cost(True) < chooser.cost(False)
    chooser.record(False, 640, 0.5)                       # the machine changed: small is now cheaper
    picks = [chooser.choose(32) for _ in range(16)]
    assert picks.count(False) == 12
    summary = chooser.summary()
    assert summary["huge_bytes"] == 64 and summary["small_bytes"] == 704
    assert summary["huge_gbps"] == pytest.approx(64 / 1.0 / 1e9)


def test_chooser_keeps_exploring_the_kind_measured_least():
    chooser = PageSizeChooser(explore_bytes=100, recheck=8)
    chooser.record(True, 200, 1.0)                        # huge explored enough, small not at all
    assert [chooser.choose(10) for _ in range(3)] == [False, False, False]


@pytest.mark.parametrize("value, mode", [("auto", "auto"), ("on", "on"), (True, "on"), ("true", "on"),
                                         ("off", "off"), (False, "off"), ("0", "off")])
def test_hugepages_option_words(value, mode):
    assert StreamerConfig.from_dict({"hugepages": value}).hugepages == mode
    assert StreamerConfig(hugepages=value).hugepages == mode


def test_hugepages_default_is_off_and_bad_words_are_rejected():
    assert StreamerConfig().hugepages == "off"
    with pytest.raises(ConfigError, match="hugepages.*auto, on or off"):
        StreamerConfig.from_dict({"hugepages": "sometimes"})


@pytest.fixture()
def big_file(tmp_path):
    """Tensors above glibc's largest mmap threshold (32 MiB), so each one is fresh memory."""
    gen = torch.Generator().manual_seed(7)
    tensors = {
        "a": torch.randint(-2**15, 2**15, (40 << 19,), dtype=torch.int16, generator=gen),      # 40 MiB
        "b": torch.randn(4099, 2561, generator=gen).to(torch.bfloat16),                      # odd, ~20 MiB
        "c": torch.randn(9 << 20, generator=gen),                                              # 36 MiB
        "d": torch.randn(3, 5, generator=gen),                                                 # too small for huge pages
        "e": torch.zeros(0, 4),
    }
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("mode", ["auto", "on", "off"])
@pytest.mark.parametrize("direct_io", ["off", "on"])
def test_loads_are_bit_exact_with_every_page_policy(big_file, mode, direct_io, monkeypatch):
    monkeypatch.setattr(cpu, "AUTO_MIN_BYTES", 0)
    got = load_file(big_file, hugepages=mode, direct_io=direct_io, concurrency=4, chunk_bytes="4MiB",
                    pin_memory="off")
    assert_bit_exact(got, st_load_file(str(big_file)))


@needs_thp
def test_hugepages_on_starts_large_tensors_on_a_huge_page_and_advises_them(big_file):
    got = load_file(big_file, hugepages="on", pin_memory="off")
    for name in ("a", "b", "c"):
        addr = got[name].data_ptr()
        assert (addr - addr % 4096) % HUGE == 0, name    # first page of the tensor starts a 2 MiB page
        assert "hg" in _vm_flags(addr + HUGE), name
    assert "hg" not in _vm_flags(got["d"].data_ptr())


@needs_thp
def test_hugepages_off_never_advises(big_file):
    got = load_file(big_file, hugepages="off", pin_memory="off")
    assert all("hg" not in _vm_flags(got[n].data_ptr() + HUGE) for n in ("a", "b", "c"))


@needs_thp
def test_auto_measures_both_page_sizes_during_the_load(big_file, monkeypatch):
    from loader_plugins import SafetensorsStreamer
    from loader_plugins.core.reader import StreamReader

    monkeypatch.setattr(cpu, "AUTO_MIN_BYTES", 0)
    readers = []
    real_init = StreamReader.__init__

    def keep(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        readers.append(self)

    monkeypatch.setattr(StreamReader, "__init__", keep)
    with SafetensorsStreamer(hugepages="auto", concurrency=1, chunk_bytes="4MiB", direct_io="off",
                             pin_memory="off") as streamer:
        streamer.stream_file(big_file)
        got = dict(streamer.get_tensors())
    assert_bit_exact(got, st_load_file(str(big_file)))
    (reader,) = readers
    assert reader.hugepages == "auto"
    sizes = reader.page_sizes
    assert sizes["huge_bytes"] > 0 and sizes["small_bytes"] > 0, sizes   # one tensor of each kind, at least
    flags = {n: "hg" in _vm_flags(got[n].data_ptr() + HUGE) for n in ("a", "b", "c")}
    assert True in flags.values() and False in flags.values(), flags


def test_auto_keeps_small_pages_for_small_loads(big_file):
    from loader_plugins.core.sinks.cpu import CpuSink

    sink = CpuSink(StreamerConfig(pin_memory="off"))
    assert sink.choose_pages(cpu.AUTO_MIN_BYTES - 1) == "off" and sink.chooser is None


@needs_thp
def test_caller_memory_is_never_advised(big_file, monkeypatch):
    from loader_plugins import SafetensorsStreamer

    monkeypatch.setattr(cpu, "AUTO_MIN_BYTES", 0)
    ref = st_load_file(str(big_file))
    dests = {n: torch.empty_like(t) for n, t in ref.items()}
    with SafetensorsStreamer(hugepages="on", pin_memory="off") as streamer:
        streamer.stream_file(big_file, destinations=dests)
        for _ in streamer.get_tensors():
            pass
    assert_bit_exact(dests, ref)
    assert all("hg" not in _vm_flags(dests[n].data_ptr() + HUGE) for n in ("a", "b", "c"))


def test_tensors_in_their_own_mapping_own_exactly_their_bytes(big_file):
    """torch.save writes a tensor's whole storage: no 2 MiB padding may be part of it."""
    import io

    got = load_file(big_file, hugepages="on", pin_memory="off")
    for name in ("a", "b", "c"):
        t = got[name]
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name
    buf = io.BytesIO()
    torch.save(got, buf)
    assert buf.tell() < sum(t.numel() * t.element_size() for t in got.values()) + (1 << 20)
    buf.seek(0)
    assert_bit_exact(torch.load(buf), st_load_file(str(big_file)))


@needs_thp
def test_direct_reads_land_in_place_in_fresh_huge_pages(big_file, monkeypatch):
    """Fresh huge pages are physically contiguous 2 MiB each: O_DIRECT reads into them in place (no
    copy out of staging)."""
    from loader_plugins.core.sources.local import LocalSource

    probe = LocalSource(str(big_file), direct_io="on")
    try:
        if probe._direct_fd() is None:
            pytest.skip(f"{big_file.parent} does not take O_DIRECT")
    finally:
        probe.close()
    staged = []
    real = LocalSource._direct_staged
    monkeypatch.setattr(LocalSource, "_direct_staged",
                        lambda self, fd, offset, dest, *a: staged.append(len(dest)) or real(self, fd, offset, dest, *a))
    expected = st_load_file(str(big_file))
    got = load_file(big_file, hugepages="on", direct_io="on", concurrency=2, chunk_bytes="4MiB", pin_memory="off")
    assert_bit_exact(got, expected)
    assert all(n < 4096 for n in staged), staged   # only "d" (60 bytes, not file-aligned) goes through staging


def test_fill_stages_direct_reads_only_into_fresh_small_pages():
    import mmap

    from loader_plugins.core.sinks.cpu import Allocation, CpuSink

    sink = CpuSink(StreamerConfig(pin_memory="off", hugepages="off"))
    region = mmap.mmap(-1, 8 << 20)               # a new anonymous mapping: no page mapped yet
    view = memoryview(region)
    seen = []
    sink.fill(view[:2 << 20], None, seen.append)                       # fresh small pages: staged
    sink.fill(view[:2 << 20], None, seen.append)                       # mapped now: in place
    huge = Allocation(None, None, True, huge=True)
    sink.fill(view[4 << 20:], huge, seen.append)                       # fresh, but huge pages: in place
    assert seen == [True, False, False]
    del view
    region.close()
