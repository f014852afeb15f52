"""``GRURecurrence`` (the Triton kernels) against ``reference.gru_recurrence`` in float64.

The recurrence is called through ``functional.gru_recurrence``, which hands tensors the kernels
can take (CUDA, or CPU under ``TRITON_INTERPRET=1``) to ``GRURecurrence``;
``test_gru_recurrence_runs_triton_kernels`` checks that it really does.
"""

import math

import pytest
import torch
from helpers import (
    KERNEL_DEVICE,
    KERNELS_RUN,
    CountingKernel,
    assert_close,
    float_inputs,
    gradcheck_through_one_input,
    random_lengths,
    requiring_grad,
)

from fused_rnn import functional, reference
from fused_rnn.ops import gru as gru_ops
from fused_rnn.ops.launch import final_slot, initial_slot, states_after

# (T, B, H). Sizes are odd on purpose: H=70 spans two hidden tiles, B=67 two batch tiles (the
# interpreter's tiles are 64 wide).
SHAPES = [(5, 3, 20), (4, 1, 1), (5, 3, 7), (3, 3, 70), (3, 67, 7)]
# Every shape runs in float32 with and without b_hh; these run in the other dtypes too. bfloat16
# only on small shapes: at H=70 or B=67 its weight gradients miss the 2e-2 tolerance by rounding
# alone. PyTorch's own bfloat16 autograd through the reference comes within 2e-4 of it there, and
# the Triton interpreter casts fp32 to bfloat16 by truncation (not round-to-nearest), doubling each
# store's error. float16 covers the same upcast tl.dot path on every shape.
LOW_AND_DOUBLE_PRECISION_CASES = [
    (shape, dtype)
    for shape in [(5, 3, 20), (4, 1, 1), (3, 3, 70), (3, 67, 7)]
    for dtype in [torch.float64, torch.float16]
] + [((5, 3, 20), torch.bfloat16), ((4, 1, 1), torch.bfloat16), ((5, 3, 7), torch.bfloat16)]


@pytest.fixture(autouse=True)
def exact_fp32(monkeypatch):
    # On a GPU, fp32 would otherwise run in TF32; the fp32 tolerance assumes IEEE products.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def case_id(shape, dtype, bias=True, reverse=False, with_lengths=False):
    T, B, H = shape
    parts = [f"T{T}-B{B}-H{H}", str(dtype).removeprefix("torch.")]
    parts += [] if bias else ["no-bias"]
    return "-".join(parts + (["reverse"] if reverse else []) + (["lengths"] if with_lengths else []))


def make_inputs(T, B, H, dtype, bias=True, with_lengths=False):
    """Random ``(gates_x, w_hh, b_hh, h0, lengths)``; ``W_hh`` scaled by 1/sqrt(H) so the gates stay
    away from saturation and every gradient is sizeable."""

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(KERNEL_DEVICE, dtype)

    gates_x = randn(T, B, 3 * H)
    w_hh = randn(3 * H, H, scale=1 / math.sqrt(H))
    b_hh = randn(3 * H) if bias else None
    h0 = randn(B, H)
    lengths = random_lengths(T, B) if with_lengths else None
    return gates_x, w_hh, b_hh, h0, lengths


def check_against_reference(shape, dtype, bias, reverse, with_lengths):
    """Forward output and every input gradient, under a random upstream gradient."""
    T, B, H = shape
    gates_x, w_hh, b_hh, h0, lengths = requiring_grad(make_inputs(T, B, H, dtype, bias, with_lengths))
    h_seq = functional.gru_recurrence(gates_x, w_hh, b_hh, h0, lengths, reverse)
    grad_h_seq = torch.randn_like(h_seq)
    grads = torch.autograd.grad(h_seq, float_inputs((gates_x, w_hh, b_hh, h0)), grad_h_seq)

    ref_inputs = [
        x.detach().double().requires_grad_() if x is not None and x.is_floating_point() else x
        for x in (gates_x, w_hh, b_hh, h0, lengths)
    ]
    ref_h_seq = reference.gru_recurrence(*ref_inputs, reverse=reverse)
    ref_grads = torch.autograd.grad(ref_h_seq, float_inputs(ref_inputs), grad_h_seq.double())

    assert h_seq.dtype == dtype
    assert_close(h_seq, ref_h_seq, dtype, name="h_seq")
    names = ["grad gates_x", "grad W_hh"] + (["grad b_hh"] if bias else []) + ["grad h0"]
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        assert grad.dtype == dtype, name
        assert_close(grad, ref_grad, dtype, name=name)


