"""Test setup: run the Triton kernels under the interpreter when no GPU is present, poison every
buffer the kernels fill so that an element they fail to write shows up as NaN, and keep fp32
exact on a GPU unless a test asks for TF32."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before triton is imported (fused_rnn imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_rnn.ops import launch  # noqa: E402


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
