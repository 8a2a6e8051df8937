"""QAT for LoRA: the adapter is trained through the weight the exporter will write.

y = fq(x) @ fq(W + scale * B @ A)^T + bias: the merged weight rounded onto the deployment
grid as the exporter rounds it (:mod:`qlora_kit.modules.fake_quant`), with straight-through
gradients (Bengio et al. 2013) to A and B, so the adapter learns under the rounding that
merging and re-quantizing will apply.

:func:`enable_qat` turns the LoRA layers of a model into :class:`QATLoRALinear` layers in
place: each stays the same module object with the same base and the same lora_A / lora_B
Parameters, so optimizers, state dicts and hooks are unaffected. Until fake-quant is
switched on (:func:`set_qat_active`, at qat.start_step) a layer computes exactly what the
layer it was made from computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlora_kit.kernels import fake_quant as fq_kernel
from qlora_kit.kernels.dispatch import use_triton
from qlora_kit.modules.fake_quant import FakeQuantConfig, quantize_dequantize_activation, quantize_dequantize_weight
from qlora_kit.modules.lora import LoRALinear, NF4LoRALinear
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.quant.intq import group_count
from qlora_kit.quant.nf4 import dynamic_map, nf4_code


class QATLoRALinear(LoRALinear):
    """A LoRA layer trained through its fake-quantized merged weight (made by :func:`enable_qat`).

    ``fake_quant``: the deployment grid. ``active``: whether fake-quant runs; while it is
    off, the forward is the one of the LoRA layer this one was made from.
    """

    fake_quant: FakeQuantConfig
    active: bool
    # Inside cached_qat_weights: the fake-quantized weight of no-grad forwards, by adapter version.
    _cache: dict | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return super().forward(x)
        # The base is frozen: its weight gets no gradient, its (frozen) bias is added as usual.
        dtype = self.base.compute_dtype if isinstance(self.base, NF4Linear) else self.base.weight.dtype
        x = x.to(dtype)
        if self._cache is not None and not torch.is_grad_enabled():
            y = _qat_input(x, self.fake_quant) @ self._cached_weight(dtype, x.device.type).t()
        else:
            y = _QATLinear.apply(x, self.lora_A.weight, self.lora_B.weight, self, self.fake_quant)
        return y if self.base.bias is None else y + self.base.bias

    def _cached_weight(self, dtype: torch.dtype, device_type: str) -> torch.Tensor:
        a, b = self.lora_A.weight, self.lora_B.weight
        key = (a._version, b._version, dtype)
        if key not in self._cache:
            self._cache.clear()
            with torch.autocast(device_type, enabled=False):
                self._cache[key] = self._fake_quant_weight(a, b, dtype)[0]
        return self._cache[key]

    def _merged_weight(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        """W + scale * B @ A in fp32, as a merge computes it (base + delta_weight()); no gradient."""
        if isinstance(self.base, NF4Linear):
            w = self.base.dequantized_weight(torch.float32)
        else:
            w = self.base.weight.detach().float()
        return w + self.scaling * (lora_b.float() @ lora_a.float())

    def _fake_quant_weight(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fq(W + scale * B @ A) in ``dtype``, and the STE pass mask (None: nothing clipped).

        On CUDA, an NF4 base and a power-of-two group run the one-pass Triton kernel;
        elsewhere (and for the mask, in the rare case the kernel counts clipped values)
        the torch path of :mod:`qlora_kit.modules.fake_quant`.
        """
        cfg = self.fake_quant
        if (
            cfg.format == "int"
            and isinstance(self.base, NF4Linear)
            # CUDA only, also for kernel="triton": under the interpreter the torch path is far faster.
            and lora_a.is_cuda
            and use_triton(self.base.kernel, lora_a)
            and fq_kernel.supports(self.in_features, cfg.group_size)
        ):
            t = self.base.nf4_weight
            w_q, clipped = fq_kernel.fake_quant_merged_nf4(
                t.packed,
                t.absmax_q,
                t.nested_absmax,
                t.offset,
                nf4_code(t.device),
                dynamic_map(t.device),
                lora_a,
                lora_b,
                self.scaling,
                cfg.bits,
                cfg.group_size,
                cfg.symmetric,
                dtype,
                t.blocksize,
                t.nested_blocksize,
            )
            # The count is read (a device sync) only for the asymmetric grid, the one that can clip.
            if clipped is None or clipped.item() == 0:
                return w_q, None
        w_q, keep = quantize_dequantize_weight(self._merged_weight(lora_a, lora_b), cfg)
        return w_q.to(dtype), None if keep is None or bool(keep.all()) else keep


class QATNF4LoRALinear(QATLoRALinear, NF4LoRALinear):
    """A :class:`QATLoRALinear` made from an :class:`NF4LoRALinear`: the fused NF4 path runs while fake-quant is off."""


# The QAT class of each LoRA class, and back.
_QAT_CLASS = {LoRALinear: QATLoRALinear, NF4LoRALinear: QATNF4LoRALinear}
_LORA_CLASS = {qat: lora for lora, qat in _QAT_CLASS.items()}


def _qat_input(x: torch.Tensor, cfg: FakeQuantConfig) -> torch.Tensor:
    return x if cfg.activation_bits is None else quantize_dequantize_activation(x, cfg.activation_bits)


