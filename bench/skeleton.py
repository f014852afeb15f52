"""``python -m bench.skeleton``: what a persistent step costs without its arithmetic, on a GPU,
next to what the cost model (``fused_rnn.ops.cost``) assumes for it.

Four measurements, each a kernel that does one part of a step and nothing else:

* ``chase``: one program follows a chain of dependent loads through L2 (``.cg``), one element
  of a random cycle after another: the L2 round trip the model takes as ``L2_ROUND_TRIP``.
* ``barrier``: ``n`` programs meet at ``launch.sync_programs`` after every step, with no data:
  the arrival and the poll that sees the last one.
* ``exchange``: the forward's data movement at a launch plan's shape: every step each of the
  ``n`` programs of a batch group reads all of ``h_{t-1}`` of the group's rows from L2, a batch
  tile after another, as the forward reads its operand (the gathering backward reads the gate
  gradients the same way: ``features = G * H``), writes its own features of ``h_t`` and meets
  the others at the barrier.
* ``tagged``: the same exchange without the barrier, an alternative the kernels do not use yet.
  Each program also writes its features of ``h_t`` into a ring of two slots, every fp16 value in
  a 32-bit word beside the step's tag (``store_tagged``), and the next step's read of ``h_t`` is
  its own poll: reissued until every word of the tile carries the step's tag
  (``sum_tagged_tile``). A step waits for the stores to reach L2 and one read that finds them,
  instead of the stores' fence, the arrival, the poll and then the read; it reads twice the
  bytes. A ring of two suffices: a program writes a slot again only after it has read, tagged,
  every program's features of the step in between, which each wrote after its own reads of the
  slot.

The persistent kernels launch through ``launch.launch``, as the layers do (a cooperative grid,
the barrier's counters allocated per call). Each figure is ``triton.testing.do_bench``'s median
time of a launch of ``2 * steps`` steps (or hops) less that of ``steps``, divided by ``steps``:
what a launch costs once (its barrier counters, the launch, the first reads from memory after
``do_bench`` flushes L2) drops out. The exchange's per-tile sum over features (a shuffle tree,
about 0.1 us) is in its figure, as the product is in a real step. After timing, each exchange
runs once more into a buffer of NaN and is compared with the same recurrence in PyTorch: a
program that read ``h_{t-1}`` before all of it was written would show there, so this also
checks the barrier on the GPU with up to 132 programs (the launch makes them all resident at
once, not necessarily one per SM).

Without a GPU the kernels run in Triton's interpreter, one program per batch group (it runs a
grid's programs one after another: more would wait forever at the barrier or the tags), a few steps each,
and only the agreement is checked: no time is printed. The JSON is written only with ``--out
DIR``: ``DIR/skeleton-<device>-<date>.json``, anew after every row (a tagged exchange whose words
never come waits until the caller's timeout).
"""

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from bench import interpret_kernels, text_table

