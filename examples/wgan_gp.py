"""WGAN-GP (Gulrajani et al., 2017) on noisy sine waves, with a fused_rnn.LSTM critic.

WGAN-GP keeps the critic 1-Lipschitz with a gradient penalty: at points ``x`` between real and
generated sequences, ``lambda * (||d critic(x) / dx||_2 - 1)^2`` (lambda = 10). Training the
critic on that term differentiates a gradient, a second derivative through the LSTM's recurrence.
On a GPU ``torch.nn.LSTM`` (cuDNN) refuses it: "the derivative for '_cudnn_rnn_backward' is not
implemented. Double backwards is not supported for CuDNN RNNs". fused_rnn's layers take it: their
first-order backward runs the BPTT kernels, and when a graph of that backward is asked for
(``create_graph=True``) they recompute the layer in plain PyTorch and differentiate it.

- Data: ``a sin(2 pi f t / T + phi) + 0.1 noise`` over ``t < T``, with ``f`` uniform in [1, 3]
  cycles per sequence, ``phi`` in [0, 2 pi), the amplitude ``a`` in [0.5, 1].
- Generator: a fused_rnn.GRU whose initial state is a linear map of 8 latent numbers, fed one
  noise value per step, with a linear read-out per step.
- Critic: a fused_rnn.LSTM (``--cells gru``: a GRU) reading the sequence in frames of ``--frame``
  samples (frames keep the double backward cheap on a CPU); the score is the mean of a linear
  head over its steps. Adam with betas (0.5, 0.9), ``--critic-steps`` critic updates per
  generator update.

Before training, a small check in float64: the penalty's gradient with respect to the critic's
weights through fused_rnn (on ``--device``) against nn.LSTM on the CPU, which is differentiable
twice; on a GPU, nn.LSTM on CUDA is tried as well. Progress is measured on 1000 held-out real
and generated sequences: the spectral distance (total variation between their mean normalized
power spectra: 0 same, 1 disjoint), the amplitude distance (Wasserstein-1 between the per-sequence
standard deviations) and the mean peak frequency; two independent real sets give the floor.

    python examples/wgan_gp.py                  # CPU-sized: under a minute
    python examples/wgan_gp.py --smoke          # seconds
"""

import copy
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

import common

DEFAULTS = dict(steps=200, batch=64, hidden=32, seq_len=32, lr=1e-3, log_every=20, critic_steps=5, frame=4,
                eval_batch=1000)
SMOKE = dict(steps=2, batch=4, hidden=4, seq_len=8, lr=1e-3, log_every=1, critic_steps=2, frame=4, eval_batch=16)
PENALTY_WEIGHT = 10.0  # lambda
LATENT = 8
NOISE = 0.1
BETAS = (0.5, 0.9)
PLOTTED_SAMPLES = 4


