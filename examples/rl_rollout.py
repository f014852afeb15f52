"""``reset=`` in a reinforcement-learning rollout: a recurrent policy runs over rollouts that hold
several episodes back to back, its state reset at every episode start, in one call; beside it the
same policy around torch.nn.LSTM / nn.GRU, which has no ``reset=``, runs the episodes split apart.

The environment is a memory task in the style of the T-maze: an episode shows a cue (left or
right) at its first step, then ``D`` blank steps (``D`` uniform in ``[--delay-min, --delay-max]``),
then a "go" signal; the action taken at the go step is rewarded with 1 if it matches the cue, 0
otherwise (the actions elsewhere do nothing). Each of the ``--batch`` environments runs episodes
back to back for ``--seq-len`` steps, the last one cut short, the layout in which actor-critic
methods store rollouts: observations ``(B, T, 3)`` and an episode-start flag ``(B, T)``.

- fused_rnn: ``rnn(observations, reset=starts)``; the state goes back to the initial (zero) state
  before each step where ``starts`` is True, so no episode sees the one before it. A rollout
  therefore begins at an episode start here: ``reset=`` returns to ``h_0``, not to zeros.
- torch.nn: every episode of the batch becomes one sequence of a ``PackedSequence``, the outputs
  are put back in rollout order.

Both give the same outputs (printed at the end, with the weight gradients). The policy (RNN,
linear layer over the two actions) is trained with REINFORCE, the mean reward of the batch as
baseline, actions drawn from the policy with Gumbel noise that is part of the batch, so that the
torch and the fused models draw the same actions. The table shows the fraction of wrong actions
(sampled in training; greedy on held-out rollouts): 0.5 is guessing. At the end, the trained fused
policy runs the held-out rollouts once more without ``reset=``, its state carried across episodes.

On a CPU, fused_rnn runs ``reset=`` with its plain-PyTorch reference recurrence (PyTorch's RNN
operator has no resets) and nn runs PyTorch's operator: the times say nothing about a GPU.

    python examples/rl_rollout.py                  # CPU-sized: a few minutes
    python examples/rl_rollout.py --smoke          # seconds
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import common

DEFAULTS = dict(steps=150, batch=64, hidden=32, seq_len=96, lr=3e-3, log_every=25, delay_min=5, delay_max=20,
                eval_batch=256)
SMOKE = dict(steps=2, batch=3, hidden=4, seq_len=8, lr=3e-3, log_every=2, delay_min=1, delay_max=2, eval_batch=3)
CUE, GO = (0, 1), 2  # observation channels: cue left, cue right, go
OBSERVATIONS, ACTIONS = 3, 2
FUSED = tuple(fused for _, fused in common.CELLS.values())


def rollouts(batch: int, steps: int, delays: tuple, generator: torch.Generator) -> tuple:
    """``(observations (B, T, 3), starts (B, T) bool, decisions (B, T) bool, cues (B, T), gumbel
    (B, T, 2))``: each row episodes back to back from an episode start; ``cues`` is the rewarded
    action (meaningful where ``decisions``), ``gumbel`` the noise the sampled actions are drawn with."""
    observations = torch.zeros(batch, steps, OBSERVATIONS)
    starts = torch.zeros(batch, steps, dtype=torch.bool)
    decisions = torch.zeros(batch, steps, dtype=torch.bool)
    cues = torch.zeros(batch, steps, dtype=torch.long)
    for row in range(batch):
        t = 0
        while t < steps:
            cue = int(torch.randint(0, 2, (), generator=generator))
            delay = int(torch.randint(delays[0], delays[1] + 1, (), generator=generator))
            starts[row, t] = True
            observations[row, t, CUE[cue]] = 1.0
            go = t + delay + 1
            if go < steps:
                observations[row, go, GO] = 1.0
                decisions[row, go] = True
                cues[row, go] = cue
            t = go + 1
    gumbel = -torch.log(-torch.log(torch.rand(batch, steps, ACTIONS, generator=generator).clamp(1e-20, 1 - 1e-7)))
    return observations, starts, decisions, cues, gumbel


def split_episodes(rnn: nn.Module, observations: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """``rnn``'s outputs ``(B, T, H)`` with every episode run on its own from the zero state: the
    episodes become the sequences of one PackedSequence. Needs ``starts[:, 0]`` all True."""
    batch, steps = starts.shape
    flat_starts = starts.flatten()
    episode = flat_starts.long().cumsum(0) - 1  # (B*T,): which episode each step belongs to
    first_step = flat_starts.nonzero().squeeze(1)  # (N,): where each episode starts
    position = torch.arange(batch * steps, device=starts.device) - first_step[episode]
    lengths = torch.bincount(episode)
    padded = observations.new_zeros(len(lengths), int(lengths.max()), observations.shape[2])
    padded[episode, position] = observations.flatten(0, 1)
    packed = pack_padded_sequence(padded, lengths.cpu(), batch_first=True, enforce_sorted=False)
    output, _ = pad_packed_sequence(rnn(packed)[0], batch_first=True)
    return output[episode, position].view(batch, steps, -1)


class Policy(nn.Module):
    """RNN over the observations, linear layer to the action logits. fused_rnn's RNNs take the
    whole rollout with ``reset=``; torch.nn's run the episodes split apart."""

    def __init__(self, rnn_cls: type, hidden: int):
        super().__init__()
        self.rnn = rnn_cls(OBSERVATIONS, hidden, batch_first=True)
        self.head = nn.Linear(hidden, ACTIONS)

    def forward(self, observations: torch.Tensor, starts, split: bool = False) -> torch.Tensor:
        """Logits ``(B, T, ACTIONS)``. ``starts=None``: no resets (the state crosses episodes);
        ``split``: run a fused RNN on the split episodes too."""
        if isinstance(self.rnn, FUSED) and not split:
            output, _ = self.rnn(observations, reset=starts)
        else:
            output = split_episodes(self.rnn, observations, starts)
        return self.head(output)


