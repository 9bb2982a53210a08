"""Plan/run objects: plan once per batch step (page table, split count, tile map), run per layer.

``PagedDecode`` / ``PagedPrefill`` validate inputs and delegate to a backend runner. The generic
runner below serves the kernel backends (triton, cuda, torch); ``fi`` and ``fa`` bring their own
(`DecodeRunner` / `PrefillRunner` in their modules) with the same three methods. ``auto`` gets an
``AutoRunner``, which picks one of those per plan (the tuned backend choice).

CUDA graphs: construct with ``max_batch`` (and ``max_pages``, ``max_tokens`` for prefill). The
runner then owns fixed buffers (page table, tile map, split-KV workspace, counters); ``plan``
copies into them outside the graph and ``run`` touches nothing else, allocates nothing (given
``out``) and never syncs, so it can be captured once and replayed after every later ``plan``.
The launch shape (split count, tile count) is the one captured: a later plan still computes the
right answer with it, since the kernels read lengths from the device page table.
"""

from __future__ import annotations

import math

import torch

from pykernels.attention import _common, tunables

INT32_MAX = 2**31 - 1


def _check_config(op: str, mod, config) -> None:
    """A caller's config for a kernel backend (triton, cuda) must hold only keys it knows, with
    valid values (_common.CONFIG_KEYS); the torch reference takes any (it has no launch)."""
    known = _common.CONFIG_KEYS.get((op, getattr(mod, "__name__", "").rsplit(".", 1)[-1]))
    if config is not None and known is not None:
        _common.check_config(config, known)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.to(device=device, dtype=torch.int32, non_blocking=True)


