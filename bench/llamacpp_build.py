"""`python -m bench.llamacpp_build`: build the benchmark's peer, llama.cpp's own `llama-server`
(continuous batching over parallel slots) and `llama-bench`, for this CPU without llama.cpp's
AMX kernels (`make bench` runs this; `python -m bench` then finds the binaries).

Where the source comes from: only PyPI is reachable here, and llama-cpp-python's sdist carries
the whole llama.cpp source in `vendor/llama.cpp`. Nothing of llama.cpp is kept in this
repository: `pip download` fetches the sdist into a temporary folder, CMake builds from it, and
the folder goes. The vendored commit is the one llama-cpp-python's CHANGELOG names for the
release (the sdist has no git history, which llama.cpp's build reads its version from).

Why not a native build (`-march=native`): on a CPU with AMX, llama.cpp turns on its AMX
matmul, and on an Intel Xeon VM with AMX (2026-12-02) it died at the first decode (general
protection fault at `ldtilecfg` in `ggml_backend_amx_mul_mat`). So the build names this CPU's
instruction sets itself (from /proc/cpuinfo), AMX left out: the same kernels as a native build
on a CPU without AMX.

The build is kept under ~/.cache/textbot/llama.cpp/<hash of the version and CMake options>/,
so a later run (or another checkout) reuses it; the first build takes about 6 minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The llama-cpp-python release whose sdist carries the llama.cpp source we build.
LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-server", "llama-bench")
CACHE = Path.home() / ".cache" / "textbot" / "llama.cpp"
# /proc/cpuinfo flag -> llama.cpp's CMake option for it (ggml/CMakeLists.txt).
GGML_OPTIONS = {"sse4_2": "GGML_SSE42", "avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA",
                "f16c": "GGML_F16C", "bmi2": "GGML_BMI2", "avx_vnni": "GGML_AVX_VNNI",
                "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
                "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}
# Always off, whatever the CPU says (see the docstring).
AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# The rest: shared libraries (the binaries find them in their own folder), no web UI download
# (no Hugging Face here: LLAMA_USE_PREBUILT_UI), no HTTPS, no tests or examples. LLAMA_CURL is
# gone from this llama.cpp (only a deprecation warning left), so it is not passed.
FIXED_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_USE_PREBUILT_UI=OFF",
                 "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF")


def cmake_args(cpu_flags: set[str]) -> list[str]:
    """llama.cpp's CMake options for a CPU with these /proc/cpuinfo flags: its instruction sets
    named one by one (GGML_NATIVE off), AMX always off."""
    isa = [f"-D{option}={'ON' if flag in cpu_flags else 'OFF'}" for flag, option in GGML_OPTIONS.items()]
    return ["-DGGML_NATIVE=OFF", *isa, *(f"-D{option}=OFF" for option in AMX_OPTIONS), *FIXED_OPTIONS]


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def build_dir(args: list[str], version: str = LLAMA_CPP_PYTHON) -> Path:
    """The cache folder for a build with these options from this llama-cpp-python's sdist."""
    return CACHE / hashlib.sha256(f"llama-cpp-python=={version}|{' '.join(args)}".encode()).hexdigest()[:16]


def binary(name: str = "llama-server") -> Path | None:
    """The built binary for this CPU, or None before `python -m bench.llamacpp_build` ran."""
    folder = build_dir(cmake_args(cpu_flags()))
    path = folder / "build" / "bin" / name
    return path if (folder / "complete").is_file() and path.is_file() else None


def vendored_commit(changelog: str, version: str) -> str | None:
    """The llama.cpp commit llama-cpp-python's CHANGELOG names under this release (its first
    `llama.cpp@<sha>`: the last update before the release)."""
    section = re.search(rf"^## \[{re.escape(version)}\]\s*$(.*?)(?=^## \[|\Z)", changelog, re.M | re.S)
    found = section and re.search(r"llama\.cpp@([0-9a-f]{7,40})", section.group(1))
    return found.group(1) if found else None


def version_line(server: Path) -> str:
    """What `llama-server --version` says of the build, e.g. '0.5.0-dev (build 1, commit 0c1e57098)'
    (the commit is what names it: the build number counts git history, which the sdist lacks)."""
    out = subprocess.run([str(server), "--version"], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    found = next((line for line in lines if line.startswith("version:")), None)
    return found.removeprefix("version:").strip() if found else " / ".join(lines[-2:])


def build(args: list[str], folder: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="llama-cpp-python-sdist-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
                        "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
                       check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        root = next(p for p in Path(tmp).iterdir() if p.is_dir())
        source = root / "vendor" / "llama.cpp"
        commit = vendored_commit((root / "CHANGELOG.md").read_text(), LLAMA_CPP_PYTHON)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(["cmake", "-S", str(source), "-B", str(folder / "build"), *generator, *args,
                        *([f"-DLLAMA_BUILD_COMMIT={commit}"] if commit else [])], check=True)
        subprocess.run(["cmake", "--build", str(folder / "build"), "--target", *TARGETS,
                        "-j", str(os.cpu_count() or 1)], check=True)
    (folder / "complete").write_text(" ".join(args) + "\n")


def main() -> None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        sys.exit("bench.llamacpp_build names x86-64 instruction sets from /proc/cpuinfo; elsewhere build "
                 "llama.cpp's llama-server yourself and put it on PATH (python -m bench looks there next)")
    args = cmake_args(cpu_flags())
    folder = build_dir(args)
    if binary() is None:
        print(f"Building llama.cpp's {' and '.join(TARGETS)} from llama-cpp-python=={LLAMA_CPP_PYTHON}'s sdist "
              f"into {folder} (about 6 minutes on 2 cores, once) with {' '.join(args)}", flush=True)
        build(args, folder)
    server = binary()
    print(f"{server}: {version_line(server)}")


if __name__ == "__main__":
    main()
