"""fused_rnn with the rest of PyTorch: torch.compile, autocast, DistributedDataParallel, CUDA graphs.

Every test runs the same weights and data two ways (compiled and eager, fused and torch, two
ranks and one process, graph replay and eager) and compares forward values and every gradient.
"""

import copy
import datetime
import faulthandler
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel

import fused_rnn
from helpers import KERNEL_DEVICE, KERNELS_RUN, TOLERANCES, assert_close


def needs_cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


# Small, odd sizes: the interpreter pays per operation.
B, T, IN, HID = 3, 5, 5, 6

FUSED_OPS = {
    "forward": {torch.ops.fused_rnn.lstm_forward.default, torch.ops.fused_rnn.gru_forward.default},
    "backward": {torch.ops.fused_rnn.lstm_backward.default, torch.ops.fused_rnn.gru_backward.default},
}


def flatten(value) -> list:
    """The tensors of a nested tuple such as ``(output, (h_n, c_n))``, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [tensor for item in value for tensor in flatten(item)]


def cotangents(outputs) -> list:
    """Fixed random float64 weights, one per output, so that every output feeds the loss."""
    generator = torch.Generator().manual_seed(1234)
    return [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device) for o in outputs]


def leaf_copies(inputs) -> list:
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]


def run_and_grad(model, inputs, autocast_dtype=None):
    """``model(*inputs)`` (under autocast on the inputs' device when ``autocast_dtype`` is given),
    then the backward of a fixed random projection of every output.

    Returns ``(outputs, grads)``: the flattened outputs and a dict of the gradients of the
    inputs that require them (``input0``, ...) and of every parameter (by name).
    """
    model.zero_grad(set_to_none=True)
    inputs = leaf_copies(inputs)
    device = inputs[0].device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        outputs = flatten(model(*inputs))
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, cotangents(outputs)))
    loss.backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(inputs) if t.requires_grad}
    module = getattr(model, "_orig_mod", model)  # the module a torch.compile wrapper holds
    grads.update((name, p.grad) for name, p in module.named_parameters())
    return [o.detach() for o in outputs], grads


def assert_all_close(actual, expected, dtype, what):
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, dtype=dtype, name=f"{what} {index}")


def assert_grads_close(actual, expected, dtype):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] is not None, f"no gradient reached {name}"
        assert_close(actual[name], expected[name], dtype=dtype, name=f"grad of {name}")


# --------------------------------------------------------------------------------------------
# torch.compile


class LSTMGRUHead(nn.Module):
    """2-layer bidirectional batch_first LSTM -> GRU -> Linear; returns every output and state."""

    def __init__(self, proj_size=0):
        super().__init__()
        self.lstm = fused_rnn.LSTM(
            IN, HID, num_layers=2, bidirectional=True, batch_first=True, proj_size=proj_size
        )
        self.gru = fused_rnn.GRU(2 * (proj_size or HID), HID, batch_first=True)
        self.head = nn.Linear(HID, 3)

    def forward(self, x, h0, c0, lengths=None):
        y, (h_n, c_n) = self.lstm(x, (h0, c0), lengths=lengths)
        z, g_n = self.gru(y, lengths=lengths)
        return self.head(z), h_n, c_n, g_n


class GRUAlone(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = fused_rnn.GRU(IN, HID, num_layers=2, bidirectional=True)

    def forward(self, x, h0):
        return self.gru(x, h0)


def lstm_gru_head_case(proj_size=0, lengths=None):
    model = LSTMGRUHead(proj_size).to(KERNEL_DEVICE)
    x = torch.randn(B, T, IN, device=KERNEL_DEVICE, requires_grad=True)
    h0 = torch.randn(4, B, proj_size or HID, device=KERNEL_DEVICE, requires_grad=True)
    c0 = torch.randn(4, B, HID, device=KERNEL_DEVICE, requires_grad=True)
    inputs = [x, h0, c0] if lengths is None else [x, h0, c0, torch.tensor(lengths, device=KERNEL_DEVICE)]
    return model, inputs


def gru_alone_case():
    model = GRUAlone().to(KERNEL_DEVICE)
    x = torch.randn(T, B, IN, device=KERNEL_DEVICE, requires_grad=True)
    h0 = torch.randn(4, B, HID, device=KERNEL_DEVICE, requires_grad=True)
    return model, [x, h0]


COMPILE_CASES = {
    "lstm2-bidir-gru-head": lambda: lstm_gru_head_case(),
    "lstm2-bidir-proj4-gru-head": lambda: lstm_gru_head_case(proj_size=4),
    "lstm2-bidir-gru-head-lengths": lambda: lstm_gru_head_case(lengths=[T, 2, T - 1]),
    "gru2-bidir-alone": gru_alone_case,
}


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def recording_aot_eager(graphs):
    """``aot_eager`` (AOTAutograd, graphs run as they are) that keeps the forward and backward
    FX graphs it is given in ``graphs["forward"]`` / ``graphs["backward"]``."""

    def keep(kind):
        def compiler(graph_module, example_inputs):
            graphs[kind].append(graph_module)
            return make_boxed_func(graph_module.forward)

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def called_ops(graph_modules) -> set:
    return {node.target for gm in graph_modules for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("case", list(COMPILE_CASES), ids=list(COMPILE_CASES))
def test_compile_fullgraph_matches_eager_and_traces_fused_ops(case, fresh_dynamo):
    model, inputs = COMPILE_CASES[case]()
    expected_outputs, expected_grads = run_and_grad(model, inputs)

    graphs = {"forward": [], "backward": []}
    compiled = torch.compile(model, backend=recording_aot_eager(graphs), fullgraph=True)
    outputs, grads = run_and_grad(compiled, inputs)

    assert not counters["graph_break"], dict(counters["graph_break"])
    assert (len(graphs["forward"]), len(graphs["backward"])) == (1, 1), "expected one graph each way"
    # The kernels are in the graphs as the custom ops (the hand-written backward included).
    cells = {"lstm", "gru"} if case.startswith("lstm") else {"gru"}
    for kind in ("forward", "backward"):
        expected_ops = {op for op in FUSED_OPS[kind] if op.name().split("::")[1].split("_")[0] in cells}
        assert called_ops(graphs[kind]) & FUSED_OPS[kind] == expected_ops, kind
    assert_all_close(outputs, expected_outputs, torch.float32, "output")
    assert_grads_close(grads, expected_grads, torch.float32)


def test_compile_fullgraph_under_no_grad_matches_eager(fresh_dynamo):
    model, inputs = lstm_gru_head_case(proj_size=4)
    with torch.no_grad():
        expected = flatten(model(*inputs))
        outputs = flatten(torch.compile(model, backend="aot_eager", fullgraph=True)(*inputs))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_all_close(outputs, expected, torch.float32, "output")




def test_compile_raises_no_warning_about_fused_rnn_code(fresh_dynamo):
    model, inputs = lstm_gru_head_case()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, backend="aot_eager", fullgraph=True)(*inputs)
    # Such as Dynamo's "ignores the cache wrapper" for an lru_cache it traces through.
    ours = [str(warning.message) for warning in caught
            if "fused_rnn" in warning.filename or "lru_cache" in str(warning.message)]
    assert not ours, ours

@pytest.mark.skipif(not KERNELS_RUN, reason="the kernel path: CUDA, or CPU under TRITON_INTERPRET=1")
def test_fx_symbolic_trace_records_a_converted_rnn_as_one_module_call_as_torch_does():
    # torch.nn's RNNs are leaves of FX's Tracer by their module's name; the fused ones were walked
    # into, and their forward raised on the Proxy (FX quantization, feature extractors).
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(IN, HID, num_layers=2, bidirectional=True)
            self.gru = nn.GRU(2 * HID, HID)

        def forward(self, x, h, c):
            output, (h_n, c_n) = self.lstm(x, (h, c))
            output, h_gru = self.gru(output, hx=h_n[:1])
            return output * 2, c_n, h_gru

    model = Model().to(KERNEL_DEVICE)
    converted = fused_rnn.convert(copy.deepcopy(model))
    graphs = {name: torch.fx.symbolic_trace(module) for name, module in (("torch", model), ("fused", converted))}
    # The same nodes (hx reaches the node positionally where the call named it: the same call).
    nodes = {name: [(node.op, str(node.target)) for node in graph.graph.nodes] for name, graph in graphs.items()}
    assert nodes["fused"] == nodes["torch"]
    x = torch.randn(T, B, IN, device=KERNEL_DEVICE)
    h, c = (torch.randn(4, B, HID, device=KERNEL_DEVICE) for _ in range(2))
    for actual, expected in zip(graphs["fused"](x, h, c), model(x, h, c)):
        assert_close(actual, expected, dtype=torch.float32)
    assert isinstance(graphs["fused"].lstm, fused_rnn.LSTM)


def test_fx_symbolic_trace_of_a_fused_module_itself_is_refused_naming_the_proxy():
    # The root is never a leaf, so no call_module node can stand for it (torch.nn's RNNs refuse to be
    # traced as the root too): the forward runs and names what it got, not an attribute "" of the module.
    with pytest.raises(TypeError, match="input must be a Tensor or PackedSequence, got Proxy"):
        torch.fx.symbolic_trace(fused_rnn.LSTM(IN, HID))


def test_jit_trace_trains_when_traced_with_grad_and_refuses_a_backward_clearly_otherwise():
    torch.manual_seed(0)
    model = fused_rnn.LSTM(IN, HID).to(KERNEL_DEVICE)
    x = torch.randn(T, B, IN, device=KERNEL_DEVICE)
    reference = nn.LSTM(IN, HID).to(KERNEL_DEVICE)
    reference.load_state_dict(model.state_dict())
    reference(x)[0].sum().backward()
    torch.jit.trace(model, x, check_trace=False)(x)[0].sum().backward()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert_close(ours.grad, theirs.grad.double(), torch.float32, "traced gradient")
    # A trace made without autograd bakes that in: the traced layer keeps nothing for a backward.
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
    with pytest.raises(RuntimeError, match="autograd was off where it ran"):
        traced(x)[0].sum().backward()

def test_compile_inductor_matches_eager(fresh_dynamo):
    model, inputs = lstm_gru_head_case(proj_size=4)
    expected_outputs, expected_grads = run_and_grad(model, inputs)
    outputs, grads = run_and_grad(torch.compile(model, fullgraph=True), inputs)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_all_close(outputs, expected_outputs, torch.float32, "output")
    assert_grads_close(grads, expected_grads, torch.float32)


OPCHECK_CASES = {
    "lstm-float32": dict(cell="lstm", proj=False, options=False, directions=1, dtype=torch.float32),
    "lstm-proj4-options-bidirectional-bfloat16": dict(cell="lstm", proj=True, options=True, directions=2,
                                                      dtype=torch.bfloat16),
    "gru-float32": dict(cell="gru", proj=False, options=False, directions=1, dtype=torch.float32),
    "gru-options-bidirectional-bfloat16": dict(cell="gru", proj=False, options=True, directions=2,
                                               dtype=torch.bfloat16),
    "rnn-options-float32": dict(cell="rnn", proj=False, options=True, directions=2, dtype=torch.float32),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES), ids=list(OPCHECK_CASES))
@pytest.mark.parametrize("save_for_backward", [True, False], ids=["save", "nosave"])
def test_custom_ops_fake_impls_match_real_outputs(case, save_for_backward):
    # torch.compile traces the layers through the fake impls: shapes, dtypes and strides of what
    # they return must be those the kernels return.
    cell, proj, options, D, dtype = OPCHECK_CASES[case].values()
    ops, P = torch.ops.fused_rnn, 4 if proj else HID

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=KERNEL_DEVICE)

    def keep(*shape):
        return torch.rand(*shape, device=KERNEL_DEVICE) < 0.3

    lengths = torch.tensor([T, 2, T - 1], device=KERNEL_DEVICE) if options else None
    resets = keep(T, B) if options else None
    h_mask = randn(B, D, P) if options else None
    zoneout_h = keep(T, B, D, P) if options else None
    zoneout_p = 0.3 if options else 0.0
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    gates_x, w_hh, h0 = randn(T, B, D, gates * HID), randn(D, gates * HID, P), randn(D, B, P)
    grad_h = randn(T, B, D, P)
    if cell == "lstm":
        w_hr = randn(D, P, HID) if proj else None
        zoneout_c = keep(T, B, D, HID) if options else None
        forward_args = (gates_x, w_hh, w_hr, h0, randn(D, B, HID), lengths, resets, h_mask, zoneout_h, zoneout_c,
                        zoneout_p, save_for_backward)
        h, c, _, saved = ops.lstm_forward(*forward_args)
        backward_args = (grad_h, randn(D, B, HID), w_hh, w_hr, lengths, resets, h_mask, zoneout_h, zoneout_c,
                         zoneout_p, h, c, saved)
    elif cell == "gru":
        forward_args = (gates_x, w_hh, randn(D, gates * HID), h0, lengths, resets, h_mask, zoneout_h, zoneout_p,
                        save_for_backward)
        h, saved = ops.gru_forward(*forward_args)
        backward_args = (grad_h, w_hh, lengths, resets, h_mask, zoneout_h, zoneout_p, h, saved)
    else:
        forward_args = (gates_x, w_hh, h0, lengths, resets, h_mask, zoneout_h, zoneout_p, "tanh", save_for_backward)
        h, saved = ops.rnn_forward(*forward_args)
        backward_args = (grad_h, w_hh, lengths, resets, h_mask, zoneout_h, zoneout_p, h, saved, "tanh")
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(getattr(ops, f"{cell}_forward").default, forward_args, test_utils=checks)
    if save_for_backward:
        torch.library.opcheck(getattr(ops, f"{cell}_backward").default, backward_args, test_utils=checks)


# --------------------------------------------------------------------------------------------
# Autocast

# Gradients that flowed through half-precision layers, compared with float64 ones, get an atol
# relative to the gradient's largest entry (bf16 rounds at 2**-8, fp16 at 2**-11): about ten
# roundings, where a wrong or missing term is off by the gradient's own size.
HALF_GRAD_RELATIVE_ATOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


def assert_half_grads_close(actual, expected, dtype):
    """Gradients of fp32 leaves through layers run in ``dtype``: fp32, and close to float64 ones."""
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        assert grad is not None, f"no gradient reached {name}"
        assert grad.dtype == torch.float32, f"grad of {name} is {grad.dtype}, expected the fp32 of its leaf"
    rtol = TOLERANCES[dtype][0]
    for name in expected:
        atol = HALF_GRAD_RELATIVE_ATOL[dtype] * expected[name].abs().max().item()
        assert_close(actual[name], expected[name], name=f"grad of {name}", tolerance=(rtol, atol))


def float64_twin(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double().cpu()


def double_inputs(inputs) -> list:
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in inputs]


class WithState(nn.Module):
    """``rnn(x, (h0, c0))`` with the states as separate arguments, so that they get gradients."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, *state):
        return self.rnn(x, tuple(state) if len(state) == 2 else state[0])


def state_inputs(rnn, device):
    directions = 2 if rnn.bidirectional else 1
    groups = rnn.num_layers * directions
    x = torch.randn(T, B, rnn.input_size, device=device, requires_grad=True)
    h0 = torch.randn(groups, B, getattr(rnn, "proj_size", 0) or rnn.hidden_size, device=device, requires_grad=True)
    if rnn.mode == "LSTM":
        return [x, h0, torch.randn(groups, B, rnn.hidden_size, device=device, requires_grad=True)]
    return [x, h0]


AUTOCAST_LSTMS = {
    "lstm1": dict(),
    "lstm2-bidir": dict(num_layers=2, bidirectional=True),
    "lstm-proj3": dict(proj_size=3),
}


@pytest.mark.parametrize("config", list(AUTOCAST_LSTMS), ids=list(AUTOCAST_LSTMS))
def test_lstm_autocast_cpu_bf16_matches_torch(config):
    torch_lstm = nn.LSTM(IN, HID, **AUTOCAST_LSTMS[config])
    reference = WithState(torch_lstm)
    fused = WithState(fused_rnn.convert(copy.deepcopy(torch_lstm)))
    inputs = state_inputs(torch_lstm, "cpu")

    outputs, grads = run_and_grad(fused, inputs, autocast_dtype=torch.bfloat16)
    exact_outputs, exact_grads = run_and_grad(float64_twin(reference), double_inputs(inputs))

    # output, h_n, c_n in bf16 (nn.LSTM's CPU fallback for projections returns c_n in fp32; the
    # fused layer runs the whole cell in the autocast dtype, as cuDNN does).
    assert [o.dtype for o in outputs] == [torch.bfloat16] * 3
    assert_all_close(outputs, exact_outputs, torch.bfloat16, "output")
    assert_half_grads_close(grads, exact_grads, torch.bfloat16)
    try:
        torch_outputs, _ = run_and_grad(reference, inputs, autocast_dtype=torch.bfloat16)
    except RuntimeError as error:
        # nn.LSTM's autocast path is oneDNN's, which has no bf16 LSTM on some CPUs (an AMD EPYC
        # without AVX-512); the float64 twin above is the reference there.
        assert "primitive descriptor" in str(error)
        return
    if not AUTOCAST_LSTMS[config].get("proj_size"):
        assert [o.dtype for o in outputs] == [o.dtype for o in torch_outputs]
    assert_all_close(outputs, torch_outputs, torch.bfloat16, "output")


def test_gru_autocast_cpu_runs_in_bf16():
    # nn.GRU ignores CPU autocast (it stays in fp32); the fused GRU runs in the autocast dtype
    # like cuDNN's, so its reference is the float64 GRU on bf16-rounded input, weights and state.
    torch_gru = nn.GRU(IN, HID, num_layers=2, bidirectional=True)
    fused = WithState(fused_rnn.convert(copy.deepcopy(torch_gru)))
    inputs = state_inputs(torch_gru, "cpu")

    outputs, grads = run_and_grad(fused, inputs, autocast_dtype=torch.bfloat16)
    rounded = float64_twin(WithState(torch_gru))
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.bfloat16().double())
    rounded_inputs = [t.detach().bfloat16().double().requires_grad_() for t in inputs]
    expected_outputs, _ = run_and_grad(rounded, rounded_inputs)
    _, exact_grads = run_and_grad(float64_twin(WithState(torch_gru)), double_inputs(inputs))

    assert [o.dtype for o in outputs] == [torch.bfloat16] * 2
    assert_all_close(outputs, expected_outputs, torch.bfloat16, "output")
    assert_half_grads_close(grads, exact_grads, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@needs_cuda
def test_autocast_cuda_matches_torch(cell, dtype):
    torch_rnn = getattr(nn, cell)(IN, HID, num_layers=2, bidirectional=True).cuda()
    reference = WithState(torch_rnn)
    fused = WithState(fused_rnn.convert(copy.deepcopy(torch_rnn)))
    inputs = state_inputs(torch_rnn, "cuda")

    torch_outputs, _ = run_and_grad(reference, inputs, autocast_dtype=dtype)
    outputs, grads = run_and_grad(fused, inputs, autocast_dtype=dtype)
    _, exact_grads = run_and_grad(float64_twin(reference), double_inputs(inputs))

    assert [o.dtype for o in outputs] == [o.dtype for o in torch_outputs]
    assert_all_close(outputs, torch_outputs, dtype, "output")
    assert_half_grads_close(grads, exact_grads, dtype)


# --------------------------------------------------------------------------------------------
# DistributedDataParallel

DDP_WORLD_SIZE, DDP_BATCH = 2, 4
DDP_TIMEOUT_S = 240


class LSTMHead(nn.Module):
    """Bidirectional batch_first fused LSTM, a Linear head on the last step's output."""

    def __init__(self):
        super().__init__()
        self.lstm = fused_rnn.LSTM(3, 4, bidirectional=True, batch_first=True, dtype=torch.float64)
        self.head = nn.Linear(8, 2, dtype=torch.float64)
        self.to(KERNEL_DEVICE)

    def forward(self, x):
        output, _ = self.lstm(x)
        return self.head(output[:, -1])


def ddp_batch():
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(DDP_BATCH, T, 3, generator=generator, dtype=torch.float64)
    target = torch.randn(DDP_BATCH, 2, generator=generator, dtype=torch.float64)
    return x.to(KERNEL_DEVICE), target.to(KERNEL_DEVICE)


def ddp_rank(rank, store_port, out_dir):
    """One rank, run in its own process: DDP over ``LSTMHead`` on its half of ``ddp_batch``;
    saves its gradients to ``out_dir``."""
    # A hang shows up as every thread's stack in the rank's log, not as a silent timeout.
    faulthandler.dump_traceback_later(DDP_TIMEOUT_S - 30, exit=True)
    # Two ranks beside the test workers on a small machine: one thread each, loopback only.
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    timeout = datetime.timedelta(seconds=DDP_TIMEOUT_S - 60)
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=DDP_WORLD_SIZE, timeout=timeout)
    # Different initial weights per rank: DDP must broadcast rank 0's into the fused layer.
    torch.manual_seed(rank)
    model = DistributedDataParallel(LSTMHead())
    x, target = ddp_batch()
    shard = slice(rank * DDP_BATCH // DDP_WORLD_SIZE, (rank + 1) * DDP_BATCH // DDP_WORLD_SIZE)
    F.mse_loss(model(x[shard]), target[shard]).backward()
    grads = {name: p.grad.cpu() for name, p in model.module.named_parameters()}
    torch.save(grads, f"{out_dir}/grads{rank}.pt")
    # Leave once every rank has its gradients (so no collective is still in flight), without
    # tearing gloo down: under CPU load that now and then hung for minutes in the C++ destructors
    # run as this function returned (faulthandler's stacks, about 1 run in 7 here; CI's timeouts
    # looked the same). The results are on disk, and the store lives in the test's process.
    store.set(f"rank {rank} done", "1")
    store.wait([f"rank {other} done" for other in range(DDP_WORLD_SIZE)])
    sys.stdout.flush()
    os._exit(0)


def run_ranks(out_dir):
    """Start ``DDP_WORLD_SIZE`` processes running ``ddp_rank``; wait for all of them.

    Plain subprocesses whose output goes to files: nothing of the pytest worker (pipes,
    threads) reaches them, and a failing rank's log is part of the test's message.
    """
    # The store lives in this process, so there is no port to guess and no file to lock.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    code = f"from test_ecosystem import ddp_rank; ddp_rank({{rank}}, {store.port}, {str(out_dir)!r})"
    search_path = [os.path.dirname(__file__), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(search_path))
    logs = [out_dir / f"rank{rank}.log" for rank in range(DDP_WORLD_SIZE)]
    ranks = []
    for rank, log in enumerate(logs):
        with log.open("w") as output:
            ranks.append(subprocess.Popen([sys.executable, "-c", code.format(rank=rank)], env=env,
                                          stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + DDP_TIMEOUT_S
    try:
        for process in ranks:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in ranks:
            process.kill()
            process.wait()
    failed = [(rank, process.returncode) for rank, process in enumerate(ranks) if process.returncode != 0]
    if failed:
        report = "\n".join(f"--- rank {rank} (exit {code}):\n{logs[rank].read_text()[-4000:]}" for rank, code in failed)
        pytest.fail(f"DDP ranks failed or did not finish within {DDP_TIMEOUT_S} s\n{report}")


def test_ddp_two_ranks_grads_match_single_process(tmp_path):
    run_ranks(tmp_path)

    torch.manual_seed(0)
    model = LSTMHead()
    x, target = ddp_batch()
    F.mse_loss(model(x), target).backward()
    for rank in range(DDP_WORLD_SIZE):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        assert list(grads) == [name for name, _ in model.named_parameters()]
        for name, param in model.named_parameters():
            assert_close(grads[name], param.grad, name=f"rank {rank} grad of {name}")


# --------------------------------------------------------------------------------------------
# CUDA graphs


class RNNHead(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(2 * HID, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@needs_cuda
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_cuda_graph_training_step_matches_eager(cell):
    rnn = getattr(fused_rnn, cell)(IN, HID, num_layers=2, bidirectional=True, batch_first=True)
    model = RNNHead(rnn).cuda()
    eager = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    static_x = torch.randn(B, T, IN, device="cuda")
    static_target = torch.randn(B, T, 3, device="cuda")

    # Whole-network capture as in the PyTorch docs: warm up on a side stream (compiles the
    # kernels; no optimizer step, so both twins keep the same weights), then capture with the
    # grads set to None, so that backward allocates them from the graph's pool.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            F.mse_loss(model(static_x), static_target).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_output = model(static_x)
        static_loss = F.mse_loss(static_output, static_target)
        static_loss.backward()
        optimizer.step()

    for step in range(2):
        x, target = torch.randn_like(static_x), torch.randn_like(static_target)
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()

        eager_optimizer.zero_grad(set_to_none=True)
        output = eager(x)
        loss = F.mse_loss(output, target)
        loss.backward()
        eager_optimizer.step()
        assert_close(static_output, output, name=f"step {step} output")
        assert_close(static_loss, loss, name=f"step {step} loss")
        for (name, param), eager_param in zip(model.named_parameters(), eager.parameters()):
            assert_close(param.grad, eager_param.grad, name=f"step {step} grad of {name}")
            assert_close(param, eager_param, name=f"step {step} {name} after the update")


@needs_cuda
def test_cuda_graph_captures_lstm_with_device_lengths():
    params = nn.LSTM(IN, HID, bidirectional=True).cuda()._flat_weights
    static_x = torch.randn(T, B, IN, device="cuda", requires_grad=True)
    static_lengths = torch.tensor([T, 2, 1], device="cuda")

    def forward(x, lengths):
        return flatten(fused_rnn.functional.lstm(x, None, params, bidirectional=True, lengths=lengths))

    # Made before capture: a host-to-device copy cannot be captured.
    weights = cotangents(forward(static_x, static_lengths))

    def step(x, lengths):
        outputs = forward(x, lengths)
        loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights))
        return [o.detach() for o in outputs], torch.autograd.grad(loss, [x, *params])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(static_x, static_lengths)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs, static_grads = step(static_x, static_lengths)

    for lengths in ([1, T, 3], [4, T, T]):
        x = torch.randn(T, B, IN, device="cuda", requires_grad=True)
        lengths = torch.tensor(lengths, device="cuda")
        with torch.no_grad():
            static_x.copy_(x)
            static_lengths.copy_(lengths)
        graph.replay()
        outputs, grads = step(x, lengths)
        assert_all_close(static_outputs, outputs, torch.float32, f"lengths {lengths.tolist()} output")
        assert_all_close(static_grads, grads, torch.float32, f"lengths {lengths.tolist()} grad")
