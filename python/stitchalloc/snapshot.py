"""Converts PyTorch memory snapshots into stitchalloc traces (docs/trace-format.md).

A snapshot is what ``torch.cuda.memory._snapshot()`` returns and ``_dump_snapshot`` pickles: a
dict with ``segments`` (the allocator's state at the end), ``device_traces`` (one event list per
device, recorded by ``_record_memory_history``) and ``allocator_settings``. A snapshot file is
untrusted input, so it is read with a restricted unpickler that builds only plain containers
and scalars and rejects every global (no class, no function, no persistent id): nothing in the
file can run code.

Conversion of one device's events, in order:
  alloc            -> alloc with a fresh block id (PyTorch reuses addresses, ids are never reused)
  free_completed   -> free of the block live at that address. This is when PyTorch can reuse
                      the memory; free_requested (the caller's free, before stream events
                      complete) is not replayed.
  segment_alloc / segment_map    -> segment_alloc (for validating allocator models)
  segment_free / segment_unmap   -> segment_free
Recording usually starts mid-run, so two kinds of blocks were allocated before the window:
  - freed in the window with no alloc in it: an alloc is added at the start of the trace;
  - still allocated at the end (state active_* in ``segments``) with no alloc in the window:
    an alloc is added at the start and the block stays live to the end.
Both are counted in the trace header (pre_window_freed, pre_window_live), never dropped.
"""

from __future__ import annotations

import csv
import gzip
import io
import pickle
from dataclasses import dataclass, field
from typing import Any, Iterable

FORMAT_LINE = "# stitchalloc-trace v1"
HEADER = "action,id,size,stream,time_us,label"


