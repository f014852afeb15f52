"""Comparison helpers shared by the tests."""

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

# What the Triton kernels run on here: CUDA when present, CPU under the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_RUN = torch.cuda.is_available() or interpreting()


def assert_close(actual, expected, dtype=None, name="tensor", tolerance=None):
    """Compare ``actual`` with a (float64) ``expected``; report the worst element on failure."""
    rtol, atol = tolerance or TOLERANCES[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert not torch.isnan(a).any() or torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: unexpected NaN"
    excess = (a - e).abs() - (atol + rtol * e.abs())
    if excess.numel() and excess.max() > 0:
        index = tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))
        raise AssertionError(
            f"{name}: worst element {index}: got {a[index].item():.6g}, expected {e[index].item():.6g} "
            f"(|diff| {abs(a[index] - e[index]).item():.3g}, rtol {rtol}, atol {atol})"
        )


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
