"""GPU tests of the PyTorch plugin (skipped without a CUDA device): a Llama-style model trained
under PyTorch's native allocator and under each way in, compared step by step.

    pytest tests/gpu/test_torch_gpu.py -s     # prints the measured reserved figures
"""

import json
import os
import pickle
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import stitchalloc  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
JOB = os.path.join(os.path.dirname(__file__), "llama_job.py")
API_JOB = os.path.join(os.path.dirname(__file__), "api_job.py")
IPC_JOB = os.path.join(os.path.dirname(__file__), "ipc_job.py")
OOB_JOB = os.path.join(os.path.dirname(__file__), "oob_job.py")


def launch(job, way, *extra):
    """Runs `job` in a fresh process started the given way in; returns its last line as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "STITCHALLOC_AUTO_INSTALL",
                                                            "LD_PRELOAD")}
    if way == "env":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "backend:stitchalloc"
    if way == "preload":
        env["LD_PRELOAD"] = stitchalloc.library_path("stitchalloc_preload")
    r = subprocess.run([sys.executable, job, "--way", way, *extra], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(way, *extra):
    out = launch(JOB, way, *extra)
    assert out["stats_keys"], "memory_stats() is empty"
    assert out["stitchalloc"] == (way != "native"), f"{way}: stitchalloc installed = {out['stitchalloc']}"
    return out


@pytest.fixture(scope="module")
def native():
    return run("native", "--steps", "20")


@pytest.mark.parametrize("way", ["install", "env", "preload"])
def test_losses_equal_native_step_by_step(native, way):
    out = run(way, "--steps", "20")
    assert len(out["losses"]) == 20
    assert out["losses"] == native["losses"]
    assert out["stats_consistent"]
    assert out["stats_keys"] == native["stats_keys"]


@pytest.mark.parametrize("sender,receiver", [("stitchalloc", "stitchalloc"), ("stitchalloc", "native"),
                                             ("native", "stitchalloc"), ("native-expandable", "stitchalloc"),
                                             ("stitchalloc-pluggable", "stitchalloc"),
                                             ("stitchalloc-pluggable", "native")])
def test_cuda_tensor_shared_between_processes(sender, receiver):
    # torch.multiprocessing's CUDA IPC in every pairing with PyTorch's allocator: stitchalloc's
    # handles are PyTorch's expandable-segment format, and it opens PyTorch's cudaMalloc ones.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "STITCHALLOC_AUTO_INSTALL",
                                                            "LD_PRELOAD")}
    r = subprocess.run([sys.executable, IPC_JOB, "--sender", sender, "--receiver", receiver], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nipc {sender} -> {receiver}: {out}")
    assert out["receiver_error"] is None, out["receiver_error"]
    assert out["sender_stitchalloc"] == sender.startswith("stitchalloc")
    assert out["receiver_stitchalloc"] == (receiver == "stitchalloc")
    assert out["receiver_equal"], "the receiver read other bytes than the sender wrote"
    assert out["sender_sees_writes"], "the sender does not see the receiver's writes"
    assert out["child_exit"] == 0


def test_snapshot_renders(tmp_path):
    path = tmp_path / "snap.pickle"
    run("install", "--steps", "3", "--snapshot", str(path))
    with open(path, "rb") as f:
        snap = pickle.load(f)
    assert snap["segments"] and snap["device_traces"][0]
    actions = {e["action"] for e in snap["device_traces"][0]}
    assert {"alloc", "free_requested", "free_completed"} <= actions
    from torch.cuda import _memory_viz

    assert "<html" in _memory_viz.trace_plot(snap).lower()
    assert "<html" in _memory_viz.segment_plot(snap).lower()


def test_cuda_graph_capture_and_replay():
    out = run("install", "--steps", "2", "--graph")
    assert out["graph_replay_equal"]


def test_reduce_overhead_compile_trains_like_native():
    # torch.compile(mode="reduce-overhead"): CUDA graph trees, which checkpoint their private pool
    # after each recording (getCheckpointState) and may restore it (setCheckpointPoolState).
    pytest.importorskip("triton")
    nat = run("native", "--steps", "8", "--compile")
    ours = run("install", "--steps", "8", "--compile")
    assert len(ours["losses"]) == 8
    for a, b in zip(ours["losses"], nat["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b), (ours["losses"], nat["losses"])


def test_varying_sequence_lengths_reserve_less_than_native():
    nat = run("native", "--steps", "30", "--vary-seq")
    ours = run("install", "--steps", "30", "--vary-seq")
    print(f"\nmax_memory_reserved native={nat['max_memory_reserved']} stitchalloc={ours['max_memory_reserved']} "
          f"(max allocated native={nat['max_memory_allocated']} stitchalloc={ours['max_memory_allocated']})")
    assert ours["losses"] == nat["losses"]
    assert ours["max_memory_reserved"] < nat["max_memory_reserved"]


def test_memory_apis_match_native():
    # Each torch.cuda memory API of issue 3's parity list on the device, native against
    # stitchalloc.install() (api_job.py: one observation per API).
    nat, ours = launch(API_JOB, "native"), launch(API_JOB, "install")
    print(f"\nnative: {json.dumps(nat)}\nstitchalloc: {json.dumps(ours)}")
    assert ours["stitchalloc_installed"] and not nat["stitchalloc_installed"]
    errors = {k: v for k, v in ours.items() if isinstance(v, str) and v.startswith("error:")}
    assert not errors, errors
    for key in ("allocated_delta", "reserved_covers_allocated", "peaks", "empty_cache", "stats_and_summary",
                "mem_get_info", "record_stream", "cudnn_benchmark", "mem_pool", "history_pools_and_segments",
                "mem_pool_no_split", "mem_pool_own_allocator", "history_metadata",
                "uncached"):
        assert ours[key] == nat[key], (key, ours[key], nat[key])
    assert nat["oom"]["raised"] == ours["oom"]["raised"] == "OutOfMemoryError"
    assert ours["oom"]["mentions_stitchalloc"]  # the core's diagnostic message
    assert ours["oom"]["num_ooms"] >= 1


def _memcheck(way, uncached):
    """compute-sanitizer's memcheck over oob_job.py: (exit code, whether it reported the read)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "STITCHALLOC_AUTO_INSTALL",
                                                            "LD_PRELOAD", "PYTORCH_NO_CUDA_MEMORY_CACHING")}
    if uncached:
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    r = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", sys.executable, OOB_JOB,
                        "--way", way], env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    errors = [line for line in out.splitlines() if line.startswith("========= ") and "ERROR SUMMARY" not in line]
    print(f"\n{way}, uncached={uncached}: memcheck exit {r.returncode}; its report:\n" + "\n".join(errors[:40]))
    return r.returncode, "Invalid __global__ read" in out


@pytest.mark.skipif(not any(os.access(os.path.join(d, "compute-sanitizer"), os.X_OK)
                            for d in os.environ.get("PATH", "").split(os.pathsep)), reason="needs compute-sanitizer")
def test_uncached_mode_lets_memcheck_see_a_read_past_a_tensor():
    # PYTORCH_NO_CUDA_MEMORY_CACHING=1 is how one debugs an illegal access: each tensor its own
    # cudaMalloc, whose bounds memcheck knows. Under stitchalloc as under PyTorch's allocator.
    # (Two runs only: memcheck slows the job down, and the test phase must fit one device call.)
    observed = {way: _memcheck(way, uncached=True) for way in ("native", "install")}
    print(f"\nway -> (exit code, memcheck reported the read): {observed}")
    assert observed["native"] == (9, True)
    assert observed["install"] == (9, True)
