"""Test setup: run the Triton kernels under the interpreter when no GPU is present, with its
bfloat16 casts rounding as a GPU's do; poison every buffer the kernels fill so that an element they
fail to write shows up as NaN; and keep fp32 exact on a GPU unless a test asks for TF32."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before triton is imported (fused_rnn imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from triton.runtime import interpreter  # noqa: E402

from bench import bfloat16_rounding  # noqa: E402
from fused_rnn.ops import launch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def bfloat16_rounding_interpreter():
    """The interpreter's fp32 -> bfloat16 casts round to nearest, as on a GPU (``bench.bfloat16_rounding``)."""
    with pytest.MonkeyPatch.context() as patch:
        if launch.interpreting():
            builder = interpreter.InterpreterBuilder
            patch.setattr(builder, "cast_impl", bfloat16_rounding(builder.cast_impl))
        yield


def _poisoned(*shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(launch, "empty", _poisoned)


@pytest.fixture(autouse=True)
def ieee_fp32(monkeypatch):
    """The kernels follow ``cudnn.allow_tf32`` on a GPU, as cuDNN does (on by default); the fp32
    tolerances assume IEEE products, so a test that wants TF32 turns it on itself."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
