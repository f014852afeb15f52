"""``python -m bench.traffic``: what the recurrence kernels read and write, per launch and per step.

The kernels run in Triton's interpreter, which hands every ``tl.load`` and ``tl.store`` the
addresses it touches. Each address is attributed to the kernel argument (buffer) that holds it, and
each configuration runs twice, at ``T`` and ``2T`` steps: the difference, divided by ``T``, is what
one step moves; the rest is what a launch moves once. For the weights that is the claim of the
resident plans: ``W_hh`` (and ``W_hr``) are read once per launch, never per step; the streaming
plan (weights too large for the chip) reads them every step.

Two launch schemes are measured: ``persistent`` (the interpreter runs one program per direction,
so per-step traffic is that program's), and ``stepwise`` with the GPU's tiling (one program per
block of units; every launch is one step, so the weights show up per step there, while on a GPU
the persistent scheme holds them for the whole sequence - the other buffers' traffic is the
GPU's). Counts are elements, summed over all programs.
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import sys

from bench import interpret_kernels, text_table

interpret_kernels("python -m bench.traffic", "TRITON_INTERPRET=1 python -m bench.traffic")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from fused_rnn import functional  # noqa: E402

CELLS = {"lstm": ("LSTM", None), "lstm_proj": ("LSTM", 0.6), "gru": ("GRU", None), "rnn": ("RNN_TANH", None)}
WEIGHTS = ("w_hh_ptr", "w_hr_ptr")


@dataclasses.dataclass(frozen=True)
class Config:
    cell: str
    batch: int = 16
    hidden: int = 40
    directions: int = 1
    lengths: bool = False
    scheme: str = "persistent"
    weights: str = "resident"
    steps: int = 4

    def label(self) -> str:
        options = [f"B{self.batch}", f"H{self.hidden}", f"D{self.directions}"] + (["lengths"] if self.lengths else [])
        return f"{self.cell} {' '.join(options)} {self.scheme} {self.weights}"


class Traffic:
    """Elements loaded and stored per (kernel, buffer), from the interpreter's memory operations."""

    def __init__(self):
        self.counts = {}  # (kernel, buffer, "load"/"store") -> elements
        self._buffers = []  # (start, end, name) of the running launch's tensor arguments
        self._kernel = None

    def _attribute(self, pointers, mask, kind):
        addresses = pointers.data[mask.data] if mask is not None else pointers.data.ravel()
        for start, end, name in self._buffers:
            inside = int(np.count_nonzero((addresses >= start) & (addresses < end)))
            if inside:
                key = (self._kernel, name, kind)
                self.counts[key] = self.counts.get(key, 0) + inside

    @contextlib.contextmanager
    def recording(self):
        traffic = self
        builder = interpreter.InterpreterBuilder
        executor = interpreter.GridExecutor
        original_load, original_store = builder.create_masked_load, builder.create_masked_store
        original_init = executor._init_args_hst

        # The cache hints that follow differ between Triton versions: pass them on as they come.
        def create_masked_load(self, ptrs, mask, *hints):
            traffic._attribute(ptrs, mask, "load")
            return original_load(self, ptrs, mask, *hints)

        def create_masked_store(self, ptrs, value, mask, *hints):
            traffic._attribute(ptrs, mask, "store")
            return original_store(self, ptrs, value, mask, *hints)

        def init_args_hst(self, args_dev, kwargs):
            args_hst, kwargs_hst = original_init(self, args_dev, kwargs)
            names = inspect.getfullargspec(self.fn).args
            traffic._kernel = self.fn.__name__
            traffic._buffers = [
                (arg.data_ptr(), arg.data_ptr() + arg.numel() * arg.element_size(), name)
                for name, arg in list(zip(names, args_hst)) + list(kwargs_hst.items())
                if isinstance(arg, torch.Tensor) and arg.numel()
            ]
            return args_hst, kwargs_hst

        builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
        executor._init_args_hst = init_args_hst
        try:
            yield self
        finally:
            builder.create_masked_load, builder.create_masked_store = original_load, original_store
            executor._init_args_hst = original_init


def run_layer(config: Config, steps: int) -> dict:
    """Forward and backward of one layer; returns ``{(kernel, buffer, kind): elements}``."""
    mode, features = _features(config)
    generator = torch.Generator().manual_seed(0)
    gates = functional.NUM_GATES[mode]
    hidden, proj = config.hidden, features != config.hidden

    def randn(*shape):
        return (torch.randn(*shape, generator=generator) * 0.3).requires_grad_()

    weights = [(randn(gates * hidden, 8), randn(gates * hidden, features), randn(gates * hidden),
                randn(gates * hidden), randn(features, hidden) if proj else None)
               for _ in range(config.directions)]
    x = randn(steps, config.batch, 8)
    h0 = randn(config.directions, config.batch, features)
    c0 = randn(config.directions, config.batch, hidden) if mode == "LSTM" else None
    lengths = torch.randint(1, steps + 1, (config.batch,), generator=generator) if config.lengths else None
    environment = {"FUSED_RNN_SCHEME": config.scheme, "FUSED_RNN_WEIGHTS": config.weights}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        with Traffic().recording() as traffic:
            output, _, _ = functional.layer(mode, x, h0, c0, weights, lengths)
            output.sum().backward()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return traffic.counts


def measure(config: Config) -> list:
    """Rows ``(kernel, buffer, kind, per_launch, per_step)`` for one configuration."""
    short, long = run_layer(config, config.steps), run_layer(config, 2 * config.steps)
    rows = []
    for key in sorted(set(short) | set(long)):
        per_step = (long.get(key, 0) - short.get(key, 0)) / config.steps
        rows.append((*key, short.get(key, 0) - per_step * config.steps, per_step))
    return rows


def _features(config: Config):
    """The cell's mode and ``P``: the projection keeps 60 % of the units."""
    mode, proj_share = CELLS[config.cell]
    return mode, max(1, int(proj_share * config.hidden)) if proj_share else config.hidden


def weight_elements(config: Config) -> dict:
    """Elements of ``W_hh`` and ``W_hr`` of one layer (all directions)."""
    mode, features = _features(config)
    w_hh = functional.NUM_GATES[mode] * config.hidden * features * config.directions
    proj = features != config.hidden
    return {"w_hh_ptr": w_hh, "w_hr_ptr": features * config.hidden * config.directions if proj else 0}


def default_configs():
    for cell in CELLS:
        yield Config(cell)
        yield Config(cell, lengths=True)
        yield Config(cell, weights="streaming")
        yield Config(cell, scheme="stepwise")
    yield Config("lstm", directions=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", nargs="+", choices=CELLS, help="cells (default: all)")
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args(argv)
    results = []
    for config in default_configs():
        if args.cell and config.cell not in args.cell:
            continue
        rows = measure(config)
        sizes = weight_elements(config)
        results.append({"config": dataclasses.asdict(config), "weight_elements": sizes,
                        "rows": [dict(zip(("kernel", "buffer", "kind", "per_launch", "per_step"), row)) for row in rows]})
        print(f"\n{config.label()}   (W_hh {sizes['w_hh_ptr']} elements, W_hr {sizes['w_hr_ptr']})")
        table = [["kernel", "buffer", "kind", "per launch", "per step"]]
        table += [[kernel, buffer.removesuffix("_ptr"), kind, f"{launch:.0f}", f"{step:.1f}"]
                  for kernel, buffer, kind, launch, step in rows]
        print(text_table(table))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