class _QATLinear(torch.autograd.Function):
    """y = fq(x) @ fq(W + scale * B @ A)^T, with straight-through gradients to x, A and B.

    Saved for backward: x, t = fq(x) @ A^T ([tokens, r]), A and B, and on ``ctx`` the
    layer, whose base weight stays packed: the fake-quantized weight is formed again in
    backward, so no weight-sized tensor outlives the forward. With G = mask * (g^T fq(x))
    the gradient reaching the merged weight through the STE, dB = scale * G A^T and
    dA = scale * B^T G; dx = g fq(W') (the activation STE is the identity). When nothing
    is clipped (the symmetric grid never clips, the asymmetric one almost never) G is not
    formed: dB = scale * g^T t and dA = scale * (g B)^T fq(x), the rank-r products plain
    LoRA computes, so QAT costs no GEMM beyond plain LoRA's.

    Autocast is off in both passes: it would compute B @ A in bf16, and the merged weight
    must be the fp32 one the exporter rounds. The matmuls with x and the gradients run in
    x's dtype (the base's compute dtype).
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, layer: QATLoRALinear, cfg: FakeQuantConfig
    ) -> torch.Tensor:
        ctx.layer, ctx.cfg = layer, cfg
        with torch.autocast(x.device.type, enabled=False):
            w_q, _ = layer._fake_quant_weight(lora_a, lora_b, x.dtype)
            xq = _qat_input(x, cfg)
            t = xq.reshape(-1, x.shape[-1]) @ lora_a.to(x.dtype).t()
            ctx.save_for_backward(x, t, lora_a, lora_b)
            return xq @ w_q.t()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _QATLinear._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        x, t, lora_a, lora_b = ctx.saved_tensors
        cfg, scaling, dtype = ctx.cfg, ctx.layer.scaling, grad_out.dtype
        w_q, keep = ctx.layer._fake_quant_weight(lora_a, lora_b, dtype)
        grad_x = grad_out @ w_q if ctx.needs_input_grad[0] else None
        del w_q
        g = grad_out.reshape(-1, grad_out.shape[-1])  # [tokens, out]
        xq = _qat_input(x, cfg).reshape(-1, x.shape[-1])  # [tokens, in]
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        if keep is None:
            grad_b = scaling * (g.t() @ t.to(dtype))
            grad_a = scaling * ((g @ b).t() @ xq)
        else:
            grad_w = (g.t() @ xq) * keep
            grad_b = scaling * (grad_w @ a.t())
            grad_a = scaling * (b.t() @ grad_w)
        return grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None, None


def _layers(model: nn.Module, cls: type = LoRALinear) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def enable_qat(model: nn.Module, cfg: FakeQuantConfig | None, active: bool = True) -> list[str]:
    """Make every LoRA layer of ``model`` (``model`` itself included) a QATLoRALinear on grid ``cfg``.

    In place: each layer keeps its identity, base and adapter Parameters; only its class
    changes. ``cfg`` None turns QAT layers back into the LoRA layers they were made from.
    ``active`` is the start-step switch (see :func:`set_qat_active`). Returns the module
    paths. Raises ValueError, naming the layer, for a group_size that does not divide its
    in_features, or for LoRA dropout: in QAT the adapter acts through the merged weight,
    where there is no separate branch to drop out; TypeError for a LoRA class with no QAT
    version here.
    """
    layers = _layers(model)
    if cfg is not None:
        for name, m in layers.items():
            if not isinstance(m.lora_dropout, nn.Identity):
                raise ValueError(f"{name}: LoRA dropout cannot be used with QAT (set lora.dropout to 0)")
            if _LORA_CLASS.get(type(m), type(m)) not in _QAT_CLASS:
                raise TypeError(f"{name}: no QAT version of {type(m).__name__}")
            if cfg.format == "int":
                try:
                    group_count(m.in_features, cfg.group_size)
                except ValueError as e:
                    raise ValueError(f"{name}: qat.{e}") from None
    for m in layers.values():
        lora_class = _LORA_CLASS.get(type(m), type(m))
        if cfg is None:
            m.__class__ = lora_class
            for attr in ("fake_quant", "active", "_cache"):
                m.__dict__.pop(attr, None)
        else:
            # A new grid invalidates the weights cached under the old one.
            cache = {} if getattr(m, "_cache", None) is not None else None
            m.__class__ = _QAT_CLASS[lora_class]
            m.fake_quant, m.active, m._cache = cfg, active, cache
    return list(layers)


def set_qat_active(model: nn.Module, active: bool) -> None:
    """Switch fake-quant on or off on every LoRA layer of ``model`` (e.g. at qat.start_step).

    Raises ValueError when switching on a layer that :func:`enable_qat` has not made a QAT layer.
    """
    for name, m in _layers(model).items():
        if isinstance(m, QATLoRALinear):
            m.active = active
        elif active:
            raise ValueError(f"{name}: no QAT config; call enable_qat(model, cfg) first")


@contextmanager
def cached_qat_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, QAT layers keep their fake-quantized weight across no-grad forwards.

    Generation runs one forward per new token; without the cache each one rounds every
    weight onto the grid again (on the CPU, where the torch path does it, that is most of
    the time). The cache holds one compute-dtype copy of each adapted weight and is keyed
    by the adapter's version counters, so an optimizer step invalidates it.
    """
    for m in _layers(model, QATLoRALinear).values():
        m._cache = {}
    try:
        yield
    finally:
        for m in _layers(model, QATLoRALinear).values():
            m._cache = None
