import mmap

import pytest

from loader_plugins.bench import peers
from loader_plugins.core import _libc


class _RecordingLibc:
    """Spy: records the ranges given to madvise and forwards to the real C library."""

    def __init__(self):
        self.real = _libc.libc()
        self.ranges = []

    def madvise(self, addr, length, advice):
        self.ranges.append((addr, length, advice))
        return self.real.madvise(addr, length, advice)


@pytest.mark.parametrize("nbytes, threads", [(1, 1), (5 * mmap.PAGESIZE + 3, 2), (3 * mmap.PAGESIZE, 8),
                                             (1 << 20, 3)])
def test_first_touch_faults_every_page_once(monkeypatch, nbytes, threads):
    spy = _RecordingLibc()
    monkeypatch.setattr(_libc, "libc", lambda: spy)
    seconds = peers.first_touch_seconds(nbytes, threads)
    assert seconds > 0
    assert all(advice == _libc.MADV_POPULATE_WRITE for _, _, advice in spy.ranges)
    spans = sorted((addr, addr + length) for addr, length, _ in spy.ranges)
    assert 1 <= len(spans) <= threads
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end == start, "gap or overlap between threads"
    assert spans[-1][1] - spans[0][0] == -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
