"""Device-side statistics against the slow obvious computation."""

from __future__ import annotations

import math

import pytest
import torch

from lrwatch.hook import stats


def mixed_tensors() -> list[torch.Tensor]:
    return [
        torch.randn(5, 3),
        torch.randn(7, dtype=torch.float64),
        torch.randn(4, 4),
        torch.randn(3, dtype=torch.bfloat16),
        torch.randn(()),
    ]


def test_foreach_norms_equal_vector_norm_per_tensor_in_input_order() -> None:
    ts = mixed_tensors()
    got = stats.foreach_norms(ts)
    expected = torch.stack([torch.linalg.vector_norm(t.double()) for t in ts]).float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=0)  # bf16 norm is coarse
    assert stats.group_by_device_dtype(ts) == [[0, 2, 4], [1], [3]]


def test_total_norm_equals_clip_grad_norm() -> None:
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(10, 4), (4,), (3, 3, 3)]]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    got = stats.total_norm(stats.foreach_norms([p.grad for p in params]))  # type: ignore[misc]
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm=math.inf)
    torch.testing.assert_close(got, expected)


def test_update_norms_overwrite_the_snapshot_with_the_difference() -> None:
    before = [torch.randn(6, 2), torch.randn(3)]
    snap = stats.snapshot(before)
    after = [t + 0.5 * torch.randn_like(t) for t in before]
    expected = torch.stack(
        [torch.linalg.vector_norm(a - b) for a, b in zip(after, before, strict=True)]
    )
    torch.testing.assert_close(stats.update_norms(snap, after), expected)
    torch.testing.assert_close(snap[0], before[0] - after[0])


def test_snapshot_reuses_buffers_that_fit_and_replaces_those_that_do_not() -> None:
    ts = [torch.randn(4), torch.randn(2, 2)]
    buffers = [torch.empty(4), torch.empty(2, 2)]
    out = stats.snapshot(ts, buffers)
    assert out is buffers and all(torch.equal(a, b) for a, b in zip(out, ts, strict=True))
    other = stats.snapshot([torch.randn(5)], buffers)
    assert other is not buffers and other[0].shape == (5,)


def test_a_step_with_no_gradient_measures_nothing_and_does_not_fail() -> None:
    """The step that reads a rollback has no gradient at all (the restore drops them): the
    logging step's snapshot and update norms are empty, where torch's foreach ops refuse an
    empty list (found by the FSDP2 and DDP rollback tests, on a logging step)."""
    assert stats.snapshot([], []) == [] and stats.snapshot([], None) == []
    assert stats.update_norms([], []).numel() == 0
    assert stats.foreach_norms([]).numel() == 0


@pytest.mark.parametrize(
    ("num", "den", "expected"),
    [(2.0, 4.0, 0.5), (0.0, 0.0, 0.0), (0.0, 3.0, 0.0), (1.0, 0.0, math.inf)],
    ids=["plain", "zero_tensor_unmoved", "unmoved", "zero_tensor_moved"],
)
def test_ratio_defines_the_zero_cases(num: float, den: float, expected: float) -> None:
    assert stats.ratio(torch.tensor([num]), torch.tensor([den])).item() == expected


def test_ratio_keeps_nan_visible() -> None:
    assert math.isnan(stats.ratio(torch.tensor([math.nan]), torch.tensor([1.0])).item())
