"""The Python side of the PyTorch plugin, without a GPU (the host driver stands in for the
device): the startup hook's handling of PYTORCH_CUDA_ALLOC_CONF, the package loading its
libraries, the three ways in (install(), the environment variable, LD_PRELOAD) in fresh
processes, the preload library in processes without torch, and the torch.cuda.memory paths that
need no device (statistics, snapshots rendered by _memory_viz, out-of-memory errors).

Runs against the installed package (pip install .), or a build tree named by
STITCHALLOC_LIBRARY_DIR.
"""

import os
import subprocess
import sys
import textwrap

import pytest

import stitchalloc
from stitchalloc import _startup

HAVE_LIBS = os.path.exists(stitchalloc.library_path("stitchalloc"))
HAVE_TORCH_PLUGIN = os.path.exists(stitchalloc.library_path("stitchalloc_torch"))
needs_libs = pytest.mark.skipif(not HAVE_LIBS, reason="stitchalloc's native libraries are not built")
needs_plugin = pytest.mark.skipif(not HAVE_TORCH_PLUGIN, reason="built without torch")

HOST = "driver:host,host_capacity_mb:256"


def run_python(code, env_extra=None, preload=False):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "STITCHALLOC_AUTO_INSTALL")}
    env.update(env_extra or {})
    if preload:
        env["LD_PRELOAD"] = stitchalloc.library_path("stitchalloc_preload")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


# ---- the startup hook: parsing and stripping of PYTORCH_CUDA_ALLOC_CONF -----------------------


@needs_libs
def test_split_keeps_moves_honours_and_reports():
    enabled, ours, theirs, notes = stitchalloc.split_alloc_conf(
        "backend:stitchalloc,stitching:false,expandable_segments:True,pinned_use_cuda_host_register:True,"
        "max_split_size_mb:256,garbage_collection_threshold:0.6")
    assert enabled
    assert ours == "stitching:false,max_split_size_mb:256"
    assert theirs == "pinned_use_cuda_host_register:True"
    assert len(notes) == 3
    assert notes[0].startswith("expandable_segments:True has no effect under stitchalloc")
    assert notes[1].startswith("max_split_size_mb:256 honoured")
    assert notes[2].startswith("garbage_collection_threshold:0.6 has no effect")


