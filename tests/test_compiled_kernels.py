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

from bench.kernels import CELLS


def test_every_kernel_compiles_for_sm90_without_spilling(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    result = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--arch", "90", "--check"],
        capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=1800,
    )
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
