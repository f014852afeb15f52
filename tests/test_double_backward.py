"""Second derivatives through the fused modules: ``torch.autograd.grad(..., create_graph=True)``.

The first-order backward runs the BPTT kernels; when a graph of it is asked for, it recomputes the
layer with ``reference.layer`` and differentiates that. Checked here:

- ``gradgradcheck`` in float64 on tiny shapes for every option: layers, directions, projection,
  no bias, ``batch_first``, ``lengths=``, a PackedSequence, dropout between layers, ``reset=``,
  recurrent dropout, zoneout (training and eval) and weight drop, the random ones under a seed
  fixed inside the checked function;
- a WGAN-GP gradient penalty (the norm of the critic's input gradient, backpropagated) against
  ``torch.nn`` on CPU in float64, which supports double backward;
- first-order gradients are the same with and without ``create_graph``, and without it the
  backward stays on the kernels.

The interpreter costs tens of milliseconds per kernel launch and gradgradcheck calls the layers
many times: T=3, B=2, H=3, and every input travels as one flat tensor (fast mode then perturbs
it once, not once per tensor).
"""

import contextlib

import pytest
import torch
from helpers import KERNEL_DEVICE, KERNELS_RUN, assert_close, float_inputs
from test_modules import CELLS, FUSED, TORCH
from torch.autograd.gradcheck import GradcheckError
from torch.nn.utils.rnn import pack_padded_sequence

from fused_rnn import reference

STEPS, BATCH, INPUT_SIZE, HIDDEN_SIZE = 3, 2, 2, 3
LENGTHS = [2, 3]  # unsorted, so that packing sorts and unsorts
RESETS = [[False, False], [True, False], [False, True]]  # (T, B)


def flat_gradgradcheck(fn, inputs):
    """``gradgradcheck`` of ``fn(*inputs)`` (a tuple of tensors, taken as one flat output) w.r.t.
    every floating-point input, the inputs travelling as one flat tensor."""
    parts = float_inputs(inputs)
    flat = torch.cat([x.detach().flatten() for x in parts]).requires_grad_()

    def fn_of_flat(flat):
        pieces = iter(x.view_as(part) for x, part in zip(flat.split([p.numel() for p in parts]), parts))
        outputs = fn(*[next(pieces) if x is not None and x.is_floating_point() else x for x in inputs])
        return torch.cat([output.flatten() for output in outputs])

    return torch.autograd.gradgradcheck(fn_of_flat, (flat,), fast_mode=True)


