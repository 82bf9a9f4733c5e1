"""The server's refusal of NaN and infinities (server/checks.py ``finite``) for every float dtype
on the wire, whatever the value's place: one per dtype's fast path (16-bit: min and max; others:
the float32 sum, then each value where the sum overflowed)."""

import pytest
import torch

from lightning_split.server.checks import SegmentError, finite

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
BAD = [float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("where", [0, 777, -1])
def test_a_single_nonfinite_value_is_refused(dtype: torch.dtype, bad: float, where: int) -> None:
    t = torch.randn(2, 33, 24).to(dtype)
    t.view(-1)[where] = bad
    with pytest.raises(SegmentError, match="NaN or infinite"):
        finite(t, "the hidden state", allow_nonfinite=False)
    assert finite(t, "the hidden state", allow_nonfinite=True) is t


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_values_pass_even_where_their_sum_overflows(dtype: torch.dtype) -> None:
    big = torch.finfo(dtype).max
    t = torch.full((4, 8), big, dtype=dtype)  # every value finite; their sum is not
    assert finite(t, "x", allow_nonfinite=False) is t
    assert finite(torch.randn(3, 5).to(dtype).t(), "a strided view", allow_nonfinite=False) is not None
    assert finite(torch.empty(0, 7, dtype=dtype), "an empty tensor", allow_nonfinite=False).numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_value_in_the_last_pass_or_in_a_strided_view_is_found(dtype: torch.dtype) -> None:
    from lightning_split.server.checks import _CHUNK

    t = torch.randn(3 * _CHUNK + 5).to(dtype)
    assert finite(t, "x", allow_nonfinite=False) is t
    t[-3] = float("nan")  # in the last, partial pass
    with pytest.raises(SegmentError):
        finite(t, "x", allow_nonfinite=False)
    grid = torch.randn(6, 10).to(dtype)
    grid[4, 3] = float("-inf")
    with pytest.raises(SegmentError):
        finite(grid.t()[3:], "a transposed slice", allow_nonfinite=False)
    assert finite(grid.t()[4:], "the slice without it", allow_nonfinite=False) is not None


def test_integer_tensors_pass_and_non_tensors_are_refused() -> None:
    assert finite(torch.arange(5), "ids", allow_nonfinite=False).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(SegmentError, match="must be a tensor"):
        finite([1.0], "the hidden state", allow_nonfinite=False)
