"""Where bytes land: CPU tensors (pinned when CUDA is present); CUDA memory (``cuda.py``)."""