def seeded(seed, fn):
    """``fn()`` under ``torch.manual_seed(seed)``, leaving the global generators as they were."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return fn()


def module_function(module, hx=True, lengths=None, reset=None, packed=False, seed=None):
    """``(fn, inputs)`` for ``flat_gradgradcheck``: ``fn(x, h_0[, c_0], *parameters)`` runs
    ``module`` with those parameters (``torch.func.functional_call``) and returns the output and
    final states."""
    names = [name for name, _ in module.named_parameters()]
    directions = 2 if module.bidirectional else 1
    groups = module.num_layers * directions
    shape = (BATCH, STEPS) if module.batch_first else (STEPS, BATCH)
    x = torch.randn(*shape, module.input_size, dtype=torch.float64, device=KERNEL_DEVICE)
    states = []
    if hx:
        states.append(torch.randn(groups, BATCH, module.proj_size or module.hidden_size, dtype=torch.float64,
                                  device=KERNEL_DEVICE))
        if module.mode == "LSTM":
            states.append(torch.randn(groups, BATCH, module.hidden_size, dtype=torch.float64, device=KERNEL_DEVICE))
    reset_tensor = None
    if reset is not None:
        reset_tensor = torch.tensor(reset, device=KERNEL_DEVICE)
        reset_tensor = reset_tensor.t() if module.batch_first else reset_tensor
    lengths_tensor = None if lengths is None else torch.tensor(lengths, device=KERNEL_DEVICE)

    def fn(x, *tensors):
        state, params = tensors[:len(states)], dict(zip(names, tensors[len(states):]))
        hx_argument = (tuple(state) if module.mode == "LSTM" else state[0]) if state else None
        if packed:
            sequence = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False)
            arguments, keywords = (sequence, hx_argument), dict(reset=reset_tensor)
        else:
            arguments, keywords = (x, hx_argument), dict(lengths=lengths_tensor, reset=reset_tensor)

        def run():
            return torch.func.functional_call(module, params, arguments, keywords)

        output, final = run() if seed is None else seeded(seed, run)
        output = output.data if packed else output
        return (output, *(final if isinstance(final, tuple) else (final,)))

    return fn, [x, *states, *(param.detach() for param in module.parameters())]


def make_module(cell, training=False, **options):
    options = {"input_size": INPUT_SIZE, "hidden_size": HIDDEN_SIZE, **options}
    return FUSED[cell](device=KERNEL_DEVICE, dtype=torch.float64, **options).train(training)


# name: (module options, training, module_function keywords)
CASES = {
    "1layer": (dict(), False, dict()),
    "1layer-no_hx": (dict(), False, dict(hx=False)),
    "2layers-bidirectional": (dict(num_layers=2, bidirectional=True), False, dict()),
    "batch_first-no_bias": (dict(batch_first=True, bias=False), False, dict()),
    "bidirectional-lengths": (dict(bidirectional=True), False, dict(lengths=LENGTHS)),
    "bidirectional-packed": (dict(bidirectional=True), False, dict(lengths=LENGTHS, packed=True)),
    "2layers-dropout": (dict(num_layers=2, dropout=0.5), True, dict(seed=1)),
    "bidirectional-reset": (dict(bidirectional=True), False, dict(reset=RESETS)),
    "bidirectional-batch_first-reset-lengths": (dict(bidirectional=True, batch_first=True), False,
                                                dict(reset=RESETS, lengths=LENGTHS)),
    "recurrent_dropout": (dict(bidirectional=True, recurrent_dropout=0.5), True, dict(seed=2)),
    "zoneout-training": (dict(bidirectional=True, zoneout=0.5), True, dict(seed=3)),
    "zoneout-eval": (dict(zoneout=0.3), False, dict()),
    "weight_drop": (dict(weight_drop=0.5), True, dict(seed=4)),
}
LSTM_CASES = {
    "proj2-2layers-bidirectional": (dict(num_layers=2, bidirectional=True, proj_size=2), False, dict()),
    "proj2-every_regularizer-reset": (dict(proj_size=2, recurrent_dropout=0.3, zoneout=0.3, weight_drop=0.3), True,
                                      dict(seed=5, reset=RESETS)),
}


def cases():
    params = [pytest.param(cell, *case, id=f"{cell}-{name}") for name, case in CASES.items() for cell in CELLS]
    params += [pytest.param("LSTM", *case, id=f"LSTM-{name}") for name, case in LSTM_CASES.items()]
    return params


@pytest.mark.parametrize("cell, options, training, call", cases())
def test_gradgradcheck(cell, options, training, call):
    module = make_module(cell, training, **options)
    fn, inputs = module_function(module, **call)
    assert flat_gradgradcheck(fn, inputs)


def test_gradgradcheck_can_fail():
    """The check above is not vacuous: a backward whose own derivative is wrong fails it."""

    class WrongSecondDerivative(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * 3 * x.detach() ** 2  # detached: no second derivative flows

    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(GradcheckError):
        torch.autograd.gradgradcheck(WrongSecondDerivative.apply, (x,), fast_mode=True)


def gradient_penalty(module, head, x, run=lambda module, x: module(x)):
    """WGAN-GP: ``(|d critic / d x| - 1)^2`` per sequence, averaged; the critic is ``head`` on the
    module's last output step, which ``run(module, x)`` runs. Returns the penalty and the input
    gradient (both with graphs)."""
    x = x.detach().requires_grad_()
    output, _ = run(module, x)
    score = head(output[-1]).sum()
    (grad_x,) = torch.autograd.grad(score, x, create_graph=True)
    penalty = (grad_x.transpose(0, 1).flatten(1).norm(dim=1) - 1).square().mean()
    return penalty, grad_x


def checkpointed(module, x):
    return torch.utils.checkpoint.checkpoint(module, x, use_reentrant=False)


@contextlib.contextmanager
def no_hooks():
    yield


# name: (what runs the module, the context of the whole penalty and its gradients)
SAVING = {
    "saved": (lambda module, x: module(x), no_hooks),
    # Saved-tensor hooks, active through the second backward, which torch.func refuses there.
    "save_on_cpu": (lambda module, x: module(x), torch.autograd.graph.save_on_cpu),
    # The layer recomputed inside the first backward, with its own hooks.
    "checkpoint": (checkpointed, no_hooks),
}


@pytest.mark.parametrize("saving", SAVING)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidirectional", "bidirectional"])
@pytest.mark.parametrize("cell", CELLS)
def test_wgan_gp_gradient_penalty_matches_torch(cell, bidirectional, saving):
    if saving != "saved" and not bidirectional:
        pytest.skip("the hooks are checked on the bidirectional layers")
    run, hooks = SAVING[saving]
    options = dict(num_layers=2, bidirectional=bidirectional)
    if cell == "LSTM":
        options["proj_size"] = 2
    oracle = TORCH[cell](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **options)
    fused = FUSED[cell](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, device=KERNEL_DEVICE, **options)
    fused.load_state_dict(oracle.state_dict())
    features = (2 if bidirectional else 1) * (oracle.proj_size or HIDDEN_SIZE)
    head = torch.nn.Linear(features, 1, dtype=torch.float64)
    fused_head = torch.nn.Linear(features, 1, dtype=torch.float64, device=KERNEL_DEVICE)
    fused_head.load_state_dict(head.state_dict())
    x = torch.randn(STEPS + 2, BATCH + 1, INPUT_SIZE, dtype=torch.float64)

    results = {}
    runs = (("torch", oracle, head, "cpu"), ("fused", fused, fused_head, KERNEL_DEVICE))
    for name, module, critic_head, device in runs:
        with hooks():
            penalty, grad_x = gradient_penalty(module, critic_head, x.to(device), run)
            # (The head's bias does not reach the input gradient, so not the penalty either.)
            grads = torch.autograd.grad(penalty, [*module.parameters(), critic_head.weight])
        results[name] = [penalty, grad_x, *grads]
    names = ["penalty", "grad x"] + [f"grad {n}" for n, _ in oracle.named_parameters()] + ["grad head.weight"]
    for name, actual, expected in zip(names, results["fused"], results["torch"], strict=True):
        assert_close(actual, expected, name=name)
    assert results["torch"][2].abs().max() > 0, "the penalty's weight gradient is zero: the test would prove nothing"


@pytest.fixture
def reference_layer_calls(monkeypatch):
    """A list that grows by one at each call of ``reference.layer``, the recomputation."""
    calls = []
    real_layer = reference.layer

    def counting_layer(*args, **kwargs):
        calls.append(True)
        return real_layer(*args, **kwargs)

    monkeypatch.setattr(reference, "layer", counting_layer)
    return calls


@pytest.mark.skipif(not KERNELS_RUN, reason="plain CPU calls are torch.nn's")
@pytest.mark.parametrize("cell", CELLS)
def test_torch_func_grad_takes_the_kernels_and_its_derivatives_match_torch(cell, reference_layer_calls):
    """torch.func's grad and vjp ask every backward for a graph: the first-order gradients come from
    the kernels all the same (``functional._LayerGradient``), and what differentiates them (a
    nested grad, a ``torch.autograd.grad(..., create_graph=True)`` inside the transform with an
    upstream gradient that depends on the input, torch.autograd outside it), and jacrev, get
    torch.nn's second derivatives."""
    options = dict(num_layers=2, bidirectional=True, **(dict(proj_size=2) if cell == "LSTM" else {}))
    oracle = TORCH[cell](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, **options)
    fused = FUSED[cell](INPUT_SIZE, HIDDEN_SIZE, dtype=torch.float64, device=KERNEL_DEVICE, **options)
    fused.load_state_dict(oracle.state_dict())
    x = torch.randn(STEPS + 1, BATCH, INPUT_SIZE, dtype=torch.float64)
    weights = torch.randn(STEPS + 1, BATCH, 2 * (oracle.proj_size or HIDDEN_SIZE), dtype=torch.float64)
    layer_calls = reference_layer_calls

    def derivatives(module, device):
        params = {name: param.detach().to(device) for name, param in module.named_parameters()}
        input, upstream = x.to(device), weights.to(device)

        def loss(params, input):
            return (torch.func.functional_call(module, params, (input,))[0] * upstream).sum()

        def penalty(input):  # a gradient penalty written with torch.autograd inside the transform
            output = module(input)[0]
            (grad,) = torch.autograd.grad(output, input, upstream * input.sum(), create_graph=True)
            return grad.square().sum()

        layer_calls.clear()
        first = torch.func.grad(loss, argnums=(0, 1))(params, input)
        _, pullback = torch.func.vjp(lambda input: module(input)[0], input)
        (vjp,) = pullback(upstream)
        first_order_calls = len(layer_calls)

        def grad_norm(input):
            return torch.func.grad(loss)(params, input)["weight_hh_l0"].square().sum()

        nested = torch.func.grad(grad_norm)(input)
        # The transform's gradients differentiated by torch.autograd outside it.
        leaves = {name: param.clone().requires_grad_() for name, param in params.items()}
        outer = torch.autograd.grad(torch.func.grad(loss)(leaves, input)["weight_ih_l0"].square().sum(),
                                    list(leaves.values()))
        jacobian = torch.func.jacrev(lambda input: module(input)[0][-1])(input)
        return first_order_calls, [*first[0].values(), first[1], vjp, nested, torch.func.grad(penalty)(input),
                                   jacobian, *outer]

    expected = derivatives(oracle, "cpu")[1]
    first_order_calls, found = derivatives(fused, KERNEL_DEVICE)
    assert first_order_calls == 0, "torch.func's first-order backward left the kernels for the reference"
    assert layer_calls, "the second derivatives did not recompute through reference.layer"
    parameters = [name for name, _ in oracle.named_parameters()]
    names = ([f"grad {name}" for name in parameters] + ["grad x", "vjp", "nested grad", "penalty grad", "jacrev"]
             + [f"outer grad {name}" for name in parameters])
    for name, actual, value in zip(names, found, expected, strict=True):
        assert_close(actual, value, name=name)
    nested, penalty, _, *outer = expected[len(parameters) + 2:]
    assert nested.abs().max() > 0 and penalty.abs().max() > 0 and max(value.abs().max() for value in outer) > 0


