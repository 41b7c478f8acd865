"""The CUDA C sources in native/, checked on the CPU.

The per-element conversions are ``__host__ __device__``: nvcc builds them into a host program
(native/tests/host_convert_test.cu) that is fed bit patterns and compared bit for bit with
PyTorch's CPU casts. Every 8- and 16-bit pattern is tried; float32 gets random patterns plus the
edges (NaN, infinities, subnormals, ties, overflow). The kernels are compiled to PTX for sm_90.
Launching them needs a GPU: integration_tests/test_gpu.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from loader_plugins.core.sinks import cuda as cuda_sink

NATIVE = cuda_sink.native_dir()
HOST_TEST = NATIVE / "tests" / "host_convert_test.cu"     # in a source checkout, not in the wheel
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (install the CUDA toolkit to build native/)")

# native name -> torch dtype (float8 variants probed: torch 2.1+ / 2.2+)
TORCH = {
    "bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32,
    "e4m3fn": getattr(torch, "float8_e4m3fn", None), "e5m2": getattr(torch, "float8_e5m2", None),
    "e4m3fnuz": getattr(torch, "float8_e4m3fnuz", None), "e5m2fnuz": getattr(torch, "float8_e5m2fnuz", None),
}
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32}
PAIRS = [(k.split("_")[2], k.split("_")[4]) for k in cuda_sink.convert_kernels()]


def _run(args, **kw):
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def host_program(tmp_path_factory) -> Path:
    if NVCC is None:
        pytest.skip("nvcc is not on PATH (install the CUDA toolkit to build native/)")
    if not HOST_TEST.is_file():
        pytest.skip(f"{HOST_TEST} is not here (an installed wheel ships the kernels, not their host test)")
    out = tmp_path_factory.mktemp("native") / "host_convert_test"
    _run([NVCC, "-O1", "-o", str(out), str(HOST_TEST)])
    return out


def _f32_patterns(gen: torch.Generator) -> torch.Tensor:
    """Random float32 bit patterns, biased towards the ranges where rounding happens."""
    edges = [
        0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFBFFFFF, 0x7FFFFFFF,  # inf, NaNs
        0x00000001, 0x80000001, 0x007FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF,              # f32 subnormals, max
        0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0xC77FF000, 0x47800000,              # f16 overflow edge
        0x38800000, 0x387FFFFF, 0x387FF000, 0x33000000, 0x33000001, 0x32FFFFFF, 0x33C00000,  # f16 subnormal edges
        0x3F808000, 0x3F818000, 0x3F808001, 0x3F7F8000, 0x7F7F8000, 0x7F7FFFFF,              # bf16 ties, overflow
        0x3F801000, 0x3F803000, 0x3F801001, 0x35000000, 0x35800000, 0x35400000,              # f16 ties, subnormal ties
        0x00000000, 0x80000000,
    ]
    anything = torch.randint(-(1 << 31), 1 << 31, (1 << 18,), dtype=torch.int64, generator=gen)
    # exponents 96..160 cover every float16 and float8 value and the rounding edges around them
    exp = torch.randint(96, 161, (1 << 19,), generator=gen)
    man = torch.randint(0, 1 << 23, (1 << 19,), generator=gen)
    sign = torch.randint(0, 2, (1 << 19,), generator=gen)
    near = (sign << 31) | (exp << 23) | man
    ties = near & ~0x1FFF | 0x1000   # exactly halfway for float16 (and for bfloat16 below)
    ties16 = near & ~0xFFFF | 0x8000
    allbits = torch.cat([torch.tensor(edges, dtype=torch.int64), anything, near, ties[:4096], ties16[:4096]])
    return (allbits & 0xFFFFFFFF).to(torch.int64).numpy().astype(np.uint32).view(np.int32)


def _inputs(src: str, gen: torch.Generator) -> np.ndarray:
    if src == "f32":
        return _f32_patterns(gen)
    if TORCH[src].itemsize == 2:
        return np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)   # every pattern
    return np.arange(256, dtype=np.uint8)                                   # every pattern


def _compare(src: str, dst: str, bits: np.ndarray, got: np.ndarray) -> None:
    src_t, dst_t = TORCH[src], TORCH[dst]
    ref = torch.from_numpy(bits.copy()).view(src_t).to(dst_t)
    want = ref.view(BITS[dst_t.itemsize]).numpy()
    nan_want = torch.isnan(ref.float()).numpy()
    nan_got = torch.isnan(torch.from_numpy(got.copy()).view(dst_t).float()).numpy()
    assert (nan_got == nan_want).all(), f"{src}->{dst}: NaN-ness differs for {int((nan_got != nan_want).sum())} inputs"
    diff = np.nonzero((got != want) & ~nan_want)[0]
    if diff.size:
        i = diff[:5]
        raise AssertionError(f"{src}->{dst}: {diff.size} of {bits.size} results differ from torch; inputs "
                             f"{[hex(int(b) & (1 << 8 * bits.itemsize) - 1) for b in bits[i]]} -> got "
                             f"{[hex(int(g) & 0xFFFFFFFF) for g in got[i]]}, torch "
                             f"{[hex(int(w) & 0xFFFFFFFF) for w in want[i]]}")


@needs_nvcc
@pytest.mark.parametrize("src,dst", PAIRS, ids=[f"{s}-{d}" for s, d in PAIRS])
def test_conversion_matches_torch(host_program: Path, tmp_path: Path, src: str, dst: str):
    if TORCH[src] is None or TORCH[dst] is None:
        pytest.skip(f"torch {torch.__version__} has no {src if TORCH[src] is None else dst}")
    gen = torch.Generator().manual_seed(sum(map(ord, src + dst)))      # stable across runs
    bits = _inputs(src, gen)
    assert np.count_nonzero(bits) > bits.size - 4          # real data, not zeros
    (tmp_path / "in").write_bytes(bits.tobytes())
    _run([str(host_program), "convert", src, dst, str(tmp_path / "in"), str(tmp_path / "out")])
    got = np.frombuffer((tmp_path / "out").read_bytes(), dtype=NP_BITS[TORCH[dst].itemsize])
    assert got.size == bits.size
    _compare(src, dst, bits, got)


def test_every_kernel_pair_is_tested():
    """The kernel table in the sink names exactly the pairs this file checks."""
    assert len(PAIRS) == 18
    assert ("f32", "bf16") in PAIRS and ("e4m3fn", "bf16") in PAIRS and ("bf16", "f16") in PAIRS
    assert all(cuda_sink.convert_kernel(k, k) is None for k in cuda_sink.NATIVE_DTYPES)
    assert cuda_sink.convert_kernel("F32", "F8_E4M3") is None      # no conversion into float8
    assert cuda_sink.convert_kernel("F8_E4M3", "BF16") == "lp_convert_e4m3fn_to_bf16"


@needs_nvcc
@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_strided_offsets_match_numpy(host_program: Path, tmp_path: Path, itemsize: int):
    rng = np.random.default_rng(itemsize)
    rows, pitch, c0, cols = 37, 53, 11, 19
    src = rng.integers(1, 255, size=rows * pitch * itemsize, dtype=np.uint8)
    (tmp_path / "in").write_bytes(src.tobytes())
    _run([str(host_program), "strided", str(itemsize), str(rows), str(cols), str(pitch), str(c0), str(cols),
          str(tmp_path / "in"), str(tmp_path / "out")])
    got = np.frombuffer((tmp_path / "out").read_bytes(), dtype=np.uint8)
    want = src.reshape(rows, pitch, itemsize)[:, c0:c0 + cols].reshape(-1)
    assert got.tobytes() == want.tobytes()


@needs_nvcc
@pytest.mark.parametrize("name", [cuda_sink.CONVERT_FILE, cuda_sink.STRIDED_FILE])
def test_kernels_compile_to_ptx(tmp_path: Path, name: str):
    """Both files as nvcc sees them, and as cupy.RawModule gets them (includes pasted in)."""
    _run([NVCC, "--ptx", "-arch=sm_90", "-o", str(tmp_path / "a.ptx"), str(NATIVE / name)])
    pasted = tmp_path / name
    pasted.write_text(cuda_sink.kernel_source(name))
    assert not re.search(r"^\s*#\s*include", pasted.read_text(), re.MULTILINE)
    _run([NVCC, "--ptx", "-arch=sm_90", "-o", str(tmp_path / "b.ptx"), str(pasted)])
    entries = {line.split()[-1].rstrip("(") for line in (tmp_path / "b.ptx").read_text().splitlines()
               if ".entry" in line}
    if name == cuda_sink.CONVERT_FILE:
        assert entries == set(cuda_sink.convert_kernels())
    else:
        assert entries == {f"lp_strided_copy_{n}" for n in (1, 2, 4, 8)}
