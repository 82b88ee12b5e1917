"""Every CUDA source compiles for sm_80 and sm_90, without a GPU: a compile error fails CI.

nvcc --ptx when nvcc is on PATH, else NVRTC through cupy_backends (the compiler cupy.RawModule
uses at run time) when CuPy and the nvidia-cuda-nvrtc wheel are installed; skipped only when
neither exists. ptxas, when present, then assembles the sm_90 PTX and reports registers and
spills: no kernel may spill or keep a stack frame (local memory) at the default block sizes.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

from lowrank.kernels import api, backends

CUDA_DIR = Path(api.__file__).parent / "cupy_gpu" / "cuda"
KERNELS = {"lora.cu": ("lora_shrink", "lora_expand", "lora_gemv"), "nf4.cu": ("nf4_dequant", "nf4_gemv")}
SOURCES = [CUDA_DIR / name for name in KERNELS]           # common.cu is included by both, not built alone
ARCHS = ("80", "90")
NVCC, PTXAS = shutil.which("nvcc"), shutil.which("ptxas")


def _nvrtc():
    """(nvrtc module, include options as cupy.RawModule passes them), or None when unavailable."""
    try:
        from cupy._core.core import assemble_cupy_compiler_options
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc, tuple(o for o in assemble_cupy_compiler_options(()) if o.startswith(("-I", "--std")))
    except Exception:                                 # ImportError, or the NVRTC library is missing
        return None


NVRTC = None if NVCC else _nvrtc()


def _ptx_nvcc(src, arch, tmp_path, defines):
    out = tmp_path / f"{src.stem}_{arch}.ptx"
    cmd = [NVCC, "--ptx", f"-arch=sm_{arch}", f"-I{CUDA_DIR}", *defines, str(src), "-o", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, f"nvcc failed on {src.name} for sm_{arch}:\n{run.stderr}"
    return out.read_text()


def _ptx_nvrtc(src, arch, defines):
    nvrtc, includes = NVRTC
    prog = nvrtc.createProgram(src.read_text(), src.name, (), ())
    try:
        nvrtc.compileProgram(prog, (f"-arch=compute_{arch}", f"-I{CUDA_DIR}", *includes, *defines))
        ptx = nvrtc.getPTX(prog)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    except nvrtc.NVRTCError:
        pytest.fail(f"NVRTC failed on {src.name} for compute_{arch}:\n{nvrtc.getProgramLog(prog)}")
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_block_sizes_must_come_as_defines(tmp_path):
    """Without launch.defines() a source does not compile: no stale default can stand in for config."""
    run = subprocess.run([NVCC, "--ptx", f"-I{CUDA_DIR}", str(SOURCES[0]), "-o", str(tmp_path / "k.ptx")],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "take their block sizes as -D options" in run.stderr, run.stderr


def test_every_source_is_built_or_included():
    names = {p.name for p in CUDA_DIR.glob("*.cu")}
    assert names == set(KERNELS) | {"common.cu"}
    assert all('#include "common.cu"' in (CUDA_DIR / n).read_text() for n in KERNELS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("src", SOURCES, ids=lambda s: s.name)
def test_compiles_without_spills(src, arch, tmp_path, cuda_launch):
    """With the -D options of launch.defines(), exactly as cupy_gpu compiles them."""
    if NVCC is None and NVRTC is None:
        pytest.skip("neither nvcc (on PATH) nor NVRTC (cupy + nvidia-cuda-nvrtc) is installed")
    defines = cuda_launch.defines()
    ptx = _ptx_nvcc(src, arch, tmp_path, defines) if NVCC else _ptx_nvrtc(src, arch, defines)
    entries = {line.split()[-1].rstrip("(") for line in ptx.splitlines() if ".entry" in line}
    assert all(f"{name}_{t}" in entries for name in KERNELS[src.name] for t in ("f32", "f16")), entries
    if PTXAS is None or arch != "90":                 # the resource report for the H200's sm_90 only
        return
    (tmp_path / "k.ptx").write_text(ptx)
    run = subprocess.run([PTXAS, f"-arch=sm_{arch}", "-v", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.o")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = [line for line in run.stderr.splitlines() if "stack frame" in line]
    assert len(report) == len(entries) and all(
        "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in line for line in report), run.stderr

