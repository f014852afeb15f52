"""On CUDA: the fused modules against ``torch.nn`` (cuDNN) and against a float64 CPU reference.

Every test here needs a GPU and is skipped with the reason 'needs CUDA' elsewhere. The reference
is ``nn.LSTM`` / ``nn.GRU`` in float64 on the CPU with the tested dtype's rounded weights and inputs
(see ``test_modules``); exact fp32 is compared with cuDNN too, with TF32 off in both. Each test
runs under both launch schemes (``FUSED_RNN_SCHEME``). The option grid of the kernel tests
(``test_ops_*``) runs here on the GPU's plans too, since those tests use CUDA when present.
"""

import pytest
import torch
from helpers import TF32_TOLERANCE, assert_close
from ops_cases import ALL_EVAL, ALL_TRAINING, Case, check_against_reference, params, use_plan
from test_modules import TORCH, assert_matches, draw_inputs, hx_of, is_fused, make_pair, run_module
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPES = {
    "B16-T64-H768-I768": dict(batch=16, steps=64, input_size=768, hidden_size=768),
    "B3-T7-H100-I37": dict(batch=3, steps=7, input_size=37, hidden_size=100),
    "B4-T6-H48-I20-2layers-bidirectional": dict(batch=4, steps=6, input_size=20, hidden_size=48,
                                               num_layers=2, bidirectional=True),
    "B5-T9-H64-I40-proj24": dict(batch=5, steps=9, input_size=40, hidden_size=64, proj_size=24),
    # The headline's projection: W_hr on chip in the forward too, 24 pieces of 32 columns; and at
    # B=256 the forward's W_hr on chip beside 32-unit blocks (fp16), or streaming beside a resident
    # W_hh (TF32: launch._projection_fits).
    "B16-T12-H768-I64-proj384": dict(batch=16, steps=12, input_size=64, hidden_size=768, proj_size=384),
    "B256-T4-H768-I32-proj384": dict(batch=256, steps=4, input_size=32, hidden_size=768, proj_size=384),
    # More batch tiles than one group: batch groups and each program walking several tiles.
    "B600-T5-H1024-I64": dict(batch=600, steps=5, input_size=64, hidden_size=1024),
}
CASES = [
    pytest.param(cell, SHAPES[shape], id=f"{cell}-{shape}")
    for cell in ("LSTM", "GRU", "RNN_TANH")
    for shape in SHAPES
    if cell == "LSTM" or "proj" not in shape
]


