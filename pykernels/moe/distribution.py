"""Expert-distribution recording: tokens per expert per MoE layer, counted on the device.

Turning it on
-------------
- Environment: ``SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR=/some/dir``, read once, when this module is
  imported (``import pykernels.moe`` does): the process recorder starts then, and an ``atexit``
  handler dumps the counts into that folder when the interpreter exits normally (not on
  ``os._exit`` or a fatal signal; nothing is written when no layer was ever recorded). Set it
  before the import.
- API: ``rec = get_recorder(); rec.start(); ...; rec.stop(); rec.dump(dir)``.

The hook
--------
``fused_moe`` calls ``record(layer_id, topk_ids, num_experts)`` once per call, with the global
expert count; ``layer_id=None`` is never recorded. Off, the hook is one global read (~50 ns) and
traces into nothing under ``torch.compile``. On, it feeds the started recorder (the last one
started, when several are) with two small kernels (``bucketize`` into bins, ``index_add_`` of
ones into the layer's counts; one more per step for the step counter) and never waits for the
GPU: no ``.item()``, ``.tolist()``, ``.cpu()``, and no ``torch.bincount`` (which syncs for its
output size on CUDA).

Bins per layer: ``[ids < 0 (dropped), expert 0, ..., expert E-1, ids >= E (out of range)]``, int64.
Dropped ids (-1: a slot routed nowhere) are counted apart from the experts; out-of-range ids are
a caller bug and are reported in the dump, not hidden.

CUDA graphs
-----------
A layer's buffers are allocated at its first record, which must run eagerly (any CUDA-graph
runner's warm-up forward does); a first record inside a capture raises, because the zero-fill
would be captured and re-run on every replay. A graph captured while recording runs the record
kernels on every replay; their source of ones is a device flag that :meth:`start` sets to 1 and
:meth:`stop` to 0, so start/stop gate replays too. A graph captured while recording was off
records nothing, whatever happens later: start the recorder before capturing. The same holds
for ``torch.compile``: the hook is traced as it is at compile time, and buffers must exist first.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from pykernels import envs
from pykernels._log import get_logger

FORMAT = "pykernels.expert_distribution/1"
PREFIX = "expert_distribution_"
_log = get_logger("moe.distribution")


@dataclass
class _Layer:
    num_experts: int
    counts: torch.Tensor  # [num_experts + 2] int64, bins as in the module docstring
    bounds: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # 0..E per id dtype


class ExpertDistributionRecorder:
    """Accumulates tokens per expert per layer on the device; see the module docstring."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else None
        self.recording = False
        self._layers: dict[int, _Layer] = {}
        self._flags: dict[torch.device, torch.Tensor] = {}  # 1 while recording, else 0
        self._steps: torch.Tensor | None = None  # calls of the first layer recorded
        self._step_layer: int | None = None
        self._seconds = 0.0
        self._since: float | None = None
        self.source = "api"

    # ---- control ---------------------------------------------------------------------------

    def start(self) -> ExpertDistributionRecorder:
        """Start (or resume) accumulating; counts so far are kept (``reset`` clears them)."""
        global _ACTIVE
        self.recording, self._since, _ACTIVE = True, time.monotonic(), self
        for flag in self._flags.values():
            flag.fill_(1)
        return self

    def stop(self) -> ExpertDistributionRecorder:
        """Stop accumulating: eager calls skip, captured graphs add zeros."""
        global _ACTIVE
        if self.recording and self._since is not None:
            self._seconds += time.monotonic() - self._since
        self.recording, self._since = False, None
        if _ACTIVE is self:
            _ACTIVE = None
        for flag in self._flags.values():
            flag.fill_(0)
        return self

    def reset(self) -> None:
        """Zero every count in place (buffers kept, so captured graphs stay valid)."""
        for layer in self._layers.values():
            layer.counts.zero_()
        if self._steps is not None:
            self._steps.zero_()
        self._seconds = 0.0
        self._since = time.monotonic() if self.recording else None

    def reserve(self, layer_ids, num_experts: int, device: torch.device | str,
                id_dtype: torch.dtype = torch.int32) -> None:
        """Allocate the buffers of ``layer_ids`` now, e.g. before capturing a graph whose layers
        were never run eagerly."""
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", as tensors report
        for layer_id in layer_ids:
            self._layer(int(layer_id), num_experts, device, id_dtype)

    # ---- the hot path ----------------------------------------------------------------------

    def record(self, layer_id: int, topk_ids: torch.Tensor, num_experts: int) -> None:
        """Add one call's routing (``topk_ids`` of any shape, integer) to ``layer_id``'s counts."""
        if not self.recording:
            return
        _check_args(layer_id, topk_ids, num_experts)
        layer = self._layer(layer_id, num_experts, topk_ids.device, topk_ids.dtype)
        flag = self._flags[topk_ids.device]
        flat = topk_ids.reshape(-1).contiguous()  # searchsorted copies strided input anyway
        # right=True: id v lands in bin (number of bounds <= v), so -1 -> 0, e -> e + 1, E -> E + 1.
        bins = torch.bucketize(flat, layer.bounds[flat.dtype], right=True, out_int32=True)
        layer.counts.index_add_(0, bins, flag.expand(bins.numel()))
        if layer_id == self._step_layer:
            self._steps.add_(flag)

    def _layer(self, layer_id: int, num_experts: int, device: torch.device,
               dtype: torch.dtype) -> _Layer:
        layer = self._layers.get(layer_id)
        if layer is not None and layer.num_experts != num_experts:
            raise ValueError(f"layer {layer_id} was recorded with {layer.num_experts} experts, "
                             f"got num_experts={num_experts}")
        if layer is not None and layer.counts.device != device:
            raise ValueError(f"layer {layer_id} counts live on {layer.counts.device}, got "
                             f"topk_ids on {device}")
        if layer is not None and dtype in layer.bounds:
            return layer
        _check_not_capturing(layer_id)
        if layer is None:
            counts = torch.zeros(num_experts + 2, dtype=torch.int64, device=device)
            layer = self._layers[layer_id] = _Layer(num_experts, counts)
            self._first_on(counts.device, layer_id)
        layer.bounds[dtype] = torch.arange(num_experts + 1, dtype=dtype, device=device)
        return layer

    def _first_on(self, device: torch.device, layer_id: int) -> None:
        if device not in self._flags:
            self._flags[device] = torch.full((1,), int(self.recording), dtype=torch.int64,
                                             device=device)
        if self._step_layer is None:
            self._step_layer = layer_id
            self._steps = torch.zeros(1, dtype=torch.int64, device=device)

    # ---- reading and dumping (these sync, once) --------------------------------------------

    def counts(self) -> dict[int, torch.Tensor]:
        """Tokens per expert, ``{layer: int64 CPU tensor [E]}``, layers in ascending order."""
        return {i: self._layers[i].counts[1:-1].cpu() for i in sorted(self._layers)}

    def snapshot(self) -> dict:
        """The dump as a JSON-ready dict: ``{"meta": {...}, "layers": {"0": [counts...]}}``."""
        bins = {i: self._layers[i].counts.tolist() for i in sorted(self._layers)}
        seconds = self._seconds + (time.monotonic() - self._since if self._since else 0.0)
        meta = {
            "format": FORMAT,
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": _device_name(self._step_device()),
            "steps": int(self._steps.item()) if self._steps is not None else 0,
            "recording_seconds": round(seconds, 3),
            "source": self.source,
            "pid": os.getpid(),
            "num_layers": len(bins),
            "dropped": {str(i): b[0] for i, b in bins.items()},
            "out_of_range": {str(i): b[-1] for i, b in bins.items()},
        }
        return {"meta": meta, "layers": {str(i): b[1:-1] for i, b in bins.items()}}

    def dump(self, dir: str | os.PathLike | None = None, pt: bool = False) -> Path:
        """Write the snapshot as ``<dir>/expert_distribution_<UTC time>_pid<pid>.json`` (and the
        same name ``.pt`` with int64 tensors when ``pt``); never overwrites a file (a ``_1``,
        ``_2`` ... suffix instead). ``dir`` defaults to the recorder's folder (the env var's).
        Returns the JSON path."""
        folder = Path(dir) if dir is not None else self.folder
        if folder is None:
            raise ValueError("dump needs a folder: pass dir=... or set "
                             "SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR")
        folder.mkdir(parents=True, exist_ok=True)
        snap = self.snapshot()
        path = _write_new(folder, json.dumps(snap, indent=1) + "\n", _pt_payload(snap) if pt
                          else None)
        _log.info("expert distribution: %d layers, %d steps -> %s", snap["meta"]["num_layers"],
                  snap["meta"]["steps"], path)
        return path

    def _step_device(self) -> torch.device | None:
        return self._steps.device if self._steps is not None else None

    def _dump_at_exit(self) -> None:
        if not self._layers:
            return
        try:
            self.dump()
        except Exception as err:  # at exit: say what went wrong, do not mask the exit status
            _log.warning("expert distribution dump at exit failed: %s: %s",
                         type(err).__name__, err)


