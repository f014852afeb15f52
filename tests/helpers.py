"""Comparison helpers shared by the tests."""

import math

import torch

from fused_rnn.ops.launch import interpreting

# (rtol, atol) of a result computed in a dtype, compared with a float64 reference.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
TF32_TOLERANCE = (1e-3, 1e-3)
# Whose results are bounded by the error of the same math in their dtype (``assert_close``).
HALF_DTYPES = (torch.float16, torch.bfloat16)

# What the Triton kernels run on here: CUDA when present, CPU under the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUN = torch.cuda.is_available() or interpreting()


def assert_close(actual, expected, dtype=None, name="tensor", tolerance=None, same_math=None):
    """Compare ``actual`` with a (float64) ``expected``; report the worst element on failure.

    ``same_math`` is the same computation done in ``actual``'s precision by another implementation
    (the reference layer, torch.nn, cuDNN). Where it is given, the bound is on the tensor's worst
    error: at most twice ``same_math``'s, plus ``rtol`` of the tensor's largest magnitude, plus
    ``atol``. An elementwise bound is missed by rounding alone where a weight gradient's sum
    cancels to a small value (in fp32 too at B*T in the thousands: torch's own fp32 CPU LSTM at
    B=16 T=64 H=768 misses 1e-5 by 1.4x), or where relu's derivative flips at a rounded 0: any
    computation in that precision is off by more than ``rtol`` of itself there (mamba's tests
    bound theirs the same way). Half precision always takes it (``HALF_DTYPES``)."""
    rtol, atol = tolerance or TOLERANCES[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.equal(a.isnan(), e.isnan()), f"{name}: NaN where the expected value is not, or the other way"
    if not e.numel():
        return
    if same_math is None:
        allowed = atol + rtol * e.abs()
        bound = f"rtol {rtol}, atol {atol}"
    else:
        theirs = worst_error(same_math, e)
        assert math.isfinite(theirs), f"{name}: the same math is off by {theirs}"
        largest = e.nan_to_num(nan=0, posinf=0, neginf=0).abs().max().item()
        allowed = 2 * theirs + rtol * largest + atol
        bound = f"allowed {allowed:.3g}: twice the same math's {theirs:.3g}, rtol {rtol} of the largest, atol {atol}"
    # Equal infinities and NaNs where they are expected match; their difference would be NaN.
    excess = ((a - e).abs() - allowed).masked_fill((a == e) | e.isnan(), 0)
    if excess.max() > 0:
        index = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{name}: worst element {index}: got {a[index].item():.6g}, expected {e[index].item():.6g} "
            f"(|diff| {abs(a[index] - e[index]).item():.3g}, {bound})"
        )


def worst_error(actual, expected):
    """The largest elementwise difference of ``actual`` from a (float64) ``expected``."""
    expected = expected.detach().double().cpu()
    difference = (actual.detach().double().cpu() - expected).abs().masked_fill(expected.isnan(), 0)
    return difference.max().item()


def random_lengths(T, B):
    """Lengths in [1, T] with a row of length T and (when B > 1) a row of length 1."""
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T if B > 1 else max(1, T - 2)
    if B > 1:
        lengths[-1] = 1
    return lengths.to(KERNEL_DEVICE)


def float_inputs(inputs):
    """The floating-point tensors among ``inputs`` (those that get gradients)."""
    return [x for x in inputs if x is not None and x.is_floating_point()]


def requiring_grad(inputs):
    """``inputs`` with every floating-point tensor set to require grad (in place)."""
    for x in float_inputs(inputs):
        x.requires_grad_()
    return inputs


def gradcheck_through_one_input(fn, inputs, check=torch.autograd.gradcheck):
    """``gradcheck`` of ``fn(*inputs)`` w.r.t. every floating-point input (``None`` stays ``None``);
    ``check=torch.autograd.gradgradcheck`` checks the second derivatives instead.

    The inputs travel as one flat tensor: fast-mode gradcheck then needs two forward runs in all
    instead of two per tensor, which is what keeps it affordable under the interpreter.
    """
    parts = float_inputs(inputs)
    flat = torch.cat([x.detach().flatten() for x in parts]).requires_grad_()

    def fn_of_flat(flat):
        pieces = iter(x.view_as(part) for x, part in zip(flat.split([p.numel() for p in parts]), parts))
        return fn(*[next(pieces) if x is not None and x.is_floating_point() else x for x in inputs])

    return check(fn_of_flat, (flat,), fast_mode=True)


class CountingKernel:
    """Stands in for a Triton kernel and records the grid of every launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]
