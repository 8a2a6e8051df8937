"""The summed NLL through a frozen lm_head, gradient made in the forward, against float64 autograd references."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaForCausalLM

from qlora_kit.data import DataCollator
from qlora_kit.model.sft import SFTModel, causal_lm_loss
from qlora_kit.modules.linear_cross_entropy import linear_nll_sum

# The Triton kernel's tests: on the GPU where there is one, else in Triton's interpreter on the CPU.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _head(d: int = 16, vocab: int = 50, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(d, vocab, bias=False, dtype=torch.float64)
    head.weight.requires_grad_(False)
    return head


@pytest.mark.parametrize("chunk_tokens", [1, 8, 37, 100])
def test_loss_and_gradient_equal_autograd_of_cross_entropy(chunk_tokens):
    head = _head()
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    loss = linear_nll_sum(hidden, head, targets, chunk_tokens)
    (grad,) = torch.autograd.grad(3.0 * loss, hidden)  # the incoming gradient scales the kept one

    reference_hidden = hidden.detach().clone().requires_grad_(True)
    reference = F.cross_entropy(reference_hidden @ head.weight.t(), targets, reduction="sum")
    (reference_grad,) = torch.autograd.grad(3.0 * reference, reference_hidden)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-10, atol=1e-12)


def test_no_rows_give_zero_and_a_gradient_of_their_shape():
    hidden = torch.randn(0, 16, dtype=torch.float64, requires_grad=True)
    loss = linear_nll_sum(hidden, _head(), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == (0, 16)


def test_without_grad_the_same_loss():
    head, hidden, targets = _head(), torch.randn(9, 16, dtype=torch.float64), torch.randint(0, 50, (9,))
    with torch.no_grad():
        plain = linear_nll_sum(hidden, head, targets, 4)
    assert plain.item() == linear_nll_sum(hidden.requires_grad_(True), head, targets, 4).item()


def test_a_trained_lm_head_is_refused():
    head = _head()
    head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen lm_head"):
        linear_nll_sum(torch.randn(2, 16), head, torch.zeros(2, dtype=torch.long))


def test_sft_loss_and_gradients_equal_the_full_logits_path(tiny_llama_config):
    """causal_lm_loss (frozen lm_head: linear_nll_sum) against the model's full logits, float64, with
    unlabelled positions in every row and a chunk that does not divide the labelled count."""
    torch.manual_seed(0)
    config = tiny_llama_config(tie_word_embeddings=False)
    lm = LlamaForCausalLM(config).double()
    lm.lm_head.weight.requires_grad_(False)
    ids = torch.randint(0, 64, (3, 12))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 3:7] = -100
    labels[2, 10:] = -100

    def loss_and_grads(loss_fn, **kwargs):
        lm.zero_grad(set_to_none=True)
        loss = loss_fn(lm, ids, labels, **kwargs)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in lm.parameters() if p.requires_grad]

    def full_logits_loss(lm, ids, labels):  # every position's logits in float64, then the labelled ones
        logits, targets = lm(input_ids=ids).logits[:, :-1], labels[:, 1:]
        mask = targets != -100
        return F.cross_entropy(logits[mask], targets[mask], reduction="sum") / mask.sum()

    loss, grads = loss_and_grads(causal_lm_loss, chunk_tokens=7)
    reference, reference_grads = loss_and_grads(full_logits_loss)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for g, r in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_collated_rows_train_as_the_rows_one_at_a_time(tiny_llama_config):
    """The collator's right-padded batch (no attention mask, the labelled positions found on the CPU) gives
    the loss and gradients of its rows run one at a time without padding, float64."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).double()
    lm.lm_head.weight.requires_grad_(False)
    rows = []
    for n, prompt in ((9, 4), (6, 2), (12, 7), (3, 3)):  # the last row has no labelled token
        ids = torch.randint(3, 64, (n,)).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batch = DataCollator(SimpleNamespace(pad_token_id=0, eos_token_id=1))(rows)
    assert "attention_mask" not in batch

    def grads():
        out = [p.grad.clone() for p in lm.parameters() if p.requires_grad]
        lm.zero_grad(set_to_none=True)
        return out

    loss = SFTModel(lm)(**batch)["loss"]
    loss.backward()
    batch_grads = grads()
    nll = sum(
        F.cross_entropy(
            lm(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1],
            torch.tensor(r["labels"][1:]),
            reduction="sum",
        )
        for r in rows
    )
    reference = nll / sum(label != -100 for r in rows for label in r["labels"][1:])
    reference.backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-12, atol=0)
    for g, r in zip(batch_grads, grads(), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernel_loss_and_gradient_equal_float64(dtype):
    """The kernel's rows (a vocabulary of two ragged tiles; an extreme logit row) against float64 log-softmax."""
    pytest.importorskip("triton", reason="triton is not installed: the kernel cannot run here")
    from qlora_kit.kernels._triton import available
    from qlora_kit.kernels.cross_entropy import cross_entropy_rows_

    if not available():
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(5, 5000, generator=g)).to(KERNEL_DEVICE, dtype)
    logits[1, 17] = 80.0  # the max far above the rest: the online rescaling must not overflow
    targets = torch.tensor([0, 17, 4999, 4096, 1234], device=KERNEL_DEVICE)
    exact = logits.double().log_softmax(-1)
    expected_loss = -exact[torch.arange(5, device=KERNEL_DEVICE), targets]
    expected_grad = exact.exp()
    expected_grad[torch.arange(5, device=KERNEL_DEVICE), targets] -= 1

    loss = cross_entropy_rows_(logits, targets, grad=True)
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=1e-5)
    # One rounding to the logits' dtype (bf16), or fp32's logsumexp error carried through the exp (fp32).
    torch.testing.assert_close(logits.double(), expected_grad, rtol=max(torch.finfo(dtype).eps, 1e-5), atol=1e-7)
    untouched = (4 * torch.randn(5, 5000, generator=g)).to(KERNEL_DEVICE, dtype)
    kept = untouched.clone()
    cross_entropy_rows_(untouched, targets, grad=False)
    assert torch.equal(untouched, kept)


def test_triton_path_of_linear_nll_sum_equals_float64_autograd():
    """linear_nll_sum with the kernel (fp32 lm_head) against float64 autograd of cross_entropy, chunks ragged."""
    pytest.importorskip("triton", reason="triton is not installed: the kernel cannot run here")
    from qlora_kit.kernels._triton import available

    if not available():
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    head = nn.Linear(16, 300, bias=False, device=KERNEL_DEVICE).requires_grad_(False)
    hidden = torch.randn(11, 16, device=KERNEL_DEVICE, requires_grad=True)
    targets = torch.randint(0, 300, (11,), device=KERNEL_DEVICE)
    loss = linear_nll_sum(hidden, head, targets, 4, kernel="triton")
    (grad,) = torch.autograd.grad(2.0 * loss, hidden)
    h64 = hidden.detach().double().requires_grad_(True)
    reference = F.cross_entropy(h64 @ head.weight.double().t(), targets, reduction="sum")
    (reference_grad,) = torch.autograd.grad(2.0 * reference, h64)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), reference_grad, rtol=1e-4, atol=1e-5)
