"""``python -m bench.kernels``: compile every kernel variant for a GPU, without one, and report
what the compiler made of it.

Triton compiles ahead of time for a named target (``GPUTarget``) with the ``ptxas`` it ships, so
the GPU compiler's verdict - ``tl.dot`` shapes, registers, spills to local memory, shared memory,
which matrix instructions were emitted - is available on a machine without a GPU. That is what
the interpreter cannot check. Each variant is a (kernel, dtype, optional inputs, launch scheme)
with the block sizes ``kernel_options`` picks for a shape.

Run it with ``TRITON_INTERPRET`` unset. ``--check`` exits non-zero if any variant fails to compile
or spills. ``--json`` writes the table.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

DTYPES = {
    "float32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "float16": (torch.float16, False),
    "bfloat16": (torch.bfloat16, False),
    "float64": (torch.float64, False),
}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
# Buffers kept in the accumulator dtype (fp32, or fp64 for fp64), whatever the input dtype.
ACCUMULATOR_BUFFERS = {"c_ptr", "dh_carry_ptr", "dc_carry_ptr"}
# (batch, hidden) shapes whose block sizes are compiled: the headline's and a large batch.
SHAPES = [(16, 768), (256, 1024)]
# SMs of an H100 SXM: the persistent scheme's BLOCK_H depends on them (see kernel_options).
MULTIPROCESSORS = 132


@dataclass
class Variant:
    kernel: str
    dtype: str
    optional: str  # which optional inputs are present
    scheme: str
    batch: int
    hidden: int


@dataclass
class Report:
    variant: Variant
    ok: bool
    blocks: str = ""  # BLOCK_B x BLOCK_H x BLOCK_K
    registers: int = 0
    spill_bytes: int = 0  # bytes a thread spills to local memory: registers the compiler could not keep
    shared_bytes: int = 0
    matrix_instructions: str = ""  # e.g. "HMMA x96"; empty when none (fp64 multiplies and reduces)
    error: str = ""


def kernels():
    """``{name: (kernel, optional)}`` for the four kernels; ``optional`` lists the pointers a
    launch may leave None (the kernels' heuristics turn each into a flag)."""
    from fused_rnn.ops import gru, lstm

    return {
        "lstm_forward": (lstm.lstm_forward_kernel, {"w_hr_ptr", "h_raw_ptr", "lengths_ptr", "gates_ptr"}),
        "lstm_backward": (lstm.lstm_backward_kernel, {"w_hr_ptr", "grad_h_proj_ptr", "lengths_ptr"}),
        "gru_forward": (gru.gru_forward_kernel, {"b_hh_ptr", "lengths_ptr", "gates_ptr"}),
        "gru_backward": (gru.gru_backward_kernel, {"lengths_ptr"}),
    }


# Pointers only the LSTM projection uses; the stepwise scheme cannot run it.
PROJECTION_POINTERS = {"w_hr_ptr", "h_raw_ptr", "grad_h_proj_ptr"}


def variants(full: bool):
    """Every kernel in every dtype, with all optional inputs and with none, in both schemes
    (``full``), or the subset CI compiles: all optional inputs, persistent, plus one minimal."""
    for name in kernels():
        for dtype in DTYPES:
            for batch, hidden in SHAPES if full else SHAPES[:1]:
                for optional in ("all", "none"):
                    for scheme in ("persistent", "stepwise"):
                        keep = optional == "all" and scheme == "persistent"
                        if full or keep or (dtype == "float16" and optional == "none"):
                            yield Variant(name, dtype, optional, scheme, batch, hidden)


def signature(variant: Variant, heuristics, optional: set):
    """Triton types of the arguments and the values of the constexpr ones: the options
    ``kernel_options`` picks, None for absent pointers, and the flags the kernel's own
    ``heuristics`` derive from which pointers are None."""
    from fused_rnn.ops.launch import accumulator_dtype, kernel_options

    dtype, tf32 = DTYPES[variant.dtype]
    torch.backends.cudnn.allow_tf32 = tf32
    multiprocessors = MULTIPROCESSORS if variant.scheme == "persistent" else 0
    constants = kernel_options(dtype, variant.batch, variant.hidden, variant.hidden, multiprocessors)
    jit_function = heuristics.fn
    lstm_stepwise = variant.kernel.startswith("lstm") and variant.scheme == "stepwise"
    absent = {
        name for name in jit_function.arg_names
        if (variant.optional == "none" and name in optional)
        or (lstm_stepwise and name in PROJECTION_POINTERS)  # stepwise cannot run the projection
        or (variant.scheme == "stepwise" and name == "barrier_ptr")
    }
    arguments = {name: None if name in absent else object() for name in jit_function.arg_names}
    constants.update({name: None for name in absent})
    constants.update({flag: flag_of(arguments) for flag, flag_of in heuristics.values.items()})
    types = {}
    for name in jit_function.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name == "lengths_ptr":
            types[name] = "*i64"
        elif name == "barrier_ptr":
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = "*" + TRITON_TYPES[accumulator_dtype(dtype) if name in ACCUMULATOR_BUFFERS else dtype]
        else:
            types[name] = "i32"
    return types, constants


def compile_variant(variant: Variant, arch: int) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_rnn.ops.launch import COMPILE_OPTIONS

    heuristics, optional = kernels()[variant.kernel]
    jit_function = heuristics.fn
    types, constants = signature(variant, heuristics, optional)
    # Pointers from torch allocations are 16-byte aligned; the launches specialise on that too.
    alignment = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(jit_function.arg_names)
                 if types[name].startswith("*")}
    source = ASTSource(fn=jit_function, signature=types, constexprs=constants, attrs=alignment)
    blocks = "x".join(str(constants[name]) for name in ("BLOCK_B", "BLOCK_H", "BLOCK_K"))
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=COMPILE_OPTIONS)
    except Exception as error:  # noqa: BLE001 - every compiler failure is what this tool reports
        first_line = str(error).splitlines()[0][:300]
        return Report(variant, ok=False, blocks=blocks, error=f"{type(error).__name__}: {first_line}")
    registers, spill = _resource_usage(compiled.asm["ptx"], arch)
    return Report(variant, ok=True, blocks=blocks, registers=registers, spill_bytes=spill,
                  shared_bytes=compiled.metadata.shared,
                  matrix_instructions=_matrix_instructions(compiled.asm["cubin"]))


