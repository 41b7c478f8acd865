"""The benchmark's summary lines: each ratio against the right row, including the strictest one."""

from loader_plugins.bench.runner import summarize
from loader_plugins.config import StreamerConfig


def _row(group, cold, warm):
    return {"group": group, "cold": {"gbps": cold}, "warm": {"gbps": warm}}


def test_ratios_name_the_row_they_are_against():
    results = {
        "streamer": _row("ours", 1.5, 2.0),
        "streamer-into": _row("ours-into", 2.0, 8.0),
        "pread-direct-8t": _row("ceiling", 0.75, 0.8),
        "pread-direct-into-8t": _row("ceiling-into", 2.5, 2.7),
        "pread-into-4t": _row("ceiling-into", 1.0, 10.0),
        "runai-c4": _row("peer", 1.2, 0.5),
        "tensorizer": _row("peer", 1.0, 1.6),
    }
    out = summarize(results, ["cold", "warm"], StreamerConfig(), None)
    v = out["values"]
    assert v["cold_vs_best_pread_ceiling"] == 1.5 / 0.75          # fresh against fresh buffers
    assert v["cold_vs_best_Run:ai"] == 1.5 / 1.2
    assert v["warm_vs_best_other_peer"] == 2.0 / 1.6              # Run:ai is not an "other" peer
    assert v["cold_into_vs_ceiling"] == 2.0 / 2.5
    assert v["warm_into_vs_ceiling"] == 8.0 / 10.0
    assert v["cold_best_vs_any_ceiling"] == 2.0 / 2.5             # streamer-into against O_DIRECT into
    assert v["warm_best_vs_any_ceiling"] == 8.0 / 10.0
    assert "cold: best of ours (streamer-into, 2.00 GB/s) = 0.80x the fastest pread of any kind " \
           "(pread-direct-into-8t, 2.50 GB/s)" in out["lines"]


def test_restarts_table_medians_each_start_and_the_totals():
    from loader_plugins.bench.restarts import format_restarts

    runs = {"streamer": [[1.0, 0.5, 0.4], [3.0, 0.7, 0.6], [2.0, 0.6, 0.5]],
            "safetensors": [[1.5, 1.0, 1.0], [1.6, 1.1, 0.9], [1.4, 0.9, 1.1]]}
    cached = {"streamer": [1.0, 0.98, 1.0], "safetensors": [1.0, 1.0, 1.0]}
    lines = format_restarts(runs, cached, 3).splitlines()
    assert lines[0] == "| method | start 1 s | start 2 s | start 3 s | total s | streamer ÷ it | cached before start 2 |"
    # totals 1.9 / 4.3 / 3.1 -> median 3.1; safetensors 3.5 / 3.6 / 3.4 -> 3.5
    assert lines[2] == "| streamer | 2.00 | 0.60 | 0.50 | 3.10 | 1.00x | 100% |"
    assert lines[3] == "| safetensors | 1.50 | 1.00 | 1.00 | 3.50 | 0.89x | 100% |"


def test_bench_table_is_valid_markdown_and_each_load_runs_in_its_own_process(tmp_path):
    """The README's bench end to end on a tiny checkpoint: a fresh process per load (the default),
    the table's header and separator agree, each row names its method, and the table is followed
    by the sentence saying what a figure times."""
    import subprocess
    import sys

    from loader_plugins.bench.demo import make_demo

    make_demo(tmp_path / "ckpt", "2MB", progress=False)
    out = subprocess.run([sys.executable, "-m", "loader_plugins.cli", "bench", str(tmp_path / "ckpt"), "--repeat", "1",
                          "--methods", "streamer,safetensors", "--settle", "0"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0].count("|") == table[1].count("|") == table[2].count("|") == table[3].count("|")
    assert set(table[1].replace("|", "")) == {"-"}
    assert [ln.split("|")[1].strip() for ln in table[2:]] == ["streamer", "safetensors"]
    assert all(float(ln.split("|")[2]) > 0 for ln in table[2:])
    assert "in a fresh process" in out.stderr and "fresh process as a server's start" in out.stdout
    assert not [ln for ln in lines if ln.startswith("INFO")], "loader log lines in the table's output"
