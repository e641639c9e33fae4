"""bench/capture_traces.py's plumbing on the CPU (the GPU capture of issue 4 item 7 runs the same
code with memory history on): one subprocess per setting, the LoRA-like frozen setting training
only its adapters, the checkpointed setting computing what the plain one does."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "capture_traces.py")


def test_capture_runs_every_setting_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, BENCH, "all", "--device", "cpu", "--steps", "3", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {x["setting"]: x for x in json.loads((tmp_path / "capture.json").read_text())["runs"]}
    assert sorted(runs) == ["ckpt", "frozen", "varlen"]
    for x in runs.values():
        assert "error" not in x, x
        assert len(x["losses"]) == 3 and all(0 < v < 20 for v in x["losses"])
        assert len(set(x["seq_lengths"])) == 3, x["seq_lengths"]  # the length varies per step
        assert len(x["step_seconds"]) == 3 and 0 < sum(x["step_seconds"]) <= x["seconds"]
    # Checkpointing recomputes the same forward: the same losses as without it.
    assert runs["ckpt"]["losses"] == pytest.approx(runs["varlen"]["losses"], rel=1e-5)
    # Frozen weights with zero-initialised adapters: the first loss is the base model's, later
    # ones differ (the adapters train).
    assert runs["frozen"]["losses"][0] == pytest.approx(runs["varlen"]["losses"][0], rel=1e-5)
    assert runs["frozen"]["losses"][1:] != runs["varlen"]["losses"][1:]
    assert "losses identical under native: True" in r.stdout


def test_cpu_refuses_stitchalloc():
    r = subprocess.run([sys.executable, BENCH, "run", "--device", "cpu", "--allocator", "stitchalloc"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "CUDA allocator" in r.stderr
