"""A character-level language model over Python's own standard library, fused_rnn against torch.nn
side by side.

The corpus is the source code of a fixed list of pure-Python standard-library modules, read with
``inspect.getsource``: it is on every machine that has Python, needs no download, and is the same
from run to run (it changes only with the Python version; the run prints its size and a hash).
The last 10% of each module is held out for validation. Characters outside printable ASCII
become ``?``.

The model is an embedding, a 2-layer LSTM (and, next to it, a 2-layer GRU) and a linear layer
over the characters; it is trained on random windows of the training text with the
cross-entropy of every next character, reported in bits per character. At the end each fused
model writes a few characters of Python of its own.

    python examples/char_lm.py                     # CPU-sized, a few minutes
    python examples/char_lm.py --hidden 256 --seq-len 200 --batch 128 --steps 3000   # GPU
"""

import hashlib
import importlib
import inspect
import math

import torch
from torch import nn

import common

MODULES = (
    "argparse", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
    "difflib", "fractions", "functools", "heapq", "pprint", "random", "shutil", "string", "textwrap",
)
DEFAULTS = dict(steps=600, batch=32, hidden=128, seq_len=64, lr=3e-3, log_every=50, val_windows=128, sample_len=300)
SMOKE = dict(steps=2, batch=2, hidden=8, seq_len=5, lr=3e-3, log_every=2, val_windows=2, sample_len=5)
LAYERS = 2
PROMPT = "def "
TEMPERATURE = 0.8


def corpus(modules=MODULES, held_out: float = 0.1):
    """``(train, val)`` text: each module's source, its last ``held_out`` fraction to ``val``."""
    train, val = [], []
    for name in modules:
        source = inspect.getsource(importlib.import_module(name))
        source = "".join(c if c == "\n" or " " <= c <= "~" else "?" for c in source)
        split = int(len(source) * (1 - held_out))
        train.append(source[:split])
        val.append(source[split:])
    return "".join(train), "".join(val)


class CharLM(nn.Module):
    """Embedding, multi-layer RNN, linear read-out; returns the logits and the RNN state."""

    def __init__(self, rnn_cls: type, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = rnn_cls(hidden, hidden, num_layers=LAYERS, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, state=None):  # tokens: (B, T)
        output, state = self.rnn(self.embed(tokens), state)
        return self.head(output), state  # logits: (B, T, V)


def windows(text: torch.Tensor, starts: torch.Tensor, length: int):
    """Inputs ``text[s : s + length]`` and targets shifted by one, for each start ``s``."""
    rows = text[starts[:, None] + torch.arange(length + 1)]
    return rows[:, :-1], rows[:, 1:]


def cross_entropy(model, batch):
    tokens, targets = batch
    logits, _ = model(tokens)
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def generate(model, prompt: torch.Tensor, length: int, generator: torch.Generator) -> list:
    """Sample ``length`` characters after ``prompt (P,)``, one step at a time, carrying the state."""
    model.eval()
    drawn = []
    with torch.no_grad():
        logits, state = model(prompt[None])
        for _ in range(length):
            probabilities = torch.softmax(logits[0, -1].float().cpu() / TEMPERATURE, dim=0)
            token = torch.multinomial(probabilities, 1, generator=generator)
            drawn.append(int(token))
            logits, state = model(token.view(1, 1).to(prompt.device), state)
    return drawn


def main(argv=None) -> list:
    args = common.parse_args(__doc__, argv, DEFAULTS, SMOKE, {
        "val_windows": (int, "validation windows of --seq-len characters"),
        "sample_len": (int, "characters each fused model writes at the end"),
    })
    train_text, val_text = corpus()
    chars = sorted(set(train_text + val_text + PROMPT))
    index = {c: i for i, c in enumerate(chars)}

    def encode(text: str) -> torch.Tensor:
        return torch.tensor([index[c] for c in text])

    train, val = encode(train_text), encode(val_text)
    digest = hashlib.sha256((train_text + val_text).encode()).hexdigest()[:12]
    print(f"corpus: {len(MODULES)} stdlib modules, {len(train)} training and {len(val)} validation characters, "
          f"{len(chars)} distinct, sha256 {digest}")

    val_starts = torch.linspace(0, len(val) - args.seq_len - 1, args.val_windows).long()
    val_batches = [
        tuple(tensor.to(args.device) for tensor in windows(val, starts, args.seq_len))
        for starts in val_starts.split(args.batch)
    ]

    def val_bits(model):
        nats = sum(cross_entropy(model, batch).item() * len(batch[0]) for batch in val_batches)
        return nats / args.val_windows / math.log(2)

    task = common.Task(
        name="char_lm",
        title=f"Char LM, {LAYERS} layers, H={args.hidden}",
        metric="bits per character",
        build=lambda rnn_cls: CharLM(rnn_cls, len(chars), args.hidden),
        sample=lambda generator: windows(
            train, torch.randint(0, len(train) - args.seq_len, (args.batch,), generator=generator), args.seq_len,
        ),
        loss=cross_entropy,
        evaluate=val_bits,
        eval_name="val",
        baseline=math.log2(len(chars)),
        baseline_label=f"uniform over {len(chars)} characters",
        scale=1 / math.log(2),
    )
    runs = common.run_task(task, args)
    for run in runs:
        if run.label.startswith("fused_rnn"):
            generator = torch.Generator().manual_seed(args.seed)
            drawn = generate(run.model, encode(PROMPT).to(args.device), args.sample_len, generator)
            print(f"\n--- {run.label} writes (temperature {TEMPERATURE}):\n{PROMPT}{''.join(chars[i] for i in drawn)}")
    return runs


if __name__ == "__main__":
    main()
