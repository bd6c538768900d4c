"""The transformed model under torch.compile: same losses, gradients and INT8 updates as eager."""

import copy

import pytest
import torch
from conftest import tiny_llama

import qgalore_fx


def train_steps(model, opt, batches, params_of=None):
    losses, grads = [], []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        named = (params_of or model).named_parameters()
        grads.append(dict((n, p.grad.clone()) for n, p in named if p.grad is not None))
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return losses, grads


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_matches_eager(backend):
    torch._dynamo.reset()
    base = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=2)
    base.train()
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(3)]
    eager = copy.deepcopy(base)
    compiled_src = copy.deepcopy(base)
    opt_e = qgalore_fx.optimizer(eager, lr=1e-2)
    opt_c = qgalore_fx.optimizer(compiled_src, lr=1e-2)
    compiled = torch.compile(compiled_src, backend=backend, fullgraph=True)
    losses_e, grads_e = train_steps(eager, opt_e, batches)
    losses_c, grads_c = train_steps(compiled, opt_c, batches, params_of=compiled_src)
    for le, lc in zip(losses_e, losses_c):
        torch.testing.assert_close(lc, le, atol=1e-5, rtol=1e-5)
    for ge, gc in zip(grads_e, grads_c):
        assert ge.keys() == gc.keys()
        for name in ge:
            torch.testing.assert_close(gc[name], ge[name], atol=1e-5, rtol=1e-4, msg=name)
    # the fused update ran inside the compiled backward and wrote the same INT8 codes
    for (name, a), (_, b) in zip(qgalore_fx.projected_layers(eager), qgalore_fx.projected_layers(compiled_src)):
        assert a.stats()["step"] == b.stats()["step"] == 3, name
        mismatch = (a.weight_codes != b.weight_codes).float().mean().item()
        assert mismatch < 1e-3, (name, mismatch)