def real_sequences(count: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``(N, T, 1)`` noisy sine waves with random frequency, phase and amplitude."""
    frequency = 1 + 2 * torch.rand(count, 1, generator=generator)
    phase = 2 * math.pi * torch.rand(count, 1, generator=generator)
    amplitude = 0.5 + 0.5 * torch.rand(count, 1, generator=generator)
    t = torch.arange(seq_len)
    waves = amplitude * torch.sin(2 * math.pi * frequency * t / seq_len + phase)
    return (waves + NOISE * torch.randn(count, seq_len, generator=generator)).unsqueeze(2)


def latent_noise(count: int, seq_len: int, generator: torch.Generator) -> tuple:
    """The generator's input: ``z (N, LATENT)`` and per-step noise ``(N, T, 1)``."""
    return torch.randn(count, LATENT, generator=generator), torch.randn(count, seq_len, 1, generator=generator)


class Generator(nn.Module):
    """A GRU started from a linear map of ``z``, driven by per-step noise; one value per step."""

    def __init__(self, hidden: int):
        super().__init__()
        self.start = nn.Linear(LATENT, hidden)
        self.rnn = common.CELLS["gru"][1](1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:  # z: (B, LATENT), noise: (B, T, 1)
        output, _ = self.rnn(noise, torch.tanh(self.start(z)).unsqueeze(0))
        return self.head(output)  # (B, T, 1)


class Critic(nn.Module):
    """An RNN over frames of ``frame`` samples; the score is the mean of a linear head over its steps."""

    def __init__(self, rnn_cls: type, hidden: int, frame: int):
        super().__init__()
        self.frame = frame
        self.rnn = rnn_cls(frame, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:  # sequences: (B, T, 1)
        output, _ = self.rnn(sequences.reshape(len(sequences), -1, self.frame))
        return self.head(output).mean(dim=(1, 2))  # (B,)


def gradient_penalty(critic: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """``mean (||d critic / d points||_2 - 1)^2`` over the sequences, with the graph of the
    input gradient kept (``create_graph=True``) so that the penalty can be backpropagated."""
    points = points.detach().requires_grad_()
    (grad,) = torch.autograd.grad(critic(points).sum(), points, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def check_second_derivative(cell: str, device: torch.device) -> float:
    """Float64, tiny sizes: the penalty's gradients w.r.t. the critic's weights through fused_rnn on
    ``device`` against torch.nn on the CPU; prints and returns the largest difference relative to
    the largest gradient. On CUDA also tries torch.nn there (cuDNN) and prints what it says."""
    torch_cls, fused_cls = common.CELLS[cell]
    reference = Critic(torch_cls, hidden=5, frame=2).double()
    fused = Critic(fused_cls, hidden=5, frame=2).double().to(device)
    fused.load_state_dict(reference.state_dict())
    points = torch.randn(3, 6, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # The head's bias does not reach the input gradient: its gradient is zero (materialized).
    expected = torch.autograd.grad(gradient_penalty(reference, points), list(reference.parameters()),
                                   materialize_grads=True)
    actual = torch.autograd.grad(gradient_penalty(fused, points.to(device)), list(fused.parameters()),
                                 materialize_grads=True)
    error = max((a.cpu() - e).abs().max().item() for a, e in zip(actual, expected, strict=True))
    error /= max(e.abs().max().item() for e in expected)
    print(f"second-derivative check (float64, 3 sequences of 6): the penalty's weight gradients through "
          f"fused_rnn.{fused_cls.__name__} on {device} and nn.{torch_cls.__name__} on the "
          f"CPU differ by {error:.1e} of the largest")
    if device.type == "cuda":
        on_gpu = copy.deepcopy(reference).float().to(device)
        try:
            gradient_penalty(on_gpu, points.float().to(device)).backward()
            print(f"  nn.{torch_cls.__name__} on {device} took it as well (cuDNN disabled?)")
        except RuntimeError as refusal:
            print(f"  nn.{torch_cls.__name__} on {device} refuses it: {str(refusal).split('. ')[0]}")
    else:
        print(f"  (on a GPU nn.{torch_cls.__name__} refuses this: cuDNN has no double backward; "
              "--device cuda shows it)")
    return error


def spectrum(sequences: torch.Tensor) -> torch.Tensor:
    """``(T // 2 + 1,)``: the power spectrum of each sequence, normalized to sum 1, averaged."""
    power = torch.fft.rfft(sequences.squeeze(2).double(), dim=1).abs().square()
    return (power / power.sum(dim=1, keepdim=True).clamp_min(1e-30)).mean(dim=0)


def statistics(real: torch.Tensor, fake: torch.Tensor) -> dict:
    """How far ``fake`` is from ``real`` (same number of sequences, on the CPU)."""
    spread = [sequences.squeeze(2).double().std(dim=1).sort().values for sequences in (real, fake)]
    peak = torch.fft.rfft(fake.squeeze(2).double(), dim=1).abs()[:, 1:].argmax(dim=1) + 1
    return {
        "spectral": 0.5 * (spectrum(real) - spectrum(fake)).abs().sum().item(),
        "amplitude": (spread[0] - spread[1]).abs().mean().item(),
        "peak": peak.double().mean().item(),
    }


@dataclass
class GanRun:
    """One WGAN-GP trained with one critic cell, and its history (one entry per generator step)."""

    label: str  # the critic's class, e.g. "fused_rnn.LSTM"
    generator: nn.Module
    critic: nn.Module
    critic_loss: list = field(default_factory=list)  # -W + lambda * penalty, mean over the critic steps
    wasserstein: list = field(default_factory=list)  # W = mean critic(real) - mean critic(fake)
    penalty: list = field(default_factory=list)  # lambda * penalty
    generator_loss: list = field(default_factory=list)  # -mean critic(fake)
    evals: list = field(default_factory=list)  # (step, statistics)
    check_error: float = float("nan")  # check_second_derivative's relative difference
    seconds: float = 0.0


COLUMNS = (("critic_loss", "critic loss"), ("wasserstein", "W estimate"), ("penalty", "10*penalty"),
           ("generator_loss", "gen loss"))


def train(cell: str, args, held_out: tuple) -> GanRun:
    """Train one WGAN-GP, printing a table as it goes."""
    torch.manual_seed(args.seed)
    fused_cls = common.CELLS[cell][1]
    run = GanRun(f"fused_rnn.{fused_cls.__name__}", Generator(args.hidden).to(args.device),
                 Critic(fused_cls, args.hidden, args.frame).to(args.device))
    real_eval, noise_eval = held_out
    critic_optimizer, generator_optimizer = (torch.optim.Adam(model.parameters(), lr=args.lr, betas=BETAS)
                                             for model in (run.critic, run.generator))
    data = torch.Generator().manual_seed(args.seed)

    def noise():
        return (tensor.to(args.device) for tensor in latent_noise(args.batch, args.seq_len, data))

    def evaluate(step):
        with torch.no_grad():
            fake = run.generator(*(tensor.to(args.device) for tensor in noise_eval)).cpu()
        run.evals.append((step, statistics(real_eval, fake)))

    evaluate(0)
    print(f"\ncritic {run.label}: means since the previous line; distances to held-out real sequences")
    print(" step" + "".join(f"{title:>13}" for _, title in COLUMNS) + f"{'spectral':>10}{'amplitude':>10}")
    since = 0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        critic_losses, distances, penalties = [], [], []
        for _ in range(args.critic_steps):
            real = real_sequences(args.batch, args.seq_len, data).to(args.device)
            with torch.no_grad():
                fake = run.generator(*noise())
            mix = torch.rand(args.batch, 1, 1, generator=data).to(args.device)
            scores = run.critic(torch.cat([real, fake]))
            distance = scores[:args.batch].mean() - scores[args.batch:].mean()
            penalty = PENALTY_WEIGHT * gradient_penalty(run.critic, mix * real + (1 - mix) * fake)
            loss = penalty - distance
            critic_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            critic_optimizer.step()
            critic_losses.append(loss.item())
            distances.append(distance.item())
            penalties.append(penalty.item())
        fake = run.generator(*noise())
        generator_loss = -run.critic(fake).mean()
        generator_optimizer.zero_grad(set_to_none=True)
        generator_loss.backward()
        generator_optimizer.step()
        run.generator_loss.append(generator_loss.item())
        run.seconds += time.perf_counter() - start
        for name, values in (("critic_loss", critic_losses), ("wasserstein", distances), ("penalty", penalties)):
            getattr(run, name).append(sum(values) / len(values))
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            evaluate(step)
            means = "".join(f"{sum(getattr(run, name)[since:]) / (step - since):13.4f}" for name, _ in COLUMNS)
            stats = run.evals[-1][1]
            print(f"{step:5d}{means}{stats['spectral']:10.4f}{stats['amplitude']:10.4f}", flush=True)
            since = step
    return run


def summarize(runs: list, floor: dict, args) -> None:
    print(f"\n{args.eval_batch} sequences against {args.eval_batch} held-out real ones: distances (0: alike) and "
          "the mean peak frequency (cycles per sequence)")
    print(f"  {'':<52}{'spectral':>9}{'amplitude':>10}{'peak':>7}")
    rows = [("another real set (the floor)", floor)]
    for run in runs:
        rows += [(f"generator before training ({run.label} critic)", run.evals[0][1]),
                 (f"generator after {args.steps} steps ({run.label} critic)", run.evals[-1][1])]
    for name, stats in rows:
        print(f"  {name:<52}{stats['spectral']:9.4f}{stats['amplitude']:10.4f}{stats['peak']:7.2f}")
    for run in runs:
        print(f"  {run.label} critic: {run.seconds:.1f} s of training, {1000 * run.seconds / args.steps:.0f} ms per "
              f"generator step ({args.critic_steps} critic steps with the double backward, 1 generator step)")
    if args.device.type != "cuda":
        print("  (times on a CPU say nothing about fused_rnn's speed on a GPU)")


def plot(runs: list, real: torch.Tensor, noise: tuple, floor: dict, args) -> str:
    """Per critic cell: the W estimate and the penalty, the distances, a few sequences."""
    plt = common.pyplot()
    figure, axes = plt.subplots(len(runs), 3, figsize=(16, 4 * len(runs)), squeeze=False)
    window = max(1, args.steps // 25)
    for (losses, distances, samples), run in zip(axes, runs):
        steps = range(1, args.steps + 1)
        losses.plot(steps, common.smooth(run.wasserstein, window), label="W estimate: critic(real) - critic(fake)")
        losses.plot(steps, common.smooth(run.penalty, window), label=f"{PENALTY_WEIGHT:g} * gradient penalty")
        losses.set_title(f"WGAN-GP, {run.label} critic (moving average over {window} steps)")
        for name, style in (("spectral", "-o"), ("amplitude", "-s")):
            line, = distances.plot([step for step, _ in run.evals], [stats[name] for _, stats in run.evals], style,
                                   label=f"{name} distance")
            distances.axhline(floor[name], color=line.get_color(), linestyle=":", label=f"{name}: real vs real")
        distances.set_yscale("log")
        distances.set_title("generated vs held-out real sequences")
        with torch.no_grad():
            fake = run.generator(*(tensor[:PLOTTED_SAMPLES].to(args.device) for tensor in noise)).cpu()
        for index in range(PLOTTED_SAMPLES):
            samples.plot(real[index, :, 0], color="gray", alpha=0.6, label="real" if index == 0 else None)
            samples.plot(fake[index, :, 0], label="generated" if index == 0 else None)
        samples.set_title(f"after {args.steps} generator steps")
        samples.set_xlabel("t")
        for axis in (losses, distances):
            axis.set_xlabel("generator step")
        for axis in (losses, distances, samples):
            axis.grid(alpha=0.3)
            axis.legend(fontsize="small")
    figure.tight_layout()
    return common.save_figure(figure, "wgan_gp", args)


def main(argv=None) -> list:
    args = common.parse_args(__doc__, argv, DEFAULTS, SMOKE, {
        "critic_steps": (int, "critic updates per generator update"),
        "frame": (int, "samples per critic step"),
        "eval_batch": (int, "held-out real and generated sequences the distances are measured on"),
    }, cells=["lstm"])
    if args.seq_len % args.frame:
        sys.exit(f"--seq-len ({args.seq_len}) must be a multiple of --frame ({args.frame})")
    print(f"WGAN-GP on noisy sine waves: device {args.device}; fused_rnn runs {common.fused_path(args.device)}")
    print(f"generator steps {args.steps} ({args.critic_steps} critic steps each), batch {args.batch}, hidden "
          f"{args.hidden}, seq-len {args.seq_len} (critic frames of {args.frame}), lr {args.lr}, seed {args.seed}")
    held_out = torch.Generator().manual_seed(args.seed + 1)
    real_eval = real_sequences(args.eval_batch, args.seq_len, held_out)
    floor = statistics(real_eval, real_sequences(args.eval_batch, args.seq_len, held_out))
    noise_eval = latent_noise(args.eval_batch, args.seq_len, held_out)
    runs = []
    for cell in args.cells:
        error = check_second_derivative(cell, args.device)
        runs.append(train(cell, args, (real_eval, noise_eval)))
        runs[-1].check_error = error
    summarize(runs, floor, args)
    plot(runs, real_eval, noise_eval, floor, args)
    return runs


if __name__ == "__main__":
    main()
