"""The benchmark harness behind ``python -m bench``: configs, agreement check, timing, rows, files.

A config is a module shape (cell, batch, seq, hidden, input, layers, bidirectional), a dtype and
a mode. For each config ``run_config``

1. builds ``torch.nn.LSTM`` / ``nn.GRU`` and the fused module with the same weights,
2. checks that both agree: outputs and final states, and in ``forward_backward`` also the input
   and weight gradients. A config that disagrees (or raises) is reported and not timed;
3. times both: ``triton.testing.do_bench`` (median) on a GPU, ``time.perf_counter`` in turns
   (median) on the CPU; on a GPU also the peak memory of one call;

and returns one result row. Without CUDA the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``, which must be set before triton is first imported: ``bench.__main__``
does it). Those times measure the interpreter, not the kernels. Without the interpreter
(``python -m bench --cpu``) CPU tensors take fused_rnn's CPU path, PyTorch's native RNN operator,
and the times compare it with torch.nn.
"""

import contextlib
import dataclasses
import datetime
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import triton
import triton.testing
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from bench import MODES, PACKED_MODES, text_table
import fused_rnn
from fused_rnn.ops.launch import interpreting

try:
    from tqdm import tqdm
except ImportError:  # the bench extra is missing (the lent GPU machines reach no registry): no bar
    tqdm = None

CELLS = ("lstm", "gru")
DTYPES = ("float32", "float16", "bfloat16")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CPU_DEVICE = "cpu (Triton interpreter)"
NATIVE_SCHEME = "native (PyTorch's RNN operator on the CPU)"

# Largest accepted max |ours - torch| / max |torch| over each compared tensor. fp32 runs as TF32
# on a GPU (as cuDNN runs it), which is why its tolerance is loose.
TOLERANCE = {"float32": 1e-2, "float16": 5e-2, "bfloat16": 5e-2}

