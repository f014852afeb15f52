"""What the examples share: the command line, the side-by-side training loop, the loss-curve plot.

Most examples train, per cell (LSTM, GRU), two copies of the same model: one around
``torch.nn.LSTM`` / ``nn.GRU`` and one around ``fused_rnn.LSTM`` / ``fused_rnn.GRU``. The fused
copy starts from the torch copy's weights (``load_state_dict``), both get the same batches and the
same optimizer settings, so their curves start at the same loss and should stay close; they drift
apart slowly because floating-point sums are not bitwise equal. An example may pass its own runs
instead (``train_and_compare(..., runs=)``), e.g. variants of one fused model.
"""

import argparse
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

import fused_rnn

# cell name -> (torch module, fused module)
CELLS = {"lstm": (nn.LSTM, fused_rnn.LSTM), "gru": (nn.GRU, fused_rnn.GRU)}

FLAGS = {
    "steps": (int, "training steps"),
    "batch": (int, "batch size"),
    "hidden": (int, "hidden size"),
    "seq_len": (int, "sequence length"),
    "lr": (float, "Adam learning rate"),
    "log_every": (int, "print a line every this many steps"),
}


def parse_args(description: str, argv, defaults: dict, smoke: dict, extra_flags: Optional[dict] = None,
               cells: Optional[list] = None, add_arguments: Optional[Callable] = None):
    """The shared flags plus ``extra_flags`` (name -> (type, help)); any of these left out takes its
    value from ``defaults``, or from ``smoke`` with ``--smoke``. ``cells``: the default of
    ``--cells`` (every cell if None); ``add_arguments(parser)`` adds flags of other forms."""
    cells = list(CELLS) if cells is None else cells
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda if available)")
    for name, (kind, text) in {**FLAGS, **(extra_flags or {})}.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind,
                            help=f"{text} (default {defaults[name]}; --smoke: {smoke[name]})")
    parser.add_argument("--cells", nargs="+", choices=list(CELLS), default=cells,
                        help=f"which cells to train (default: {' '.join(cells)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the data (default 0)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes and a few steps: seconds on a CPU, even under TRITON_INTERPRET=1")
    parser.add_argument("--out", default="example_outputs",
                        help="folder for the loss-curve PNG (default: ./example_outputs)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    for name, value in (smoke if args.smoke else defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.device = torch.device(args.device)
    return args


@dataclass
class Task:
    """One training problem; ``build``, ``sample`` and ``loss`` are all the loop needs."""

    name: str  # file stem of the plot
    title: str
    metric: str  # y-axis label of the training loss
    build: Callable[[type], nn.Module]  # the model around an RNN class (nn.LSTM, fused_rnn.GRU, ...)
    sample: Callable[[torch.Generator], tuple]  # one training batch (inputs, targets), CPU tensors
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    evaluate: Optional[Callable[[nn.Module], float]] = None  # held-out metric, under no_grad
    eval_name: str = "held-out"
    baseline: Optional[float] = None  # loss of the best input-blind prediction
    baseline_label: str = "baseline"
    scale: float = 1.0  # the metric is loss * scale (1 / ln 2 turns nats into bits)
    log_scale: bool = False  # plot the metric on a log axis


@dataclass
class Run:
    """One model being trained, its optimizer and its history."""

    label: str  # e.g. "nn.LSTM", "fused_rnn.LSTM"
    cell: str  # "LSTM" or "GRU"
    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: list = field(default_factory=list)  # training metric per step
    evals: list = field(default_factory=list)  # (step, held-out metric)
    seconds: float = 0.0  # forward + backward + optimizer step, all steps
    twin: Optional["Run"] = None  # the run that starts from the same weights and should match at step 1


def fused_path(device: torch.device) -> str:
    """What the fused layers run on for this device."""
    if device.type == "cuda":
        return "the Triton kernels on the GPU"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1; very slow)"
    return ("PyTorch's own RNN operator, or fused_rnn's plain-PyTorch reference for the options it lacks "
            "(CPU; TRITON_INTERPRET=1 runs the Triton kernels instead)")


def output_dir(path: str) -> str:
    """Create ``path`` if needed; a folder created here gets a ``.gitignore`` of ``*``, so that a
    run inside a git checkout leaves nothing to commit."""
    if not os.path.isdir(path):
        os.makedirs(path)
        with open(os.path.join(path, ".gitignore"), "w") as file:
            file.write("# written by fused_rnn's examples\n*\n")
    return path


def make_runs(task: Task, args) -> list:
    """Per cell: the torch model, then the fused one loaded with the same initial weights."""
    runs = []
    for cell in args.cells:
        torch_cls, fused_cls = CELLS[cell]
        torch.manual_seed(args.seed)
        reference = task.build(torch_cls).to(args.device)
        fused = task.build(fused_cls).to(args.device)
        fused.load_state_dict(reference.state_dict())
        torch_run, fused_run = (
            Run(label, torch_cls.__name__, model, torch.optim.Adam(model.parameters(), lr=args.lr))
            for label, model in ((f"nn.{torch_cls.__name__}", reference), (f"fused_rnn.{fused_cls.__name__}", fused))
        )
        fused_run.twin = torch_run
        runs += [torch_run, fused_run]
    return runs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(task: Task, run: Run, batch: tuple, device: torch.device) -> None:
    _synchronize(device)
    start = time.perf_counter()
    run.model.train()
    loss = task.loss(run.model, batch)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    value = loss.item()  # also waits for the GPU
    run.seconds += time.perf_counter() - start
    run.losses.append(value * task.scale)


