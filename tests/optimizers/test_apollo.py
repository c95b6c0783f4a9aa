"""APOLLO and APOLLO-Mini (lrzoo.optimizers.apollo): the official optimizer's weights step for step, state that
reloads bit-exactly across a projection redraw, and the memory of rank r (and rank 1).

Parity with the official package (``apollo_torch.APOLLOAdamW``, PyPI ``apollo-torch`` 1.0.3, the `test` extra;
skipped without it). Tolerance: none. lrzoo draws P from the same seeds with the same generators and runs the
same float operations in the same order, so on CPU the weights are bit-identical after 35 steps (T = 10:
redraws at t = 1, 11, 21, 31), with weight decay, a ×20 loss spike (the norm-growth limiter acts) and both
tiny LLaMA (m ≥ n and m < n weights) and BERT (biases: the seeds count every parameter).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import lrzoo
from conftest import tiny_bert, tiny_llama
from optimizer_steps import SPIKE, batch, train
from lrzoo.optimizers import projection_targets, state_bytes
from lrzoo.optimizers.apollo import ApolloAdamW, next_seed, random_projection

MODELS = {"llama": tiny_llama, "bert": tiny_bert}
METHODS = {"apollo": {"rank": 4}, "apollo_mini": {}}
LR, WEIGHT_DECAY, GAP, STEPS = 1e-2, 0.1, 10, 35
GROUP_KEYS = ("rank", "update_proj_gap", "scale", "proj_type", "proj", "scale_type")


def make(model, method: str, **options):
    return lrzoo.make_optimizer(model, lr=LR, method=method, weight_decay=WEIGHT_DECAY, update_proj_gap=GAP,
                                **{**METHODS[method], **options})


def official_twin(ours, model, twin, **options):
    """``apollo_torch.APOLLOAdamW`` over ``twin`` (a copy of ``model``) with ``ours``'s param groups, in order."""
    official_cls = pytest.importorskip("apollo_torch").APOLLOAdamW
    position = {id(p): i for i, p in enumerate(model.parameters())}
    twin_params = list(twin.parameters())
    groups = []
    for group in ours.param_groups:
        twin_group = {"params": [twin_params[position[id(p)]] for p in group["params"]], "lr": group["lr"],
                      "weight_decay": group["weight_decay"]}
        if "rank" in group:
            twin_group.update({key: group[key] for key in GROUP_KEYS})
        groups.append(twin_group)
    return official_cls(groups, lr=LR, **options)


def assert_same_weights(model, twin) -> None:
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_thirty_five_steps_give_the_official_optimizers_weights(method, model_name):
    model = MODELS[model_name]()
    twin = copy.deepcopy(model)
    ours = make(model, method)
    theirs = official_twin(ours, model, twin)
    projected = [p for g in ours.param_groups if "rank" in g for p in g["params"]]
    assert len(projected) == (14 if model_name == "llama" else 12)
    train(model, ours, range(SPIKE))
    train(twin, theirs, range(SPIKE))
    before = {p: ours.state[p]["update_norm"].item() for p in projected}
    train(model, ours, [SPIKE])
    train(twin, theirs, [SPIKE])
    limits = [(ours.state[p]["update_norm"].item(), 1.01 * (s + 1e-8)) for p, s in before.items()]
    assert any(new == pytest.approx(limit, rel=1e-6) for new, limit in limits)  # the limiter acted at the spike
    train(model, ours, range(SPIKE + 1, STEPS))
    train(twin, theirs, range(SPIKE + 1, STEPS))
    assert_same_weights(model, twin)
    for ours_param, twin_param in zip(model.parameters(), twin.parameters()):
        if ours_param in ours.state and "projector" in ours.state[ours_param]:
            assert torch.equal(ours.state[ours_param]["projector"], theirs.state[twin_param]["projector"].ortho_matrix)
            assert ours.state[ours_param]["seed"] == theirs.state[twin_param]["projector"].seed


@pytest.mark.parametrize("options", [{"scale_front": True}, {"disable_nl": True}, {"proj": "svd"},
                                     {"scale_type": "tensor", "scale": 4.0}])
def test_the_official_flags_give_the_official_weights(options):
    model = tiny_llama()
    twin = copy.deepcopy(model)
    ours = make(model, "apollo", **options)
    flags = {key: options[key] for key in ("scale_front", "disable_nl") if key in options}
    theirs = official_twin(ours, model, twin, **flags)
    train(model, ours, range(15))
    train(twin, theirs, range(15))
    assert_same_weights(model, twin)