def _check_args(layer_id, topk_ids, num_experts) -> None:
    if isinstance(layer_id, bool) or not isinstance(layer_id, int) or layer_id < 0:
        raise TypeError(f"layer_id must be a non-negative int, got {layer_id!r}")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype not in _ID_DTYPES:
        got = topk_ids.dtype if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__
        raise TypeError(f"topk_ids must be an int32 or int64 tensor, got {got}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")


_ID_DTYPES = (torch.int32, torch.int64)


def _check_not_capturing(layer_id: int) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"expert distribution: layer {layer_id} is first recorded inside a CUDA-graph "
            "capture; its buffers must exist before (run one eager forward first, or call "
            "get_recorder().reserve(layer_ids, num_experts, device))")


def _device_name(device: torch.device | None) -> str:
    if device is None:
        return ""  # nothing recorded yet
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _pt_payload(snap: dict) -> dict:
    """The ``.pt`` form of a snapshot: meta as is, counts as int64 tensors per layer."""
    return {"meta": snap["meta"],
            "layers": {k: torch.tensor(v, dtype=torch.int64) for k, v in snap["layers"].items()}}


def _write_new(folder: Path, text: str, pt: dict | None) -> Path:
    stem = f"{PREFIX}{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}_pid{os.getpid()}"
    for n in range(10_000):
        name = stem if n == 0 else f"{stem}_{n}"
        path, pt_path = folder / f"{name}.json", folder / f"{name}.pt"
        if pt_path.exists():  # a stem names one dump: its .json and .pt stay a pair
            continue
        try:
            with path.open("x") as f:  # "x": fails if another writer got there first
                f.write(text)
        except FileExistsError:
            continue
        if pt is not None:
            with pt_path.open("xb") as f:
                torch.save(pt, f)
        return path
    raise FileExistsError(f"no free dump name for {stem} in {folder}")


