"""``FP8WeightOnlyLinear``: an ``nn.Linear`` whose weight is stored as packed FP8 (W8A16).

The serving layer calls :func:`quantize_model_fp8` for ``--quantization fp8``: every bf16/fp16
``nn.Linear`` whose N and K are multiples of 64 (the kernels' granularity) becomes an
``FP8WeightOnlyLinear`` holding ``qweight`` / ``scales`` in the packed format of docs/quant.md, and
its forward is ``fp8_marlin_gemm`` (+ bias). Half the weight bytes of bf16, so a decode step,
which streams every weight once, can approach 2x.

:func:`select_fp8_linear_method` says which FP8 path a device would use ("w8a8" where
``torch._scaled_mm`` runs natively, compute capability >= 8.9, unless VLLM_TEST_FORCE_FP8_MARLIN
is set; "marlin" elsewhere). This package has no W8A8 linear yet, so both answers lead to this
module for now; quantize_model_fp8 logs when it does that on a W8A8-capable device.
"""

from __future__ import annotations

import torch
from torch import nn

from pykernels import envs
from pykernels._log import get_logger
from pykernels.quant.pack import LAYOUT, to_fragment_order

log = get_logger("quant")

_ACT_DTYPES = (torch.bfloat16, torch.float16)
_FP8 = torch.float8_e4m3fn
_PANEL = 128  # K columns per packed panel (docs/quant.md)
_ALIGN = 64  # N and K must be multiples of this (fp8_marlin_gemm's checks)
_GROUP_SIZES = (-1, 128)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_features(in_features: int, out_features: int, what: str) -> None:
    if in_features % _ALIGN or out_features % _ALIGN or in_features <= 0 or out_features <= 0:
        raise ValueError(f"{what}: in_features and out_features must be positive multiples of "
                         f"{_ALIGN}, got in_features={in_features}, out_features={out_features}")


def _check_group_size(group_size: int) -> None:
    if group_size not in _GROUP_SIZES:
        raise ValueError(f"group_size must be -1 (per output channel) or 128, got {group_size!r}")


def _scales_shape(out_features: int, panels: int, group_size: int) -> tuple[int, ...]:
    return (out_features,) if group_size == -1 else (panels, out_features)


