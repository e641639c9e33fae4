#!/usr/bin/env bash
# Run HERE (a machine with Debian's package index) before a GPU session: downloads into .gpukit/
# (git-ignored) the Debian 12 packages of the C++ build dependencies that the lent GPU machine
# lacks and cannot fetch (it has no package index): Abseil, GoogleTest/GoogleMock, Google
# Benchmark and zlib's headers, about 3 MB. scripts/gpu.sh unpacks them there into a private
# prefix (never into /). Debian 12's libraries need glibc 2.36 or newer and run on newer systems.
# Then every device `run` names `.gpukit` in `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(libabsl-dev libabsl20220623 libgtest-dev libgmock-dev googletest libbenchmark-dev libbenchmark1debian
          zlib1g-dev)
rm -rf .gpukit && mkdir -p .gpukit/debs
(cd .gpukit/debs && apt-get download "${packages[@]}" 2>&1 | grep -v "^W: Download is performed unsandboxed" || true)
n=$(ls .gpukit/debs/*.deb 2>/dev/null | wc -l)
if ((n != ${#packages[@]})); then
  echo "gpu_kit: expected ${#packages[@]} packages, got ${n} (apt-get update first?)" >&2
  exit 1
fi
du -sh .gpukit | sed 's/^/gpu_kit: /'