def evaluate(task: Task, run: Run, step: int) -> None:
    run.model.eval()
    with torch.no_grad():
        run.evals.append((step, task.evaluate(run.model)))


def _width(runs: list) -> int:
    """Characters per column of the loss table."""
    return max(17, max(len(run.label) for run in runs) + 2)


def _header(runs: list, task: Task) -> str:
    held_out = f"; train/{task.eval_name} where evaluated" if task.evaluate else ""
    cells = "".join(f"{run.label:>{_width(runs)}}" for run in runs)
    return f"{task.metric}: step 1, then the mean since the previous line{held_out}\n step{cells}"


def _row(step: int, runs: list, since: int) -> str:
    cells = ""
    for run in runs:
        text = f"{sum(run.losses[since:]) / len(run.losses[since:]):.4f}"
        if run.evals and run.evals[-1][0] == step:
            text += f"/{run.evals[-1][1]:.4f}"
        cells += f"{text:>{_width(runs)}}"
    return f"{step:5d}{cells}"


def train_and_compare(task: Task, args, runs: Optional[list] = None) -> list:
    """Train every run (``make_runs``'s torch / fused pairs unless given) on the same batches;
    prints a table of losses and returns the runs."""
    print(f"{task.title}: device {args.device}; fused_rnn runs {fused_path(args.device)}")
    print(f"steps {args.steps}, batch {args.batch}, hidden {args.hidden}, seq-len {args.seq_len}, "
          f"lr {args.lr}, seed {args.seed}")
    if task.baseline is not None:
        print(f"{task.baseline_label}: {task.baseline:.4f}")
    runs = make_runs(task, args) if runs is None else runs
    generator = torch.Generator().manual_seed(args.seed)
    print(_header(runs, task))
    last_line = 0
    for step in range(1, args.steps + 1):
        batch = tuple(tensor.to(args.device) for tensor in task.sample(generator))
        for run in runs:
            train_step(task, run, batch, args.device)
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            if task.evaluate is not None and step > 1:
                for run in runs:
                    evaluate(task, run, step)
            print(_row(step, runs, last_line), flush=True)
            last_line = step
    summarize(task, runs, args)
    return runs


def summarize(task: Task, runs: list, args) -> None:
    tail = max(1, min(100, args.steps // 10))
    evaluated = f"; {task.eval_name}: after the last step" if task.evaluate else ""
    print(f"\nfinal {task.metric} (train: mean of the last {tail} step{'s' * (tail > 1)}{evaluated}):")
    width = _width(runs) - 2
    for run in runs:
        held_out = f", {task.eval_name} {run.evals[-1][1]:.4f}" if run.evals else ""
        print(f"  {run.label:>{width}}: train {sum(run.losses[-tail:]) / tail:.4f}{held_out}"
              f"   ({1000 * run.seconds / args.steps:.1f} ms per step)")
    for run in runs:
        if run.twin is not None:
            gap = abs(run.losses[0] - run.twin.losses[0])
            print(f"  {run.cell}: step-1 loss differs by {gap:.2e} between {run.twin.label} and {run.label} "
                  "(same weights, same batch)")
    if args.device.type != "cuda":
        print("  (times on a CPU say nothing about fused_rnn's speed on a GPU)")


def smooth(values: list, window: int) -> list:
    """Trailing moving average."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, name: str, args) -> str:
    """Write ``figure`` to ``<args.out>/<name>.png``, close it, say so; returns the path."""
    path = os.path.join(output_dir(args.out), f"{name}.png")
    figure.savefig(path, dpi=120)
    pyplot().close(figure)
    print(f"wrote {path}")
    return path


def plot(task: Task, runs: list, args) -> str:
    """One panel per cell: training curves (smoothed) of that cell's runs (the torch and the fused
    model), held-out points, the baseline. Returns the PNG's path."""
    plt = pyplot()
    cells = list(dict.fromkeys(run.cell for run in runs))
    figure, axes = plt.subplots(1, len(cells), figsize=(6 * len(cells), 4), squeeze=False, sharey=True)
    window = max(1, len(runs[0].losses) // 50)
    for axis, cell in zip(axes[0], cells):
        panel = [run for run in runs if run.cell == cell]
        for run, style, marker in zip(panel, itertools.cycle(("-", "--", "-.", ":")), itertools.cycle("oxs^v")):
            steps = range(1, len(run.losses) + 1)
            line, = axis.plot(steps, smooth(run.losses, window), style, label=f"{run.label} (train)")
            if run.evals:
                axis.plot(*zip(*run.evals), marker, color=line.get_color(), label=f"{run.label} ({task.eval_name})")
        if task.baseline is not None:
            axis.axhline(task.baseline, color="gray", linestyle=":", label=task.baseline_label)
        axis.set_title(f"{task.title}: {cell}")
        axis.set_xlabel("step")
        if task.log_scale:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    axes[0][0].set_ylabel(task.metric + (f" (moving average over {window} steps)" if window > 1 else ""))
    figure.tight_layout()
    return save_figure(figure, task.name, args)


def run_task(task: Task, args, runs: Optional[list] = None) -> list:
    """Train, summarize, plot; returns the runs."""
    runs = train_and_compare(task, args, runs)
    plot(task, runs, args)
    return runs
