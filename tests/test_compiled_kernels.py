"""The GPU compiler's verdict on every kernel, checked without a GPU.

The interpreter runs the kernels' arithmetic but not the compiler: a ``tl.dot`` shape it rejects,
an unsupported cast or an operation that only fails to lower would surface only on a GPU. Triton
compiles for a named target with the ``ptxas`` it ships, so ``python -m bench.kernels`` compiles
each kernel in every dtype, with and without its optional inputs, with the plans of an H100/H200
(sm_90), an A100 (sm_80), an L40S (sm_89) and a T4 (sm_75), and checks that nothing spills to
local memory and that every program fits that GPU's shared memory.
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


@pytest.mark.parametrize("arch", [90, 80, 89, 75])
def test_every_kernel_compiles_without_spilling(tmp_path, arch):
    result = compile_in_subprocess(["-m", "bench.kernels", "--arch", str(arch), "--check"], tmp_path, 1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # The compile options name FMA fusion (launch.COMPILE_OPTIONS): left to Triton 3.9's default, it
    # warns at the first compile in every user's process that 3.10 will change it.
    assert "TRITON_DEFAULT_FP_FUSION" not in result.stderr, result.stderr[-4000:]
    rows = [line for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0] in CELLS]
    assert {row.split()[0] for row in rows} == set(CELLS), result.stdout
    assert len(rows) >= 20 and not any("FAILED" in row for row in rows), result.stdout


def test_reports_compile_the_shape_as_a_launch_specialises_it():
    # A launch marks integer arguments that are multiples of 16 as such and makes a 1 a constant;
    # compiled without that, the reports showed spills the launched kernels do not have.
    from bench.kernels import UNALIGNED, Variant, signature, shape_of
    from fused_rnn.ops import launch, recurrence

    for batch, hidden, constant, divisible in [(1, 768, {"B"}, {"H", "P"}), (16, 768, set(), {"B", "H", "P"}),
                                               (*UNALIGNED, set(), set())]:
        variant = Variant("lstm", "backward", "float16", "all", batch, hidden)
        plan = launch.gpu_plan(shape_of(variant), 132, backward=True)
        types, constants, marked = signature(variant, recurrence.backward_kernel, plan)
        assert {name for name in ("B", "H", "P") if constants.get(name) == 1} == constant
        assert marked & {"B", "H", "P"} == divisible
        # The partial-sum rows (where the backward sums parts) are padded to a multiple of 16 whatever the shape.
        assert {"partial_columns", "partial_proj_columns"} <= marked


@pytest.mark.parametrize("kernel, hidden, chain, product",
                         [("forward", 384, 4, (32, 16, 512)), ("backward", 768, 4, (16, 16, 3072))])
def test_small_blocks_split_their_reduction_over_the_warps(tmp_path, kernel, hidden, chain, product):
    # One tl.dot over all of K gave every warp the whole reduction, dependent matrix instructions
    # into one accumulator: 64 in the forward's (32, 1024) @ (1024, 16) (8-unit blocks at the
    # headline's size; at H=384 32 in its (32, 512) @ (512, 16)), 192 in the gathering
    # backward's (16, 3072) @ (3072, 16), the same on each of the 8 warps. Batched over the
    # pieces (recurrence.recurrent_matmul), a warp's chain is one piece's k-steps, and the warps
    # together do the product's multiply-adds once.
    from bench.kernels import multiply_adds
    from fused_rnn.ops.launch import COMPILE_OPTIONS

    script = ("from bench.kernels import Variant, compile_variant; "
              f"r = compile_variant(Variant('lstm', '{kernel}', 'float16', 'all', 16, {hidden}), 90); "
              "print(r.ok, r.spill_bytes, r.mma_chain, r.matrix_instructions, sep=',')")
    result = compile_in_subprocess(["-c", script], tmp_path, 600)
    assert result.returncode == 0, result.stderr[-4000:]
    ok, spill, longest, instructions = result.stdout.strip().splitlines()[-1].split(",")
    assert (ok, spill) == ("True", "0"), result.stdout
    assert 0 < int(longest) <= chain, result.stdout
    rows, batch, columns = product
    assert multiply_adds(instructions, COMPILE_OPTIONS["num_warps"]) == {"HMMA": rows * batch * columns}, result.stdout


def test_chains_follow_the_accumulator():
    # Two interleaved chains (each HMMA's last operand the previous one's result), a fresh one from
    # RZ, another instruction overwriting a result (the run starts again), an HGMMA (not counted).
    from bench.kernels import matrix_instructions, multiply_adds

    sass = """
        /*0100*/                   HMMA.16816.F32 R72, R80.reuse, R72, RZ ;
        /*0110*/                   HMMA.16816.F32 R80, R80, R182, RZ ;
        /*0120*/                   HMMA.16816.F32 R72, R76.reuse, R178, R72 ;
        /*0130*/                   HMMA.16816.F32 R76, R76, R186, R80 ;
        /*0140*/                   HMMA.16816.F32 R72, R68.reuse, R178, R72 ;
        /*0150*/                   HMMA.16816.F32 R4, R68, R178, RZ ;
        /*0160*/                   FADD R72, R72, R4 ;
        /*0170*/                   HMMA.16816.F32 R72, R68, R178, R72 ;
        /*0180*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4].tnspA, R24, gsb0 ;
        /*0190*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8].tnspA, R24 ;
    """
    summary, chain = matrix_instructions(sass)
    assert summary == "HGMMA.64x16x16 x2 HMMA.16816 x7" and chain == 3
    assert multiply_adds(summary, 8) == {"HGMMA": 2 * 64 * 16 * 16 * 2, "HMMA": 7 * 16 * 8 * 16 * 8}


def test_fresh_loads_leave_out_the_barriers_polls_and_the_check_refuses_narrow_ones():
    # Triton 3.6 read the headline forward's operand 2 bytes at a time: 64 loads a thread where 8
    # vectors of 16 bytes do. The barrier's poll (the acquire: CCTL.IVALL follows it) is not data,
    # though ptxas may use its address register for a data load elsewhere (R160 at 0x0100).
    from bench.kernels import GPUS, MULTIPLE_OF_8, UNALIGNED, Report, Variant, failures, fresh_loads

    sass = """
        /*0100*/               @P5 LDG.E.128.STRONG.GPU R28, desc[UR12][R160.64] ;
        /*0110*/               @P0 LDG.E.LTC128B.128.STRONG.GPU R32, desc[UR12][R136.64+0x100] ;
        /*0120*/              @!P3 LDG.E.U16.STRONG.GPU R85, desc[UR10][R62.64+0x40] ;
        /*0130*/                   LDG.E.128 R40, desc[UR12][R30.64] ;
        /*0140*/               @P1 MEMBAR.ALL.GPU ;
        /*0150*/               @P1 REDG.E.ADD.STRONG.GPU desc[UR12][R160.64], R17 ;
        /*0160*/                   LDG.E.STRONG.GPU R17, desc[UR12][R160.64] ;
        /*0170*/                   CCTL.IVALL ;
        /*0180*/                   LDG.E.STRONG.GPU R18, desc[UR12][R150.64] ;
    """
    assert fresh_loads(sass) == "128-bit x2 32-bit x1 16-bit x1"

    def report(shape, loads):
        return Report(Variant("lstm", "forward", "float16", "all", *shape), ok=True, plan="resident 1x48x1 B16xU16",
                      fresh_loads=loads)

    h100 = GPUS[90]
    assert failures(report((16, 768), "16-bit x64"), h100) == ["reads from L2 in 64 loads narrower than 16 bytes"]
    assert failures(report((16, 768), "128-bit x8 32-bit x1"), h100) == []
    assert failures(report(UNALIGNED, "16-bit x64"), h100) == []  # rows of H = 999 start anywhere
    # H = 1000 is a multiple of 8: the kernels say so (launch.alignment), and rows come in vectors.
    assert failures(report(MULTIPLE_OF_8, "16-bit x64"), h100) == ["reads from L2 in 64 loads narrower than 16 bytes"]


def test_the_check_refuses_more_shared_memory_than_the_gpu_gives_a_program():
    from bench.kernels import GPUS, Report, Variant, failures

    compiled = Report(Variant("lstm", "forward", "float16", "all", 16, 768), ok=True, plan="resident 1x96x1 B16xU8",
                      shared_bytes=120 * 1024, fresh_loads="128-bit x8")
    assert failures(compiled, GPUS[90]) == failures(compiled, GPUS[80]) == []
    assert failures(compiled, GPUS[89]) == [f"needs {120 * 1024} bytes of shared memory"]


@pytest.mark.parametrize("cell, kernel, plan, instructions, chain",
                         [("lstm", "forward", "resident 1x63x1", "HGMMA", 0),
                          ("gru", "backward", "resident gather", "HMMA", 4)])
def test_rows_of_a_multiple_of_8_are_read_in_vectors_and_batched(tmp_path, cell, kernel, plan, instructions, chain):
    # A launch marks only the multiples of 16 among its integers: at H = 1000 the forward read
    # h_{t-1} 2 bytes at a time (64 loads a thread) in one tl.dot, a chain of 64 HMMA, and the
    # GRU's gathering backward spilled 140 bytes a thread, so it summed parts. Told H and P are
    # multiples of 8 (ALIGNMENT_H, ALIGNMENT_P), they read 16-byte vectors, and the products run
    # as HGMMA (the forward's 64-row blocks) or in batched HMMA chains of a piece's k-steps.
    script = ("from bench.kernels import Variant, compile_variant; "
              f"r = compile_variant(Variant('{cell}', '{kernel}', 'float16', 'all', 16, 1000), 90); "
              "print(r.ok, r.spill_bytes, r.plan, r.matrix_instructions, r.mma_chain, r.fresh_loads, sep=',')")
    result = compile_in_subprocess(["-c", script], tmp_path, 600)
    assert result.returncode == 0, result.stderr[-4000:]
    ok, spill, planned, matrix, longest, loads = result.stdout.strip().splitlines()[-1].split(",")
    assert (ok, spill) == ("True", "0") and planned.startswith(plan), result.stdout
    assert matrix.startswith(instructions + ".") and int(longest) <= chain, result.stdout
    assert loads.startswith("128-bit") and len(loads.split()) == 2, result.stdout


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_a_step_issues_its_loads_before_the_product(tmp_path, kernel):
    # What the cell reads of its own does not depend on the product: loaded after it, it cost
    # the step one more L2 round trip. In the compiled headline (no options) every global load of
    # the time loop comes before the first matrix instruction (the forward's HGMMA, the backward's
    # HMMA); after it only the barrier's polls (.STRONG.GPU, like the operand's .cg loads) read
    # global memory.
    script = ("import re, bench.kernels as K; sass = []; disassemble = K._disassemble; "
              "K._disassemble = lambda cubin: sass.append(disassemble(cubin)) or sass[-1]; "
              f"r = K.compile_variant(K.Variant('lstm', '{kernel}', 'float16', 'none', 16, 768), 90); "
              "code = sass[0][re.search(r'\\bHG?MMA', sass[0]).start():]; "
              "print(r.ok, r.spill_bytes, len(re.findall(r'\\bLDG(?![.\\w]*STRONG)[.\\w]*', code)), sep=',')")
    result = compile_in_subprocess(["-c", script], tmp_path, 600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1] == "True,0,0", result.stdout


@pytest.mark.parametrize("cell, dtype", [("lstm", "float16"), ("gru", "bfloat16")])
def test_a_16_bit_backward_summing_parts_compiles(tmp_path, cell, dtype):
    # The backward that sums parts rounds its gate gradients to the weights' dtype before its
    # product by them (recurrence.write_partial): tl.dot takes operands of one dtype. Under the
    # interpreter both operands go to fp32 (DOT_UPCAST), and the subset that
    # test_every_kernel_compiles_without_spilling compiles sums parts only in fp32, tf32 and fp64:
    # only the compiler sees a 16-bit weight meet fp32 gate gradients. At H = 999 (UNALIGNED) rows
    # of H are not in vectors, so the backward sums parts.
    script = ("from bench.kernels import UNALIGNED, Variant, compile_variant; "
              f"r = compile_variant(Variant('{cell}', 'backward', '{dtype}', 'all', *UNALIGNED), 90); "
              "print(r.ok, r.plan, (r.error or '').splitlines()[:1], sep=',')")
    result = compile_in_subprocess(["-c", script], tmp_path, 600)
    assert result.returncode == 0, result.stderr[-4000:]
    ok, plan, error = result.stdout.strip().splitlines()[-1].split(",", 2)
    assert " parts " in f" {plan} ", result.stdout
    assert ok == "True", result.stdout
