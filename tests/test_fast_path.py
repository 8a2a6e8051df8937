"""The fast path trains exactly like the plain PyTorch path: SmolLM2-135M, same seed and data, 50 steps."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains SmolLM2-135M twice

ROOT = Path(__file__).resolve().parent.parent


def _losses(quickstart_losses, out_dir: Path, fused: bool) -> list[float]:
    return quickstart_losses(
        out_dir,
        50,
        f"training.fused_kernels={str(fused).lower()}",
        "training.batch_size=1",
        "training.uncheckpointed_layers=10",
        "training.gradient_checkpointing=true",
        "data.max_seq_len=96",
        f"data.train={ROOT / 'examples/date-iso/train.jsonl'}",
    )


def test_fast_path_loss_curve_matches_plain_path(tmp_path, quickstart_losses):
    fast, plain = (
        _losses(quickstart_losses, tmp_path / "fast", True),
        _losses(quickstart_losses, tmp_path / "plain", False),
    )
    assert len(fast) == len(plain) == 50
    assert plain[-1] < 0.5 * plain[0]  # it learns
    # fp32 on the CPU: only summation order differs between the two paths.
    assert max(abs(a - b) for a, b in zip(fast, plain)) < 1e-3 * max(plain)