class FP8WeightOnlyLinear(nn.Module):
    """``y = x @ dequant(qweight).T + bias`` with an FP8 e4m3 weight and bf16/fp16 activations.

    Parameters
    ----------
    in_features, out_features : int
        K and N, multiples of 64.
    bias : bool
        Whether a ``bias [N]`` buffer exists (in ``dtype``).
    group_size : {-1, 128}
        Scales per output channel (``scales [N]``) or per channel and 128-wide K group
        (``scales [ceil(K/128), N]``).
    dtype : torch.dtype
        The activation dtype (bfloat16 or float16): the bias is kept in it.
    device : optional
        Where the (uninitialized) buffers are allocated.

    Buffers (all in ``state_dict``): ``qweight`` float8_e4m3fn ``[ceil(K/128), N, 128]``,
    ``scales`` float32, ``bias`` (optional), ``qweight_layout`` (int32 scalar: the packed byte
    order, ``pack.LAYOUT`` = 2). A state dict without ``qweight_layout`` was saved before layout
    2 (natural k order, layout 1) and is converted on load (a lossless byte permutation). Build
    one with :meth:`from_linear` or :meth:`from_state_dict`; ``backend`` ("auto", "cuda",
    "triton", "torch") is passed to ``fp8_marlin_gemm`` on every call.

    Example
    -------
    >>> import torch
    >>> from pykernels.quant.linear import FP8WeightOnlyLinear
    >>> lin = torch.nn.Linear(256, 128, dtype=torch.bfloat16)
    >>> q = FP8WeightOnlyLinear.from_linear(lin)
    >>> q(torch.randn(3, 256, dtype=torch.bfloat16)).shape
    torch.Size([3, 128])
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 group_size: int = -1, dtype: torch.dtype = torch.bfloat16, device=None,
                 backend: str = "auto"):
        super().__init__()
        _check_features(in_features, out_features, "FP8WeightOnlyLinear")
        _check_group_size(group_size)
        if dtype not in _ACT_DTYPES:
            raise TypeError(f"dtype must be bfloat16 or float16, got {_dtype_name(dtype)}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size, self.backend = group_size, backend
        panels = -(-in_features // _PANEL)
        self.register_buffer("qweight", torch.empty(panels, out_features, _PANEL, dtype=_FP8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(_scales_shape(out_features, panels,
                                                                 group_size),
                                                   dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device)
                             if bias else None)
        self.register_buffer("qweight_layout", torch.tensor(LAYOUT, dtype=torch.int32,
                                                            device=device))

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = -1) -> FP8WeightOnlyLinear:
        """Quantize a bf16/fp16 ``nn.Linear`` (its weight is packed on its own device)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        return cls._from_weight(linear.weight.detach(), linear.bias, group_size, "linear.weight",
                                "linear.bias")

    @classmethod
    def from_state_dict(cls, state_dict, prefix: str = "", group_size: int | None = None,
                        in_features: int | None = None) -> FP8WeightOnlyLinear:
        """Build from ``{prefix}weight`` (bf16/fp16 ``[N, K]``: packed here) or from an already
        packed ``{prefix}qweight`` / ``{prefix}scales`` pair; ``{prefix}bias`` is optional. A
        packed pair's byte order is ``{prefix}qweight_layout`` (absent: layout 1, saved before
        layout 2, converted here). A pair from ``fp8_weight_pack`` is layout 2: add
        ``{prefix}qweight_layout = 2`` (``pack.LAYOUT``) when building such a dict by hand.

        group_size: for a bf16 weight, the grouping to pack with (None = -1); for a packed pair
        it is read from the scales' shape, and a value given must agree. in_features: the
        logical K of a packed pair (a packed weight holds ceil(K/128) panels, so K is ambiguous
        by 64); None = 128 * panels.
        """
        weight = state_dict.get(prefix + "weight")
        packed = prefix + "qweight" in state_dict or prefix + "scales" in state_dict
        if weight is not None and packed:
            raise ValueError(f"state dict has both {prefix}weight and {prefix}qweight/scales: "
                             "give one form")
        bias = state_dict.get(prefix + "bias")
        if weight is not None:
            return cls._from_weight(weight, bias, -1 if group_size is None else group_size,
                                    f"{prefix}weight", f"{prefix}bias")
        if not packed:
            raise KeyError(f"state dict has neither {prefix}weight nor {prefix}qweight and "
                           f"{prefix}scales; keys: {sorted(state_dict)[:8]}")
        for name, other in (("qweight", "scales"), ("scales", "qweight")):
            if prefix + name not in state_dict:
                raise KeyError(f"state dict has {prefix}{other} but no {prefix}{name}")
        qweight = _to_layout2(state_dict[prefix + "qweight"],
                              state_dict.get(prefix + "qweight_layout"), prefix)
        return cls._from_packed(qweight, state_dict[prefix + "scales"], bias, group_size,
                                in_features, prefix)

    @classmethod
    def _from_weight(cls, weight: torch.Tensor, bias, group_size: int, what: str,
                     bias_name: str):
        from pykernels.quant.pack import fp8_weight_pack

        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{what} must be a 2-D [out_features, in_features] tensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if weight.dtype not in _ACT_DTYPES:
            raise TypeError(f"{what} must be bfloat16 or float16, got "
                            f"{_dtype_name(weight.dtype)}")
        _check_group_size(group_size)
        n, k = weight.shape
        _check_features(k, n, what)
        packed = fp8_weight_pack(weight, group_size)
        mod = cls(k, n, bias is not None, group_size=group_size, dtype=weight.dtype,
                  device="meta")
        mod.qweight, mod.scales = packed.qweight, packed.scales
        mod.qweight_layout = torch.tensor(LAYOUT, dtype=torch.int32, device=weight.device)
        if bias is not None:
            mod.bias = cls._checked_bias(bias, n, weight.dtype, weight.device, bias_name)
        return mod

    @classmethod
    def _from_packed(cls, qweight, scales, bias, group_size, in_features, prefix):
        for name, t in (("qweight", qweight), ("scales", scales)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{prefix}{name} must be a tensor, got {type(t).__name__}")
        if qweight.dim() != 3 or qweight.shape[2] != _PANEL:
            raise ValueError(f"{prefix}qweight must have shape [ceil(K/128), N, 128] "
                             f"(docs/quant.md), got {tuple(qweight.shape)}")
        panels, n = qweight.shape[0], qweight.shape[1]
        found = -1 if scales.dim() == 1 else 128
        if group_size is not None and group_size != found:
            raise ValueError(f"group_size={group_size} was asked but {prefix}scales has shape "
                             f"{tuple(scales.shape)}, which means group_size={found}")
        k = panels * _PANEL if in_features is None else in_features
        if -(-k // _PANEL) != panels:
            raise ValueError(f"in_features={k} needs ceil(K/128)={-(-k // _PANEL)} panels, but "
                             f"{prefix}qweight has {panels}")
        dtype = bias.dtype if isinstance(bias, torch.Tensor) else torch.bfloat16
        mod = cls(k, n, bias is not None, group_size=found,
                  dtype=dtype if dtype in _ACT_DTYPES else torch.bfloat16, device="meta")
        problems = mod._packed_problems(qweight, scales, prefix)
        if problems:
            raise ValueError("; ".join(problems))
        mod.qweight, mod.scales = qweight.contiguous(), scales.contiguous()
        mod.qweight_layout = torch.tensor(LAYOUT, dtype=torch.int32, device=qweight.device)
        if bias is not None:
            mod.bias = cls._checked_bias(bias, n, bias.dtype, qweight.device, prefix + "bias")
        return mod

    @staticmethod
    def _checked_bias(bias, n: int, dtype: torch.dtype, device, name: str) -> torch.Tensor:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{name} must have shape ({n},), got {shape}")
        if bias.dtype not in _ACT_DTYPES:
            raise TypeError(f"{name} must be bfloat16 or float16, got "
                            f"{_dtype_name(bias.dtype)}")
        return bias.detach().to(device=device, dtype=dtype).contiguous()

    def _packed_problems(self, qweight, scales, prefix: str = "") -> list[str]:
        """What is wrong with a (qweight, scales) pair for this module (empty: nothing)."""
        out = []
        want_q = tuple(self.qweight.shape)
        if qweight.dtype != _FP8:
            out.append(f"{prefix}qweight must be float8_e4m3fn, got {_dtype_name(qweight.dtype)}")
        if tuple(qweight.shape) != want_q:
            out.append(f"{prefix}qweight must have shape {want_q}, got {tuple(qweight.shape)}")
        if scales.dtype != torch.float32:
            out.append(f"{prefix}scales must be float32, got {_dtype_name(scales.dtype)}")
        want_s = tuple(self.scales.shape)
        if tuple(scales.shape) != want_s:
            kind = "per channel" if self.group_size == -1 else "per 128-group"
            out.append(f"{prefix}scales must have shape {want_s} ({kind}, group_size="
                       f"{self.group_size}), got {tuple(scales.shape)}")
        if qweight.device != scales.device:
            out.append(f"{prefix}qweight and {prefix}scales must be on one device, got "
                       f"{qweight.device} and {scales.device}")
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # nn.Module would copy_() a bf16 tensor into the fp8 buffer (a silent cast): check the
        # packed pair's dtypes and shapes first and report them like torch reports the rest.
        q, s = state_dict.get(prefix + "qweight"), state_dict.get(prefix + "scales")
        if isinstance(q, torch.Tensor) and isinstance(s, torch.Tensor):
            problems = self._packed_problems(q, s, prefix)
            if problems:
                error_msgs.extend(problems)
                return
            layout = state_dict.get(prefix + "qweight_layout")
            if layout is None or int(layout) != LAYOUT:
                # Saved in layout 1 (no marker: before layout 2): load converted bytes, from a
                # copy (the caller's dict is not touched).
                try:
                    converted = _to_layout2(q, layout, prefix)
                except ValueError as e:
                    error_msgs.append(str(e))
                    return
                state_dict = {**state_dict, prefix + "qweight": converted,
                              prefix + "qweight_layout": torch.tensor(LAYOUT, dtype=torch.int32)}
        bias = state_dict.get(prefix + "bias")
        if isinstance(bias, torch.Tensor) and bias.dtype not in _ACT_DTYPES:
            error_msgs.append(f"{prefix}bias must be bfloat16 or float16, got "
                              f"{_dtype_name(bias.dtype)}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype), .half(), .bfloat16() cast every floating buffer, fp8 included: the
        # packed weight and its fp32 scales keep their dtypes and only follow the device (the
        # bias does follow the dtype: it is in the activation dtype).
        keep = {name: getattr(self, name) for name in ("qweight", "scales")}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from pykernels.quant.gemm import fp8_marlin_gemm

        y = fp8_marlin_gemm(x, self.qweight, self.scales, backend=self.backend)
        if self.bias is not None:
            y.add_(self.bias if self.bias.dtype == y.dtype else self.bias.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}, "
                f"weight=float8_e4m3fn, backend={self.backend!r}")


def _to_layout2(qweight, layout, prefix: str):
    """A packed qweight in layout 2, from the layout its state dict names (None: 1)."""
    found = 1 if layout is None else int(layout)
    if found == LAYOUT:
        return qweight
    if found != 1:
        raise ValueError(f"{prefix}qweight_layout must be 1 or {LAYOUT}, got {found}")
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 3 or qweight.shape[-1] != _PANEL:
        return qweight  # malformed: _packed_problems names what is wrong
    return to_fragment_order(qweight)


# ---- method selection and whole-model conversion ------------------------------------------------


def select_fp8_linear_method(device) -> str:
    """"w8a8" where a native FP8 W8A8 GEMM exists (``torch._scaled_mm`` on a CUDA device of
    compute capability >= 8.9) and VLLM_TEST_FORCE_FP8_MARLIN is not set; "marlin" (the FP8
    weight-only path of this module) otherwise."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if envs.VLLM_TEST_FORCE_FP8_MARLIN or device.type != "cuda":
        return "marlin"
    if not (torch.cuda.is_available() and hasattr(torch, "_scaled_mm")):
        return "marlin"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return "w8a8" if torch.cuda.get_device_capability(index) >= (8, 9) else "marlin"


def _skipped(name: str, skip) -> bool:
    """Whether a module's dotted name matches an entry of skip (the whole name or one part)."""
    parts = name.split(".")
    return any(s == name or s in parts for s in skip)


def _convertible(module: nn.Module) -> bool:
    # Exact nn.Linear only: subclasses (MultiheadAttention's out_proj, ...) are read through
    # their .weight by their owners, which a packed module would break.
    if type(module) is not nn.Linear or module.weight.dtype not in _ACT_DTYPES:
        return False
    return module.in_features % _ALIGN == 0 and module.out_features % _ALIGN == 0


def quantize_model_fp8(model: nn.Module, *, group_size: int = -1,
                       skip=("lm_head",)) -> nn.Module:
    """Swap every bf16/fp16 ``nn.Linear`` with N and K multiples of 64 for an
    ``FP8WeightOnlyLinear`` (in place; returns the model, or the new module when ``model``
    itself is such a linear). The serving layer calls this for ``--quantization fp8``.

    skip: module names left in bf16/fp16, matched against the full dotted name or any part of
    it (default: the LM head, whose logits are the most precision-sensitive). Linears of other
    dtypes or with unaligned sizes are left as they are (logged at INFO).
    """
    _check_group_size(group_size)
    if _convertible(model):
        return FP8WeightOnlyLinear.from_linear(model, group_size)
    targets, left = [], []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not _skipped(name, skip):
            (targets if _convertible(module) else left).append(name)
    if targets:
        first = model.get_submodule(targets[0]).weight.device
        if select_fp8_linear_method(first) == "w8a8":
            # No W8A8 linear exists in pykernels yet: on a device that could run one we still
            # use the weight-only Marlin path, and say so.
            log.info("quantize_model_fp8: %s supports FP8 W8A8 (torch._scaled_mm), but pykernels "
                     "has no W8A8 linear yet; using the FP8 weight-only (Marlin) path", first)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, FP8WeightOnlyLinear.from_linear(getattr(parent, child),
                                                               group_size))
    if left:
        log.info("quantize_model_fp8: left %d linear layer(s) unquantized (dtype not bf16/fp16 "
                 "or N/K not multiples of %d): %s", len(left), _ALIGN, ", ".join(left[:8]))
    log.info("quantize_model_fp8: %d linear layer(s) now FP8 weight-only (group_size=%d)",
             len(targets), group_size)
    return model
