"""Launch schemes: which scheme runs, and how many programs the persistent scheme may start.

The persistent scheme's programs wait for each other, so its grid must never exceed what can be
resident at once; these tests pin down that arithmetic without a GPU. Its kernels themselves are
tested under both schemes in ``test_ops_lstm`` / ``test_ops_gru`` (and on a GPU in ``test_gpu``).
"""

from types import SimpleNamespace

import pytest
import torch

from fused_rnn.ops import launch

CUDA = torch.device("cuda", 0)


@pytest.fixture
def multiprocessors(monkeypatch):
    """Pretend the GPU has a given number of usable SMs."""

    def set_count(count):
        monkeypatch.setattr(launch, "_usable_multiprocessors", lambda index: count)

    return set_count


@pytest.mark.parametrize(
    "batch_tiles, hidden_tiles, sms, programs",
    [
        pytest.param(1, 24, 132, 24, id="every-hidden-tile-its-own-program"),
        pytest.param(2, 100, 132, 66, id="programs-share-tiles-when-the-sms-run-out"),
        pytest.param(4, 33, 132, 33, id="exactly-fills-the-sms"),
        pytest.param(200, 4, 132, 1, id="more-batch-tiles-than-sms-one-program-each"),
        pytest.param(3, 8, 2, 1, id="tiny-gpu"),
    ],
)
def test_persistent_grid_never_exceeds_the_usable_sms(multiprocessors, batch_tiles, hidden_tiles, sms, programs):
    multiprocessors(sms)
    assert launch.persistent_programs(batch_tiles, hidden_tiles, CUDA) == programs
    # With more than one program per batch tile, all of them must be resident at once.
    assert programs == 1 or batch_tiles * programs <= sms


def test_persistent_scheme_runs_one_program_per_batch_tile_in_the_interpreter():
    # The interpreter runs programs one after another: a second program of the same batch tile
    # would wait forever for the first.
    assert launch.persistent_programs(3, 50, torch.device("cpu")) == 1


@pytest.mark.parametrize("share, usable", [(None, 132), ("50", 66), ("1", 1)])
def test_mps_thread_percentage_limits_the_usable_sms(monkeypatch, share, usable):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(multi_processor_count=132))
    if share is None:
        monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    else:
        monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", share)
    assert launch._usable_multiprocessors.__wrapped__(0) == usable


@pytest.mark.parametrize(
    "forced, has_projection, scheme",
    [
        (None, False, "persistent"),
        ("stepwise", False, "stepwise"),
        ("stepwise", True, "persistent"),  # the projection needs a barrier inside the step
        ("persistent", False, "persistent"),
    ],
)
def test_choose_scheme(monkeypatch, forced, has_projection, scheme):
    if forced is None:
        monkeypatch.delenv("FUSED_RNN_SCHEME", raising=False)
    else:
        monkeypatch.setenv("FUSED_RNN_SCHEME", forced)
    assert launch.choose_scheme(has_projection) == scheme


def test_unknown_scheme_is_rejected(monkeypatch):
    monkeypatch.setenv("FUSED_RNN_SCHEME", "sequential")
    with pytest.raises(ValueError, match="FUSED_RNN_SCHEME must be one of"):
        launch.choose_scheme(False)


@pytest.mark.parametrize(
    "batch, hidden, block_h",
    [
        pytest.param(16, 768, 16, id="headline-48-tiles-of-16-each-get-an-sm"),
        pytest.param(16, 4096, 32, id="256-tiles-of-16-would-not"),
        pytest.param(256, 768, 32, id="many-batch-tiles"),
    ],
)
def test_persistent_block_h_is_the_smallest_that_gives_every_tile_an_sm(batch, hidden, block_h):
    assert launch.kernel_options(torch.float16, batch, hidden, hidden, multiprocessors=132)["BLOCK_H"] == block_h


def test_persistent_launch_keeps_the_arrival_counters_below_2_31(monkeypatch):
    """Past 2**31 arrivals the int32 counters would wrap; such a launch runs one program per batch tile."""
    monkeypatch.setattr(launch, "persistent_programs", lambda batch_tiles, hidden_tiles, device: 8)
    grids = []

    class Kernel:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    for num_steps in (2**27 - 1, 2**27):  # 8 programs * 2 barriers * 2**27 steps = 2**31
        launch.launch(Kernel(), (torch.empty(1, 1, 1),), num_steps, 1, 128, 128, has_projection=True)
    assert grids == [(1, 8), (1, 1)]