@pytest.mark.parametrize(
    "shape, dtype, bias",
    [
        pytest.param(s, torch.float32, b, id=case_id(s, torch.float32, b))
        for s in SHAPES
        for b in (True, False)
    ]
    + [pytest.param(s, d, True, id=case_id(s, d)) for s, d in LOW_AND_DOUBLE_PRECISION_CASES],
)
def test_gru_output_and_grads_match_reference(shape, dtype, bias):
    check_against_reference(shape, dtype, bias, reverse=False, with_lengths=False)


@pytest.mark.parametrize(
    "shape, bias, reverse, with_lengths",
    [
        pytest.param(s, True, True, True, id=case_id(s, torch.float32, True, True, True))
        for s in SHAPES
    ]
    + [
        pytest.param(s, b, r, n, id=case_id(s, torch.float32, b, r, n))
        for s in [(5, 3, 20), (3, 67, 7), (3, 3, 70)]
        for b, r, n in [(True, True, False), (True, False, True), (False, True, True)]
    ],
)
def test_gru_output_and_grads_match_reference_reverse_and_lengths(shape, bias, reverse, with_lengths):
    check_against_reference(shape, torch.float32, bias, reverse, with_lengths)


@pytest.mark.parametrize(
    "dtype, bias",
    [
        pytest.param(d, b, id=case_id((5, 3, 20), d, b, True, True))
        for d, b in [(torch.float64, True), (torch.float64, False), (torch.float16, True), (torch.bfloat16, True)]
    ],
)
def test_gru_output_and_grads_match_reference_reverse_with_lengths_per_dtype(dtype, bias):
    check_against_reference((5, 3, 20), dtype, bias, reverse=True, with_lengths=True)


@pytest.mark.parametrize("scheme", ["persistent", "stepwise"])
@pytest.mark.parametrize(
    "shape, reverse, with_lengths",
    [
        pytest.param((3, 3, 70), False, False, id=case_id((3, 3, 70), torch.float32)),
        pytest.param((3, 3, 70), True, True, id=case_id((3, 3, 70), torch.float32, True, True, True)),
        pytest.param((3, 67, 7), True, True, id=case_id((3, 67, 7), torch.float32, True, True, True)),
    ],
)
def test_gru_launch_scheme_matches_reference(monkeypatch, scheme, shape, reverse, with_lengths):
    monkeypatch.setenv("FUSED_RNN_SCHEME", scheme)
    check_against_reference(shape, torch.float32, True, reverse, with_lengths)


@pytest.mark.parametrize(
    "scheme, grids",
    [
        # T=4, B=3 (one batch tile), H=70 (two hidden tiles).
        pytest.param("persistent", [(1, 1)], id="persistent-one-launch"),
        pytest.param("stepwise", [(1, 2)] * 4, id="stepwise-one-launch-per-step"),
    ],
)
def test_gru_launch_scheme_sets_launches_and_grid(monkeypatch, scheme, grids):
    monkeypatch.setenv("FUSED_RNN_SCHEME", scheme)
    forward = CountingKernel(gru_ops.gru_forward_kernel)
    backward = CountingKernel(gru_ops.gru_backward_kernel)
    monkeypatch.setattr(gru_ops, "gru_forward_kernel", forward)
    monkeypatch.setattr(gru_ops, "gru_backward_kernel", backward)
    gates_x, w_hh, b_hh, h0, _ = requiring_grad(make_inputs(4, 3, 70, torch.float32))
    h_seq = functional.gru_recurrence(gates_x, w_hh, b_hh, h0)
    torch.autograd.grad(h_seq, (gates_x, w_hh, b_hh, h0), torch.randn_like(h_seq))
    assert forward.grids == grids
    assert backward.grids == grids


