"""moe_align_block_size: every backend against the reference (pykernels.moe.ref).

Order inside an expert's group is free, so outputs are compared in canonical form: each group
(and the tail past the padded total) sorted; expert ids and the padded total exactly. CPU: the
Triton kernels through the interpreter on tiny grids, the torch backend, bad inputs. GPU: the
issue's grid (E x M with top-k and block size rotating), skew, empty experts, expert maps, dropped
ids, poisoned preallocated outputs, CUDA-graph replay with new ids, opcheck and torch.compile."""

from __future__ import annotations

import pytest
import torch

from pykernels.moe import ref
from pykernels.moe.align import MAX_EXPERTS, moe_align_block_size

HAS_CUDA = torch.cuda.is_available()
GPU_BACKENDS = ["cuda", "triton"]
POISON = -12345


def _routing(m, topk, num_experts, device="cpu", dtype=torch.int32):
    """Distinct experts per token when topk <= E (as a router picks them), else with repeats."""
    if m == 0:
        return torch.empty(0, topk, dtype=dtype, device=device)
    if topk <= num_experts:
        ids = torch.rand(m, num_experts, device=device).argsort(dim=1)[:, :topk]
    else:
        ids = torch.randint(0, num_experts, (m, topk), device=device)
    return ids.to(dtype)


def _canonical(sorted_ids, topk_ids, num_experts, block_size):
    """Each expert's padded group and the tail past it, sorted: (segment, value) keys."""
    flat = topk_ids.reshape(-1).long().cpu()
    numel = flat.numel()
    valid = flat[(flat >= 0) & (flat < num_experts)]
    sizes = (torch.bincount(valid, minlength=num_experts) + block_size - 1) // block_size
    seg = torch.repeat_interleave(torch.arange(num_experts), sizes * block_size)
    tail = torch.full((sorted_ids.numel() - seg.numel(),), num_experts)
    keys = torch.cat([seg, tail]) * (numel + 1) + sorted_ids.long().cpu()
    return keys.sort().values


def _check(got, topk_ids, num_experts, block_size, expert_map=None):
    want = ref.moe_align_block_size(topk_ids, num_experts, block_size, expert_map)
    for g, w, name in zip(got, want, ("sorted_token_ids", "expert_ids", "total")):
        assert g.dtype == torch.int32 and g.shape == w.shape, (name, g.dtype, g.shape, w.shape)
        assert g.device == topk_ids.device, name
    assert got[2].item() == want[2].item(), ("total", got[2].item(), want[2].item())
    torch.testing.assert_close(got[1].cpu(), want[1].cpu(), atol=0, rtol=0)
    torch.testing.assert_close(_canonical(got[0], topk_ids, num_experts, block_size),
                               _canonical(want[0], topk_ids, num_experts, block_size),
                               atol=0, rtol=0)