def reinforce(model: nn.Module, batch: tuple) -> torch.Tensor:
    """REINFORCE with the batch's mean reward as baseline. The value returned is the fraction of
    wrong actions; the gradient is the policy gradient's (a surrogate term of value 0 carries it)."""
    observations, starts, decisions, cues, gumbel = batch
    logits = model(observations, starts)[decisions]  # (N, ACTIONS): the go steps only
    actions = (logits.detach() + gumbel[decisions]).argmax(dim=1)  # a sample from softmax(logits)
    rewards = (actions == cues[decisions]).float()
    log_probabilities = torch.log_softmax(logits, dim=1).gather(1, actions[:, None]).squeeze(1)
    surrogate = -((rewards - rewards.mean()) * log_probabilities).mean()
    return surrogate - surrogate.detach() + (1 - rewards.mean())


def greedy_error(model: nn.Module, batch: tuple, reset: bool = True) -> float:
    """Fraction of wrong greedy actions; ``reset=False`` carries the state across episodes."""
    observations, starts, decisions, cues, _ = batch
    logits = model(observations, starts if reset else None)
    return (logits[decisions].argmax(dim=1) != cues[decisions]).float().mean().item()


def check_reset_matches_split(run: common.Run, batch: tuple) -> None:
    """The fused model's outputs and weight gradients with ``reset=`` against the same weights
    running the split episodes: fused_rnn's own RNN, and torch.nn's."""
    model = run.model
    torch_cls = next(torch_cls for torch_cls, fused_cls in common.CELLS.values() if isinstance(model.rnn, fused_cls))
    oracle = Policy(torch_cls, model.rnn.hidden_size).to(next(model.parameters()).device)
    oracle.load_state_dict(model.state_dict())
    observations, starts = batch[:2]
    upstream = torch.randn(*starts.shape, ACTIONS, generator=torch.Generator().manual_seed(0)).to(observations.device)
    results = {}
    for name, module, split in (("reset", model, False), ("split", model, True), ("nn", oracle, True)):
        module.eval()
        logits = module(observations, starts, split=split)
        gradients = torch.autograd.grad((logits * upstream).sum(), list(module.parameters()))
        results[name] = (logits, gradients)

    def differences(a, b):
        """The largest difference of the outputs, and of the gradients relative to the largest gradient."""
        output = (results[a][0] - results[b][0]).abs().max().item()
        gradient = max((x - y).abs().max().item() for x, y in zip(results[a][1], results[b][1], strict=True))
        gradient /= max(x.abs().max().item() for x in results[a][1])
        return f"outputs differ by {output:.1e}, weight gradients by {gradient:.1e}"

    episodes = int(starts.sum())
    print(f"  {run.label}, one call with reset= over {episodes} episodes in {len(starts)} rollouts of "
          f"{starts.shape[1]} steps, against the {episodes} episodes split apart (outputs: largest |logit| "
          f"{results['reset'][0].abs().max().item():.1f}; gradients: relative to the largest):")
    print(f"    {run.label} split: {differences('reset', 'split')}")
    print(f"    nn.{torch_cls.__name__} split: {differences('reset', 'nn')}")


def main(argv=None) -> list:
    args = common.parse_args(__doc__, argv, DEFAULTS, SMOKE, {
        "delay_min": (int, "fewest blank steps between cue and go"),
        "delay_max": (int, "most blank steps between cue and go"),
        "eval_batch": (int, "held-out rollouts"),
    })
    if not 0 <= args.delay_min <= args.delay_max:
        raise SystemExit("need 0 <= --delay-min <= --delay-max")
    delays = (args.delay_min, args.delay_max)
    held_out = tuple(tensor.to(args.device) for tensor in
                     rollouts(args.eval_batch, args.seq_len, delays, torch.Generator().manual_seed(args.seed + 1)))
    episodes = int(held_out[1].sum()) / args.eval_batch
    task = common.Task(
        name="rl_rollout",
        title=f"Cue memory, delay {args.delay_min}-{args.delay_max}, rollouts of {args.seq_len}",
        metric="wrong actions",
        build=lambda rnn_cls: Policy(rnn_cls, args.hidden),
        sample=lambda generator: rollouts(args.batch, args.seq_len, delays, generator),
        loss=reinforce,
        evaluate=lambda model: greedy_error(model, held_out),
        eval_name="held-out greedy",
        baseline=0.5,
        baseline_label="guessing",
    )
    print(f"rollouts of {args.seq_len} steps hold {episodes:.1f} episodes on average (held-out set)")
    runs = common.run_task(task, args)
    print("\nreset= against split episodes (trained fused weights, held-out rollouts, eval mode):")
    for run in runs:
        if run.twin is not None:
            check_reset_matches_split(run, held_out)
    observations, _, decisions, cues, _ = held_out
    first_cue = observations[:, :1, CUE[1]].long().expand_as(cues)  # the cue of each rollout's first episode
    print("\nthe trained fused policies on the held-out rollouts (wrong greedy actions):")
    for run in runs:
        if run.twin is not None:
            with torch.no_grad():
                print(f"  {run.label}: with reset= {greedy_error(run.model, held_out):.4f}, "
                      f"without (state carried across episodes) {greedy_error(run.model, held_out, reset=False):.4f}")
    print(f"  (always answering the rollout's first cue: {(first_cue != cues)[decisions].float().mean().item():.4f})")
    return runs


if __name__ == "__main__":
    main()
