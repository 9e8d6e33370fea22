"""`python -m bench.llamacpp_build`: install the benchmark's peer, llama-cpp-python's server,
built for this CPU without llama.cpp's AMX kernels (`make bench` runs this).

Why not pip's default build (`-march=native`): on a CPU with AMX, llama.cpp turns on its AMX
matmul, and on an Intel Xeon VM with AMX (2026-12-02) its server died at the first completion
(general protection fault at `ldtilecfg` in `ggml_backend_amx_mul_mat`). So the build names
this CPU's instruction sets itself (from /proc/cpuinfo), AMX left out: the same kernels as a
native build on a CPU without AMX.

The wheel is kept under ~/.cache/textbot/wheels, one folder per set of instruction sets, so a
new virtualenv installs it in seconds; the first build takes about 7 minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "requirements-bench.txt"
# /proc/cpuinfo flag -> llama.cpp's CMake option for it (ggml/CMakeLists.txt).
GGML_OPTIONS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
                "bmi2": "GGML_BMI2", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
                "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
                "avx512_bf16": "GGML_AVX512_BF16"}


def cmake_args(cpu_flags: set[str]) -> str:
    options = [f"-D{option}={'ON' if flag in cpu_flags else 'OFF'}" for flag, option in GGML_OPTIONS.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *options])


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def main() -> None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        # Elsewhere pip's own build, as llama-cpp-python's README has it.
        subprocess.run([sys.executable, "-m", "pip", "install", "-r", str(REQUIREMENTS)], check=True)
        return
    args = cmake_args(cpu_flags())
    requirement = next(line.strip() for line in REQUIREMENTS.read_text().splitlines()
                       if line.strip().startswith("llama-cpp-python"))
    wheels = Path.home() / ".cache" / "textbot" / "wheels" / hashlib.sha256(
        f"{requirement}|{args}".encode()).hexdigest()[:16]
    if not any(wheels.glob("llama_cpp_python-*.whl")):
        print(f"Building {requirement} with CMAKE_ARGS={args} (about 7 minutes on 2 cores, once)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-w", str(wheels),
                        requirement], check=True, env=os.environ | {"CMAKE_ARGS": args})
    # This wheel even over one installed before (a used virtualenv's native build), then its dependencies.
    wheel = next(wheels.glob("llama_cpp_python-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--find-links", str(wheels), "-r", str(REQUIREMENTS)],
                   check=True)


if __name__ == "__main__":
    main()