def _poisoned(topk_ids, num_experts, block_size):
    cap = ref.max_padded_tokens(topk_ids.numel(), num_experts, block_size)
    dev = topk_ids.device
    return (torch.full((cap,), POISON, dtype=torch.int32, device=dev),
            torch.full((-(-cap // block_size),), POISON, dtype=torch.int32, device=dev),
            torch.full((1,), POISON, dtype=torch.int32, device=dev))


def _run(backend, topk_ids, num_experts, block_size, expert_map=None):
    out = _poisoned(topk_ids, num_experts, block_size)
    got = moe_align_block_size(topk_ids, num_experts, block_size, expert_map, out=out,
                               backend=backend)
    assert all(g is o for g, o in zip(got, out))
    _check(got, topk_ids, num_experts, block_size, expert_map)
    return got


# ---- CPU: reference, torch backend, Triton interpreter ----------------------------------------

def test_reference_small_example():
    ids = torch.tensor([[2, 0], [2, 1]], dtype=torch.int32)
    s, e, n = ref.moe_align_block_size(ids, 4, 2)
    assert s.tolist() == [1, 4, 3, 4, 0, 2, 4, 4]
    assert e.tolist() == [0, 1, 2, -1] and n.tolist() == [6]


def _interp():
    if HAS_CUDA:
        pytest.skip("interpreter test is for CPU-only machines; the gpu tests cover triton")


# (E, topk, M, block_size): odd and aligned sizes; 300 x 2 spans three 256-slot chunks.
CPU_GRID = [(1, 1, 3, 2), (8, 2, 5, 4), (60, 6, 7, 16), (64, 8, 33, 16), (3, 2, 300, 8),
            (16, 4, 64, 1), (128, 8, 9, 32)]


@pytest.mark.parametrize("num_experts,topk,m,block_size", CPU_GRID)
def test_triton_interpreter(num_experts, topk, m, block_size):
    _interp()
    ids = _routing(m, topk, num_experts)
    got = _run("triton", ids, num_experts, block_size)
    # The Triton kernels order each group by slot, as the reference does: exactly equal.
    for g, w in zip(got, ref.moe_align_block_size(ids, num_experts, block_size)):
        assert torch.equal(g, w)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cpu_expert_map_dropped_ids_int64(backend):
    if backend == "triton":
        _interp()
    ids = torch.tensor([[0, 5, 9], [3, -1, 5], [7, 5, 2**40], [1, 8, 3]], dtype=torch.int64)
    emap = torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3, -1], dtype=torch.int32)
    got = _run(backend, ids, 9, 4, emap)
    assert not {2, 4, 8} & set(got[0].tolist())  # the slots of ids 9, -1 and 2**40: dropped
    _run(backend, ids, 9, 4)


@pytest.mark.parametrize("backend", ["triton", "torch", "auto"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_cpu_empty(backend, block_size):
    if backend == "triton":
        _interp()
    ids = torch.empty(0, 8, dtype=torch.int32)
    s, e, n = _run(backend, ids, 8, block_size)
    assert n.item() == 0 and bool((s == 0).all()) and bool((e == -1).all())


def test_cpu_non_contiguous_and_skewed():
    _interp()
    base = torch.randint(0, 6, (9, 8), dtype=torch.int32)
    _run("triton", base[:, ::2], 6, 4)  # a strided view is copied, slot order kept
    _run("triton", torch.full((20, 2), 3, dtype=torch.int32), 6, 8)


def test_auto_on_cpu_is_torch_even_with_triton_env(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON", "1")
    import pykernels.moe.align as align

    calls = []
    monkeypatch.setattr(align, "moe_align_block_size_",
                        lambda *a: calls.append(a) or ref_into(*a))
    ids = _routing(5, 2, 8)
    _check(moe_align_block_size(ids, 8, 4), ids, 8, 4)
    assert len(calls) == 1


def ref_into(s, e, n, ids, num_experts, block_size, emap):
    for dst, src in zip((s, e, n), ref.moe_align_block_size(ids, num_experts, block_size, emap)):
        dst.copy_(src)


# ---- bad inputs --------------------------------------------------------------------------------

def _ids(m=4, k=2, dtype=torch.int32):
    return torch.zeros(m, k, dtype=dtype)


BAD = [
    ("float ids", lambda: moe_align_block_size(_ids().float(), 8, 4), TypeError,
     "topk_ids must be int32 or int64, got float32"),
    ("list ids", lambda: moe_align_block_size([[0, 1]], 8, 4), TypeError,
     "topk_ids must be a torch.Tensor, got list"),
    ("3-D ids", lambda: moe_align_block_size(torch.zeros(2, 2, 2, dtype=torch.int32), 8, 4),
     ValueError, "topk_ids must be 2-D [tokens, topk], got shape (2, 2, 2)"),
    ("1-D ids", lambda: moe_align_block_size(torch.zeros(4, dtype=torch.int32), 8, 4),
     ValueError, "topk_ids must be 2-D"),
    ("block 0", lambda: moe_align_block_size(_ids(), 8, 0), ValueError,
     "block_size must be >= 1, got 0"),
    ("block -3", lambda: moe_align_block_size(_ids(), 8, -3), ValueError,
     "block_size must be >= 1, got -3"),
    ("block float", lambda: moe_align_block_size(_ids(), 8, 16.0), TypeError,
     "block_size must be an int, got float"),
    ("experts 0", lambda: moe_align_block_size(_ids(), 0, 4), ValueError,
     f"num_experts must be in [1, {MAX_EXPERTS}], got 0"),
    ("experts -1", lambda: moe_align_block_size(_ids(), -1, 4), ValueError,
     "num_experts must be in [1, 4096], got -1"),
    ("experts too many", lambda: moe_align_block_size(_ids(), MAX_EXPERTS + 1, 4), ValueError,
     "num_experts must be in [1, 4096], got 4097"),
    ("map size", lambda: moe_align_block_size(_ids(), 8, 4, torch.zeros(7, dtype=torch.int32)),
     ValueError, "expert_map must have shape (8,), got (7,)"),
    ("map dtype", lambda: moe_align_block_size(_ids(), 8, 4, torch.zeros(8)), TypeError,
     "expert_map must be int32, got float32"),
    ("out arity", lambda: moe_align_block_size(_ids(), 8, 4, out=(torch.empty(36),)), TypeError,
     "out must be a tuple (sorted_token_ids, expert_ids, num_tokens_post_padded)"),
    ("out sorted size", lambda: moe_align_block_size(
        _ids(), 8, 4, out=(torch.empty(35, dtype=torch.int32), torch.empty(9, dtype=torch.int32),
                          torch.empty(1, dtype=torch.int32))),
     ValueError, "out sorted_token_ids must have shape (32,), got (35,)"),
    ("out blocks size", lambda: moe_align_block_size(
        _ids(), 8, 4, out=(torch.empty(32, dtype=torch.int32), torch.empty(9, dtype=torch.int32),
                          torch.empty(1, dtype=torch.int32))),
     ValueError, "out expert_ids must have shape (8,), got (9,)"),
    ("out total dtype", lambda: moe_align_block_size(
        _ids(), 8, 4, out=(torch.empty(32, dtype=torch.int32), torch.empty(8, dtype=torch.int32),
                          torch.empty(1, dtype=torch.int64))),
     TypeError, "out num_tokens_post_padded must be an int32 tensor, got int64"),
    ("out strided", lambda: moe_align_block_size(
        _ids(), 8, 4, out=(torch.empty(64, dtype=torch.int32)[::2],
                          torch.empty(8, dtype=torch.int32), torch.empty(1, dtype=torch.int32))),
     ValueError, "out sorted_token_ids must be contiguous"),
    ("backend", lambda: moe_align_block_size(_ids(), 8, 4, backend="cutlass"), ValueError,
     "moe_align_block_size: backend must be one of 'auto', 'cuda', 'triton', 'torch', got "
     "'cutlass'"),
    ("too large", lambda: moe_align_block_size(_ids(), 4096, 2**20), ValueError,
     "topk_ids too large"),
]


@pytest.mark.parametrize("name,call,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value), str(info.value)


def test_cuda_backend_on_cpu_tensor():
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        moe_align_block_size(_ids(), 8, 4, backend="cuda")


# ---- GPU ---------------------------------------------------------------------------------------

E_LEVELS = [1, 8, 60, 64, 128, 256, 512, 1024]
# 256 x 8 = 2048 slots: the CUDA one-CTA path's limit (csrc/moe/align.cuh kSmallMaxSlots); larger
# counts take the two-launch multi-CTA path; 333 is odd.
M_LEVELS = [1, 7, 64, 333, 1024, 4096, 16384]
TOPKS = [1, 2, 6, 8]
BLOCKS = [16, 32, 64, 128]


def _grid():
    cases = []
    for i, (e, m) in enumerate((e, m) for e in E_LEVELS for m in M_LEVELS):
        case = (e, m, TOPKS[i % 4], BLOCKS[(i + i // 4) % 4])
        slow = m == 16384 and e >= 512  # the reference loops over 131072 slots per expert
        cases.append(pytest.param(*case, marks=[pytest.mark.slow] if slow else [],
                                  id=f"E{e}-M{m}-k{case[2]}-b{case[3]}"))
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("num_experts,m,topk,block_size", _grid())
def test_gpu_grid(backend, num_experts, m, topk, block_size):
    ids = _routing(m, topk, num_experts, "cuda")
    _run(backend, ids, num_experts, block_size)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("m,topk", [(1, 8), (256, 8), (257, 8), (1024, 8), (1025, 8), (8193, 1),
                                    (16384, 8)])
def test_gpu_all_to_one_expert(backend, m, topk):
    ids = torch.full((m, topk), 17, dtype=torch.int32, device="cuda")
    got = _run(backend, ids, 256, 64)
    assert got[2].item() == -(-m * topk // 64) * 64


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("m", [3, 4096])
def test_gpu_most_experts_empty(backend, m):
    ids = torch.randint(0, 5, (m, 8), dtype=torch.int32, device="cuda") * 51  # 5 of 256 used
    _run(backend, ids, 256, 32)
    _run(backend, ids + 1, 1024, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("m,num_experts", [(7, 64), (1000, 256), (4096, 256), (16384, 64)])
def test_gpu_expert_map(backend, m, num_experts):
    ids = _routing(m, 8, num_experts, "cuda")
    local = torch.randperm(num_experts, device="cuda")[: num_experts // 4]
    emap = torch.full((num_experts,), -1, dtype=torch.int32, device="cuda")
    emap[local] = torch.arange(local.numel(), dtype=torch.int32, device="cuda")
    got = _run(backend, ids, num_experts, 32, emap)
    assert bool((got[1] == -1).any())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("m", [5, 3000])
def test_gpu_dropped_ids_and_int64(backend, m):
    ids = _routing(m, 8, 64, "cuda", torch.int64)
    ids[::3, 0] = -1
    ids[1::3, 1] = 64
    ids[2::3, 2] = 2**40
    got = _run(backend, ids, 64, 16)
    assert got[2].item() <= ids.numel() + 64 * 15


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_non_contiguous_and_max_experts(backend):
    ids = _routing(500, 16, 256, "cuda")[:, ::2]
    _run(backend, ids, 256, 64)
    _run(backend, _routing(333, 8, MAX_EXPERTS, "cuda"), MAX_EXPERTS, 16)
    _run(backend, _routing(4096, 8, MAX_EXPERTS, "cuda"), MAX_EXPERTS, 64)  # 8 CTAs x 4096


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("block_size", [1, 16])
def test_gpu_empty(backend, block_size):
    ids = torch.empty(0, 8, dtype=torch.int32, device="cuda")
    s, e, n = _run(backend, ids, 64, block_size)
    assert n.item() == 0 and bool((s == 0).all()) and bool((e == -1).all())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("m,num_experts", [(64, 8), (64, 512), (4096, 512)])
def test_gpu_cuda_graph_replay_new_ids(backend, m, num_experts):
    block_size = 64
    static = _routing(m, 8, num_experts, "cuda")
    out = _poisoned(static, num_experts, block_size)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles) outside the capture
        moe_align_block_size(static, num_experts, block_size, out=out, backend=backend)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_align_block_size(static, num_experts, block_size, out=out, backend=backend)
    for step in range(3):
        new = _routing(m, 8, num_experts, "cuda")
        if step == 2:
            new.fill_(num_experts - 1)  # skewed after balanced: sizes differ, buffers do not
        static.copy_(new)
        for t in out:
            t.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        _check(out, new, num_experts, block_size)


def _op_args(m, topk, num_experts, block_size, emap=None):
    ids = _routing(m, topk, num_experts, "cuda")
    return (*_poisoned(ids, num_experts, block_size), ids, num_experts, block_size, emap)


@pytest.mark.gpu
def test_gpu_opcheck():
    import pykernels.moe.cuda  # noqa: F401  (registers the op and its fake)

    # <= 32 slots: one warp ranks them, so the op is deterministic and eager/traced runs agree.
    emap = torch.arange(16, dtype=torch.int32, device="cuda") - 4
    for args in (_op_args(4, 8, 16, 16), _op_args(3, 2, 16, 4, emap)):
        torch.library.opcheck(torch.ops.pykernels.moe_align_block_size, args)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    import pykernels.moe.cuda  # noqa: F401

    def align(ids):
        out = _poisoned(ids, 256, 64)
        torch.ops.pykernels.moe_align_block_size(*out, ids, 256, 64, None)
        return out

    ids = _routing(4096, 8, 256, "cuda")
    _check(torch.compile(align, fullgraph=True)(ids), ids, 256, 64)


@pytest.mark.gpu
def test_gpu_auto_follows_triton_env(monkeypatch):
    import pykernels.moe.cuda as cuda_impl
    import pykernels.moe.triton as triton_impl

    seen = []
    for name, mod in (("cuda", cuda_impl), ("triton", triton_impl)):
        real = mod.moe_align_block_size_
        monkeypatch.setattr(mod, "moe_align_block_size_",
                            lambda *a, _n=name, _r=real: seen.append(_n) or _r(*a))
    ids = _routing(64, 8, 64, "cuda")
    _check(moe_align_block_size(ids, 64, 16), ids, 64, 16)
    monkeypatch.setenv("VLLM_ENABLE_MOE_ALIGN_BLOCK_SIZE_TRITON", "1")
    _check(moe_align_block_size(ids, 64, 16), ids, 64, 16)
    assert seen == ["cuda", "triton"]


LAUNCHER_BAD = [
    ("ids dtype", lambda a: (*a[:3], a[3].float(), *a[4:]), TypeError,
     "topk_ids must be int32 or int64"),
    ("ids cpu", lambda a: (*a[:3], a[3].cpu(), *a[4:]), ValueError,
     "topk_ids must be a CUDA tensor"),
    ("experts", lambda a: (*a[:4], 5000, *a[5:]), ValueError, "num_experts must be in [1, 4096]"),
    ("block", lambda a: (*a[:5], 0, a[6]), ValueError, "block_size must be >= 1"),
    ("sorted size", lambda a: (a[0][:-1], *a[1:]), ValueError,
     "sorted_token_ids must have shape ["),
    ("blocks dtype", lambda a: (a[0], a[1].long(), *a[2:]), TypeError,
     "expert_ids must be int32"),
    ("map size", lambda a: (*a[:6], torch.zeros(3, dtype=torch.int32, device="cuda")),
     ValueError, "expert_map must have shape [16]"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,edit,exc,message", LAUNCHER_BAD, ids=[b[0] for b in LAUNCHER_BAD])
def test_gpu_launcher_checks(name, edit, exc, message):
    import pykernels.moe.cuda  # noqa: F401

    args = edit(_op_args(4, 2, 16, 8))
    with pytest.raises(exc) as info:
        torch.ops.pykernels.moe_align_block_size(*args)
    assert message in str(info.value), str(info.value)