# name: (module options, training, module_function keywords)
FIRST_ORDER_CASES = {
    "2layers-bidirectional-lengths-reset": (dict(num_layers=2, bidirectional=True), False,
                                            dict(lengths=LENGTHS, reset=RESETS)),
    "bidirectional-every_regularizer-reset": (dict(bidirectional=True, recurrent_dropout=0.5, zoneout=0.4,
                                                   weight_drop=0.5), True, dict(seed=6, reset=RESETS)),
    "zoneout-eval-lengths": (dict(zoneout=0.3), False, dict(lengths=LENGTHS)),
}


@pytest.mark.parametrize("options, training, call", FIRST_ORDER_CASES.values(), ids=FIRST_ORDER_CASES.keys())
@pytest.mark.parametrize("cell", CELLS)
def test_first_order_grads_are_the_same_with_and_without_create_graph(cell, options, training, call,
                                                                      reference_layer_calls):
    """gradgradcheck differentiates the create_graph backward, but does not compare it with the
    forward: here it meets the kernels' backward, which test_modules compares with torch."""
    if cell == "LSTM":
        options = dict(options, proj_size=2)
    module = make_module(cell, training, **options)
    fn, inputs = module_function(module, **call)
    inputs = [tensor.detach().requires_grad_() for tensor in inputs]
    outputs = fn(*inputs)
    upstream = [torch.randn_like(output) for output in outputs]

    layer_calls = reference_layer_calls
    layer_calls.clear()  # counted from the backward on
    plain = torch.autograd.grad(outputs, inputs, upstream, retain_graph=True)
    assert not layer_calls, "the first-order backward left the kernels for the reference"
    with_graph = torch.autograd.grad(outputs, inputs, upstream, create_graph=True)
    assert len(layer_calls) == module.num_layers, "create_graph=True did not recompute through reference.layer"
    for index, (grad, graph_grad) in enumerate(zip(plain, with_graph, strict=True)):
        assert graph_grad.requires_grad, f"gradient {index}: no graph despite create_graph=True"
        assert_close(graph_grad, grad, name=f"gradient {index}")