def _resource_usage(ptx: str, arch: int):
    """Registers, spill bytes (stores) and stack-frame bytes, from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as file:
        file.write(ptx)
        file.flush()
        report = subprocess.run([get_ptxas(arch).path, "-v", "--gpu-name", target, file.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spill


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _matrix_instructions(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([_tool("nvdisasm"), file.name], capture_output=True, text=True, check=True).stdout
    counts = {}
    for opcode in re.findall(r"\b([HQ]GMMA|HMMA|DMMA)\b", sass):
        counts[opcode] = counts.get(opcode, 0) + 1
    return " ".join(f"{opcode} x{count}" for opcode, count in sorted(counts.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--all", action="store_true", help="every variant (default: the subset CI compiles)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a variant fails to compile or spills")
    parser.add_argument("--json", help="write the reports to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")

    reports = [compile_variant(variant, args.arch) for variant in variants(args.all)]
    print(f"{'kernel':14} {'dtype':9} {'optional':8} {'scheme':10} {'B':>4} {'H':>5} {'blocks':>9} {'regs':>4} "
          f"{'spill':>5} {'shared':>6}  matrix")
    for report in reports:
        v = report.variant
        row = f"{v.kernel:14} {v.dtype:9} {v.optional:8} {v.scheme:10} {v.batch:4} {v.hidden:5} {report.blocks:>9} "
        if report.ok:
            row += f"{report.registers:4} {report.spill_bytes:5} {report.shared_bytes:6}  "
            row += report.matrix_instructions or "-"
        else:
            row += f"FAILED: {report.error}"
        print(row)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"arch": args.arch, "reports": [asdict(report) for report in reports]}, file, indent=1)
    failed = [r for r in reports if not r.ok or r.spill_bytes]
    if args.check and failed:
        print(f"{len(failed)} variant(s) failed to compile or spill", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