# Keys of a result row, in order; "correct" follows them.
ROW_KEYS = (
    "cell", "batch", "seq", "hidden", "input", "layers", "bidirectional", "dtype", "mode",
    "ours_ms", "cudnn_ms", "speedup", "ours_peak_mb", "cudnn_peak_mb",
)
HEADER_KEYS = ("device", "torch", "triton", "cudnn", "scheme", "rows")
MiB = 2**20
# Seconds of timing turns per config on the CPU path (python -m bench --cpu).
CPU_BUDGET_S = 4.0
CPU_PLOT_NOTE = "CPU, Triton interpreter: these times say nothing about speed"


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark setup; its field names are the first keys of a result row."""

    cell: str
    batch: int
    seq: int
    hidden: int
    input: int
    layers: int
    bidirectional: bool
    dtype: str
    mode: str

    def label(self) -> str:
        """Short name of the shape, e.g. ``lstm B16 T512 H768`` (``I..``, ``L2``, ``bi`` when they apply)."""
        parts = [self.cell, f"B{self.batch}", f"T{self.seq}", f"H{self.hidden}"]
        if self.input != self.hidden:
            parts.append(f"I{self.input}")
        if self.layers != 1:
            parts.append(f"L{self.layers}")
        if self.bidirectional:
            parts.append("bi")
        return " ".join(parts)


CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(Config))


@dataclasses.dataclass(frozen=True)
class Axes:
    """The values each config field takes; the configs are their Cartesian product.

    ``inputs=None`` means input size = hidden size. The defaults are the performance issue's grid.
    """

    cells: tuple = CELLS
    batches: tuple = (1, 16, 64, 256)
    hiddens: tuple = (256, 768, 1024)
    seqs: tuple = (512,)
    inputs: Optional[tuple] = None
    layers: tuple = (1,)
    bidirectional: tuple = (False,)
    dtypes: tuple = DTYPES
    modes: tuple = MODES

    def configs(self) -> list:
        """Every combination, ordered by dtype, mode, cell, then the shape."""
        product = itertools.product(
            self.dtypes, self.modes, self.cells, self.layers, self.bidirectional, self.seqs,
            self.hiddens, self.batches,
        )
        return [
            Config(cell, batch, seq, hidden, size, layers, bidirectional, dtype, mode)
            for dtype, mode, cell, layers, bidirectional, seq, hidden, batch in product
            for size in (self.inputs or (hidden,))
        ]


PRESETS = {
    # cell x batch x hidden x dtype x mode at T=512: 2 * 4 * 3 * 3 * 2 = 144 configs.
    "grid": Axes(),
    # The headline: LSTM B=16, T=1024, H=768 in fp16 and bf16, both modes.
    "headline": Axes(cells=("lstm",), batches=(16,), hiddens=(768,), seqs=(1024,), dtypes=("float16", "bfloat16")),
    # What runs without a GPU, in Triton's interpreter.
    "smoke": Axes(batches=(2,), hiddens=(16,), seqs=(4,), dtypes=("float32",)),
    # The CPU path (PyTorch's native operator) against torch.nn, fp32; CPU_LARGE is appended.
    "cpu": Axes(batches=(16,), hiddens=(128,), seqs=(100,), dtypes=("float32",)),
}
# Appended to the grid: 2 layers, bidirectional, B=64, H=768, every cell, dtype and mode (12 configs).
DEEP = Axes(batches=(64,), hiddens=(768,), layers=(2,), bidirectional=(True,))
# Appended to the CPU run: B=64, T=200, H=256, both cells and modes (4 configs).
CPU_LARGE = Axes(batches=(64,), hiddens=(256,), seqs=(200,), dtypes=("float32",))
APPENDED = {"grid": DEEP, "cpu": CPU_LARGE}
SHAPE_AXES = frozenset({"batches", "hiddens", "inputs", "layers", "bidirectional"})
# The CPU path is expected within this factor of torch.nn's time (it runs the same operator).
CPU_RATIO_GOAL = 1.05


def select_configs(preset: str = "grid", **overrides) -> list:
    """The configs of ``preset`` ("grid", "headline", "smoke" or "cpu") with axes replaced by ``overrides``.

    ``overrides`` are ``Axes`` fields; ``None`` values are ignored. The grid also holds the
    2-layer bidirectional ``DEEP`` configs, the CPU run the ``CPU_LARGE`` ones (``APPENDED``):
    they follow overrides of cells, seqs, dtypes and modes, and are left out once a shape axis
    (batches, hiddens, inputs, layers, bidirectional) is given.
    """
    overrides = {name: tuple(values) for name, values in overrides.items() if values is not None}
    configs = dataclasses.replace(PRESETS[preset], **overrides).configs()
    if preset in APPENDED and not SHAPE_AXES & overrides.keys():
        configs += dataclasses.replace(APPENDED[preset], **overrides).configs()
    return configs


def build_modules(config: Config, device: str):
    """``(torch module, fused module)`` for ``config`` on ``device``, the fused one loaded with the other's weights."""
    kwargs = dict(
        input_size=config.input, hidden_size=config.hidden, num_layers=config.layers,
        bidirectional=config.bidirectional, device=device, dtype=getattr(torch, config.dtype),
    )
    torch_cls, fused_cls = {"lstm": (torch.nn.LSTM, fused_rnn.LSTM), "gru": (torch.nn.GRU, fused_rnn.GRU)}[config.cell]
    reference, fused = torch_cls(**kwargs), fused_cls(**kwargs)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def make_inputs(config: Config, device: str):
    """Input ``x (T, B, input)`` (requiring grad) and the fixed upstream gradient ``(T, B, D*H)`` of the output.

    In the packed modes ``x`` is a ``PackedSequence`` of ``batch`` sequences of random lengths
    from ``T / 2`` to ``T`` (the longest ``T``), unsorted, whose data requires grad, and the
    upstream gradient has the shape of the packed output's data."""
    dtype = getattr(torch, config.dtype)
    features = config.hidden * (2 if config.bidirectional else 1)
    x = torch.randn(config.seq, config.batch, config.input, device=device, dtype=dtype,
                    requires_grad=not packed(config.mode))
    if packed(config.mode):
        lengths = torch.randint(max(1, config.seq // 2), config.seq + 1, (config.batch,))
        lengths[0] = config.seq
        sequence = pack_padded_sequence(x, lengths, enforce_sorted=False)
        x = sequence._replace(data=sequence.data.requires_grad_())
        return x, torch.randn(x.data.shape[0], features, device=device, dtype=dtype)
    upstream = torch.randn(config.seq, config.batch, features, device=device, dtype=dtype)
    return x, upstream


def packed(mode: str) -> bool:
    """Whether ``mode`` feeds a ``PackedSequence``; it times what ``mode`` without "packed_" times."""
    return mode in PACKED_MODES


def leaf(x) -> torch.Tensor:
    """The tensor a config's input gradient goes to: ``x``, or a ``PackedSequence``'s data."""
    return x.data if isinstance(x, PackedSequence) else x


def output_tensor(output) -> torch.Tensor:
    """A module's output as a tensor: a ``PackedSequence``'s data."""
    return output.data if isinstance(output, PackedSequence) else output


def step(module, x, upstream, mode: str) -> Callable[[], None]:
    """What is timed: the forward under ``no_grad``; forward + backward of ``sum(output * upstream)``;
    or a gradient penalty: that backward with ``create_graph=True``, then the backward of
    ``|grad x|^2`` into the weights (second derivatives; see ``gradient_penalty``)."""
    if mode in ("forward", "packed_forward"):
        def forward():
            with torch.no_grad():
                module(x)
        return forward
    if mode == "gradient_penalty":
        return lambda: gradient_penalty(module, x, upstream)[-1].backward()

    def forward_backward():
        output_tensor(module(x)[0]).backward(upstream)
    return forward_backward


def gradient_penalty(module, x, upstream):
    """``(output, state, grad x, penalty)``: ``grad x`` of ``sum(output * upstream)`` with a graph,
    and ``penalty = |grad x|^2``, whose backward reaches the weights through second derivatives.
    cuDNN's RNN refuses double backward, so torch.nn runs here without cuDNN, as its users must."""
    with torch.backends.cudnn.flags(enabled=False):
        output, state = module(x)
        (grad_x,) = torch.autograd.grad(output, x, upstream, create_graph=True)
    return output, state, grad_x, grad_x.square().sum()


def compared_tensors(module, x, upstream, mode: str) -> dict:
    """Outputs and final states; in ``forward_backward`` also the gradients of ``x`` and every
    parameter; in ``gradient_penalty`` the gradient of ``x`` and the penalty's weight gradients."""
    backward = mode in ("forward_backward", "packed_forward_backward")
    if mode == "gradient_penalty":
        output, state, grad_x, penalty = gradient_penalty(module, x, upstream)
    else:
        with torch.set_grad_enabled(backward):
            output, state = module(x)
            output = output_tensor(output)
    states = state if isinstance(state, tuple) else (state,)
    tensors = {"output": output, **dict(zip(("h_n", "c_n"), states))}
    names, params = zip(*module.named_parameters())
    if backward:
        grads = torch.autograd.grad(output, (leaf(x), *params), upstream)
        tensors["grad input"] = grads[0]
        tensors.update({f"grad {name}": grad for name, grad in zip(names, grads[1:])})
    elif mode == "gradient_penalty":
        with torch.backends.cudnn.flags(enabled=False):
            grads = torch.autograd.grad(penalty, params)
        tensors["grad input"] = grad_x
        tensors.update({f"penalty grad {name}": grad for name, grad in zip(names, grads)})
    return {name: tensor.detach() for name, tensor in tensors.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in fp32; ``inf`` for NaN or a shape mismatch."""
    if actual.shape != expected.shape:
        return math.inf
    expected = expected.float()
    scale = expected.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    error = ((actual.float() - expected).abs().max() / scale).item()
    return math.inf if math.isnan(error) else error


def check_agreement(config: Config, reference, fused, x, upstream):
    """``(agrees, worst tensor name, its relative error)`` of the fused module against torch's."""
    expected = compared_tensors(reference, x, upstream, config.mode)
    actual = compared_tensors(fused, x, upstream, config.mode)
    errors = {name: relative_error(actual[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)
    return errors[worst] <= TOLERANCE[config.dtype], worst, errors[worst]


def time_gpu_ms(fn: Callable[[], None], grad_to_none) -> float:
    """Median time of ``fn`` in ms by ``triton.testing.do_bench`` (gradients reset before each call)."""
    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")


def time_cpu_ms(ours: Callable[[], None], theirs: Callable[[], None], grads_to_none, min_reps: int = 3,
                budget_s: float = 0.0):
    """Median wall-clock times of ``ours`` and ``theirs`` in ms, timed in turns after a warm-up call each.

    Taking turns lets a change in the machine's speed (other processes, clock) reach both alike,
    and each turn swaps which goes first, so that neither always finds the caches as the other
    left them. At least ``min_reps`` turns, more until ``budget_s`` seconds have passed. The
    tensors of ``grads_to_none`` get ``grad = None`` before each call, as ``do_bench`` does on a GPU.
    """
    def call(fn):
        for tensor in grads_to_none:
            tensor.grad = None
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    call(ours), call(theirs)
    ours_s, theirs_s = [], []
    began = time.perf_counter()
    while len(ours_s) < min_reps or time.perf_counter() - began < budget_s:
        if len(ours_s) % 2:
            theirs_s.append(call(theirs))
            ours_s.append(call(ours))
        else:
            ours_s.append(call(ours))
            theirs_s.append(call(theirs))
    return statistics.median(ours_s) * 1e3, statistics.median(theirs_s) * 1e3


def peak_mb(fn: Callable[[], None]) -> float:
    """Peak CUDA memory that one call of ``fn`` allocates above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / MiB


def make_row(config: Config, ours_ms=None, cudnn_ms=None, ours_peak_mb=None, cudnn_peak_mb=None,
             correct: bool = True) -> dict:
    """A result row: the config's fields, the measurements (``None`` when not measured) and ``correct``.

    ``speedup = cudnn_ms / ours_ms``: above 1.0 the fused module is faster.
    """
    speedup = cudnn_ms / ours_ms if ours_ms and cudnn_ms is not None else None
    measured = dict(
        ours_ms=ours_ms, cudnn_ms=cudnn_ms, speedup=speedup, ours_peak_mb=ours_peak_mb, cudnn_peak_mb=cudnn_peak_mb,
    )
    return {**dataclasses.asdict(config), **measured, "correct": correct}


def run_config(config: Config, device: str):
    """Check and time one config: ``(row, warning or None)``. A config that disagrees is not timed."""
    torch.manual_seed(0)
    try:
        reference, fused = build_modules(config, device)
        x, upstream = make_inputs(config, device)
        agrees, worst, error = check_agreement(config, reference, fused, x, upstream)
        problem = None if agrees else f"{worst} differs by {error:.3g} relative (tolerance {TOLERANCE[config.dtype]})"
    except Exception as exc:  # one failing config must not cost the rest of a long run
        problem = f"raised {type(exc).__name__}: {exc}"
    if problem is not None:
        return make_row(config, correct=False), f"{config.label()} {config.dtype} {config.mode}: {problem}; not timed"
    ours, theirs = step(fused, x, upstream, config.mode), step(reference, x, upstream, config.mode)
    if device == "cpu":
        # The interpreter is slow and its times mean nothing: three turns. The native path is
        # compared with torch.nn within a few percent, which takes more.
        timing = dict(min_reps=3) if interpreting() else dict(min_reps=10, budget_s=CPU_BUDGET_S)
        ours_ms, torch_ms = time_cpu_ms(ours, theirs, [leaf(x), *fused.parameters(), *reference.parameters()],
                                        **timing)
        return make_row(config, ours_ms, torch_ms), None
    ours_ms = time_gpu_ms(ours, [leaf(x), *fused.parameters()])
    cudnn_ms = time_gpu_ms(theirs, [leaf(x), *reference.parameters()])
    peaks = []
    for module, fn in ((fused, ours), (reference, theirs)):
        for tensor in (leaf(x), *module.parameters()):
            tensor.grad = None
        peaks.append(peak_mb(fn))
    return make_row(config, ours_ms, cudnn_ms, *peaks), None


@contextlib.contextmanager
def tf32_like_cudnn():
    """fp32 matmuls and cuDNN in TF32 (cuDNN's default for RNNs) inside the block, restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_suite(configs, device: str, progress: bool = True) -> list:
    """Rows of every config on ``device`` ("cuda" or "cpu"), with a progress bar; warnings are printed."""
    rows = []
    show = tqdm.write if tqdm else print
    with tf32_like_cudnn():
        for config in tqdm(configs, desc="configs", unit="config") if tqdm and progress else configs:
            row, warning = run_config(config, device)
            if warning is not None:
                show(f"WARNING: {warning}")
            rows.append(row)
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def environment(device: str) -> dict:
    """The results file's header: device name, the torch, triton and cuDNN versions, the launch scheme.

    On the CPU without the interpreter fused_rnn runs PyTorch's native RNN operator: the device
    names the processor and the threads torch uses, the scheme is ``NATIVE_SCHEME``.
    """
    on_gpu, native = device == "cuda", device == "cpu" and not interpreting()
    if on_gpu:
        name = torch.cuda.get_device_name()
    elif native:
        threads = torch.get_num_threads()
        name = f"cpu {cpu_model()}, {threads} thread{'s' if threads > 1 else ''}"
    else:
        name = CPU_DEVICE
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "scheme": NATIVE_SCHEME if native else launch_scheme(),
    }


def cpu_model() -> str:
    """The processor's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def result_stem(device_name: str, date: Optional[datetime.date] = None, tag: Optional[str] = None) -> str:
    """Results file name without suffix: ``<device slug>-<YYYY-MM-DD>``, then ``-<tag>`` if given.

    The full grid has no tag; other selections get one so that they never overwrite it.
    """
    stem = f"{slug(device_name)}-{(date or datetime.date.today()).isoformat()}"
    return stem if tag is None else f"{stem}-{tag}"


def write_results(header: dict, rows: list, out_dir: Path, date: Optional[datetime.date] = None,
                  tag: Optional[str] = None):
    """Write ``<stem>.json`` (header + rows) and ``<stem>.png`` (the speedup plot) to ``out_dir``.

    ``tag`` is appended to the name (see ``result_stem``). Returns both paths; the PNG's is ``None``
    when matplotlib (the bench extra) is not installed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = result_stem(header["device"], date, tag)
    json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
    json_path.write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
    if importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot written")
        return json_path, None
    title = f"fused_rnn vs torch{' (cuDNN)' if header['cudnn'] is not None else ''} on {header['device']}"
    plot_speedups(rows, png_path, title if header["device"] != CPU_DEVICE else f"{title}\n{CPU_PLOT_NOTE}")
    return json_path, png_path


def plot_speedups(rows: list, path: Path, title: str) -> None:
    """Bar chart of the speedup of each config on a log scale, one panel per (dtype, mode), a dashed line at 1.0.

    Configs that were not timed (they disagreed with torch) get no bar and an "x" below the axis.
    """
    from matplotlib.figure import Figure  # the Agg canvas, without pyplot's global state
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    groups = {}
    for row in rows:
        groups.setdefault((row["dtype"], row["mode"]), []).append(row)
    widest = max(len(group) for group in groups.values())
    fig = Figure(figsize=(max(6.0, 0.3 * widest + 2.0), 3.2 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, ((dtype, mode), group) in zip(axes, groups.items()):
        timed = [(p, row["speedup"]) for p, row in enumerate(group) if row["speedup"] is not None]
        untimed = [p for p, row in enumerate(group) if row["speedup"] is None]
        if timed:
            positions, speedups = zip(*timed)
            bars = ax.bar(positions, speedups, color=["tab:green" if s >= 1.0 else "tab:red" for s in speedups])
            ax.bar_label(bars, fmt="%.2g", fontsize=6)
        ax.plot(untimed, [0.02] * len(untimed), "kx", transform=ax.get_xaxis_transform())
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.margins(y=0.15)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{dtype}, {mode}" + (" (x: not timed, disagrees with torch)" if untimed else ""))
        ax.set_ylabel("speedup (torch ms / ours ms)")
        ax.set_xlim(-0.6, len(group) - 0.4)
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([Config(**{k: row[k] for k in CONFIG_FIELDS}).label() for row in group],
                           rotation=90, fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def format_table(rows: list) -> str:
    """The rows as a fixed-width text table (torch = nn.LSTM / nn.GRU, i.e. cuDNN on a GPU)."""
    def number(value, digits, kind="f"):
        return "-" if value is None else f"{value:.{digits}{kind}}"

    header = ("cell", "B", "T", "H", "in", "L", "bi", "dtype", "mode",
              "ours ms", "torch ms", "speedup", "ours MB", "torch MB", "ok")
    lines = [header]
    for row in rows:
        lines.append((
            row["cell"], str(row["batch"]), str(row["seq"]), str(row["hidden"]), str(row["input"]),
            str(row["layers"]), "y" if row["bidirectional"] else "n", row["dtype"], row["mode"],
            number(row["ours_ms"], 3), number(row["cudnn_ms"], 3), number(row["speedup"], 3, "g"),
            number(row["ours_peak_mb"], 1), number(row["cudnn_peak_mb"], 1), "yes" if row["correct"] else "NO",
        ))
    return text_table(lines)


def summary(rows: list) -> str:
    """One line: how many configs agree with torch, and min / median speedup over the timed ones."""
    speedups = [row["speedup"] for row in rows if row["speedup"] is not None]
    agree = sum(row["correct"] for row in rows)
    text = f"{agree}/{len(rows)} configs agree with torch"
    if speedups:
        faster = sum(s >= 1.0 for s in speedups)
        text += (f"; speedup min {min(speedups):.3g}, median {statistics.median(speedups):.3g}, "
                 f"{faster}/{len(speedups)} timed configs at >= 1.0")
    return text


def format_cpu_table(rows: list) -> str:
    """The rows of a CPU run as a text table: ours and torch.nn's ms, and their ratio (1.0: as fast)."""
    lines = [("cell", "B", "T", "H", "in", "L", "bi", "dtype", "mode", "ours ms", "torch ms", "ours/torch", "ok")]
    for row in rows:
        ratio = None if row["speedup"] is None else 1 / row["speedup"]
        lines.append((
            row["cell"], str(row["batch"]), str(row["seq"]), str(row["hidden"]), str(row["input"]),
            str(row["layers"]), "y" if row["bidirectional"] else "n", row["dtype"], row["mode"],
            *("-" if value is None else f"{value:.3f}" for value in (row["ours_ms"], row["cudnn_ms"], ratio)),
            "yes" if row["correct"] else "NO",
        ))
    return text_table(lines)


def cpu_summary(rows: list) -> str:
    """One line: agreement, and the largest and median ours/torch time ratio against ``CPU_RATIO_GOAL``."""
    ratios = [1 / row["speedup"] for row in rows if row["speedup"] is not None]
    text = f"{sum(row['correct'] for row in rows)}/{len(rows)} configs agree with torch"
    if ratios:
        within = sum(ratio <= CPU_RATIO_GOAL for ratio in ratios)
        text += (f"; ours/torch max {max(ratios):.3f}, median {statistics.median(ratios):.3f}, "
                 f"{within}/{len(ratios)} timed configs within {CPU_RATIO_GOAL}x")
    return text


def launch_scheme() -> str:
    """The fused kernels' launch scheme, weights and backward for these runs, as ``FUSED_RNN_SCHEME``,
    ``FUSED_RNN_WEIGHTS`` and ``FUSED_RNN_BACKWARD`` force them (by default: persistent, weights
    resident where they fit, the backward gathering where its blocks fit)."""
    scheme = os.environ.get("FUSED_RNN_SCHEME", "persistent")
    weights = os.environ.get("FUSED_RNN_WEIGHTS", "resident where they fit")
    backward = os.environ.get("FUSED_RNN_BACKWARD", "gather where it fits")
    return f"{scheme}, weights {weights}, backward {backward}" + (" (Triton interpreter)" if interpreting() else "")