if __name__ == "__main__" and not torch.cuda.is_available():  # the kernels below are defined interpreted
    interpret_kernels("bench.skeleton without a GPU", "TRITON_INTERPRET=1 python -m bench.skeleton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from bench import suite  # noqa: E402
from fused_rnn.ops import cost, launch  # noqa: E402
from fused_rnn.ops.launch import sync_programs  # noqa: E402
from fused_rnn.ops.recurrence import load_fresh_tile, store_tile  # noqa: E402

# (name, batch groups, programs per group, batch rows, features, batch rows per tile) of the
# exchanges: the headline's forward (48 programs of 16 units, P = 768; and in 96 programs of 8,
# which the cost model ranks behind it for reading h_{t-1} twice as often)
# and gathering backward (48 of 16, reading 4H = 3072 gate gradients), and the forward at B=256
# H=768 (2 x 48 programs, 8 tiles each); docs/performance.md has their plans.
EXCHANGES = (
    ("forward B16 H768", 1, 48, 16, 768, 16),
    ("forward B16 H768 in 96 programs", 1, 96, 16, 768, 16),
    ("backward B16 H768", 1, 48, 16, 3072, 16),
    ("forward B256 H768", 2, 48, 256, 768, 16),
)
BARRIER_PROGRAMS = (1, 2, 8, 32, 64, 96, 128, 132)
CHASED_LINES = 512  # lines of the chased cycle: 20,000 hops pass each about 40 times
LINE = 32  # int32 elements in a 128-byte line
# Tags of the tagged exchange: the step modulo 2**15, so that a word (tag << 16 | 16 bits) stays
# positive; a reader only tells step t from t - 2.
TAGS = tl.constexpr(1 << 15)
# What the model takes a tagged exchange to wait for besides its loads: its stores reaching L2,
# where the readers' next poll finds them.
TAGGED_ROUND_TRIPS = 1
# Keys of a result row, in order.
ROW_KEYS = ("kind", "name", "groups", "programs", "batch", "features", "block_b", "dtype", "us_per_step",
            "model_us_per_step", "agrees")


@triton.jit
def chase_kernel(next_ptr, out_ptr, hops):
    """One program: ``index = next[index]`` ``hops`` times from 0, each load waiting for the one
    before and read from L2, never L1 (``.cg``); writes the last index to ``out[0]``."""
    index = tl.load(next_ptr, cache_modifier=".cg")
    for _ in range(hops - 1):
        index = tl.load(next_ptr + index, cache_modifier=".cg")
    tl.store(out_ptr, index)


@triton.jit
def store_tagged(ptr, rows, row_length, features, mask, value, tag):
    """``ptr[rows, features] = tag << 16 | the fp16 bits of value``, one 32-bit word an element,
    written by relaxed atomics: strong stores, each word seen by a reader whole or not at all."""
    bits = value.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.atomic_xchg(ptr + rows[None, :] * row_length + features[:, None], bits | (tag << 16), mask=mask,
                   sem="relaxed", scope="gpu")


@triton.jit
def sum_tagged_tile(ptr, rows, row_length, row_mask, tag, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
                    NUM_PIECES: tl.constexpr):
    """Per row of the tile, the sum of the values of all ``row_length`` features that
    ``store_tagged`` wrote with ``tag``: every piece is read (``volatile``: from L2, each time),
    then all of them again while any word of the tile carries another tag."""
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    stale = 1
    while stale > 0:
        # Summed over the pieces element by element and reduced once: a reduction across warps
        # between two pieces would hold the next piece's load back until the first arrives.
        values = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.float32)
        stale_words = tl.zeros((BLOCK_K, BLOCK_B), dtype=tl.int1)
        for piece in tl.static_range(NUM_PIECES):
            features = piece * BLOCK_K + tl.arange(0, BLOCK_K)
            mask = (features[:, None] < row_length) & row_mask[None, :]
            words = tl.load(ptr + rows[None, :] * row_length + features[:, None], mask=mask, other=tag << 16,
                            volatile=True)
            stale_words = stale_words | ((words >> 16) != tag)
            values += (words & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        stale = tl.sum(tl.sum(stale_words.to(tl.int32), axis=1), axis=0)
        total = tl.sum(values, axis=0)
    return total


@triton.jit
def exchange_kernel(h_ptr, ring_ptr, B, GROUP_ROWS, P, OWN, barrier_ptr, step_begin, step_end,
                    EXCHANGE: tl.constexpr, TAGGED: tl.constexpr, STEP_PHASE: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                    NUM_PIECES: tl.constexpr):
    """A persistent launch's steps without their arithmetic. Grid ``(groups, n, 1)`` as
    ``launch.plan``'s: batch group ``g`` owns the rows ``[g * GROUP_ROWS, (g + 1) * GROUP_ROWS)``
    of ``h (steps + 1, B, P)``, program ``j`` of it the ``OWN`` features from ``j * OWN``.

    With ``EXCHANGE``, step ``t`` reads ``h[t]`` at the group's rows, ``BLOCK_B`` of them at a
    time, in ``NUM_PIECES`` pieces of ``BLOCK_K`` features, from L2 as the forward reads its
    operand (``recurrence.load_fresh_tile``), and writes its features of
    ``h[t + 1] = mean over features of h[t] / 2 + feature / P`` at those rows; then the barrier.
    With ``TAGGED`` as well, it reads ``h[t]`` from slot ``t % 2`` of ``ring (2, B, P)`` (int32
    words, ``store_tagged``) once they carry the tag of step ``t``, writes its features of
    ``h[t + 1]`` there too, into the other slot, and meets no barrier. Without ``EXCHANGE`` only
    the barrier. ``STEP_PHASE`` is ``launch.launch``'s, unused."""
    first_row = tl.program_id(0) * GROUP_ROWS
    last_row = tl.minimum(first_row + GROUP_ROWS, B)
    own = tl.program_id(1) * OWN + tl.arange(0, BLOCK_F)
    own_mask = (tl.arange(0, BLOCK_F) < OWN) & (own < P)
    arrivals = 0
    for t in range(step_begin, step_end):
        if EXCHANGE:
            slot = tl.cast(t, tl.int64) * B * P
            tag = tl.cast(t, tl.int32) % TAGS
            for tile in range(first_row, last_row, BLOCK_B):
                rows = tile + tl.arange(0, BLOCK_B)
                row_mask = rows < last_row
                if TAGGED:
                    total = sum_tagged_tile(ring_ptr + (t % 2) * B * P, rows, P, row_mask, tag,
                                            BLOCK_B, BLOCK_K, NUM_PIECES)
                else:
                    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
                    for piece in tl.static_range(NUM_PIECES):
                        features = piece * BLOCK_K + tl.arange(0, BLOCK_K)
                        operand = load_fresh_tile(h_ptr + slot, rows, P, features,
                                                  (features[:, None] < P) & row_mask[None, :])
                        total += tl.sum(operand.to(tl.float32), axis=0)
                value = total[None, :] / P * 0.5 + own[:, None].to(tl.float32) / P
                own_tile = own_mask[:, None] & row_mask[None, :]
                store_tile(h_ptr + slot + B * P, rows, P, own, own_tile, value)
                if TAGGED:
                    store_tagged(ring_ptr + ((t + 1) % 2) * B * P, rows, P, own, own_tile, value, (tag + 1) % TAGS)
        if not TAGGED:
            arrivals = sync_programs(barrier_ptr, arrivals, True)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One row: its ``kind`` (``chase``, ``barrier``, ``exchange`` or ``tagged``) and, for the persistent
    kernels, ``groups`` batch groups of ``programs`` programs over ``batch`` rows of ``features``
    (none for the barrier alone) in ``dtype``, tiles of ``block_b`` rows."""

    kind: str
    name: str
    groups: int = 1
    programs: int = 1
    batch: int = 0
    features: int = 0
    block_b: int = 16
    dtype: torch.dtype = torch.float16

    @property
    def tiles(self) -> int:
        """Batch tiles a program walks per step."""
        return math.ceil(math.ceil(self.batch / self.groups) / self.block_b)

    @property
    def own(self) -> int:
        """Features each program writes."""
        return max(1, math.ceil(self.features / self.programs))

    @property
    def exchanges(self) -> bool:
        """Whether it moves ``h`` (an exchange, tagged or not)."""
        return self.kind in ("exchange", "tagged")

    def bytes_per_program(self) -> int:
        """Bytes a program reads and writes per step: ``h_{t-1}`` of its group, its own features;
        tagged, 32-bit words of ``h_{t-1}`` and its own features a second time as words."""
        size = self.dtype.itemsize
        read, written = (4, size + 4) if self.kind == "tagged" else (size, size)
        return self.tiles * self.block_b * (self.features * read + self.own * written)

    def plan(self) -> launch.Plan:
        """The persistent kernels' ``launch.Plan`` (``EXCHANGE`` off for the barrier alone)."""
        block_k, num_pieces = launch.pieces(max(1, self.features), widest=1024)
        options = dict(EXCHANGE=self.exchanges, TAGGED=self.kind == "tagged", BLOCK_B=self.block_b,
                       BLOCK_F=triton.next_power_of_2(self.own), BLOCK_K=block_k, NUM_PIECES=num_pieces)
        return launch.Plan("persistent", (self.groups, self.programs, 1), options, False)


def measurements(multiprocessors: int, on_gpu: bool):
    """Every ``Measurement``: on a GPU as named above, as far as its SMs go; in the interpreter
    with one program per batch group."""
    yield Measurement("chase", "L2 round trip", dtype=torch.int32)
    for programs in BARRIER_PROGRAMS if on_gpu else (1,):
        if programs <= multiprocessors:
            yield Measurement("barrier", f"{programs} programs", programs=programs)
    for kind in ("exchange", "tagged"):
        for name, groups, programs, batch, features, block_b in EXCHANGES:
            if not on_gpu:
                programs = 1
            if groups * programs <= multiprocessors or not on_gpu:
                yield Measurement(kind, name, groups, programs, batch, features, block_b)


def run_persistent(measurement: Measurement, steps: int, h: torch.Tensor, ring=None) -> None:
    """Launch an exchange, or the barrier alone, over ``steps`` steps on ``h (steps + 1, B, P)``;
    a tagged one on ``ring``, by default made anew from ``h[0]`` (``initial_ring``)."""
    group_rows = math.ceil(measurement.batch / measurement.groups)
    if ring is None:
        ring = initial_ring(h[0]) if measurement.kind == "tagged" else h  # untouched without TAGGED
    launch.launch(exchange_kernel, (h, ring, measurement.batch, group_rows, measurement.features, measurement.own),
                  measurement.plan(), steps)


def initial_ring(h0: torch.Tensor) -> torch.Tensor:
    """The tagged exchange's ring before step 0: ``h0``'s fp16 bits in slot 0 tagged as step 0, in
    slot 1 as step -1 (``store_tagged``'s words)."""
    if h0.dtype != torch.float16:
        raise TypeError(f"the tagged exchange packs float16 values, got h of {h0.dtype}")
    bits = h0.view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.stack([bits, bits | (TAGS.value - 1) << 16])


def expected_exchange(h0: torch.Tensor, steps: int) -> torch.Tensor:
    """``exchange_kernel``'s ``h`` in PyTorch: fp32 arithmetic, each step rounded to ``h0``'s dtype."""
    features = torch.arange(h0.shape[1], device=h0.device, dtype=torch.float32) / h0.shape[1]
    states = [h0]
    for _ in range(steps):
        states.append((states[-1].float().mean(1, keepdim=True) * 0.5 + features).to(h0.dtype))
    return torch.stack(states)


def check_exchange(measurement: Measurement, steps: int, device: str) -> bool:
    """Run an exchange into a buffer of NaN past a random ``h_0`` and compare with
    ``expected_exchange`` (within two units in the last place of fp16: the sums' order differs)."""
    shape = (measurement.batch, measurement.features)
    h = torch.full((steps + 1, *shape), float("nan"), dtype=measurement.dtype, device=device)
    h[0] = torch.rand(shape, device=device).to(measurement.dtype)
    run_persistent(measurement, steps, h)
    return torch.allclose(h.float(), expected_exchange(h[0], steps).float(), rtol=2e-3, atol=0)


def make_cycle(lines: int, device: str, seed: int = 0) -> torch.Tensor:
    """``next`` of one cycle through ``lines`` elements in a random order, each at the start of its
    own 128-byte line (the rest -1), int32. Few enough to stay in L2, where ``do_bench`` flushes
    it before each call: only the first pass of a chase goes to memory."""
    order = torch.randperm(lines, generator=torch.Generator().manual_seed(seed)) * LINE
    cycle = torch.full((lines * LINE,), -1, dtype=torch.int32)
    cycle[order] = order.roll(-1).to(torch.int32)
    return cycle.to(device)


def chase(cycle: torch.Tensor, hops: int, out: torch.Tensor) -> None:
    """Follow ``hops`` links of ``cycle`` from 0 in the kernel, the last index into ``out[0]``."""
    chase_kernel[(1,)](cycle, out, hops, num_warps=1)


def walk(cycle: torch.Tensor, hops: int) -> int:
    """``chase`` in Python."""
    links, index = cycle.tolist(), 0
    for _ in range(hops):
        index = links[index]
    return index


def model_us(measurement: Measurement) -> float:
    """What the cost model (``cost``) assumes: an L2 round trip per hop; the barrier's arrival and
    poll; an exchange's stores, barrier and a load per tile, plus its bytes over the L2 bandwidth;
    tagged, the stores and a load per tile (``TAGGED_ROUND_TRIPS``), plus its bytes."""
    trip = cost.L2_ROUND_TRIP * 1e6
    if measurement.kind == "chase":
        return trip
    if measurement.kind == "barrier":
        return (cost.SYNC_ROUND_TRIPS - 1) * trip
    bandwidth = cost.l2_seconds(measurement.bytes_per_program(), measurement.groups * measurement.programs)
    sync = TAGGED_ROUND_TRIPS if measurement.kind == "tagged" else cost.SYNC_ROUND_TRIPS
    return (sync + measurement.tiles * cost.TILE_ROUND_TRIPS) * trip + bandwidth * 1e6


def measure(measurement: Measurement, device: str, steps: int, hops: int) -> dict:
    """Its result row (``ROW_KEYS``): on a GPU the median time per step (or hop); whether the
    chase and the exchange computed what PyTorch does (None for the barrier, which computes
    nothing)."""
    on_gpu, us, agrees = device == "cuda", None, None
    if measurement.kind == "chase":
        cycle, out = make_cycle(CHASED_LINES, device), torch.full((1,), -1, dtype=torch.int32, device=device)
        if on_gpu:
            us = per_step_us(lambda length: chase(cycle, length, out), hops)
        chase(cycle, hops, out)
        agrees = out.item() == walk(cycle.cpu(), hops)
    else:
        if on_gpu:
            # The barrier alone reads and writes nothing: one element stands for h.
            h = torch.rand(2 * steps + 1, max(1, measurement.batch), max(1, measurement.features), device=device)
            h = h.to(measurement.dtype)
            us = per_step_us(lambda length: run_persistent(measurement, length, h), steps)
        if measurement.exchanges:
            agrees = check_exchange(measurement, steps, device)
    return dict(kind=measurement.kind, name=measurement.name, groups=measurement.groups,
                programs=measurement.programs, batch=measurement.batch, features=measurement.features,
                block_b=measurement.block_b, dtype=str(measurement.dtype).removeprefix("torch."), us_per_step=us,
                model_us_per_step=model_us(measurement), agrees=agrees)


def per_step_us(run, length: int) -> float:
    """Microseconds per step of ``run(steps)``: ``do_bench``'s medians at ``2 * length`` and
    ``length`` steps, their difference over ``length``."""
    short, long = (triton.testing.do_bench(lambda: run(steps), return_mode="median") for steps in (length, 2 * length))
    return (long - short) * 1e3 / length


def format_table(rows: list) -> str:
    """The rows as a fixed-width text table."""
    header = ("kind", "name", "grid", "us per step (hop)", "model us", "agrees")
    lines = [header] + [
        (row["kind"], row["name"], f"{row['groups']}x{row['programs']}",
         "-" if row["us_per_step"] is None else f"{row['us_per_step']:.3f}", f"{row['model_us_per_step']:.3f}",
         {True: "yes", False: "NO", None: "-"}[row["agrees"]])
        for row in rows
    ]
    return text_table(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.skeleton", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, help="steps of each launch (default: 2000 on a GPU, 3 interpreted)")
    parser.add_argument("--hops", type=int, help="dependent loads of the chase (default: 20000 on a GPU, 50 interpreted)")
    parser.add_argument("--out", help="directory for the JSON (nothing is written without it)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Measure, print the table, write the JSON if ``--out``; exit status 1 when a check disagrees."""
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    steps = args.steps if args.steps is not None else 2000 if on_gpu else 3
    hops = args.hops if args.hops is not None else 20000 if on_gpu else 50
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
    header = suite.environment(device)
    print(f"device {header['device']}, triton {header['triton']}; {steps} steps, {hops} hops")
    path = None
    if args.out is not None:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = Path(args.out) / f"skeleton-{suite.result_stem(header['device'])}.json"
    config = dict(steps=steps, hops=hops, chased_lines=CHASED_LINES)
    rows = []
    for measurement in measurements(multiprocessors, on_gpu):
        rows.append(measure(measurement, device, steps, hops))
        print(f"{measurement.kind} {measurement.name}: done", flush=True)
        if path is not None:  # after every row: one that never finishes leaves the rows before it
            path.write_text(json.dumps({**header, "config": config, "rows": rows}, indent=1) + "\n")
    print(format_table(rows))
    if not on_gpu:
        print("Interpreted: the checks ran, nothing was timed.")
    if path is not None:
        print(f"wrote {path}")
    return 1 if any(row["agrees"] is False for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
