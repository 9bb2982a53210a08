"""Expert-distribution recording: exact counts vs bincount, gating, dumps, the env switch, the CLI,
and on the GPU: CUDA-graph replays and no host sync on the record path."""

from __future__ import annotations

import inspect
import json
from datetime import datetime, timezone

import pytest
import torch

from bench import expert_distribution as cli
from pykernels.moe import distribution as dist

ENV = "SGLANG_EXPERT_DISTRIBUTION_RECORD_DIR"


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", raising=False)
    dist._reset()
    yield
    dist._reset()


def _ids(m, k, e, device="cpu", dtype=torch.int32, drop=0.1):
    """Random routing [m, k] in [0, e) with a fraction `drop` of -1 slots."""
    ids = torch.randint(0, e, (m, k), device=device, dtype=dtype)
    return ids.masked_fill(torch.rand(m, k, device=device) < drop, -1)


def _bincount(ids, e):
    flat = ids.reshape(-1).long().cpu()
    return torch.bincount(flat[flat >= 0], minlength=e)


@pytest.mark.parametrize("e,k", [(1, 1), (8, 2), (60, 6), (128, 8), (257, 8)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_counts_match_bincount(e, k, dtype):
    rec = dist.ExpertDistributionRecorder().start()
    want = {0: torch.zeros(e, dtype=torch.int64), 3: torch.zeros(e, dtype=torch.int64)}
    for m in (1, 7, 111, 0):
        for layer in want:
            ids = _ids(m, k, e, dtype=dtype)
            rec.record(layer, ids, e)
            want[layer] += _bincount(ids, e)
    got = rec.counts()
    assert list(got) == [0, 3]
    for layer, counts in want.items():
        assert torch.equal(got[layer], counts), layer


def test_dropped_and_out_of_range_are_counted_apart():
    rec = dist.ExpertDistributionRecorder().start()
    rec.record(0, torch.tensor([[-1, 0], [3, 4], [-7, 3], [99, 1]]), 4)
    assert rec.counts()[0].tolist() == [1, 1, 0, 2]
    meta = rec.snapshot()["meta"]
    assert meta["dropped"] == {"0": 2} and meta["out_of_range"] == {"0": 2}


def test_non_contiguous_ids():
    ids = _ids(16, 8, 32)[:, ::2]  # [16, 4], stride 2
    rec = dist.ExpertDistributionRecorder().start()
    rec.record(0, ids, 32)
    assert torch.equal(rec.counts()[0], _bincount(ids, 32))


def test_start_stop_reset_gating():
    rec = dist.ExpertDistributionRecorder()
    ids = torch.tensor([[0, 1]])
    rec.record(0, ids, 2)  # not started: nothing, not even a buffer
    assert rec.counts() == {}
    rec.start()
    rec.record(0, ids, 2)
    rec.stop()
    rec.record(0, ids, 2)
    assert rec.counts()[0].tolist() == [1, 1]
    rec.start()
    rec.record(0, ids, 2)
    assert rec.counts()[0].tolist() == [2, 2] and rec.snapshot()["meta"]["steps"] == 2
    rec.reset()
    assert rec.counts()[0].tolist() == [0, 0] and rec.snapshot()["meta"]["steps"] == 0


def test_steps_count_calls_of_the_first_layer():
    rec = dist.ExpertDistributionRecorder().start()
    for _ in range(5):
        for layer in (2, 3, 4):
            rec.record(layer, torch.tensor([[0]]), 1)
    assert rec.snapshot()["meta"]["steps"] == 5


def test_module_hook_is_off_by_default_and_skips_layer_none():
    dist._check_env()  # what import does: the variable is unset
    dist.record(0, torch.tensor([[0]]), 1)
    assert dist._RECORDER is None  # off: nothing created
    rec = dist.get_recorder().start()
    dist.record(None, torch.tensor([[0]]), 1)
    dist.record(1, torch.tensor([[0, 1]]), 2)
    assert list(rec.counts()) == [1]
    rec.stop()
    dist.record(1, torch.tensor([[0, 1]]), 2)
    assert rec.counts()[1].tolist() == [1, 1]


def test_record_path_never_reads_the_device():
    # .item()/.tolist()/.cpu()/bincount would each wait for the GPU on every step.
    rec = dist.ExpertDistributionRecorder
    path = (rec.record, rec._layer, rec._first_on, dist.record)
    src = "".join(inspect.getsource(f) for f in path)
    for bad in (".item(", ".tolist(", ".cpu(", "bincount", ".numpy(", "nonzero"):
        assert bad not in src, bad


@pytest.mark.parametrize("args,error,match", [
    ((-1, torch.tensor([[0]]), 1), TypeError, "layer_id must be a non-negative int, got -1"),
    ((1.0, torch.tensor([[0]]), 1), TypeError, "layer_id must be a non-negative int, got 1.0"),
    ((0, torch.tensor([[0.0]]), 1), TypeError, "topk_ids must be an int32 or int64 tensor, "
                                               "got torch.float32"),
    ((0, [[0]], 1), TypeError, "topk_ids must be an int32 or int64 tensor, got list"),
    ((0, torch.tensor([[0]]), 0), ValueError, "num_experts must be a positive int, got 0"),
])
def test_bad_inputs(args, error, match):
    rec = dist.ExpertDistributionRecorder().start()
    with pytest.raises(error, match=match):
        rec.record(*args)


def test_expert_count_must_not_change():
    rec = dist.ExpertDistributionRecorder().start()
    rec.record(0, torch.tensor([[0]]), 8)
    with pytest.raises(ValueError, match="layer 0 was recorded with 8 experts, got num_experts=16"):
        rec.record(0, torch.tensor([[0]]), 16)


def test_first_record_inside_a_capture_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    rec = dist.ExpertDistributionRecorder().start()
    with pytest.raises(RuntimeError, match="layer 5 is first recorded inside a CUDA-graph"):
        rec.record(5, torch.tensor([[0]]), 4)


def test_reserved_layers_record_inside_a_capture(monkeypatch):
    rec = dist.ExpertDistributionRecorder().start()
    rec.reserve([0, 1], 4, "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    rec.record(1, torch.tensor([[3, 3]], dtype=torch.int32), 4)
    assert rec.counts()[1].tolist() == [0, 0, 0, 2]


# ---- dumps ------------------------------------------------------------------------------------


def _recorded(layers=3, e=16):
    rec = dist.ExpertDistributionRecorder().start()
    for layer in range(layers):
        for _ in range(2):
            rec.record(layer, _ids(9, 2, e), e)
    return rec


def test_dump_json_schema_and_pt(tmp_path):
    rec = _recorded()
    path = rec.dump(tmp_path / "new", pt=True)
    assert path.parent == tmp_path / "new" and path.name.startswith(dist.PREFIX)
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "layers"}
    meta = data["meta"]
    assert meta["format"] == dist.FORMAT and meta["device"] == "cpu" and meta["steps"] == 2
    assert meta["num_layers"] == 3 and meta["source"] == "api"
    assert {"time", "recording_seconds", "pid", "dropped", "out_of_range"} <= set(meta)
    counts = rec.counts()
    assert data["layers"] == {str(i): counts[i].tolist() for i in range(3)}
    pt = dist.load(path.with_suffix(".pt"))
    assert pt["layers"] == data["layers"] and pt["meta"] == meta
    assert dist.load(path) == data


def test_dump_never_overwrites(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 21, 7, 0, 0, tzinfo=timezone.utc)

    monkeypatch.setattr(dist, "datetime", Frozen)
    rec = _recorded()
    first = rec.dump(tmp_path)
    taken = first.with_name(first.stem + "_1.pt")  # a .pt of the next name exists: skip it
    taken.write_text("keep")
    second = rec.dump(tmp_path, pt=True)
    third = rec.dump(tmp_path)
    assert first.name.startswith("expert_distribution_20261121T070000Z_pid")
    assert second.name == first.stem + "_2.json" and second.with_suffix(".pt").exists()
    assert third.name == first.stem + "_3.json"
    assert taken.read_text() == "keep"
    assert len(list(tmp_path.glob("*.json"))) == 3


def test_dump_needs_a_folder():
    with pytest.raises(ValueError, match="pass dir=... or set SGLANG_EXPERT_DISTRIBUTION"):
        _recorded().dump()


def test_env_var_starts_recording_and_dumps_at_exit(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "ed"))
    dist._check_env()  # what importing the module does
    ids = torch.tensor([[1, 2]])
    dist.record(0, ids, 4)
    rec = dist.get_recorder()
    assert rec.recording and rec.source == "env" and rec.folder == tmp_path / "ed"
    assert rec.counts()[0].tolist() == [0, 1, 1, 0]
    rec._dump_at_exit()  # what atexit runs
    (path,) = (tmp_path / "ed").glob("*.json")
    assert json.loads(path.read_text())["meta"]["source"] == "env"


def test_env_alias_and_empty_exit_dump(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(tmp_path))
    rec = dist.get_recorder()
    assert rec.recording
    rec._dump_at_exit()  # no MoE layer ever ran: no file
    assert not list(tmp_path.iterdir())


def test_env_var_is_read_once(tmp_path, monkeypatch):
    dist._check_env()  # at import: unset
    monkeypatch.setenv(ENV, str(tmp_path))
    dist.record(0, torch.tensor([[0]]), 1)
    assert not dist.get_recorder().recording and dist._ACTIVE is None


def test_hook_under_torch_compile():
    # fused_moe is compiled with fullgraph=True in its GPU tests: the hook must trace, off and on.
    def f(x, ids):
        dist.record(0, ids, 4)
        return x * 2

    ids = torch.tensor([[1, 3]], dtype=torch.int32)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    compiled(torch.ones(2), ids)
    rec = dist.get_recorder()
    rec.reserve([0], 4, "cpu")
    rec.start()
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    compiled(torch.ones(2), ids)
    compiled(torch.ones(2), ids)
    assert rec.counts()[0].tolist() == [0, 2, 0, 2]


# ---- the CLI ----------------------------------------------------------------------------------


def _known_dump(folder):
    rec = dist.ExpertDistributionRecorder().start()
    rec.record(0, torch.tensor([[0, 0], [0, 0]]), 4)  # all on expert 0: max/mean 4, cv sqrt(3)
    rec.record(1, torch.tensor([[0, 1], [2, 3]]), 4)  # even: 1.00, 0.00
    rec.record(1, torch.tensor([[-1, -1]]), 4)
    return rec.dump(folder, pt=True)


def test_layer_stats():
    s = cli.layer_stats([4, 0, 0, 0])
    assert s["max_over_mean"] == 4.0 and s["cv"] == pytest.approx(3 ** 0.5)
    assert s["idle"] == 3 and s["top"][0] == (0, 4, 1.0)
    assert cli.layer_stats([0, 0])["max_over_mean"] is None


def test_cli_table_and_plot(tmp_path, capsys):
    path = _known_dump(tmp_path)
    png = tmp_path / "plots" / "heat.png"
    assert cli.main([str(tmp_path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln[:1].isdigit()}
    assert lines["0"][:7] == ["0", "4", "4", "4.00", "1.73", "3", "0"]
    assert lines["1"][:7] == ["1", "4", "4", "1.00", "0.00", "0", "2"]
    assert "worst layer 0 at 4.00" in out and str(path) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main([str(path.with_suffix(".pt"))]) == 0
    assert "4.00" in capsys.readouterr().out


def test_cli_all_sums_dumps(tmp_path, capsys):
    _known_dump(tmp_path)
    _known_dump(tmp_path)
    assert cli.main([str(tmp_path), "--all"]) == 0
    out = capsys.readouterr().out
    assert "2 steps" in out
    assert [ln.split()[2] for ln in out.splitlines() if ln.startswith("0 ")] == ["8"]


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([str(tmp_path)])
    assert exc.value.code == 2
    assert "no expert_distribution_*.json or .pt dump in" in capsys.readouterr().err


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_counts_match_bincount_without_sync():
    rec = dist.ExpertDistributionRecorder().start()
    batches = [_ids(m, 8, 256, device="cuda") for m in (1, 64, 4096)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the record path raises
    try:
        for layer in range(3):
            for ids in batches:
                rec.record(layer, ids, 256)  # first call per layer allocates: no sync either
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = sum(_bincount(ids, 256) for ids in batches)
    for layer, counts in rec.counts().items():
        assert torch.equal(counts, want), layer


@pytest.mark.gpu
def test_gpu_graph_replays_count_and_obey_start_stop():
    e = 128
    rec = dist.ExpertDistributionRecorder().start()
    ids = torch.zeros(64, 8, dtype=torch.int32, device="cuda")
    rec.record(0, ids, e)  # eager warm-up allocates layer 0
    rec.reserve([1], e, "cuda")
    rec.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rec.record(0, ids, e)
        rec.record(1, ids, e)
    want = torch.zeros(e, dtype=torch.int64)
    for _ in range(3):
        new = _ids(64, 8, e, device="cuda")
        ids.copy_(new)
        graph.replay()
        want += _bincount(new, e)
    rec.stop()
    graph.replay()  # stopped: the captured kernels add zeros
    rec.start()
    new = _ids(64, 8, e, device="cuda")
    ids.copy_(new)
    graph.replay()
    want += _bincount(new, e)
    torch.cuda.synchronize()
    counts = rec.counts()
    assert torch.equal(counts[0], want) and torch.equal(counts[1], want)
    assert rec.snapshot()["meta"]["steps"] == 4


@pytest.mark.gpu
def test_gpu_first_record_in_capture_raises():
    rec = dist.ExpertDistributionRecorder().start()
    ids = torch.zeros(4, 2, dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="first recorded inside a CUDA-graph capture"):
        with torch.cuda.graph(graph):
            rec.record(0, ids, 8)


@pytest.mark.gpu
def test_gpu_dump_names_the_device(tmp_path):
    rec = dist.ExpertDistributionRecorder().start()
    rec.record(0, _ids(8, 2, 8, device="cuda"), 8)
    meta = json.loads(rec.dump(tmp_path).read_text())["meta"]
    assert meta["device"] == torch.cuda.get_device_name()