def _int_buffer(n: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(max(n, 1), dtype=torch.int32, device=device)


class GenericDecodeRunner:
    """Decode through a backend module's ``decode_plan`` / ``decode``."""

    def __init__(self, mod, spec: _common.Spec, attn: _common.Params, *,
                 max_batch: int | None = None, max_pages: int | None = None,
                 config: dict | None = None, split_kv: bool = True):
        _check_config("decode", mod, config)
        self.mod, self.spec, self.attn, self.config = mod, spec, attn, config
        self.fixed = max_batch is not None
        self.cfg: dict = {}
        self.table: _common.Table | None = None
        self.max_page = -1
        if self.fixed:
            if max_pages is None:
                raise ValueError("max_pages is needed with max_batch (fixed buffers)")
            self.max_batch, self.max_pages = max_batch, max_pages
            dev = spec.device
            self._bufs = (_int_buffer(max_batch + 1, dev), _int_buffer(max_pages, dev),
                          _int_buffer(max_batch, dev))
            # (request, split) pairs the workspace holds: the heuristic needs at most
            # max_batch + 2 * SMs / kv_heads (_common.choose_splits); 4x that leaves room for
            # tuned configs, and bs=1 can always take MAX_SPLITS. Larger asks are clamped.
            units = (max_batch + 4 * math.ceil(2 * _common.sm_count(dev) / spec.num_kv_heads)
                     + _common.MAX_SPLITS)
            self._capacity = units if split_kv else max_batch
            self._work = _common.DecodeWork(1)
            if split_kv:  # partials for `units` (request, split) pairs, counters per request
                self._work = _common.DecodeWork.allocate(units, spec, 1, counters=True)
                self._work.counters = _int_buffer(max_batch * spec.num_q_heads, dev)

    def plan(self, kv_indptr, kv_indices, kv_last_page_len) -> None:
        batch = _common.check_table(kv_indptr, kv_indices, kv_last_page_len)
        if kv_indptr.device.type == "cpu":
            self.max_page = _common.validate_table_values(
                kv_indptr, kv_indices, kv_last_page_len, self.spec.page_size, None)
            total_pages = int(kv_indptr[-1] - kv_indptr[0])
        else:
            self.max_page = -1  # device tables are not read back
            total_pages = kv_indices.shape[0]
        self.cfg = self.mod.decode_plan(self.spec, batch, total_pages, self.config)
        splits = self.cfg["num_splits"]
        if self.fixed:
            self._check_fits(batch, kv_indices.shape[0])
            splits = max(1, min(splits, self._capacity // max(batch, 1)))
            self.table = self._copy_in(kv_indptr, kv_indices, kv_last_page_len, batch)
            w = self._work
            self.work = _common.DecodeWork(splits, w.partial_o, w.partial_lse, w.counters)
        else:
            dev = self.spec.device
            self.table = _common.Table(_to_device(kv_indptr, dev), _to_device(kv_indices, dev),
                                       _to_device(kv_last_page_len, dev), self.spec.page_size)
            self.work = _common.DecodeWork.allocate(batch, self.spec, splits)
        self.cfg["num_splits"] = self.work.num_splits

    def _check_fits(self, batch: int, n_indices: int) -> None:
        if batch > self.max_batch:
            raise ValueError(f"batch {batch} exceeds max_batch {self.max_batch} of this plan")
        if n_indices > self.max_pages:
            raise ValueError(f"kv_indices has {n_indices} entries, more than max_pages "
                             f"{self.max_pages} of this plan")

    def _copy_in(self, kv_indptr, kv_indices, kv_last_page_len, batch) -> _common.Table:
        indptr, indices, last = self._bufs
        indptr[:batch + 1].copy_(kv_indptr, non_blocking=True)
        indices[:kv_indices.shape[0]].copy_(kv_indices, non_blocking=True)
        last[:batch].copy_(kv_last_page_len, non_blocking=True)
        return _common.Table(indptr[:batch + 1], indices, last[:batch], self.spec.page_size)

    def run(self, q, kv_cache, out, k_scale: float, v_scale: float) -> torch.Tensor:
        params = _common.Params(self.attn.sm_scale, self.attn.logits_soft_cap,
                                self.attn.window_left, k_scale, v_scale)
        self.mod.decode(out, q, kv_cache, self.table, params, self.work, self.cfg)
        return out


class GenericPrefillRunner:
    """Prefill through a backend module's ``prefill_plan`` / ``prefill``."""

    def __init__(self, mod, spec: _common.Spec, attn: _common.Params, *, causal: bool = True,
                 max_batch: int | None = None, max_pages: int | None = None,
                 max_tokens: int | None = None, config: dict | None = None):
        _check_config("prefill", mod, config)
        self.mod, self.spec, self.attn, self.causal = mod, spec, attn, causal
        self.config = config
        self.decode = GenericDecodeRunner(_NoPlan, spec, attn, max_batch=max_batch,
                                          max_pages=max_pages, split_kv=False)
        self.fixed = max_batch is not None
        if self.fixed and max_tokens is None:
            raise ValueError("max_tokens is needed with max_batch (fixed buffers)")
        self.max_tokens = max_tokens
        self._qo = _int_buffer(max_batch + 1, spec.device) if self.fixed else None
        self._work_bufs: tuple | None = None
        self.max_page = -1

    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
             num_tokens: int | None = None) -> None:
        batch = _common.check_table(kv_indptr, kv_indices, kv_last_page_len)
        num_tokens = _prefill_tokens(qo_indptr, batch, num_tokens)
        self.num_tokens = num_tokens
        self.decode.plan(kv_indptr, kv_indices, kv_last_page_len)
        self.max_page, self.table = self.decode.max_page, self.decode.table
        if self.fixed:
            if num_tokens > self.max_tokens:
                raise ValueError(f"{num_tokens} query tokens exceed max_tokens "
                                 f"{self.max_tokens} of this plan")
            self._qo[:batch + 1].copy_(qo_indptr, non_blocking=True)
            self.qo_indptr = self._qo[:batch + 1]
            # The tile map is sized for the largest step so the captured grid covers any plan,
            # and the config (its tile) keyed by the buffers' capacity: the captured kernel's.
            kv_len = _kv_key(self.spec, self.decode.max_pages, self.decode.max_batch)
            self.cfg, work = self.mod.prefill_plan(self.spec, self.qo_indptr, self.max_tokens,
                                                   self.config, max_batch=self.decode.max_batch,
                                                   kv_len=kv_len)
            self.work = self._fixed_work(work)
        else:
            self.qo_indptr = _to_device(qo_indptr, self.spec.device)
            kv_len = _kv_key(self.spec, _total_pages(kv_indptr, kv_indices), batch)
            self.cfg, self.work = self.mod.prefill_plan(self.spec, self.qo_indptr, num_tokens,
                                                        self.config, kv_len=kv_len)

    def _fixed_work(self, work):
        if work is None:
            return None
        if self._work_bufs is None:
            self._work_bufs = tuple(torch.empty_like(w) for w in work)
        for buf, new in zip(self._work_bufs, work):
            n = min(new.shape[0], buf.shape[0])
            buf[:n].copy_(new[:n])
            buf[n:].fill_(INT32_MAX)
        return self._work_bufs

    def run(self, q, kv_cache, out, k_scale: float, v_scale: float) -> torch.Tensor:
        params = _common.Params(self.attn.sm_scale, self.attn.logits_soft_cap,
                                self.attn.window_left, k_scale, v_scale)
        self.mod.prefill(out, q, kv_cache, self.qo_indptr, self.table, params, self.causal,
                         self.work, self.cfg)
        return out


class AutoRunner:
    """Backend ``auto`` with tuned choices: each plan asks ``choose(batch, total_pages,
    num_tokens)`` for a backend name (the tuned one for the plan's bucket, else the fixed order;
    see ``_dispatch.choose_backend``) and delegates to that backend's runner, made once by
    ``make(name)`` and kept. The choice is made at plan time only; ``run`` adds a set insertion
    (fixed buffers) to the backend's own run.

    Fixed buffers (CUDA graphs): a captured graph replays the backend it captured, whatever a
    later plan picks. So a plan also re-plans every backend already run at its batch size (one
    graph per batch size is the rule): a replay then reads a fresh page table, while eager runs
    use the new choice. While the choice stays put (the usual case) that is the one backend.
    """

    def __init__(self, choose, make, fixed: bool):
        self._choose, self._make, self.fixed = choose, make, fixed
        self._runners: dict[str, object] = {}
        self._ran: dict[int, set[str]] = {}  # batch -> backends run at it (fixed buffers)
        self.current = None
        self.backend: str | None = None  # the backend of the last plan
        self._batch = 0

    def _plan(self, batch: int, total_pages: int, num_tokens: int | None, plan_one) -> None:
        name = self._choose(batch, total_pages, num_tokens)
        others = self._ran.get(batch, set()) - {name} if self.fixed else set()
        for other in sorted(others):
            plan_one(self._runner(other))
        runner = self._runner(name)
        plan_one(runner)
        self.current, self.backend, self._batch = runner, name, batch

    def _runner(self, name: str):
        if name not in self._runners:
            self._runners[name] = self._make(name)
        return self._runners[name]

    def run(self, q, kv_cache, out, k_scale: float, v_scale: float) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("run called before plan")
        if self.fixed:
            self._ran.setdefault(self._batch, set()).add(self.backend)
        return self.current.run(q, kv_cache, out, k_scale, v_scale)

    @property
    def cfg(self) -> dict:
        return getattr(self.current, "cfg", {})

    @property
    def max_page(self) -> int:
        return getattr(self.current, "max_page", -1)


def _prefill_tokens(qo_indptr: torch.Tensor, batch: int, num_tokens: int | None) -> int:
    """Checks qo_indptr against the batch; the query-token count, given or read from it (a host
    read when qo_indptr lives on the GPU: pass num_tokens there)."""
    _common.index_tensor("qo_indptr", qo_indptr, batch + 1)
    return int(qo_indptr[-1] - qo_indptr[0]) if num_tokens is None else num_tokens


def _kv_key(spec: _common.Spec, total_pages: int, batch: int) -> int:
    """The pow2 mean kv length of a prefill config key (as the backend choice keys it)."""
    return tunables.spec_key(spec, total_pages, batch)["kv_len"]


def _total_pages(kv_indptr: torch.Tensor, kv_indices: torch.Tensor) -> int:
    """Pages of a table as the decode plans count them: read on the host, an upper bound (the
    length of kv_indices) on the device, which is never read back."""
    if kv_indptr.device.type == "cpu":
        return int(kv_indptr[-1] - kv_indptr[0])
    return kv_indices.shape[0]


class AutoDecodeRunner(AutoRunner):
    def plan(self, kv_indptr, kv_indices, kv_last_page_len) -> None:
        batch = _common.check_table(kv_indptr, kv_indices, kv_last_page_len)
        self._plan(batch, _total_pages(kv_indptr, kv_indices), None,
                   lambda r: r.plan(kv_indptr, kv_indices, kv_last_page_len))


class AutoPrefillRunner(AutoRunner):
    def plan(self, qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
             num_tokens: int | None = None) -> None:
        batch = _common.check_table(kv_indptr, kv_indices, kv_last_page_len)
        num_tokens = _prefill_tokens(qo_indptr, batch, num_tokens)
        self._plan(batch, _total_pages(kv_indptr, kv_indices), num_tokens,
                   lambda r: r.plan(qo_indptr, kv_indptr, kv_indices, kv_last_page_len,
                                    num_tokens=num_tokens))

    @property
    def num_tokens(self) -> int:
        return self.current.num_tokens


class _NoPlan:
    """Stands in for a backend in the page-table half of a prefill plan: no splits."""

    @staticmethod
    def decode_plan(spec, batch, total_pages, config):
        return {"num_splits": 1}
