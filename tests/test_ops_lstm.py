"""``LSTMRecurrence`` (the Triton kernels) against ``reference.lstm_recurrence`` in float64.

The recurrence is called through ``functional.lstm_recurrence``, which hands tensors the kernels
can take (CUDA, or CPU under ``TRITON_INTERPRET=1``) to ``LSTMRecurrence``;
``test_lstm_recurrence_runs_triton_kernels`` checks that it really does.
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
from fused_rnn.ops import lstm as lstm_ops
from fused_rnn.ops.launch import final_slot, initial_slot, states_after

# (T, B, H, P): P is proj_size or None. Sizes are odd on purpose: H=70 spans two hidden tiles and
# P=65 two projection tiles, B=67 two batch tiles (the interpreter's tiles are 64 wide).
SHAPES = [
    (5, 3, 20, None),
    (4, 1, 1, None),
    (5, 3, 7, None),
    (3, 3, 70, None),
    (3, 67, 7, None),
    (5, 3, 20, 7),
    (4, 3, 7, 1),
    (3, 3, 70, 65),
    (3, 67, 20, 7),
]
# Every shape runs in float32; these run in the other dtypes too. bfloat16 only on small shapes: at
# H=70 or B=67 its weight gradients miss the 2e-2 tolerance by rounding alone. PyTorch's own
# bfloat16 autograd through the reference comes within 2e-4 of it there, and the Triton
# interpreter casts fp32 to bfloat16 by truncation (not round-to-nearest), doubling each store's
# error. float16 covers the same upcast tl.dot path on every shape.
LOW_AND_DOUBLE_PRECISION_CASES = [
    (shape, dtype)
    for shape in [(5, 3, 20, None), (4, 1, 1, None), (3, 3, 70, None), (3, 67, 7, None), (3, 3, 70, 65)]
    for dtype in [torch.float64, torch.float16]
] + [((5, 3, 20, None), torch.bfloat16), ((4, 1, 1, None), torch.bfloat16), ((4, 3, 7, 1), torch.bfloat16)]


@pytest.fixture(autouse=True)
def exact_fp32(monkeypatch):
    # On a GPU, fp32 would otherwise run in TF32; the fp32 tolerance assumes IEEE products.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def shape_id(shape):
    T, B, H, P = shape
    return f"T{T}-B{B}-H{H}" + (f"-P{P}" if P else "")


def case_id(shape, dtype, reverse=False, with_lengths=False):
    parts = [shape_id(shape), str(dtype).removeprefix("torch.")]
    return "-".join(parts + (["reverse"] if reverse else []) + (["lengths"] if with_lengths else []))


def make_inputs(T, B, H, P, dtype, with_lengths=False):
    """Random ``(gates_x, w_hh, w_hr, h0, c0, lengths)``; weights scaled by 1/sqrt(fan-in) so the
    gates stay away from saturation and every gradient is sizeable."""
    features = P or H

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(KERNEL_DEVICE, dtype)

    gates_x = randn(T, B, 4 * H)
    w_hh = randn(4 * H, features, scale=1 / math.sqrt(features))
    w_hr = randn(P, H, scale=1 / math.sqrt(H)) if P else None
    h0 = randn(B, features)
    c0 = randn(B, H)
    lengths = random_lengths(T, B) if with_lengths else None
    return gates_x, w_hh, w_hr, h0, c0, lengths


def check_against_reference(shape, dtype, reverse, with_lengths):
    """Forward outputs and every input gradient, under a random upstream gradient on both outputs."""
    T, B, H, P = shape
    gates_x, w_hh, w_hr, h0, c0, lengths = requiring_grad(make_inputs(T, B, H, P, dtype, with_lengths))
    h_seq, c_n = functional.lstm_recurrence(gates_x, w_hh, w_hr, h0, c0, lengths, reverse)
    grad_h_seq, grad_c_n = torch.randn_like(h_seq), torch.randn_like(c_n)
    grads = torch.autograd.grad(
        (h_seq, c_n), float_inputs((gates_x, w_hh, w_hr, h0, c0)), (grad_h_seq, grad_c_n)
    )

    ref_inputs = [
        x.detach().double().requires_grad_() if x is not None and x.is_floating_point() else x
        for x in (gates_x, w_hh, w_hr, h0, c0, lengths)
    ]
    ref_h_seq, ref_c_n = reference.lstm_recurrence(*ref_inputs, reverse=reverse)
    ref_grads = torch.autograd.grad(
        (ref_h_seq, ref_c_n), float_inputs(ref_inputs), (grad_h_seq.double(), grad_c_n.double())
    )

    assert h_seq.dtype == dtype and c_n.dtype == dtype
    assert_close(h_seq, ref_h_seq, dtype, name="h_seq")
    assert_close(c_n, ref_c_n, dtype, name="c_n")
    names = ["grad gates_x", "grad W_hh"] + (["grad W_hr"] if P else []) + ["grad h0", "grad c0"]
    for name, grad, ref_grad in zip(names, grads, ref_grads, strict=True):
        assert grad.dtype == dtype, name
        assert_close(grad, ref_grad, dtype, name=name)


@pytest.mark.parametrize(
    "shape, dtype",
    [pytest.param(s, torch.float32, id=case_id(s, torch.float32)) for s in SHAPES]
    + [pytest.param(s, d, id=case_id(s, d)) for s, d in LOW_AND_DOUBLE_PRECISION_CASES],
)
def test_lstm_output_and_grads_match_reference(shape, dtype):
    check_against_reference(shape, dtype, reverse=False, with_lengths=False)


@pytest.mark.parametrize(
    "shape, reverse, with_lengths",
    [pytest.param(s, True, True, id=case_id(s, torch.float32, True, True)) for s in SHAPES]
    + [
        pytest.param(s, r, n, id=case_id(s, torch.float32, r, n))
        for s in [(5, 3, 20, None), (3, 67, 7, None), (3, 3, 70, 65)]
        for r, n in [(True, False), (False, True)]
    ],
)
def test_lstm_output_and_grads_match_reference_reverse_and_lengths(shape, reverse, with_lengths):
    check_against_reference(shape, torch.float32, reverse, with_lengths)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        pytest.param(s, d, id=case_id(s, d, True, True))
        for s, d in [
            ((5, 3, 20, 7), torch.float64),
            ((5, 3, 20, 7), torch.float16),
            ((5, 3, 20, 7), torch.bfloat16),
            ((5, 3, 20, None), torch.bfloat16),
        ]
    ],
)
def test_lstm_output_and_grads_match_reference_reverse_with_lengths_per_dtype(shape, dtype):
    check_against_reference(shape, dtype, reverse=True, with_lengths=True)


@pytest.mark.parametrize("scheme", ["persistent", "stepwise"])
@pytest.mark.parametrize(
    "shape, reverse, with_lengths",
    [
        pytest.param((3, 3, 70, None), False, False, id=case_id((3, 3, 70, None), torch.float32)),
        pytest.param((3, 3, 70, None), True, True, id=case_id((3, 3, 70, None), torch.float32, True, True)),
        pytest.param((3, 67, 7, None), True, True, id=case_id((3, 67, 7, None), torch.float32, True, True)),
        pytest.param((3, 3, 70, 65), True, True, id=case_id((3, 3, 70, 65), torch.float32, True, True)),
    ],
)
def test_lstm_launch_scheme_matches_reference(monkeypatch, scheme, shape, reverse, with_lengths):
    monkeypatch.setenv("FUSED_RNN_SCHEME", scheme)
    check_against_reference(shape, torch.float32, reverse, with_lengths)


@pytest.mark.parametrize(
    "scheme, proj, grids",
    [
        # T=4, B=3 (one batch tile), H=70 (two hidden tiles).
        pytest.param("persistent", False, [(1, 1)], id="persistent-one-launch"),
        pytest.param("stepwise", False, [(1, 2)] * 4, id="stepwise-one-launch-per-step"),
        pytest.param("stepwise", True, [(1, 1)], id="stepwise-with-proj-runs-persistent"),
    ],
)
def test_lstm_launch_scheme_sets_launches_and_grid(monkeypatch, scheme, proj, grids):
    monkeypatch.setenv("FUSED_RNN_SCHEME", scheme)
    forward = CountingKernel(lstm_ops.lstm_forward_kernel)
    backward = CountingKernel(lstm_ops.lstm_backward_kernel)
    monkeypatch.setattr(lstm_ops, "lstm_forward_kernel", forward)
    monkeypatch.setattr(lstm_ops, "lstm_backward_kernel", backward)
    gates_x, w_hh, w_hr, h0, c0, _ = requiring_grad(make_inputs(4, 3, 70, 20 if proj else None, torch.float32))
    h_seq, c_n = functional.lstm_recurrence(gates_x, w_hh, w_hr, h0, c0)
    upstream = (torch.randn_like(h_seq), torch.randn_like(c_n))
    torch.autograd.grad((h_seq, c_n), float_inputs((gates_x, w_hh, w_hr, h0, c0)), upstream)
    assert forward.grids == grids
    assert backward.grids == grids


@pytest.mark.parametrize(
    "proj, reverse, with_lengths",
    [
        pytest.param(False, False, False, id="plain"),
        pytest.param(True, False, False, id="proj"),
        pytest.param(False, True, True, id="reverse-lengths"),
        pytest.param(True, True, True, id="proj-reverse-lengths"),
    ],
)
def test_lstm_gradcheck(proj, reverse, with_lengths):
    T, B, H = 3, 2, 3
    gates_x, w_hh, w_hr, h0, c0, lengths = make_inputs(
        T, B, H, 2 if proj else None, torch.float64, with_lengths
    )
    assert gradcheck_through_one_input(
        lambda *inputs: functional.lstm_recurrence(*inputs, reverse), (gates_x, w_hh, w_hr, h0, c0, lengths)
    )


@pytest.mark.skipif(not KERNELS_RUN, reason="needs CUDA or TRITON_INTERPRET=1")
def test_lstm_recurrence_runs_triton_kernels(monkeypatch):
    launches = []
    original_launch = lstm_ops.launch

    def counting_launch(kernel, *args, **kwargs):
        launches.append(kernel)
        return original_launch(kernel, *args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference recurrence ran instead of the Triton kernels")

    reference_lstm = reference.lstm_recurrence
    monkeypatch.setattr(lstm_ops, "launch", counting_launch)
    monkeypatch.setattr(reference, "lstm_recurrence", no_reference)
    gates_x, w_hh, w_hr, h0, c0, lengths = requiring_grad(make_inputs(5, 3, 20, 7, torch.float64, with_lengths=True))
    h_seq, c_n = functional.lstm_recurrence(gates_x, w_hh, w_hr, h0, c0, lengths, True)
    assert type(h_seq.grad_fn).__name__.startswith("LSTMRecurrence")
    assert launches == [lstm_ops.lstm_forward_kernel]
    (h_seq.sum() + c_n.sum()).backward()
    assert launches == [lstm_ops.lstm_forward_kernel, lstm_ops.lstm_backward_kernel]
    with torch.no_grad():
        ref_h_seq, ref_c_n = reference_lstm(gates_x, w_hh, w_hr, h0, c0, lengths, True)
    assert_close(h_seq, ref_h_seq, name="h_seq")
    assert_close(c_n, ref_c_n, name="c_n")


@pytest.mark.parametrize("proj", [False, True], ids=["no-proj", "proj"])
def test_lstm_no_grad_forward_saves_no_gates_and_matches(monkeypatch, proj):
    saved_gates = []
    original_forward = functional.lstm_forward

    def recording_forward(*args):
        h, c, h_raw, gates = original_forward(*args)
        saved_gates.append(gates.numel())
        return h, c, h_raw, gates

    monkeypatch.setattr(functional, "lstm_forward", recording_forward)
    inputs = requiring_grad(make_inputs(5, 3, 20, 7 if proj else None, torch.float32, with_lengths=True))
    with torch.no_grad():
        h_seq, c_n = functional.lstm_recurrence(*inputs)
    assert saved_gates == [0], "the no-grad forward allocated the gates it only needs for backward"
    train_h_seq, train_c_n = functional.lstm_recurrence(*inputs)
    assert saved_gates[1] > 0
    assert torch.equal(h_seq, train_h_seq.detach())
    assert torch.equal(c_n, train_c_n.detach())
    gates_x, w_hh, w_hr, h0, c0, lengths = inputs
    ref_h_seq, ref_c_n = reference.lstm_recurrence(
        gates_x.double(), w_hh.double(), None if w_hr is None else w_hr.double(), h0.double(), c0.double(), lengths
    )
    assert_close(h_seq, ref_h_seq, name="h_seq")
    assert_close(c_n, ref_c_n, name="c_n")


@pytest.mark.parametrize(
    "reverse, with_lengths, P",
    [(False, False, None), (True, False, None), (False, True, 4), (True, True, 4)],
    ids=["forward", "reverse", "forward-lengths-proj", "reverse-lengths-proj"],
)
def test_lstm_state_buffers_hold_initial_state_outputs_and_final_cell_state(reverse, with_lengths, P):
    T, B, H = 5, 3, 7
    gates_x, w_hh, w_hr, h0, c0, lengths = make_inputs(T, B, H, P, torch.float64, with_lengths)
    h, c, _, _ = lstm_ops.lstm_forward(gates_x, w_hh, w_hr, h0, c0, lengths, reverse, True)
    ref_h_seq, ref_c_n = reference.lstm_recurrence(gates_x, w_hh, w_hr, h0, c0, lengths, reverse)
    assert h.shape == (T + 1, B, P or H) and c.shape == (T + 1, B, H)
    assert c.dtype == torch.float64
    assert torch.equal(h[initial_slot(T, reverse)], h0)
    assert torch.equal(c[initial_slot(T, reverse)], c0)
    assert_close(states_after(h, reverse), ref_h_seq, name="h buffer past the initial slot")
    assert_close(c[final_slot(T, reverse)], ref_c_n, name="c buffer final slot")
    _, c_n = functional.lstm_recurrence(gates_x, w_hh, w_hr, h0, c0, lengths, reverse)
    assert_close(c_n, ref_c_n, name="c_n")
