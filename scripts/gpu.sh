#!/usr/bin/env bash
# Run ON THE LENT GPU MACHINE (the device tool), after scripts/gpu_kit.sh ran here and with
# `.gpukit` carried: builds stitchalloc there against its PyTorch and runs the GPU work of every
# landed feature. Each phase fits one device call (10 minutes); run them in one warm lease:
#   bash scripts/gpu.sh build          # unpack the kit, configure + build build/gpu (2-4 min)
#   bash scripts/gpu.sh test           # the gtest binaries (GPU tests run), pip install ., pytest python
#   bash scripts/gpu.sh pytest-torch   # pytest tests/gpu/test_torch_gpu.py (the plugin against native)
#   bash scripts/gpu.sh pytest-offload # pytest tests/gpu/test_offload_gpu.py
#   bash scripts/gpu.sh bench          # torch hot path, replay on the CUDA driver, microbenchmarks
#   bash scripts/gpu.sh capture        # traces from process start, 3 settings x 3 allocators, replayed
#   bash scripts/gpu.sh offload        # longest trainable sequence search (bench/offload_seq.py)
#   bash scripts/gpu.sh probes         # single lengths (PROBES="mode:tokens ..."), copy hiding
#   bash scripts/gpu.sh diag           # the way-in abort of 2026-11-22, with native stacks (after build)
# CAPTURE_TIMEOUT / OFFLOAD_TIMEOUT (seconds, default 560) bound those phases; OFFLOAD_ARGS
# passes arguments to the search. The machine goes
# back after 30 s idle: a later call on a fresh one needs `build` again (about 1 minute).
# The test phase was one until 2026-11-23, when its pytest alone took 373 s (H100); with the tests
# added since, it is three, so that each fits one call.
# Measured on 2026-11-22 (H100): build 48-61 s, build+test 307 s, capture 158 s, offload > 470 s
# (the native and checkpoint searches alone; run `--modes` separately, see bench/offload_seq.py).
# Several phases may share one call (`bash scripts/gpu.sh build test`). Every phase writes its raw
# output into $OUT/<phase>.log (and <phase>.tar.gz for its files) when $OUT is set (the device
# tool), else into bench/results/gpu/<date>-<device>/: commit them from there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:${PATH}"
export PYTHONUNBUFFERED=1
PY="${PY:-$(command -v python3)}"
JOBS="${JOBS:-$(nproc)}"
kit=/tmp/gpukit
today=$(date +%F)
device=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' |
         sed 's/-$//' || true)
dest="${OUT:-bench/results/gpu/${today}-${device:-nodevice}}"
mkdir -p "${dest}"
work=$(mktemp -d)

