"""The copy-memory task (Hochreiter & Schmidhuber, 1997; Arjovsky, Shah & Bengio, 2016), fused_rnn
against torch.nn side by side.

Alphabet: 0 is the blank, 1-8 are symbols, 9 is the delimiter. An input starts with K random
symbols, then T - 1 blanks, the delimiter, and K more blanks (T + 2K steps in all); the target is
blank everywhere except the last K steps, which must reproduce the K symbols from the start. The
loss is the cross-entropy per step. Predicting blanks and then a uniform guess over the 8 symbols
scores K ln 8 / (T + 2K), the baseline of Arjovsky et al. (2016); only a model that carries the
symbols across the T blanks gets below it.

    python examples/copy_memory.py                     # CPU-sized, a few minutes
    python examples/copy_memory.py --hidden 256 --seq-len 200 --batch 128 --steps 4000   # GPU

``--seq-len`` is the delay T; ``--copy-len`` is K (10, as in the paper).
"""

import math
import sys

import torch
from torch import nn

import common

DEFAULTS = dict(steps=1500, batch=64, hidden=64, seq_len=20, lr=3e-3, log_every=100, copy_len=10, eval_batch=1000)
SMOKE = dict(steps=3, batch=4, hidden=8, seq_len=3, lr=3e-3, log_every=3, copy_len=2, eval_batch=8)
BLANK, DELIMITER, NUM_SYMBOLS = 0, 9, 8
ALPHABET = 10  # input classes: blank, 8 symbols, delimiter
OUTPUTS = 9  # output classes: blank and the 8 symbols


class Copier(nn.Module):
    """One-hot input, RNN, a linear layer giving the output class at every step."""

    def __init__(self, rnn_cls: type, hidden: int):
        super().__init__()
        self.rnn = rnn_cls(ALPHABET, hidden, batch_first=True)
        self.head = nn.Linear(hidden, OUTPUTS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, T + 2K)
        output, _ = self.rnn(nn.functional.one_hot(tokens, ALPHABET).float())
        return self.head(output)  # logits: (B, T + 2K, OUTPUTS)


def sample(batch: int, delay: int, copy_len: int, generator: torch.Generator):
    """``tokens (B, T + 2K)`` and ``targets (B, T + 2K)``."""
    symbols = torch.randint(1, NUM_SYMBOLS + 1, (batch, copy_len), generator=generator)
    tokens = torch.full((batch, delay + 2 * copy_len), BLANK)
    tokens[:, :copy_len] = symbols
    tokens[:, copy_len + delay - 1] = DELIMITER
    targets = torch.full_like(tokens, BLANK)
    targets[:, -copy_len:] = symbols
    return tokens, targets


def cross_entropy(model, batch):
    tokens, targets = batch
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())


def main(argv=None) -> list:
    args = common.parse_args(__doc__, argv, DEFAULTS, SMOKE, {
        "seq_len": (int, "delay T: blanks between the symbols and the delimiter, plus one"),
        "copy_len": (int, "number of symbols to remember, K"),
        "eval_batch": (int, "size of the fixed held-out batch"),
    })
    if args.seq_len < 1 or args.copy_len < 1:
        sys.exit("--seq-len and --copy-len must be at least 1")
    held_out = tuple(
        tensor.to(args.device)
        for tensor in sample(args.eval_batch, args.seq_len, args.copy_len, torch.Generator().manual_seed(args.seed + 1))
    )

    def recall_accuracy(model):
        tokens, targets = held_out
        guesses = model(tokens)[:, -args.copy_len:].argmax(dim=2)
        return (guesses == targets[:, -args.copy_len:]).float().mean().item()

    task = common.Task(
        name="copy_memory",
        title=f"Copy memory, T={args.seq_len}, K={args.copy_len}",
        metric="cross-entropy (nats per step)",
        build=lambda rnn_cls: Copier(rnn_cls, args.hidden),
        sample=lambda generator: sample(args.batch, args.seq_len, args.copy_len, generator),
        loss=cross_entropy,
        evaluate=lambda model: cross_entropy(model, held_out).item(),
        eval_name="held-out",
        baseline=args.copy_len * math.log(NUM_SYMBOLS) / (args.seq_len + 2 * args.copy_len),
        baseline_label="baseline: blanks, then a uniform guess",
    )
    runs = common.run_task(task, args)
    print(f"fraction of the {args.copy_len} symbols recalled on the held-out batch (chance: 1/{NUM_SYMBOLS}):")
    for run in runs:
        run.model.eval()
        with torch.no_grad():
            print(f"  {run.label:>15}: {recall_accuracy(run.model):.3f}")
    return runs


if __name__ == "__main__":
    main()
