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
from dataclasses import dataclass

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
    """Embedding, multi-layer RNN, linear read-out; returns the logits and the RNN state.
    ``rnn_options`` go to the RNN's constructor (fused_rnn's regularizers, for instance)."""

    def __init__(self, rnn_cls: type, vocab: int, hidden: int, layers: int = LAYERS, **rnn_options):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = rnn_cls(hidden, hidden, num_layers=layers, batch_first=True, **rnn_options)
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


@dataclass
class Corpus:
    """The text as character indices: ``chars[i]`` is character ``i``."""

    chars: list
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64

    def encode(self, text: str) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index[c] for c in text])

    def decode(self, indices) -> str:
        return "".join(self.chars[i] for i in indices)


def load(modules=MODULES, held_out: float = 0.1) -> Corpus:
    """``corpus(modules, held_out)`` encoded; prints its size and hash."""
    train_text, val_text = corpus(modules, held_out)
    data = Corpus(sorted(set(train_text + val_text + PROMPT)), torch.tensor([]), torch.tensor([]))
    data.train, data.val = data.encode(train_text), data.encode(val_text)
    digest = hashlib.sha256((train_text + val_text).encode()).hexdigest()[:12]
    print(f"corpus: {len(modules)} stdlib module{'s' * (len(modules) > 1)}, {len(data.train)} training and "
          f"{len(data.val)} validation characters, {len(data.chars)} distinct, sha256 {digest}")
    return data


def bits_per_character(text: torch.Tensor, count: int, args):
    """A function of a model: its bits per character on ``count`` evenly spaced windows of ``text``."""
    starts = torch.linspace(0, len(text) - args.seq_len - 1, count).long()
    batches = [tuple(tensor.to(args.device) for tensor in windows(text, chunk, args.seq_len))
               for chunk in starts.split(args.batch)]

    def bits(model) -> float:
        nats = sum(cross_entropy(model, batch).item() * len(batch[0]) for batch in batches)
        return nats / count / math.log(2)

    return bits


def make_task(args, data: Corpus, name: str = "char_lm", title: str = "Char LM", layers: int = LAYERS) -> common.Task:
    """Next-character prediction on random training windows, validation bits per character."""
    return common.Task(
        name=name,
        title=f"{title}, {layers} layer{'s' * (layers > 1)}, H={args.hidden}",
        metric="bits per character",
        build=lambda rnn_cls: CharLM(rnn_cls, len(data.chars), args.hidden, layers),
        sample=lambda generator: windows(
            data.train, torch.randint(0, len(data.train) - args.seq_len, (args.batch,), generator=generator),
            args.seq_len,
        ),
        loss=cross_entropy,
        evaluate=bits_per_character(data.val, args.val_windows, args),
        eval_name="val",
        baseline=math.log2(len(data.chars)),
        baseline_label=f"uniform over {len(data.chars)} characters",
        scale=1 / math.log(2),
    )


def main(argv=None) -> list:
    args = common.parse_args(__doc__, argv, DEFAULTS, SMOKE, {
        "val_windows": (int, "validation windows of --seq-len characters"),
        "sample_len": (int, "characters each fused model writes at the end"),
    })
    data = load()
    runs = common.run_task(make_task(args, data), args)
    for run in runs:
        if run.label.startswith("fused_rnn"):
            generator = torch.Generator().manual_seed(args.seed)
            drawn = generate(run.model, data.encode(PROMPT).to(args.device), args.sample_len, generator)
            print(f"\n--- {run.label} writes (temperature {TEMPERATURE}):\n{PROMPT}{data.decode(drawn)}")
    return runs


if __name__ == "__main__":
    main()