def test_the_projection_is_gaussian_from_the_parameters_position_and_leaves_the_global_rng_alone():
    model = tiny_bert()
    optimizer = make(model, "apollo")
    numbered = {id(p): i for i, p in enumerate((p for g in optimizer.param_groups for p in g["params"]), start=1)}
    first = next(p for g in optimizer.param_groups if "rank" in g for p in g["params"])
    assert optimizer.state[first]["seed"] == numbered[id(first)]
    torch.manual_seed(123)
    expected_global = torch.rand(3)
    torch.manual_seed(123)
    train(model, optimizer, range(1))
    m, n = first.shape
    shape = (4, n) if m >= n else (m, 4)
    assert torch.equal(optimizer.state[first]["projector"], random_projection(shape, numbered[id(first)], "cpu"))
    assert optimizer.state[first]["seed"] == next_seed(numbered[id(first)])
    basis = optimizer.state[first]["projector"]
    assert abs(basis.std().item() - 1 / math.sqrt(4)) < 0.15  # N(0, 1/r), not orthonormal
    assert torch.equal(torch.rand(3), expected_global)  # the model's forward and the draw used no global RNG


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_reloaded_mid_period_continues_bit_exactly_across_a_redraw(method):
    model = tiny_llama()
    optimizer = make(model, method)
    train(model, optimizer, range(15))  # draws at t = 1, 11
    saved_weights = copy.deepcopy(model.state_dict())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    projectors = {p: s["projector"].clone() for p, s in optimizer.state.items() if "projector" in s}
    train(model, optimizer, range(15, 25))  # draw at t = 21
    assert all(not torch.equal(optimizer.state[p]["projector"], before) for p, before in projectors.items())

    reloaded = tiny_llama(seed=1)
    reloaded.load_state_dict(saved_weights)
    reloaded_optimizer = make(reloaded, method)
    buffer.seek(0)
    reloaded_optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    train(reloaded, reloaded_optimizer, range(15, 25))
    assert_same_weights(model, reloaded)
    for ours, theirs in zip(model.parameters(), reloaded.parameters()):
        for key, value in optimizer.state[ours].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(reloaded_optimizer.state[theirs][key])), key


@pytest.mark.parametrize("method, rank", [("apollo", 4), ("apollo_mini", 1)])
def test_projected_state_is_rank_r_and_apollo_mini_keeps_about_one_row(method, rank):
    """Per m×n weight: moments r·max(m, n) each, P r·min(m, n), the limiter's 0-d norm (4 bytes)."""
    model = tiny_llama()
    optimizer = make(model, method)
    train(model, optimizer, range(1))
    for param in projection_targets(model):
        m, n = param.shape
        assert state_bytes(optimizer, [param]) == (2 * rank * max(m, n) + rank * min(m, n)) * 4 + 4
    group = next(g for g in optimizer.param_groups if "rank" in g)
    assert group["rank"] == rank
    if method == "apollo_mini":
        assert (group["scale_type"], group["scale"]) == ("tensor", 128.0)


def test_list_optimizers_names_apollo_and_apollo_mini():
    assert {"apollo", "apollo_mini"} <= set(lrzoo.list_optimizers())


@pytest.mark.parametrize("options, message", [
    ({"proj": "gaussian"}, r"proj must be one of random, svd, got 'gaussian'"),
    ({"scale_type": "row"}, r"scale_type must be one of channel, tensor, got 'row'"),
    ({"scale_front": "yes"}, r"scale_front must be true or false"),
    ({"scale": float("nan")}, r"scale must be a finite number > 0, got nan"),
    ({"rank": 0}, r"rank must be a positive integer"),
    ({"eps": 0.0}, r"eps must be a finite number > 0"),
])
def test_an_option_that_would_train_wrong_is_refused_naming_its_range(options, message):
    with pytest.raises(ValueError, match=message):
        make(tiny_llama(), "apollo", **options)


def test_a_param_group_of_its_own_is_checked_too():
    weight = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"ApolloAdamW: scale_type must be one of channel, tensor"):
        ApolloAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 1, "scale": 1.0, "proj_type": "std",
                      "scale_type": "rows"}])
