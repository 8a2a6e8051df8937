"""GPTQ: accurate post-training quantization (Frantar et al., 2022).

For one Linear layer with calibration inputs X, GPTQ quantizes the weight W
column by column and, after each column, spreads that column's rounding error
over the not-yet-quantized columns so that ||XW^T - XQ^T|| stays small. The
second-order information is the Hessian H = 2/n * sum x x^T of the layer-wise
squared error; the updates use the rows of the upper Cholesky factor of H^-1.
Updates are applied lazily in batches of `blocksize` columns.

Codes land on the shared int-k grid (`intq`), so they pack losslessly into the
GPTQ / AWQ checkpoint layouts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qlora_kit.quant.intq import IntQuantWeight, find_params, group_count, quantize


class GPTQ:
    """Hessian accumulator and quantizer for one Linear layer with `columns` inputs."""

    def __init__(self, columns: int, device: torch.device | str | None = None) -> None:
        self.columns = columns
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0
        self.loss: float | None = None

    def add_batch(self, inp: Tensor) -> None:
        """Accumulate H = 2/n * sum x x^T over the rows x of `inp` [..., K].

        A running average in fp32, as the reference does; n counts rows
        (tokens), so H does not depend on how the calibration set is batched.
        """
        if inp.dim() == 0 or inp.shape[-1] != self.columns:
            raise ValueError(f"GPTQ layer has {self.columns} input columns, got an input of shape {tuple(inp.shape)}")
        x = inp.reshape(-1, self.columns).to(self.H.device, torch.float32)
        tmp = x.shape[0]
        self.H *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        x = (2 / self.nsamples) ** 0.5 * x
        self.H += x.t() @ x

    @torch.no_grad()
    def quantize(
        self,
        weight: Tensor,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = True,
        act_order: bool = False,
        damp_percent: float = 0.01,
        blocksize: int = 128,
    ) -> IntQuantWeight:
        """Quantize `weight` [N, K] against the accumulated Hessian.

        Sets `self.loss` to sum (w - q)^2 / (2 [H_F^-1]_qq), the OBS estimate of
        the increase in the layer's squared error (H_F: Hessian of the columns
        not yet quantized), for logging.
        """
        if weight.dim() != 2 or weight.shape[1] != self.columns:
            raise ValueError(
                f"GPTQ layer has {self.columns} input columns, got a weight of shape {tuple(weight.shape)}"
            )
        if self.nsamples == 0:
            raise ValueError("GPTQ.quantize called before any add_batch: the Hessian is empty")
        if not torch.isfinite(weight).all():
            raise ValueError(f"weight of shape {tuple(weight.shape)} has non-finite values")
        if damp_percent < 0:
            raise ValueError(f"damp_percent must be >= 0, got {damp_percent}")
        if blocksize <= 0:
            raise ValueError(f"blocksize must be positive, got {blocksize}")
        columns = self.columns
        groups = group_count(columns, group_size)
        g = columns // groups
        if group_size != -1 and g % blocksize != 0:
            # Align blocks to groups: a group then starts at a block start or
            # lies inside one block, so its parameters see every earlier update.
            blocksize = g * max(1, blocksize // g)

        W = weight.to(self.H.device, torch.float32).clone()
        H = self.H.clone()

        # A column whose input is always zero has no effect on the output:
        # zero its weight and give H a unit diagonal there so it stays invertible.
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0

        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]

        damp = damp_percent * torch.mean(torch.diag(H))
        diag = torch.arange(columns, device=H.device)
        H[diag, diag] += damp
        try:
            H = torch.linalg.cholesky(H)
            H = torch.cholesky_inverse(H)
            Hinv = torch.linalg.cholesky(H, upper=True)
        except torch.linalg.LinAlgError as e:
            raise ValueError(
                f"GPTQ Hessian of a layer with {columns} inputs is not positive definite "
                f"after damping {damp_percent}; increase damp_percent"
            ) from e

        Q = torch.zeros_like(W)
        loss = torch.zeros((), device=W.device)
        scales, zeros = [], []
        for i1 in range(0, columns, blocksize):
            i2 = min(i1 + blocksize, columns)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Losses1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]

            for i in range(count):
                if (i1 + i) % g == 0:
                    # W1 carries this block's updates; a group reaching past the
                    # block starts with it, when W is fully updated.
                    group = W1[:, i : i + g] if i + g <= count else W[:, i1 + i : i1 + i + g]
                    scale, zero = find_params(group, bits, symmetric)
                    scales.append(scale)
                    zeros.append(zero)
                w = W1[:, i : i + 1]
                d = Hinv1[i, i]
                q = quantize(w, scale, zero, bits)
                Q1[:, i : i + 1] = q
                err1 = (w - scale * (q - zero)) / d
                Losses1[:, i : i + 1] = err1**2
                W1[:, i:] -= err1 @ Hinv1[i : i + 1, i:]
                Err1[:, i : i + 1] = err1

            Q[:, i1:i2] = Q1
            loss += Losses1.sum() / 2
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        self.loss = loss.item()
        g_idx = torch.arange(columns, device=W.device, dtype=torch.int32) // g
        if act_order:
            # Groups were formed in the permuted order; map each original
            # column to the group it was quantized in.
            invperm = torch.argsort(perm)
            Q = Q[:, invperm]
            g_idx = g_idx[invperm]
        return IntQuantWeight(
            q=Q.to(torch.uint8),
            scale=torch.cat(scales, dim=1),
            zero=torch.cat(zeros, dim=1).to(torch.uint8),
            g_idx=g_idx,
            bits=bits,
            group_size=group_size,
            symmetric=symmetric,
        )
