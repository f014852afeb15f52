"""The adding problem (Hochreiter & Schmidhuber, 1997), fused_rnn against torch.nn side by side.

Each input is a sequence of (value, marker) pairs: values uniform in [0, 1), markers 0 except at
two positions, one in each half of the sequence (the form used by Le et al., 2015, and Arjovsky
et al., 2016). The target is the sum of the two marked values, read off the last hidden state;
the loss is the mean squared error. Predicting 1 whatever the input gives an MSE of
Var(a + b) = 1/6 ~ 0.167: a model below that line has learnt to carry the marked values across
the sequence.

    python examples/adding_problem.py                     # CPU-sized, a few minutes
    python examples/adding_problem.py --hidden 256 --seq-len 200 --batch 128 --steps 4000   # GPU
"""

import sys

import torch
from torch import nn

import common

DEFAULTS = dict(steps=1500, batch=64, hidden=64, seq_len=50, lr=3e-3, log_every=100, eval_batch=1000)
SMOKE = dict(steps=3, batch=4, hidden=8, seq_len=6, lr=3e-3, log_every=3, eval_batch=8)
BASELINE = 1 / 6


class Adder(nn.Module):
    """RNN over the (value, marker) pairs, a linear read-out of the last hidden state."""

    def __init__(self, rnn_cls: type, hidden: int):
        super().__init__()
        self.rnn = rnn_cls(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:  # pairs: (B, T, 2)
        output, _ = self.rnn(pairs)
        return self.head(output[:, -1]).squeeze(1)  # (B,)


def sample(batch: int, seq_len: int, generator: torch.Generator):
    """``pairs (B, T, 2)`` and ``targets (B,)``; one marker in each half of the sequence."""
    values = torch.rand(batch, seq_len, generator=generator)
    half = seq_len // 2
    first = torch.randint(0, half, (batch,), generator=generator)
    second = torch.randint(half, seq_len, (batch,), generator=generator)
    markers = torch.zeros(batch, seq_len)
    rows = torch.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return torch.stack([values, markers], dim=2), targets


def main(argv=None) -> list:
    args = common.parse_args(
        __doc__, argv, DEFAULTS, SMOKE, {"eval_batch": (int, "size of the fixed held-out batch")},
    )
    if args.seq_len < 2:
        sys.exit("--seq-len must be at least 2 (one marker in each half)")
    held_out = tuple(
        tensor.to(args.device)
        for tensor in sample(args.eval_batch, args.seq_len, torch.Generator().manual_seed(args.seed + 1))
    )

    def mse(model, batch):
        pairs, targets = batch
        return nn.functional.mse_loss(model(pairs), targets)

    task = common.Task(
        name="adding_problem",
        title=f"Adding problem, T={args.seq_len}",
        metric="MSE",
        build=lambda rnn_cls: Adder(rnn_cls, args.hidden),
        sample=lambda generator: sample(args.batch, args.seq_len, generator),
        loss=mse,
        evaluate=lambda model: mse(model, held_out).item(),
        eval_name="held-out MSE",
        baseline=BASELINE,
        baseline_label="baseline: always predict 1 (MSE 1/6)",
        log_scale=True,
    )
    return common.run_task(task, args)


if __name__ == "__main__":
    main()
