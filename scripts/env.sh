# Sourced by the scripts: puts the CUDA toolkit on PATH and picks the parallelism.
export PATH="/usr/local/cuda/bin:${PATH}"
export CUDAToolkit_ROOT="${CUDAToolkit_ROOT:-/usr/local/cuda}"
JOBS="${JOBS:-$(nproc)}"
