"""LoRA (Hu et al. 2021) on a frozen base linear: y = base(x) + scale * B(A(dropout(x))).

QAT mode (fake-quant, :mod:`qlora_kit.modules.fake_quant`): the adapter acts through the
merged weight, rounded onto the deployment grid as the exporter will round it,
y = fq(x) @ fq(W + scale * B @ A)^T + bias, with straight-through gradients to A and B.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qlora_kit.kernels import fake_quant as fq_kernel
from qlora_kit.modules.fake_quant import FakeQuantConfig, quantize_dequantize_activation, quantize_dequantize_weight
from qlora_kit.modules.nf4_linear import NF4Linear
from qlora_kit.quant.intq import group_count
from qlora_kit.quant.nf4 import dynamic_map, nf4_code


def lora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or alpha / sqrt(r) with rank-stabilized LoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update.

    A is initialised like ``nn.Linear`` (Kaiming-uniform, as PEFT does) and B at zero,
    so the wrapped layer starts out equal to the base. The adapter weights live in
    fp32 and are cast to the input's dtype for the matmuls, as PEFT does.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.scaling = lora_scale(r, alpha, use_rslora)
        device = next((t.device for t in base.buffers()), None) or next(base.parameters()).device
        # Initialised by the CPU generator, then moved: a seed gives the same adapters wherever
        # the base lives (on the GPU, or in CPU memory before FSDP shards it onto the GPUs).
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device)
        self.lora_B.to(device)
        # Dropout 0 skips the module entirely: no mask, no extra pass over x.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # False: the plain autograd path (base(x) + scale * B(A(x))) even on an NF4 base.
        self.fused = True
        # Set through enable_qat / set_qat_active; QAT runs when both are set.
        self.qat: FakeQuantConfig | None = None
        self.qat_active = False
        # Inside cached_qat_weights: fake-quantized weights of no-grad forwards, by adapter version.
        self._qat_cache: dict | None = None

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A in fp32: what a merge adds to the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qat is not None and self.qat_active:
            return self._qat_forward(x)
        if self.fused and isinstance(self.base, NF4Linear) and isinstance(self.lora_dropout, nn.Identity):
            x = x.to(self.base.compute_dtype)
            y = _LoRANF4MatMul.apply(x, self.lora_A.weight, self.lora_B.weight, self.base, self.scaling)
            return y if self.base.bias is None else y + self.base.bias
        y = self.base(x)
        a = self.lora_A.weight.to(x.dtype)
        b = self.lora_B.weight.to(x.dtype)
        return y + (self.lora_dropout(x) @ a.t() @ b.t()).to(y.dtype) * self.scaling

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
        cfg = self.qat
        if (
            cfg.format == "int"
            and isinstance(self.base, NF4Linear)
            and self.base.kernel != "torch"
            and lora_a.is_cuda
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

    def _qat_forward(self, x: torch.Tensor) -> torch.Tensor:
        # The base is frozen: its weight gets no gradient, its (frozen) bias is added as usual.
        dtype = self.base.compute_dtype if isinstance(self.base, NF4Linear) else self.base.weight.dtype
        if self._qat_cache is not None and not torch.is_grad_enabled():
            a, b = self.lora_A.weight, self.lora_B.weight
            key = (a._version, b._version, dtype)
            if key not in self._qat_cache:
                self._qat_cache.clear()
                with torch.autocast(x.device.type, enabled=False):
                    self._qat_cache[key] = self._fake_quant_weight(a, b, dtype)[0]
            y = _qat_input(x.to(dtype), self.qat) @ self._qat_cache[key].t()
            return y if self.base.bias is None else y + self.base.bias
        y = _QATLinear.apply(x.to(dtype), self.lora_A.weight, self.lora_B.weight, self, self.qat)
        return y if self.base.bias is None else y + self.base.bias


class _LoRANF4MatMul(torch.autograd.Function):
    """y = x @ W^T + scale * (x @ A^T) @ B^T for a frozen NF4 weight W, in two GEMMs and a rank-r one.

    The low-rank product is accumulated into the base GEMM's output in place (addmm with
    beta=1) instead of as separate scale and add passes over [tokens, out]; backward does
    the same for grad_x. Saved: x and t = x @ A^T (what plain LoRA's autograd saves too),
    A and B; the NF4 weight stays packed on ``ctx`` and is dequantized again in backward.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, base: NF4Linear, scaling: float
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        t = x2 @ a.t()
        y = x2 @ base.dequantized_weight(x.dtype).t()
        y.addmm_(t, b.t(), alpha=scaling)
        ctx.base, ctx.scaling = base, scaling
        ctx.save_for_backward(x, t, lora_a, lora_b)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, t, lora_a, lora_b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        a, b = lora_a.to(g.dtype), lora_b.to(g.dtype)
        gb = g @ b  # [tokens, r]
        grad_x = g @ ctx.base.dequantized_weight(g.dtype)
        grad_x.addmm_(gb, a, alpha=ctx.scaling)
        grad_a = (gb.t() @ x2).mul_(ctx.scaling)
        grad_b = (g.t() @ t.to(g.dtype)).mul_(ctx.scaling)
        return grad_x.view_as(x), grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), None, None


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
        ctx, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, layer: LoRALinear, cfg: FakeQuantConfig
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


def _lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def enable_qat(model: nn.Module, cfg: FakeQuantConfig | None, active: bool = True) -> list[str]:
    """Put fake-quant config ``cfg`` on every LoRALinear of ``model`` (None: QAT off).

    ``active`` is the start-step switch (see :func:`set_qat_active`). Returns the module
    paths set. Raises ValueError, naming the layer, for a group_size that does not divide
    its in_features, or for LoRA dropout: in QAT mode the adapter acts through the merged
    weight, where there is no separate branch to drop out.
    """
    layers = _lora_layers(model)
    if cfg is not None:
        for name, m in layers.items():
            if not isinstance(m.lora_dropout, nn.Identity):
                raise ValueError(f"{name}: LoRA dropout cannot be used with QAT (set lora.dropout to 0)")
            if cfg.format == "int":
                try:
                    group_count(m.in_features, cfg.group_size)
                except ValueError as e:
                    raise ValueError(f"{name}: qat.{e}") from None
    for m in layers.values():
        m.qat, m.qat_active = cfg, active and cfg is not None
    return list(layers)


@contextmanager
def cached_qat_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, QAT layers keep their fake-quantized weight across no-grad forwards.

    Generation runs one forward per new token; without the cache each one rounds every
    weight onto the grid again (on the CPU, where the torch path does it, that is most of
    the time). The cache holds one compute-dtype copy of each adapted weight and is keyed
    by the adapter's version counters, so an optimizer step invalidates it.
    """
    layers = list(_lora_layers(model).values())
    for m in layers:
        m._qat_cache = {}
    try:
        yield
    finally:
        for m in layers:
            m._qat_cache = None


def set_qat_active(model: nn.Module, active: bool) -> None:
    """Switch fake-quant on or off on every LoRALinear of ``model`` (e.g. at qat.start_step).

    Raises ValueError when switching on a layer that :func:`enable_qat` has not configured.
    """
    for name, m in _lora_layers(model).items():
        if active and m.qat is None:
            raise ValueError(f"{name}: no QAT config; call enable_qat(model, cfg) first")
        m.qat_active = active
