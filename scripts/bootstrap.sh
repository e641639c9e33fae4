#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine of the project's kind lacks to build stitchalloc:
# compilers and build tools, Abseil, GoogleTest/GoogleMock, Google Benchmark, zlib, gnuplot (the
# main job's plot) and python3-venv (the Python tests' virtual environment) from Debian.
# The CUDA toolkit (headers, nvcc) is expected at /usr/local/cuda; libcuda is never needed.
# Idempotent and non-interactive: packages already installed are not touched.
set -euo pipefail

packages=(build-essential cmake ninja-build pkg-config libabsl-dev googletest libgtest-dev libgmock-dev libbenchmark-dev
          zlib1g-dev gnuplot-nox python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v nvcc >/dev/null 2>&1 && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  echo "bootstrap: note: add /usr/local/cuda/bin to PATH (scripts do this themselves)"
fi
if [[ ! -f /usr/local/cuda/include/cuda.h ]]; then
  echo "bootstrap: error: the CUDA toolkit headers are required at /usr/local/cuda/include (cuda.h, nvtx3)" >&2
  exit 1
fi
