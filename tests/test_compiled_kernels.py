"""The GPU compiler's verdict on every kernel, checked without a GPU.

The interpreter runs the kernels' arithmetic but not the compiler: a ``tl.dot`` shape it rejects,
an unsupported cast or an operation that only fails to lower would surface only on a GPU. Triton
compiles for a named target with the ``ptxas`` it ships, so ``python -m bench.kernels`` compiles
each kernel for sm_90 (H100/H200) in every dtype, with and without its optional inputs, and
checks that nothing spills to local memory.
"""

import os
import subprocess
import sys

import pytest

from bench.kernels import CELLS


def compile_in_subprocess(arguments, tmp_path, timeout):
    """Run ``python arguments`` from the checkout with the interpreter off (it does not compile) and
    an empty Triton cache, so that the kernels are compiled for real."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)), timeout=timeout)


def test_every_kernel_compiles_for_sm90_without_spilling(tmp_path):
    result = compile_in_subprocess(["-m", "bench.kernels", "--arch", "90", "--check"], tmp_path, 1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0] in CELLS]
    assert {row.split()[0] for row in rows} == set(CELLS), result.stdout
    assert len(rows) >= 20 and not any("FAILED" in row for row in rows), result.stdout


def test_reports_compile_the_shape_as_a_launch_specialises_it():
    # A launch marks integer arguments that are multiples of 16 as such and makes a 1 a constant;
    # compiled without that, the reports showed spills the launched kernels do not have.
    from bench.kernels import Variant, signature, shape_of
    from fused_rnn.ops import launch, recurrence

    for batch, hidden, constant, divisible in [(1, 768, {"B"}, {"H", "P"}), (16, 768, set(), {"B", "H", "P"}),
                                               (5, 1000, set(), set())]:
        variant = Variant("lstm", "backward", "float16", "all", batch, hidden)
        plan = launch.gpu_plan(shape_of(variant), 132, backward=True)
        types, constants, marked = signature(variant, recurrence.backward_kernel, plan)
        assert {name for name in ("B", "H", "P") if constants.get(name) == 1} == constant
        assert marked & {"B", "H", "P"} == divisible
        # The partial-sum rows (where the backward sums parts) are padded to a multiple of 16 whatever the shape.
        assert {"partial_columns", "partial_proj_columns"} <= marked


@pytest.mark.parametrize("kernel, chain, matrix", [("forward", 8, "HMMA x32"), ("backward", 24, "HMMA x48")])
def test_headline_products_split_their_reduction_over_the_warps(tmp_path, kernel, chain, matrix):
    # One tl.dot over all of K gave every warp the whole reduction, dependent matrix instructions
    # into one accumulator: 60 in the forward's (32, 1024) @ (1024, 16), 163 in the gathering
    # backward's (16, 3072) @ (3072, 16), the same on each of the 8 warps. Batched over the
    # pieces (recurrence.recurrent_matmul), a warp's chain is one piece's k-steps.
    from fused_rnn.ops.launch import SEVERAL_GROUPS

    if kernel == "backward" and not SEVERAL_GROUPS:
        pytest.skip("this Triton spills blocks in several batched groups: the backward keeps one tl.dot (launch.SEVERAL_GROUPS)")
    script = ("from bench.kernels import Variant, compile_variant; "
              f"r = compile_variant(Variant('lstm', '{kernel}', 'float16', 'all', 16, 768), 90); "
              "print(r.ok, r.spill_bytes, r.mma_chain, r.matrix_instructions, sep=',')")
    result = compile_in_subprocess(["-c", script], tmp_path, 600)
    assert result.returncode == 0, result.stderr[-4000:]
    ok, spill, longest, instructions = result.stdout.strip().splitlines()[-1].split(",")
    assert (ok, spill) == ("True", "0"), result.stdout
    assert 0 < int(longest) <= chain and instructions == matrix, result.stdout