class SnapshotError(ValueError):
    """A snapshot or event file that cannot be converted; the message says why."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        raise SnapshotError(
            f"refusing to load global {module}.{name}: a memory snapshot holds only plain "
            "containers and scalars")

    def persistent_load(self, pid: Any) -> Any:
        raise SnapshotError("refusing to load a persistent id: not a memory snapshot")


def _open_maybe_gzip(path: str) -> io.BufferedIOBase:
    f = open(path, "rb")
    magic = f.read(2)
    f.seek(0)
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=f)  # type: ignore[return-value]
    return f  # type: ignore[return-value]


def load_snapshot(path: str) -> dict:
    """Loads a snapshot pickle (optionally gzip-compressed) without running any code."""
    try:
        with _open_maybe_gzip(path) as f:
            data = _RestrictedUnpickler(f).load()
    except SnapshotError as e:
        raise SnapshotError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, OSError, MemoryError, RecursionError) as e:
        raise SnapshotError(f"{path}: not a readable snapshot pickle ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise SnapshotError(f"{path}: top level is {type(data).__name__}, expected a dict with "
                            "'segments' and 'device_traces'")
    for key in ("segments", "device_traces"):
        if key not in data:
            raise SnapshotError(f"{path}: no '{key}' key (was the snapshot taken with "
                                "_record_memory_history enabled?)")
    if not isinstance(data["segments"], list) or not isinstance(data["device_traces"], list):
        raise SnapshotError(f"{path}: 'segments' and 'device_traces' must be lists")
    return data


@dataclass
class Trace:
    name: str
    meta: list[tuple[str, str]] = field(default_factory=list)
    rows: list[tuple[str, int, int, int, int, str]] = field(default_factory=list)

    def text(self) -> str:
        out = [FORMAT_LINE, f"# name: {self.name}"]
        out += [f"# {k}: {v}" for k, v in self.meta]
        out.append(HEADER)
        out += [f"{a},{i},{s},{st},{t},{label}" for a, i, s, st, t, label in self.rows]
        return "\n".join(out) + "\n"

    def write(self, path: str) -> None:
        data = self.text().encode()
        if path.endswith(".gz"):
            with gzip.open(path, "wb", compresslevel=6) as f:
                f.write(data)
        else:
            with open(path, "wb") as f:
                f.write(data)

    def allocs(self) -> int:
        return sum(1 for r in self.rows if r[0] == "alloc")


def _int(event: dict, key: str, where: str) -> int:
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SnapshotError(f"{where}: field '{key}' is {value!r}, expected an integer")
    return value


class _Converter:
    def __init__(self, name: str, where: str):
        self.name = name
        self.where = where
        self.rows: list[tuple[str, int, int, int, int, str]] = []
        self.prefix: list[tuple[str, int, int, int, int, str]] = []
        self.live: dict[int, tuple[int, int, int]] = {}  # addr -> (id, size, stream)
        self.next_id = 0
        self.t0: int | None = None
        self.pre_freed = 0
        self.ooms = 0

    def _time(self, t: int) -> int:
        if self.t0 is None:
            self.t0 = t
        return max(0, t - self.t0)

    def alloc(self, addr: int, size: int, stream: int, t: int, i: int) -> None:
        if size <= 0:
            raise SnapshotError(f"{self.where}, event {i}: alloc of size {size}")
        if addr in self.live:
            raise SnapshotError(f"{self.where}, event {i}: alloc at {addr:#x}, which is already allocated")
        self.live[addr] = (self.next_id, size, stream)
        self.rows.append(("alloc", self.next_id, size, stream, self._time(t), ""))
        self.next_id += 1

    def free(self, addr: int, size: int, stream: int, t: int) -> None:
        if addr in self.live:
            bid, asize, _ = self.live.pop(addr)
            self.rows.append(("free", bid, asize, stream, self._time(t), ""))
            return
        # Allocated before the window: its alloc goes to the start.
        if size <= 0:
            return
        bid = self.next_id
        self.next_id += 1
        self.prefix.append(("alloc", bid, size, stream, 0, ""))
        self.rows.append(("free", bid, size, stream, self._time(t), ""))
        self.pre_freed += 1

    def segment(self, action: str, size: int, stream: int, t: int) -> None:
        self.rows.append((action, 0, size, stream, self._time(t), ""))

    def finish(self, pre_live: Iterable[tuple[int, int, int]], meta: list[tuple[str, str]]) -> Trace:
        pre_live_rows = []
        for addr, size, stream in sorted(pre_live):
            if addr in self.live or size <= 0:
                continue
            pre_live_rows.append(("alloc", self.next_id, size, stream, 0, ""))
            self.next_id += 1
        meta = list(meta) + [
            ("pre_window_live", str(len(pre_live_rows))),
            ("pre_window_freed", str(self.pre_freed)),
            ("live_at_end", str(len(self.live) + len(pre_live_rows))),
        ]
        if self.ooms:
            meta.append(("recorded_ooms", str(self.ooms)))
        return Trace(self.name, meta, pre_live_rows + self.prefix + self.rows)


def convert_snapshot(snapshot: dict, name: str, device: int = 0, source: str = "") -> Trace:
    """Converts one device of a loaded snapshot (see the module docstring)."""
    where = source or name
    traces = snapshot["device_traces"]
    if not 0 <= device < len(traces):
        raise SnapshotError(f"{where}: no device {device} (the snapshot has {len(traces)} device traces)")
    events = traces[device]
    if not isinstance(events, list):
        raise SnapshotError(f"{where}: device_traces[{device}] is not a list")
    conv = _Converter(name, where)
    for i, e in enumerate(events):
        if not isinstance(e, dict) or not isinstance(e.get("action"), str):
            raise SnapshotError(f"{where}, event {i}: not a trace entry with an 'action'")
        action = e["action"]
        if action in ("snapshot",):
            continue
        if action == "oom":
            conv.ooms += 1
            continue
        w = f"{where}, event {i}"
        addr, size, stream, t = _int(e, "addr", w), _int(e, "size", w), _int(e, "stream", w), _int(e, "time_us", w)
        if action == "alloc":
            conv.alloc(addr, size, stream, t, i)
        elif action == "free_completed":
            conv.free(addr, size, stream, t)
        elif action == "free_requested":
            conv._time(t)
        elif action in ("segment_alloc", "segment_map"):
            conv.segment("segment_alloc", size, stream, t)
        elif action in ("segment_free", "segment_unmap"):
            conv.segment("segment_free", size, stream, t)
        else:
            raise SnapshotError(f"{w}: unknown action '{action}'")
    # Blocks allocated at the end that the window never saw allocated.
    pre_live = []
    reserved = 0
    for seg in snapshot["segments"]:
        if not isinstance(seg, dict) or seg.get("device", device) != device:
            continue
        reserved += int(seg.get("total_size", 0) or 0)
        for b in seg.get("blocks", []) or []:
            if isinstance(b, dict) and str(b.get("state", "")).startswith("active"):
                size = b.get("requested_size") or b.get("size") or 0
                pre_live.append((int(b.get("address", 0)), int(size), int(seg.get("stream", 0) or 0)))
    meta = [("source", source or "PyTorch memory snapshot"), ("device", str(device)),
            ("reported_reserved_bytes", str(reserved))]
    settings = snapshot.get("allocator_settings")
    if isinstance(settings, dict):
        for key in ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments", "max_split_size"):
            if key in settings:
                meta.append((f"recorded_{key.lower()}", repr(settings[key])))
    return conv.finish(pre_live, meta)


def convert_events_csv(path: str, name: str) -> Trace:
    """Converts an event CSV (seq,action,addr,size,stream,time_us), as in
    ../shared/data/traces/converted. Without the snapshot's segments, blocks live through the
    whole window cannot be known; those freed in it are handled as above."""
    conv = _Converter(name, path)
    try:
        with _open_maybe_gzip(path) as f:
            reader = csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"))
            need = {"action", "addr", "size", "stream", "time_us"}
            if reader.fieldnames is None or not need <= set(reader.fieldnames):
                raise SnapshotError(f"{path}: header must name {sorted(need)}, got {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                try:
                    addr, size, stream, t = (int(row[k]) for k in ("addr", "size", "stream", "time_us"))
                except (TypeError, ValueError):
                    raise SnapshotError(f"{path}, line {line}: non-integer field in {row}") from None
                action = row["action"]
                if action == "alloc":
                    conv.alloc(addr, size, stream, t, line)
                elif action == "free_completed":
                    conv.free(addr, size, stream, t)
                elif action in ("segment_alloc", "segment_map"):
                    conv.segment("segment_alloc", size, stream, t)
                elif action in ("segment_free", "segment_unmap"):
                    conv.segment("segment_free", size, stream, t)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise SnapshotError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    return conv.finish([], [("source", f"event CSV {path.rsplit('/', 1)[-1]}")])