@needs_libs
def test_without_backend_the_variable_is_untouched():
    environ = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert not _startup.apply_environment(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert stitchalloc.split_alloc_conf("max_split_size_mb:64") == (False, "", "max_split_size_mb:64", [])


@needs_libs
def test_hook_rewrites_the_environment(capsys):
    environ = {"PYTORCH_CUDA_ALLOC_CONF": "backend:stitchalloc,chunk_size_mb:4,expandable_segments:True"}
    assert _startup.apply_environment(environ, stderr=sys.stderr)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in environ  # nothing left for PyTorch
    assert environ["STITCHALLOC_AUTO_INSTALL"] == "chunk_size_mb:4"
    assert "expandable_segments:True has no effect" in capsys.readouterr().err

    environ = {"PYTORCH_CUDA_ALLOC_CONF": "pinned_num_register_threads:4,backend:stitchalloc"}
    assert _startup.apply_environment(environ)
    assert environ["PYTORCH_CUDA_ALLOC_CONF"] == "pinned_num_register_threads:4"
    assert environ["STITCHALLOC_AUTO_INSTALL"] == ""


@needs_libs
@pytest.mark.parametrize("text, message", [
    ("backend:stitchalloc,nonsense:1", "unknown key 'nonsense'"),
    ("backend:stitchalloc,stitching", "malformed entry 'stitching'"),
    ("backend:stitchalloc,stitching:perhaps", "invalid value 'perhaps'"),
    ("backend:stitchalloc,backend:native", "'backend' is given more than once"),
    ("backend:stitchalloc,:x", "key and value must both be non-empty"),
    ("backend:stitchalloc,device:2", "'device' is not accepted"),
])
def test_malformed_values_are_rejected_with_the_reason(text, message):
    environ = {"PYTORCH_CUDA_ALLOC_CONF": text}
    with pytest.raises(ValueError, match=message):
        _startup.apply_environment(environ)
    assert environ == {"PYTORCH_CUDA_ALLOC_CONF": text}  # unchanged


# ---- the package and its libraries -------------------------------------------------------------


@needs_libs
def test_package_loads_its_library():
    lib = stitchalloc._c_api()
    assert lib.stitchalloc_version().decode() == stitchalloc.__version__
    out = subprocess.run([sys.executable, "-m", "stitchalloc", "--preload-path"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == stitchalloc.library_path("stitchalloc_preload")
    assert os.path.exists(out.stdout.strip())


def _exported(path):
    """The names a shared library defines in its dynamic symbol table."""
    out = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True)
    return [line.split()[-1] for line in out.stdout.splitlines() if len(line.split()) == 3]


@needs_libs
@pytest.mark.parametrize("name", ["stitchalloc", "stitchalloc_preload", "stitchalloc_torch", "stitchalloc_torch_ops"])
def test_libraries_export_only_their_c_abi(name):
    # cmake/c_abi_only.map: an exported copy of libstdc++ template code or of the allocator core
    # would be bound by other libraries in the process (PyTorch's) in place of their own.
    path = stitchalloc.library_path(name)
    if not os.path.exists(path):
        pytest.skip(f"{os.path.basename(path)} is not built")
    names = _exported(path)
    if name != "stitchalloc_torch_ops":  # registers its operators from a static constructor
        assert names, f"{path} exports nothing"
    stray = [n for n in names if not n.startswith("stitchalloc_") and n != "dlopen"]
    assert stray == [], f"{path} exports {len(stray)} symbols besides its C ABI, e.g. {stray[:5]}"


def test_importing_the_package_does_not_import_torch():
    r = run_python("import sys, stitchalloc; print('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


# ---- the preload library -----------------------------------------------------------------------


@needs_libs
def test_preload_is_a_no_op_without_torch():
    r = run_python("""
        import json, ctypes, ctypes.util
        ctypes.CDLL(ctypes.util.find_library("z"))   # a dlopen the preload library sees
        maps = open("/proc/self/maps").read()
        print("preload" in maps, "libstitchalloc.so" in maps, "libstitchalloc_torch" in maps)
        """, preload=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False", "False"]  # loaded, but loads nothing else
    assert r.stderr == ""
    sh = subprocess.run(["sh", "-c", "echo hello"], env={**os.environ, "LD_PRELOAD": stitchalloc.library_path(
        "stitchalloc_preload")}, capture_output=True, text=True)
    assert (sh.returncode, sh.stdout, sh.stderr) == (0, "hello\n", "")


@needs_plugin
def test_preload_installs_when_torch_loads_without_a_gpu():
    r = run_python("""
        import torch, stitchalloc
        print(stitchalloc.installed(), torch.cuda.memory.memory_stats_as_nested_dict is not None)
        p = torch._C._cuda_cudaCachingAllocator_raw_alloc(1 << 20, 0)
        print(torch._C._cuda_memoryStats(0)["allocated_bytes"]["all"]["current"])
        torch._C._cuda_cudaCachingAllocator_raw_delete(p)
        """, {"STITCHALLOC_CONF": HOST}, preload=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", str(1 << 20)]


@needs_plugin
def test_preload_reads_the_backend_variable():
    r = run_python("""
        import os, torch, stitchalloc
        print(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), os.environ["STITCHALLOC_AUTO_INSTALL"], stitchalloc.installed())
        """, {"STITCHALLOC_CONF": HOST, "PYTORCH_CUDA_ALLOC_CONF":
              "backend:stitchalloc,stitching:false,pinned_num_register_threads:2"}, preload=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["pinned_num_register_threads:2", "stitching:false", "True"]


# ---- the three ways in, end to end in fresh processes ------------------------------------------


@needs_plugin
def test_install_before_cuda_use():
    r = run_python(f"""
        import stitchalloc, torch
        assert not stitchalloc.installed()
        stitchalloc.install("{HOST}")
        stitchalloc.install("{HOST}")      # again, same configuration: fine
        print(stitchalloc.installed())
        try:
            stitchalloc.install("driver:host,stitching:false")
        except stitchalloc.InstallError as e:
            print("refused:", "already installed" in str(e))
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "refused:", "True"]


@needs_plugin
def test_install_too_late_raises_and_changes_nothing():
    # Without a GPU, torch.cuda cannot initialise; swapping in torch's pluggable allocator
    # initialises the current allocator the same way CUDA use would.
    r = run_python(f"""
        import ctypes, torch, stitchalloc
        lib = stitchalloc.library_path("stitchalloc")
        alloc = torch.cuda.memory.CUDAPluggableAllocator(lib, "stitchalloc_version", "stitchalloc_version")
        torch.cuda.memory.change_current_allocator(alloc)
        try:
            stitchalloc.install("{HOST}")
        except stitchalloc.InstallError as e:
            print("too late" in str(e), "Nothing was changed" in str(e))
        print(stitchalloc.installed())
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", "False"]


@needs_plugin
def test_environment_variable_way_in():
    r = run_python("""
        import os, torch, stitchalloc
        print(stitchalloc.installed(), os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        """, {"STITCHALLOC_CONF": HOST, "PYTORCH_CUDA_ALLOC_CONF": "backend:stitchalloc,expandable_segments:True"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "None"]
    assert "expandable_segments:True has no effect under stitchalloc" in r.stderr


@needs_plugin
def test_environment_variable_inherited_by_child_processes():
    r = run_python("""
        import subprocess, sys
        import torch, stitchalloc
        child = subprocess.run([sys.executable, "-c",
                                "import torch, stitchalloc; print(stitchalloc.installed())"],
                               capture_output=True, text=True)
        print(stitchalloc.installed(), child.stdout.strip())
        """, {"STITCHALLOC_CONF": HOST, "PYTORCH_CUDA_ALLOC_CONF": "backend:stitchalloc"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True"]


@needs_plugin
def test_invalid_environment_variable_makes_import_torch_fail():
    r = run_python("import torch", {"PYTORCH_CUDA_ALLOC_CONF": "backend:stitchalloc,bogus:1"})
    assert r.returncode != 0
    assert "unknown key 'bogus'" in r.stderr


def test_without_backend_nothing_happens():
    r = run_python("""
        import os, sys
        print("stitchalloc._startup" in sys.modules, os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        """, {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "expandable_segments:True"]


# ---- torch.cuda.memory paths that need no device -----------------------------------------------


@needs_plugin
def test_run_time_allocator_settings_that_do_not_reach_stitchalloc_are_named():
    # PyTorch applies settings given at run time to its own configuration only; stitchalloc,
    # behind PyTorch's device hook, names each that therefore does nothing, once per process.
    # Its max_split_size_mb is fixed at install; pinned_* keys are PyTorch's pinned allocator's.
    import ctypes

    import torch

    c10 = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    if not hasattr(c10, "_ZN3c1016CachingAllocator26AcceleratorAllocatorConfig19getConfigParserHookB5cxx11Ev"):
        pytest.skip(f"torch {torch.__version__}'s c10 defines the settings hook inline (torch 2.11 does): the "
                    "plugin's copy is its own and hears nothing (docs/torch.md)")
    r = run_python(f"""
        import sys, torch, stitchalloc
        stitchalloc.install("{HOST},max_split_size_mb:64")
        for settings in ["pinned_use_background_threads:True", "max_split_size_mb:64",
                         "expandable_segments:False,pinned_use_background_threads:True,max_split_size_mb:128",
                         "expandable_segments:False", "expandable_segments:True"]:
            print("setting", settings, file=sys.stderr, flush=True)
            torch._C._accelerator_setAllocatorSettings(settings)
        try:
            torch.cuda.memory._set_allocator_settings("stitching:false")
        except ValueError as e:
            print("rejected:", e)
        p = torch._C._cuda_cudaCachingAllocator_raw_alloc(4000, 0)  # the allocator still serves
        print(torch._C._cuda_memoryStats(0)["allocated_bytes"]["all"]["current"])
        torch._C._cuda_cudaCachingAllocator_raw_delete(p)
        """)
    assert r.returncode == 0, r.stderr
    assert "rejected: Unrecognized key 'stitching'" in r.stdout
    assert r.stdout.splitlines()[-1] == "4096"
    lines = [line for line in r.stderr.splitlines() if line.startswith("setting") or "stitchalloc: " in line]
    notes = [line.split("Warning: stitchalloc: ")[1].split(" (function")[0] if "Warning" in line else line
             for line in lines]
    assert notes == [
        "setting pinned_use_background_threads:True",
        "setting max_split_size_mb:64",
        "setting expandable_segments:False,pinned_use_background_threads:True,max_split_size_mb:128",
        "expandable_segments:False set at run time has no effect under stitchalloc: stitchalloc always maps memory "
        "with the VMM API (it never fragments into segments)",
        "max_split_size_mb:128 set at run time does not reach stitchalloc: its max_split_size_mb is fixed when it is "
        "installed (64 MiB); give it in PYTORCH_CUDA_ALLOC_CONF or stitchalloc.install()",
        "setting expandable_segments:False",
        "setting expandable_segments:True",
        "expandable_segments:True set at run time has no effect under stitchalloc: stitchalloc always maps memory "
        "with the VMM API (it never fragments into segments)",
    ], r.stderr


@needs_plugin
def test_stats_snapshot_render_and_out_of_memory():
    r = run_python(f"""
        import json, torch, stitchalloc
        import torch.cuda._memory_viz as viz
        stitchalloc.install("{HOST}")
        C = torch._C
        a = C._cuda_cudaCachingAllocator_raw_alloc(3 << 20, 0)
        b = C._cuda_cudaCachingAllocator_raw_alloc(1000, 0)
        s = C._cuda_memoryStats(0)
        out = {{
            "allocated": s["allocated_bytes"]["all"]["current"],
            "requested": s["requested_bytes"]["all"]["current"],
            "small": s["allocation"]["small_pool"]["current"],
            "reserved_ge": s["reserved_bytes"]["all"]["current"] >= s["allocated_bytes"]["all"]["current"],
            "keys": sorted(s.keys()),
        }}
        snap = torch.cuda.memory._snapshot()
        blocks = [b for seg in snap["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"]
        out["blocks"] = sorted(b["size"] for b in blocks)
        out["tiles"] = all(sum(b["size"] for b in seg["blocks"]) == seg["total_size"] for seg in snap["segments"])
        out["render"] = "<html" in viz.segment_plot(snap).lower() and "<html" in viz.trace_plot(snap).lower()
        try:
            C._cuda_cudaCachingAllocator_raw_alloc(300 << 20, 0)
        except torch.OutOfMemoryError as e:
            out["oom"] = str(e)
        out["num_ooms"] = C._cuda_memoryStats(0)["num_ooms"]
        C._cuda_cudaCachingAllocator_raw_delete(a)
        C._cuda_resetPeakMemoryStats(0)
        out["peak_after_reset"] = C._cuda_memoryStats(0)["allocated_bytes"]["all"]["peak"]
        C._cuda_cudaCachingAllocator_raw_delete(b)
        C._cuda_emptyCache()
        out["reserved_after_empty"] = C._cuda_memoryStats(0)["reserved_bytes"]["all"]["current"]
        C._cuda_setMemoryFraction(0.5, 0)
        try:
            C._cuda_cudaCachingAllocator_raw_alloc(200 << 20, 0)
        except torch.OutOfMemoryError:
            out["fraction_enforced"] = True
        print(json.dumps(out))
        """)
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout)
    assert out["allocated"] == (3 << 20) + 1024
    assert out["requested"] == (3 << 20) + 1000
    assert out["small"] == 1
    assert out["reserved_ge"]
    # The keys torch.cuda.memory_stats() flattens: the same as under the native allocator,
    # because torch builds them from the DeviceStats the plugin fills.
    for key in ("allocated_bytes", "reserved_bytes", "active_bytes", "inactive_split_bytes", "requested_bytes",
                "allocation", "segment", "active", "inactive_split", "num_alloc_retries", "num_ooms",
                "num_device_alloc", "num_device_free", "max_split_size", "oversize_allocations"):
        assert key in out["keys"], key
    assert out["blocks"] == [1024, 3 << 20]
    assert out["tiles"]
    assert out["render"]
    assert out["oom"].startswith("CUDA out of memory. stitchalloc:")
    assert "requested" in out["oom"]
    assert out["num_ooms"] == 1
    assert out["peak_after_reset"] == 1024
    assert out["reserved_after_empty"] == 0
    assert out["fraction_enforced"]


@needs_plugin
def test_memory_metadata_apis():
    # torch.cuda.memory's metadata calls reach stitchalloc (no warning that the backend ignores
    # them). What the entries carry is checked through c10's interface (torch_plugin_test) and
    # against PyTorch's allocator on a GPU (api_job.py, history_metadata): recording a history
    # needs a device here.
    r = run_python(f"""
        import inspect, json, threading, warnings, torch, stitchalloc
        stitchalloc.install("{HOST}")
        mm, C = torch.cuda.memory, torch._C
        out = {{"has_query": hasattr(mm, "_memory_metadata_supported")}}
        if out["has_query"]:
            out["supported"] = mm._memory_metadata_supported()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # A dict is kept as its compact JSON where torch takes one (2.15 on; a str before).
            takes_dict = "dict" in str(inspect.signature(mm._set_memory_metadata))
            mm._set_memory_metadata({{"phase": "forward", "step": 3}} if takes_dict else '{{"phase":"forward","step":3}}')
            out["get"] = mm._get_memory_metadata()
            seen = []
            t = threading.Thread(target=lambda: seen.append(mm._get_memory_metadata()))
            t.start(); t.join()
            out["other_thread"] = seen[0]
            mm._set_memory_metadata(out["get"])  # save / set / restore round trip
            out["restored"] = mm._get_memory_metadata()
            mm._set_memory_metadata("")
            out["cleared"] = mm._get_memory_metadata()
            if hasattr(C, "_cuda_annotateMemory"):
                p = C._cuda_cudaCachingAllocator_raw_alloc(1 << 20, 0)
                C._cuda_annotateMemory(p, "no history is recording: nothing happens")
                C._cuda_cudaCachingAllocator_raw_delete(p)
        out["warnings"] = [str(w.message) for w in caught]
        print(json.dumps(out))
        """)
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout)
    if out["has_query"]:
        assert out["supported"] is True
    assert out["get"] == '{"phase":"forward","step":3}'
    assert out["other_thread"] == ""
    assert out["restored"] == out["get"]
    assert out["cleared"] == ""
    assert not [w for w in out["warnings"] if "does not support" in w], out["warnings"]
    assert "does not support" not in r.stderr


@needs_plugin
def test_no_cuda_memory_caching_variable():
    # PYTORCH_NO_CUDA_MEMORY_CACHING=1, as under PyTorch's allocator: every allocation is made and
    # given back on its own, outside the statistics; caching_allocator_enable has the same effect.
    code = f"""
        import json, torch, stitchalloc
        stitchalloc.install("{HOST}")
        C = torch._C
        out = {{}}
        ptrs = [C._cuda_cudaCachingAllocator_raw_alloc(n, 0) for n in (1000, 3 << 20, 150 << 20)]
        out["allocated"] = C._cuda_memoryStats(0)["allocated_bytes"]["all"]["current"]
        for p in ptrs:
            C._cuda_cudaCachingAllocator_raw_delete(p)
        big = C._cuda_cudaCachingAllocator_raw_alloc(200 << 20, 0)  # fits only if the 150 MiB went back
        C._cuda_cudaCachingAllocator_raw_delete(big)
        out["reserved"] = C._cuda_memoryStats(0)["reserved_bytes"]["all"]["current"]
        print(json.dumps(out))
        """
    uncached = run_python(code, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
    assert uncached.returncode == 0, uncached.stderr
    import json
    assert json.loads(uncached.stdout) == {"allocated": 0, "reserved": 0}
    cached = run_python(code)  # the same under caching: counted, and the 200 MiB fits by releasing
    assert cached.returncode == 0, cached.stderr
    out = json.loads(cached.stdout)
    assert out["allocated"] == 1024 + (3 << 20) + (150 << 20)
    assert out["reserved"] >= 200 << 20


@needs_plugin
def test_arena_marks_from_python():
    r = run_python(f"""
        import json, torch, stitchalloc
        C = torch._C
        out = {{}}
        try:
            with stitchalloc.iteration(1):
                pass
        except RuntimeError as e:
            out["before_install"] = str(e)
        stitchalloc.install("{HOST}")
        addresses = []
        for step in range(3):
            with stitchalloc.iteration(signature=128):
                seen = []
                for i in range(3):
                    with stitchalloc.layer("decoder", i, "forward"):
                        x = C._cuda_cudaCachingAllocator_raw_alloc(2 << 20, 0)
                        y = C._cuda_cudaCachingAllocator_raw_alloc(1 << 20, 0)
                        C._cuda_cudaCachingAllocator_raw_delete(y)
                        seen.append(x)
                for x in seen:
                    C._cuda_cudaCachingAllocator_raw_delete(x)
            addresses.append(seen)
        out["stats"] = stitchalloc.arena_stats()
        out["same_addresses"] = addresses[1] == addresses[2]
        try:
            with stitchalloc.layer("decoder", 0, "sideways"):
                pass
        except ValueError as e:
            out["bad_phase"] = str(e)
        try:
            with stitchalloc.iteration(signature="long"):
                pass
        except TypeError as e:
            out["bad_signature"] = str(e)
        try:
            stitchalloc.arena._check(stitchalloc.arena._lib().stitchalloc_torch_iteration_end(-1))
        except RuntimeError as e:
            out["unbalanced"] = str(e)
        stitchalloc.drop_plans()
        out["cached_after_drop"] = stitchalloc.arena_stats()["arena.plans_cached"]
        print(json.dumps(out))
        """)
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout)
    assert "not PyTorch's CUDA allocator" in out["before_install"]
    s = out["stats"]
    assert s["arena.recorded_iterations"] == 1
    assert s["arena.served_iterations"] == 2
    assert s["arena.hits"] == 12  # 3 layers x 2 requests x 2 served iterations
    assert s["arena.misses"] == 0
    assert s["arena.arena_bytes"] > 0
    assert out["same_addresses"]
    assert "phase must be" in out["bad_phase"]
    assert "must be an int" in out["bad_signature"]
    assert "stitchalloc_torch_iteration_end" in out["unbalanced"]
    assert out["cached_after_drop"] == 0
