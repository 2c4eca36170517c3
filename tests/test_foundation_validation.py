"""engine.validation: every check names the argument and accepts exactly its range."""

import math

import numpy as np
import pytest
import torch

from engine.validation import MAX_BYTES, check_bytes, check_choice, check_float, check_int


def test_check_int_accepts_integer_types_in_range():
    assert check_int("n", 5, 1, 10) == 5
    assert check_int("n", np.int64(7), 1, 10) == 7
    assert check_int("n", torch.tensor(3), 1, 10) == 3
    assert check_int("n", 1, 1) == 1


@pytest.mark.parametrize("value", [0, 11, -3])
def test_check_int_out_of_range_names_argument_and_range(value):
    with pytest.raises(ValueError, match=r"num_experts must be >= 1 and <= 10, got"):
        check_int("num_experts", value, 1, 10)


@pytest.mark.parametrize("value", [2.5, "3", True, None, 3.0])
def test_check_int_rejects_non_integers(value):
    with pytest.raises(ValueError, match="top_k must be an integer"):
        check_int("top_k", value, 1, 2)


def test_check_float():
    assert check_float("c", "1.5", lo=0, lo_open=True) == 1.5
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        check_float("capacity_factor", 0, lo=0, lo_open=True)
    with pytest.raises(ValueError, match="c must be >= 0"):
        check_float("c", -1, lo=0)
    with pytest.raises(ValueError, match="c must be finite"):
        check_float("c", math.nan)
    with pytest.raises(ValueError, match="c must be a number"):
        check_float("c", "abc")
    with pytest.raises(ValueError, match="c must be <= 2"):
        check_float("c", 3, hi=2)


def test_check_choice_lists_the_choices():
    assert check_choice("dtype", "bf16", ("fp16", "bf16")) == "bf16"
    with pytest.raises(ValueError, match="dtype must be one of fp16, bf16; got 'int8'"):
        check_choice("dtype", "int8", ("fp16", "bf16"))


def test_check_bytes_refuses_above_limit_only():
    check_bytes("x", MAX_BYTES)
    with pytest.raises(ValueError, match=r"tokens would need about 8\.0 GiB, over the 4 GiB limit"):
        check_bytes("tokens", 8 * 2**30)