def test_no_graph_breaks_in_a_block():
    torch._dynamo.reset()
    model = qgalore_fx.transform(tiny_llama(), rank=8)
    qgalore_fx.optimizer(model, lr=1e-2)
    ids = torch.randint(0, 128, (2, 16))
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_learning_rate_schedule_causes_no_recompilation(backend):
    """The layers read lr and betas from a tensor: a scheduler changing lr every step recompiles nothing."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base = qgalore_fx.transform(tiny_llama(), rank=8, update_interval=2)
    base.train()
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(5)]
    runs = {}
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(base)
        opt = qgalore_fx.optimizer(model, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        run = torch.compile(model, backend=backend, fullgraph=True) if mode == "compiled" else model
        lrs = []
        for ids in batches:
            run(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        assert len(set(lrs)) == 5
        runs[mode] = model
        # the eager run compiled the fused 8-bit AdamW step of the rest group once (qgalore_fx.kernels.fastpath);
        # the schedule recompiled neither it nor, below, the model
        assert dict(counters["recompiles"]) == {}
        if mode == "eager":
            counters.clear()
    assert counters["stats"]["unique_graphs"] == 1  # one forward frame, compiled once
    for (name, a), (_, b) in zip(qgalore_fx.projected_layers(runs["eager"]),
                                 qgalore_fx.projected_layers(runs["compiled"])):
        assert a.stats()["step"] == b.stats()["step"] == 5, name
        torch.testing.assert_close(b.hparams, a.hparams, atol=0, rtol=0)  # both hold the 5th step's lr
        # Inductor reassociates float sums, so gradients differ in the last bits; with the same counter-based
        # random stream, stochastic rounding then picks the other neighbour for a few codes, never further off.
        # Refreshes (every 2 steps here) carry the difference into the projection, whose alignment with the
        # previous one follows it: measured up to 1.0 % of codes off by one (a 32 x 64 layer) after 5 steps.
        diff = (a.weight_codes.int() - b.weight_codes.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 2e-2, (name, diff.float().mean())
        torch.testing.assert_close(b.weight_scales, a.weight_scales, atol=1e-6, rtol=1e-3)


def test_one_forward_and_one_backward_graph_with_every_update_inside():
    """Whole training step compiled without graph breaks: Dynamo captures one forward frame, AOTAutograd builds
    one forward and one backward graph, and every projected layer's update op sits in that backward graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def recorder(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    torch._dynamo.reset()
    model = qgalore_fx.transform(tiny_llama(), rank=8)
    model.train()
    opt = qgalore_fx.optimizer(model, lr=1e-2)
    compiled = torch.compile(model, fullgraph=True,
                             backend=aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward")))
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(2):
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert len(graphs["forward"]) == 1 and len(graphs["backward"]) == 1

    def ops(gm):  # a mutating custom op appears functionalized: auto_functionalized_v2(op, ...)
        return [str(n.args[0] if "auto_functionalized" in str(n.target) else n.target)
                for n in gm.graph.nodes if n.op == "call_function"]

    layers = len(qgalore_fx.projected_layers(model))
    assert sum("lowrank_update_" in t for t in ops(graphs["backward"][0])) == layers
    assert not any("lowrank_update_" in t for t in ops(graphs["forward"][0]))
    assert {s["step"] for s in opt.layer_stats().values()} == {2}


def _basis_cosines(a, b):
    Pa, Pb = a.projection_matrix(), b.projection_matrix()
    basis = (lambda P: P) if Pa.shape[0] == 16 else (lambda P: P.t())
    return torch.nn.functional.cosine_similarity(basis(Pa), basis(Pb), dim=1)


def test_compiled_and_eager_refresh_alike_from_the_same_state():
    """A 2-layer LLaMA (hidden 128, rank 16, refresh every 4 steps) trained eager and compiled (inductor,
    fullgraph) on the same batches, the compiled model given the eager one's state (weights, projections, moments,
    counters; the optimizer's too) before each refresh step (0, 4, 8, 12). Inductor computes the forward and
    backward matmuls in another order than eager, so each refresh's G differs by ~5e-7 (relative) and the SVD's P
    by ~1e-5; the sign rule then picks the same side for every basis vector, and quantizing P to INT4 (round to
    nearest) gives the same codes except where a value lies within that noise of a rounding midpoint. Measured
    (2026-12-07): at most 0.2 % of a layer's INT4 codes differ (one code of layers.1.mlp.gate_proj at step 0,
    -1.5000006 eager against -1.4999887 compiled in code units; two of layers.1.self_attn.v_proj at step 4),
    basis cosines >= 0.9988, INT8 weight codes <= 0.92 %."""
    torch._dynamo.reset()
    base = qgalore_fx.transform(tiny_llama(hidden=128, intermediate=256), rank=16, update_interval=4, adaptive=False)
    base.train()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (4, 32), generator=gen) for _ in range(13)]
    eager, compiled_src = copy.deepcopy(base), copy.deepcopy(base)
    opt_e = qgalore_fx.optimizer(eager, lr=1e-2)
    opt_c = qgalore_fx.optimizer(compiled_src, lr=1e-2)
    compiled = torch.compile(compiled_src, backend="inductor", fullgraph=True)
    for step, ids in enumerate(batches):
        refresh = step % 4 == 0
        if refresh:
            compiled_src.load_state_dict(eager.state_dict())
            opt_c.load_state_dict(opt_e.state_dict())
        train_steps(eager, opt_e, [ids])
        train_steps(compiled, opt_c, [ids], params_of=compiled_src)
        if not refresh:
            continue
        for (name, a), (_, b) in zip(qgalore_fx.projected_layers(eager), qgalore_fx.projected_layers(compiled_src)):
            assert a.stats()["refresh_count"] == b.stats()["refresh_count"] == step // 4 + 1, (step, name)
            assert (a.proj_codes != b.proj_codes).float().mean().item() <= 0.01, (step, name)
            assert float(_basis_cosines(a, b).min()) > 0.99, (step, name)
            assert (a.weight_codes != b.weight_codes).float().mean().item() <= 0.02, (step, name)


# Left to run on their own, the two runs are not held equal: they part at the first step, where one INT4 projection
# code lies within float noise of a rounding midpoint (the test above), as do one first- and one second-moment code
# of the 8-bit AdamW of the unprojected weights; the one-code change of P moves the layer's first update, hundreds
# of its 8-bit moment and INT8 weight codes follow, and by the refresh at step 4 the gradients differ by ~1 %, enough
# to reorder or flip near-degenerate singular vectors (measured over 17 steps: 84-87 % of the INT4 projection bytes
# differ, some basis vectors flipped). The test above shows that the refresh is not where they part: from the same
# state every refresh agrees. What parts them is a code on a rounding midpoint (INT4, INT8 or 8-bit moment), which
# no rule removes; bit-equal compiled and eager forward/backward would.