@pytest.fixture(params=["persistent", "stepwise"])
def scheme(request, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_SCHEME", request.param)
    return request.param


@pytest.fixture
def tf32_flags():
    """Restores cuBLAS's TF32 switch a test sets (conftest's ``ieee_fp32`` restores cuDNN's, which
    the kernels follow). Not monkeypatch: it would delete the attribute of torch's module object."""
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def set_tf32(allowed):
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed


def build(cell, dtype, config):
    """``(reference, fused, cudnn, tensors)`` for a shape config: equal weights, random inputs."""
    options = {key: value for key, value in config.items() if key not in ("batch", "steps")}
    reference, fused = make_pair(cell, dtype, **options)
    cudnn = TORCH[cell](device="cuda", dtype=dtype, **options)
    cudnn.load_state_dict(reference.state_dict())
    assert is_fused(fused, cell) and fused.weight_ih_l0.is_cuda
    tensors = draw_inputs(reference, dtype, batch=config["batch"], steps=config["steps"])
    return reference, fused, cudnn, tensors


@pytest.mark.parametrize("cell, config", CASES)
def test_fp32_without_tf32_matches_fp64_reference_within_cudnns_error(cell, config, scheme, tf32_flags):
    """Every result within twice cuDNN's worst error of the fp64 reference, plus 1e-5 of the
    result's largest magnitude (``helpers.assert_close``): at B=16 T=64 H=768 the weight
    gradients' sums of 1024 terms cancel, and torch's own fp32 misses an elementwise 1e-5."""
    set_tf32(False)
    reference, fused, cudnn, tensors = build(cell, torch.float32, config)
    expected = run_module(reference, tensors, torch.float32)
    assert_matches(run_module(fused, tensors, torch.float32), expected, torch.float32,
                   same_math=run_module(cudnn, tensors, torch.float32))


@pytest.mark.parametrize("cell, config", CASES)
def test_fp32_with_tf32_matches_fp64_reference_within_cudnns_tf32_error(cell, config, scheme, tf32_flags):
    """As without TF32, against cuDNN in TF32, with TF32's tolerance (1e-3)."""
    set_tf32(True)
    reference, fused, cudnn, tensors = build(cell, torch.float32, config)
    expected = run_module(reference, tensors, torch.float32)
    ours, theirs = run_module(fused, tensors, torch.float32), run_module(cudnn, tensors, torch.float32)
    assert list(ours) == list(expected)
    for name, value in expected.items():
        assert_close(ours[name], value, tolerance=TF32_TOLERANCE, name=f"tf32: {name}", same_math=theirs[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("cell, config", CASES)
def test_half_precision_matches_fp64_reference(cell, config, dtype, scheme):
    """Every result within twice cuDNN's worst error of the fp64 reference, plus the dtype's
    tolerance of the result's largest magnitude (``helpers.assert_close``)."""
    reference, fused, cudnn, tensors = build(cell, dtype, config)
    expected = run_module(reference, tensors, dtype)
    assert_matches(run_module(fused, tensors, dtype), expected, dtype, same_math=run_module(cudnn, tensors, dtype))


PACKED = dict(batch=6, steps=10, input_size=37, hidden_size=100, num_layers=2, bidirectional=True)
LENGTHS = [7, 10, 1, 4, 10, 3]


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_packed_sequence_matches_cudnn_and_fp64_reference(cell, scheme, tf32_flags):
    set_tf32(False)
    reference, fused, cudnn, tensors = build(cell, torch.float32, PACKED)
    outputs = []

    def packed_forward(module, inputs):
        output, state = module(pack_padded_sequence(inputs["input"], LENGTHS, enforce_sorted=False), hx_of(inputs))
        outputs.append(output)
        return output, state

    expected = run_module(reference, tensors, torch.float32, packed_forward)
    ours = run_module(fused, tensors, torch.float32, packed_forward)
    theirs = run_module(cudnn, tensors, torch.float32, packed_forward)
    assert_matches(ours, expected, torch.float32)
    assert_matches(ours, theirs, torch.float32)
    _, ours_packed, theirs_packed = outputs
    for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
        assert torch.equal(getattr(ours_packed, field).cpu(), getattr(theirs_packed, field).cpu()), field


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_lengths_keyword_matches_packed_fp64_reference(cell, scheme, tf32_flags):
    set_tf32(False)
    reference, fused, _, tensors = build(cell, torch.float32, PACKED)
    lengths = torch.tensor(LENGTHS)

    def packed_then_padded(module, inputs):
        packed = pack_padded_sequence(inputs["input"], lengths, enforce_sorted=False)
        output, state = module(packed, hx_of(inputs))
        return pad_packed_sequence(output, total_length=PACKED["steps"])[0], state

    def with_lengths(module, inputs):
        return module(inputs["input"], hx_of(inputs), lengths=lengths.cuda())

    expected = run_module(reference, tensors, torch.float32, packed_then_padded)
    assert_matches(run_module(fused, tensors, torch.float32, with_lengths), expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("cell, config", CASES)
def test_persistent_and_stepwise_schemes_agree_bitwise(cell, config, dtype, monkeypatch):
    """Both schemes run the same tile code with the same blocks, so they round identically: any
    difference is a program reading state another program had not finished writing (a missing or
    broken barrier in the persistent scheme). Repeated, because a race need not show every time."""
    _, fused, _, tensors = build(cell, dtype, config)
    results = {}
    for scheme in ("stepwise", "persistent", "persistent", "persistent"):
        monkeypatch.setenv("FUSED_RNN_SCHEME", scheme)
        results.setdefault(scheme, []).append(run_module(fused, tensors, dtype))
    expected = results["stepwise"][0]
    for run in results["persistent"]:
        for name, value in expected.items():
            assert torch.equal(run[name], value), f"{name} differs between the schemes"


# The persistent kernels at sizes where many programs share W_hh and meet at the grid barrier:
# the headline's 48 programs of 16 units (the backward's of 16 features), 48 of 8 units at H=384
# (the forward's batched pieces), both directions in one launch (48 x 2 programs of 16 units), a
# batch past one tile, and every option, against the float64 reference.
GPU_LAYER_CASES = [
    Case("LSTM", 16, 16, 768, D=1, options=ALL_TRAINING),
    Case("LSTM", 16, 16, 384, D=1, options=ALL_TRAINING),
    Case("LSTM", 8, 16, 768, D=2, options=ALL_TRAINING),
    Case("LSTM", 8, 40, 256, 128, D=2, options=ALL_EVAL),
    Case("GRU", 16, 16, 768, D=2, options=ALL_TRAINING),
    Case("RNN_TANH", 16, 16, 1024, D=2, options=ALL_TRAINING),
    Case("LSTM", 6, 16, 4096, D=1),  # streams W_hh: too large for the chip
]


@pytest.mark.parametrize("plan", ["default", "stepwise-resident"])
@pytest.mark.parametrize("case", params(GPU_LAYER_CASES))
def test_persistent_kernels_match_fp64_reference_with_every_option(case, plan, monkeypatch):
    use_plan(monkeypatch, plan)
    check_against_reference(case)
