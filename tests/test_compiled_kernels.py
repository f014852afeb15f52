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
