"""One rank of a 2-process gloo job that runs a peer's distributed test module under pytest.

    python -m torch.distributed.run --standalone --nproc-per-node 2 dist_runner.py OUT_DIR PYTEST_ARGS...

The peer's tests call ``dist.get_rank()`` and ``dist.barrier()`` and expect the process group to
exist already; their own CI creates it the same way before handing over to the test runner. Each
rank writes ``OUT_DIR/rank<N>.xml`` (JUnit) and ``OUT_DIR/rank<N>.reached.json`` (routing shim).
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

# A rank that fails before a barrier leaves the other waiting; the default (30 minutes) would
# outlast the whole job, so the wait is bounded well below the harness's own timeout.
BARRIER_TIMEOUT = datetime.timedelta(seconds=60)


def main(argv: list[str]) -> int:
    out_dir, pytest_args = Path(argv[0]), argv[1:]
    rank = int(os.environ["RANK"])
    os.environ["CONFORMANCE_REACHED"] = str(out_dir / f"rank{rank}.reached.json")
    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        return int(pytest.main([
            "-p", "no:cacheprovider", "-p", "conformance.routing_shim", "-q",
            f"--junitxml={out_dir / f'rank{rank}.xml'}", *pytest_args,
        ]))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
