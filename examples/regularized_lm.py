"""AWD-LSTM-style regularization of the character-level language model, with the regularizers
fused_rnn.LSTM takes and torch.nn.LSTM lacks, against the same model without them.

The model and the task are char_lm.py's (embedding, LSTM, linear read-out; next-character
cross-entropy on random windows of standard-library source), sized so that the plain model
overfits within a few minutes on a CPU: one module's source (``textwrap``, about 16,000 training
characters, its last fifth held out), a 1-layer LSTM of 256 units, 300 steps. Every variant starts
from the same weights and sees the same batches:

- ``plain``: ``fused_rnn.LSTM`` as ``nn.LSTM``;
- ``weight_drop``: DropConnect on the recurrent weights ``W_hh``, a fresh mask per forward
  (Wan et al., 2013; Merity et al., 2018: AWD-LSTM's "weight-dropped LSTM");
- ``recurrent_dropout``: variational dropout of ``h_{t-1}`` where it enters ``W_hh``, one mask per
  sequence (Gal & Ghahramani, 2016);
- ``zoneout``: each unit of ``h`` and ``c`` keeps its previous value with this probability
  (Krueger et al., 2017); in eval mode the expectation;
- ``all three``: the three at once, at lower rates.

All are active in training only; validation runs in eval mode. The summary gives each variant's
best validation bits per character (and when), its last, and the gap between its training bits
(eval mode, on fixed training windows) and its validation bits: the overfitting that the
regularizers fight.

On a CPU the plain model runs PyTorch's own LSTM operator (as nn.LSTM), ``weight_drop`` too (the
mask is applied to ``W_hh`` before the call), while ``recurrent_dropout`` and ``zoneout`` run
fused_rnn's plain-PyTorch reference recurrence, a loop over time several times slower; on a GPU
every variant runs the Triton kernels.

    python examples/regularized_lm.py                  # CPU-sized: a few minutes
    python examples/regularized_lm.py --variants plain "all three"
    python examples/regularized_lm.py --smoke          # seconds
"""

import torch

import char_lm
import common

MODULES = ("textwrap",)
HELD_OUT = 0.2  # the last fifth of each module is the validation text
VARIANTS = {
    "plain": {},
    "weight_drop": dict(weight_drop=0.5),
    "recurrent_dropout": dict(recurrent_dropout=0.3),
    "zoneout": dict(zoneout=0.15),
    "all three": dict(weight_drop=0.3, recurrent_dropout=0.2, zoneout=0.1),
}
DEFAULTS = dict(steps=300, batch=64, hidden=256, seq_len=32, lr=3e-3, log_every=25, val_windows=128,
                train_windows=128, layers=1)
SMOKE = dict(steps=2, batch=2, hidden=8, seq_len=5, lr=3e-3, log_every=2, val_windows=2, train_windows=2, layers=1)


def make_runs(args, vocab: int) -> list:
    """Per cell, one run per variant, all from the same initial weights."""
    runs = []
    for cell in args.cells:
        rnn_cls = common.CELLS[cell][1]
        torch.manual_seed(args.seed)
        weights = char_lm.CharLM(rnn_cls, vocab, args.hidden, args.layers).state_dict()
        for name in args.variants:
            model = char_lm.CharLM(rnn_cls, vocab, args.hidden, args.layers, **VARIANTS[name])
            model.load_state_dict(weights)
            model.to(args.device)
            optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
            runs.append(common.Run(f"{rnn_cls.__name__} {name}", rnn_cls.__name__, model, optimizer))
    return runs


def summarize(runs: list, train_bits, args) -> None:
    print(f"\nafter {args.steps} steps, eval mode (no dropout), bits per character:")
    print(f"  {'variant':>22}  options{'':<44}{'best val':>9}{'(step)':>8}{'last val':>10}{'train':>8}{'gap':>8}")
    for run in runs:
        run.model.eval()
        with torch.no_grad():
            train = train_bits(run.model)
        best_step, best = min(run.evals, key=lambda item: item[1])
        last = run.evals[-1][1]
        options = ", ".join(f"{key}={value}" for key, value in VARIANTS[run.label.split(" ", 1)[1]].items()) or "-"
        print(f"  {run.label:>22}  {options:<51}{best:9.4f}{best_step:8d}{last:10.4f}{train:8.4f}{last - train:8.4f}")


def plot(task: common.Task, runs: list, args) -> str:
    """Training curves (smoothed) on the left, validation on the right, one line per variant."""
    plt = common.pyplot()
    figure, (train, val) = plt.subplots(1, 2, figsize=(13, 4.5))
    window = max(1, args.steps // 50)
    for run in runs:
        line, = train.plot(range(1, args.steps + 1), common.smooth(run.losses, window), label=run.label)
        val.plot(*zip(*run.evals), "-o", markersize=3, color=line.get_color(), label=run.label)
    train.axhline(task.baseline, color="gray", linestyle=":", label=task.baseline_label)
    train.set_title(f"{task.title}: training, regularizers on")
    train.set_ylabel(f"{task.metric} (moving average over {window} steps)")
    val.set_title("validation, eval mode")
    val.set_ylabel(task.metric)
    for axis in (train, val):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    return common.save_figure(figure, task.name, args)


def main(argv=None) -> list:
    args = common.parse_args(__doc__, argv, DEFAULTS, SMOKE, {
        "val_windows": (int, "validation windows of --seq-len characters"),
        "train_windows": (int, "training windows for the final eval-mode training bits"),
        "layers": (int, "RNN layers"),
    }, cells=["lstm"], add_arguments=lambda parser: parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="which variants to train, all from the same initial weights (default: all)",
    ))
    data = char_lm.load(MODULES, HELD_OUT)
    task = char_lm.make_task(args, data, name="regularized_lm", title="Regularized char LM", layers=args.layers)
    runs = common.train_and_compare(task, args, make_runs(args, len(data.chars)))
    plot(task, runs, args)
    summarize(runs, char_lm.bits_per_character(data.train, args.train_windows, args), args)
    return runs


if __name__ == "__main__":
    main()