unpack_kit() {
  [[ -d "${kit}/usr" ]] && return 0
  if [[ ! -d .gpukit/debs ]]; then
    echo "gpu: no .gpukit (run scripts/gpu_kit.sh here and carry .gpukit); using the system's packages"
    return 0
  fi
  mkdir -p "${kit}"
  for f in .gpukit/debs/*.deb; do dpkg -x "${f}" "${kit}"; done
  # Debian's libz.so points at Debian's runtime name; use the runtime of this system.
  local z="${kit}/usr/lib/x86_64-linux-gnu/libz.so"
  if [[ ! -e "${z}" ]]; then
    ln -sf "$(ls /lib/x86_64-linux-gnu/libz.so.1 /usr/lib/x86_64-linux-gnu/libz.so.1 2>/dev/null | head -1)" "${z}"
  fi
}

use_kit() {
  # The phases after build use this tree's libraries (a pip install of the package is the test
  # phase's business; a fresh machine need not repeat it for the benchmarks).
  if [[ -f build/gpu/torch_plugin/libstitchalloc_torch.so ]] && ! "${PY}" -c "import stitchalloc" 2>/dev/null; then
    export PYTHONPATH="${PWD}/python${PYTHONPATH:+:${PYTHONPATH}}"
    export STITCHALLOC_LIBRARY_DIR="${PWD}/build/gpu/torch_plugin"
  fi
  if [[ -d "${kit}/usr" ]]; then
    export CMAKE_PREFIX_PATH="${kit}/usr${CMAKE_PREFIX_PATH:+:${CMAKE_PREFIX_PATH}}"
    export LD_LIBRARY_PATH="${kit}/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:${LD_LIBRARY_PATH}}"
  fi
}

phase_build() {
  echo "== machine"
  nvidia-smi || true
  grep PRETTY_NAME /etc/os-release || true
  c++ --version | head -1; nvcc --version | tail -2; cmake --version | head -1
  "${PY}" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  unpack_kit
  use_kit
  # The compiler must link libstdc++ dynamically, as PyTorch's libraries do: a toolchain with only
  # libstdc++.a (the /opt/gcc named by CXX on the H100 machine of 2026-11-23) puts a second copy
  # of libstdc++ into every library and executable, and the test executables fail to link.
  local cxx="${CXX:-c++}"
  echo "CXX=${CXX:-} CC=${CC:-} CUDAHOSTCXX=${CUDAHOSTCXX:-}: $(command -v "${cxx}")"
  if [[ "$("${cxx}" -print-file-name=libstdc++.so)" != /* ]] && [[ -x /usr/bin/g++ ]]; then
    echo "gpu: ${cxx} has no shared libstdc++; building with /usr/bin/g++ ($(/usr/bin/g++ -dumpfullversion))"
    export CXX=/usr/bin/g++ CC=/usr/bin/gcc CUDAHOSTCXX=/usr/bin/g++
    grep -qs "CMAKE_CXX_COMPILER:.*=/usr/bin/g++" build/gpu/CMakeCache.txt || rm -rf build/gpu
  fi
  echo "== configure + build build/gpu"
  cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTITCHALLOC_PYTHON="${PY}" -DSTITCHALLOC_TORCH=ON \
    -DSTITCHALLOC_WERROR=OFF -DCMAKE_GTEST_DISCOVER_TESTS_DISCOVERY_MODE=PRE_TEST
  cmake --build build/gpu -j "${JOBS}"
}

phase_test() {
  use_kit
  # The CUDA suite first, on its own: on 2026-11-22 tests/torch_plugin_test aborted while its
  # tests were being listed, which stopped ctest before any suite ran.
  echo "== gpu_conformance_test (the conformance suite on the real CUDA driver, a kernel through a stitched range)"
  timeout 600 build/gpu/tests/gpu/gpu_conformance_test || echo "gpu: GPU CONFORMANCE FAILED"
  if command -v compute-sanitizer > /dev/null; then
    echo "== compute-sanitizer memcheck of the stitched-range kernel test"
    timeout 300 compute-sanitizer --tool memcheck build/gpu/tests/gpu/gpu_conformance_test --gtest_filter='GpuStitch*' ||
      echo "gpu: MEMCHECK FAILED"
  fi
  # Every other gtest binary on its own, not through ctest: ctest lists the tests of every
  # binary first, so one binary that aborts (torch_plugin_test on 2026-11-22) kept all from running.
  echo "== the C++ suites, one binary at a time (the CUDA tests run on the device)"
  local failed=()
  for t in build/gpu/tests/*_test; do
    echo "-- ${t}"
    if [[ "${t}" == */torch_plugin_test ]]; then
      # Installing is once per process (as in PyTorch): each test in a process of its own, as
      # ctest runs them.
      local names
      if ! names=$("${t}" --gtest_list_tests | awk '/^[^ ]/ {suite = $1} /^  / {print suite $1}'); then
        failed+=("torch_plugin_test(listing)")
        continue
      fi
      for n in ${names}; do
        timeout 300 "${t}" --gtest_filter="${n}" --gtest_brief=1 || failed+=("${n}")
      done
      continue
    fi
    timeout 600 "${t}" --gtest_brief=1 || failed+=("$(basename "${t}")")
  done
  ((${#failed[@]} == 0)) || echo "gpu: C++ SUITES FAILED: ${failed[*]}"
  install_package
  run_pytest python
}

# The package as a user installs it (the ways in need its startup hook): again only when the
# sources changed since this machine last installed it.
install_package() {
  local sources
  sources=$(find CMakeLists.txt pyproject.toml cmake allocator vmm swap recompute torch_plugin python -type f \
              -not -name '*.pyc' | sort | xargs md5sum | md5sum | cut -d' ' -f1)
  if [[ "$(cat /tmp/stitchalloc-installed 2>/dev/null)" == "${sources}" ]] && "${PY}" -c "import stitchalloc" 2>/dev/null
  then
    echo "== pip install . (done already for these sources)"
    return 0
  fi
  echo "== pip install . (against this machine's torch, no package index)"
  "${PY}" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall \
    --config-settings=cmake.define.STITCHALLOC_WERROR=OFF . && echo "${sources}" > /tmp/stitchalloc-installed
}

# PYTEST_ARGS (e.g. -k 'not memcheck') narrows a run that would not fit one call.
run_pytest() {
  echo "== pytest $* ${PYTEST_ARGS:-}"
  # shellcheck disable=SC2086  # PYTEST_ARGS is a list of arguments
  (cd tests && STITCHALLOC_REPLAY="${PWD}/../build/gpu/bench/stitchalloc-replay" \
    "${PY}" -m pytest -v -s -rs --durations=15 "$@" ${PYTEST_ARGS:-}) || echo "gpu: PYTEST FAILED ($*)"
}

phase_pytest-torch() {
  use_kit
  install_package
  run_pytest gpu/test_torch_gpu.py
}

phase_pytest-offload() {
  use_kit
  install_package
  run_pytest gpu/test_offload_gpu.py
}

phase_bench() {
  use_kit
  echo "== torch hot path: native vs stitchalloc (bench/torch_hotpath.py)"
  "${PY}" bench/torch_hotpath.py --json "${work}/torch-hotpath.json" || echo "gpu: HOTPATH FAILED"
  echo "== replay of the generated traces with stitchalloc on the CUDA driver"
  build/gpu/bench/stitchalloc-replay --compare --check --driver cuda --json "${work}/replay-cuda-generated.json" \
    gen:all || echo "gpu: REPLAY FAILED"
  echo "== allocator microbenchmarks (host driver, this machine's CPU)"
  build/gpu/bench/stitchalloc-bench --benchmark_out="${work}/allocator-bench.json" --benchmark_out_format=json \
    --benchmark_repetitions=3 --benchmark_report_aggregates_only=true || echo "gpu: BENCH FAILED"
}

phase_diag() {
  use_kit
  # The way-in abort of 2026-11-22 (free(): invalid pointer): each case runs with
  # scripts/diag/abort_backtrace.c preloaded, which prints the native stack at the abort;
  # scripts/diag/symbolize.sh names the functions (this machine has no gdb).
  cc -shared -fPIC -O0 -o /tmp/abort_backtrace.so scripts/diag/abort_backtrace.c
  local bt=/tmp/abort_backtrace.so
  traced() { (LD_PRELOAD="${bt}${LD_PRELOAD:+:${LD_PRELOAD}}" "$@" 2>&1; echo "rc=$?") | scripts/diag/symbolize.sh; }
  echo "== the C++ plugin test binary, listing its tests"
  traced build/gpu/tests/torch_plugin_test --gtest_list_tests
  echo "== the startup hook's way in (stitchalloc._startup imported by hand, as stitchalloc.pth does)"
  traced env STITCHALLOC_CONF= PYTORCH_CUDA_ALLOC_CONF=backend:stitchalloc "${PY}" -c \
    "import stitchalloc._startup, torch, stitchalloc; print('installed', stitchalloc.installed(), flush=True)"
  echo "== the same, split_alloc_conf only (libstitchalloc.so loaded before torch), no install"
  traced "${PY}" -c "import stitchalloc; print(stitchalloc.split_alloc_conf('backend:stitchalloc')); import torch; print('ok', flush=True)"
  echo "== install() in the script (passed on 2026-11-22)"
  traced "${PY}" -c "import torch, stitchalloc; stitchalloc.install(''); print('installed', stitchalloc.installed(), flush=True)"
  echo "== exported symbols of the libraries, and what the test binary loads"
  for f in build/gpu/torch_plugin/*.so build/gpu/tests/torch_plugin_test; do
    echo "${f}: $(nm -D --defined-only "${f}" | wc -l) defined; unique, weak and data objects:"
    nm -DC --defined-only "${f}" | grep -E ' [uVBD] ' | cut -c1-200 | head -30 || true
  done
  ldd build/gpu/tests/torch_plugin_test | grep -v -E 'libnv|libcu' | head -40
}

phase_capture() {
  use_kit
  echo "== traces captured from process start, 3 settings x 3 allocators (bench/capture_traces.py)"
  timeout "${CAPTURE_TIMEOUT:-560}" "${PY}" bench/capture_traces.py all --out "${work}/capture" --replay build/gpu/bench/stitchalloc-replay ||
    echo "gpu: CAPTURE FAILED"
}

phase_offload() {
  use_kit
  # OFFLOAD_ARGS picks modes and lengths (one call cannot search all three modes: a probe at
  # 50k+ tokens takes 1-2 minutes), e.g. "--modes offload --start 57344 --resolution 8192".
  local args="${OFFLOAD_ARGS:---modes native,checkpoint,offload}"
  echo "== longest trainable sequence (bench/offload_seq.py search ${args})"
  # shellcheck disable=SC2086  # OFFLOAD_ARGS is a list of arguments
  timeout "${OFFLOAD_TIMEOUT:-560}" "${PY}" bench/offload_seq.py search ${args} --json "${work}/offload-seq.json" ||
    echo "gpu: OFFLOAD SEARCH FAILED"
}

phase_probes() {
  use_kit
  # Single lengths instead of a search (a step at 300k+ tokens takes a minute or more):
  # PROBES="native:47104 checkpoint:389120 offload:196608 hiding:32768" (also checkpoint-stitchalloc
  # and native-stitchalloc: stitchalloc's allocator without offload), each one process of
  # bench/offload_seq.py with one timed step after the warm-up; PROBE_ARGS adds arguments to all
  # (e.g. "--conf swap_host_limit_mb:110000", or "--steps 0": the warm-up step only, whether the
  # length fits), PROBE_TIMEOUT bounds each (seconds, default 300). Each step prints a progress line
  # on stderr; a probe that the timeout ends prints its result with the steps it took (killed 30 s later if it has not ended).
  local probe mode seq
  for probe in ${PROBES:-native:47104 offload:196608}; do
    mode=${probe%%:*}
    seq=${probe##*:}
    echo "== ${mode} at ${seq} tokens (bench/offload_seq.py ${PROBE_ARGS:-})"
    if [[ ${mode} == hiding ]]; then
      # shellcheck disable=SC2086  # PROBE_ARGS is a list of arguments
      timeout -k 30 "${PROBE_TIMEOUT:-300}" "${PY}" bench/offload_seq.py hiding --seq "${seq}" --steps 1 ${PROBE_ARGS:-} ||
        echo "gpu: PROBE ${probe} FAILED"
    else
      # shellcheck disable=SC2086
      timeout -k 30 "${PROBE_TIMEOUT:-300}" "${PY}" bench/offload_seq.py probe --mode "${mode}" --seq "${seq}" --steps 1 \
        ${PROBE_ARGS:-} || echo "gpu: PROBE ${probe} FAILED"
    fi
  done
}

((${#@})) || set -- build test
for phase in "$@"; do
  case "${phase}" in
    build | test | pytest-torch | pytest-offload | bench | capture | offload | probes | diag) ;;
    *) echo "gpu: unknown phase ${phase} (build, test, pytest-torch, pytest-offload, bench, capture, offload," \
            "probes, diag)" >&2; exit 2 ;;
  esac
  echo "##### ${phase} ($(date -Is))"
  "phase_${phase}" 2>&1 | tee "${dest}/${phase}.log"
  if [[ -n "$(ls -A "${work}")" ]]; then
    tar -czf "${dest}/${phase}.tar.gz" -C "${work}" . && rm -rf "${work:?}"/*
  fi
done