@pytest.mark.parametrize(
    "bias, reverse, with_lengths",
    [
        pytest.param(True, False, False, id="bias"),
        pytest.param(False, False, False, id="no-bias"),
        pytest.param(True, True, True, id="bias-reverse-lengths"),
        pytest.param(False, True, True, id="no-bias-reverse-lengths"),
    ],
)
def test_gru_gradcheck(bias, reverse, with_lengths):
    T, B, H = 3, 2, 3
    gates_x, w_hh, b_hh, h0, lengths = make_inputs(T, B, H, torch.float64, bias, with_lengths)
    assert gradcheck_through_one_input(
        lambda *inputs: functional.gru_recurrence(*inputs, reverse), (gates_x, w_hh, b_hh, h0, lengths)
    )


@pytest.mark.skipif(not KERNELS_RUN, reason="needs CUDA or TRITON_INTERPRET=1")
def test_gru_recurrence_runs_triton_kernels(monkeypatch):
    launches = []
    original_launch = gru_ops.launch

    def counting_launch(kernel, *args, **kwargs):
        launches.append(kernel)
        return original_launch(kernel, *args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference recurrence ran instead of the Triton kernels")

    reference_gru = reference.gru_recurrence
    monkeypatch.setattr(gru_ops, "launch", counting_launch)
    monkeypatch.setattr(reference, "gru_recurrence", no_reference)
    gates_x, w_hh, b_hh, h0, lengths = requiring_grad(make_inputs(5, 3, 20, torch.float64, with_lengths=True))
    h_seq = functional.gru_recurrence(gates_x, w_hh, b_hh, h0, lengths, True)
    assert type(h_seq.grad_fn).__name__.startswith("GRURecurrence")
    assert launches == [gru_ops.gru_forward_kernel]
    h_seq.sum().backward()
    assert launches == [gru_ops.gru_forward_kernel, gru_ops.gru_backward_kernel]
    with torch.no_grad():
        ref_h_seq = reference_gru(gates_x, w_hh, b_hh, h0, lengths, True)
    assert_close(h_seq, ref_h_seq, name="h_seq")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_gru_no_grad_forward_saves_no_gates_and_matches(monkeypatch, bias):
    saved_gates = []
    original_forward = functional.gru_forward

    def recording_forward(*args):
        h, gates = original_forward(*args)
        saved_gates.append(gates.numel())
        return h, gates

    monkeypatch.setattr(functional, "gru_forward", recording_forward)
    inputs = requiring_grad(make_inputs(5, 3, 20, torch.float32, bias, with_lengths=True))
    with torch.no_grad():
        h_seq = functional.gru_recurrence(*inputs)
    assert saved_gates == [0], "the no-grad forward allocated the gates it only needs for backward"
    train_h_seq = functional.gru_recurrence(*inputs)
    assert saved_gates[1] > 0
    assert torch.equal(h_seq, train_h_seq.detach())
    gates_x, w_hh, b_hh, h0, lengths = inputs
    ref_h_seq = reference.gru_recurrence(
        gates_x.double(), w_hh.double(), None if b_hh is None else b_hh.double(), h0.double(), lengths
    )
    assert_close(h_seq, ref_h_seq, name="h_seq")


@pytest.mark.parametrize(
    "reverse, with_lengths",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["forward", "reverse", "forward-lengths", "reverse-lengths"],
)
def test_gru_state_buffer_holds_initial_state_outputs_and_final_state(reverse, with_lengths):
    T, B, H = 5, 3, 7
    gates_x, w_hh, b_hh, h0, lengths = make_inputs(T, B, H, torch.float64, with_lengths=with_lengths)
    h, _ = gru_ops.gru_forward(gates_x, w_hh, b_hh, h0, lengths, reverse, True)
    ref_h_seq = reference.gru_recurrence(gates_x, w_hh, b_hh, h0, lengths, reverse)
    assert h.shape == (T + 1, B, H)
    assert torch.equal(h[initial_slot(T, reverse)], h0)
    assert_close(states_after(h, reverse), ref_h_seq, name="h buffer past the initial slot")
    # The state after the last step processed: each sequence's end state when lengths are given.
    assert_close(h[final_slot(T, reverse)], ref_h_seq[0 if reverse else -1], name="h buffer final slot")
