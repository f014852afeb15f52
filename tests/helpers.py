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