def load(path: str | os.PathLike) -> dict:
    """A dump (``.json`` or ``.pt``) as ``{"meta": dict, "layers": {"0": [int, ...]}}``."""
    path = Path(path)
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=True)
        layers = {k: [int(x) for x in v.tolist()] for k, v in data["layers"].items()}
        return {"meta": data["meta"], "layers": layers}
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not {"meta", "layers"} <= set(data):
        raise ValueError(f"{path} is not an expert distribution dump (needs meta and layers)")
    return data


# ---- the process-wide recorder ------------------------------------------------------------

_RECORDER: ExpertDistributionRecorder | None = None
_ACTIVE: ExpertDistributionRecorder | None = None  # the recorder while it records, else None
_ENV_CHECKED = False


def get_recorder() -> ExpertDistributionRecorder:
    """The process's recorder (created on first call; started already when the env var is set)."""
    global _RECORDER
    _check_env()
    if _RECORDER is None:
        _RECORDER = ExpertDistributionRecorder()
    return _RECORDER


def record(layer_id: int | None, topk_ids: torch.Tensor, num_experts: int) -> None:
    """The hook fused_moe calls: counts ``topk_ids`` for ``layer_id`` while a recorder records,
    else nothing (one global read, which torch.compile guards on)."""
    rec = _ACTIVE
    if rec is not None and layer_id is not None:
        rec.record(layer_id, topk_ids, num_experts)


def _check_env() -> ExpertDistributionRecorder | None:
    """Start the process recorder if the env var names a folder (once: at import, or at the
    first get_recorder() after _reset())."""
    global _ENV_CHECKED, _RECORDER
    if _ENV_CHECKED:
        return _ACTIVE
    _ENV_CHECKED = True
    folder = envs.SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR
    if folder is None:
        return None
    if _RECORDER is None:
        _RECORDER = ExpertDistributionRecorder()
    _RECORDER.folder, _RECORDER.source = Path(folder).expanduser(), "env"
    atexit.register(_RECORDER._dump_at_exit)
    return _RECORDER.start()


def _reset() -> None:
    """Forget the process recorder and the env check (tests)."""
    global _RECORDER, _ACTIVE, _ENV_CHECKED
    if _RECORDER is not None:
        atexit.unregister(_RECORDER._dump_at_exit)
    _RECORDER, _ACTIVE, _ENV_CHECKED = None, None, False


_check_env()  # at import, not in record(): the hook stays one global read
