"""GaLore and Fira (lrzoo.optimizers): the official optimizers' weights step for step, optimizer state that
reloads bit-exactly across a projector refresh, rank/d of AdamW's state, and make_optimizer's wiring.

The parity tests compare with the official packages (galore-torch, fira; the `test` extra) and skip
without them. Tolerance: none. lrzoo runs the same float operations in the same order, with the
projector in the SVD's column-major layout as the official code holds it, so on CPU the weights are
bit-identical after 20 steps (4 projector refreshes, weight decay, α ≠ 1, a Fira limiter step).
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

import lrzoo
from conftest import REPO, tiny_bert, tiny_llama
from optimizer_steps import SPIKE, batch, train
from lrzoo.optimizers import projection_targets, state_bytes
from lrzoo.registry import TrainingRecord, set_record
from lrzoo.optimizers.fira import FiraAdamW
from lrzoo.optimizers.galore import GaLoreAdamW

MODELS = {"llama": tiny_llama, "bert": tiny_bert}
OURS = {"galore": GaLoreAdamW, "fira": FiraAdamW}
#: method -> (official package, class, the group key it calls α)
OFFICIAL = {"galore": ("galore_torch", "GaLoreAdamW", "scale"), "fira": ("fira", "FiraAdamW", "alpha")}
#: T = 5: refreshes at t = 1, 6, 11, 16 within 20 steps.
OPTIONS = {"rank": 4, "update_proj_gap": 5, "scale": 0.5}
LR, WEIGHT_DECAY = 1e-2, 0.1
#: optimizer_steps.SPIKE: the loss is ×20 at that step (t = 13, inside a period), so Fira's residual grows
#: more than 1.01×.


def official(method: str):
    package, cls, scale_key = OFFICIAL[method]
    return getattr(pytest.importorskip(package), cls), scale_key


def make(model, method: str, **options):
    return lrzoo.make_optimizer(model, lr=LR, method=method, weight_decay=WEIGHT_DECAY, **{**OPTIONS, **options})


def official_twin(ours, model, twin, method: str):
    """The official optimizer over ``twin`` (a copy of ``model``) with ``ours``'s param groups."""
    official_cls, scale_key = official(method)
    position = {id(p): i for i, p in enumerate(model.parameters())}
    twin_params = list(twin.parameters())
    groups = []
    for group in ours.param_groups:
        twin_group = {"params": [twin_params[position[id(p)]] for p in group["params"]],
                      "lr": group["lr"], "weight_decay": group["weight_decay"]}
        if "rank" in group:
            twin_group.update(rank=group["rank"], update_proj_gap=group["update_proj_gap"],
                              proj_type=group["proj_type"], **{scale_key: group["scale"]})
        groups.append(twin_group)
    return official_cls(groups, lr=LR, no_deprecation_warning=True)


def assert_same_weights(model, twin) -> None:
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", sorted(OURS))
def test_twenty_steps_give_the_official_optimizers_weights(method, model_name):
    model = MODELS[model_name]()
    twin = copy.deepcopy(model)
    ours = make(model, method)
    theirs = official_twin(ours, model, twin, method)
    assert sum(len(g["params"]) for g in ours.param_groups if "rank" in g) == (14 if model_name == "llama" else 12)
    train(model, ours, range(SPIKE))
    train(twin, theirs, range(SPIKE))
    before = {p: s["residual_norm"].item() for p, s in ours.state.items() if "residual_norm" in s}
    train(model, ours, [SPIKE])
    train(twin, theirs, [SPIKE])
    if method == "fira":  # at the spike, no residual norm grew past γ·(s + 1e-8) and some reached it
        limits = [(ours.state[p]["residual_norm"].item(), 1.01 * (s + 1e-8)) for p, s in before.items()]
        assert all(new <= limit * (1 + 1e-6) for new, limit in limits)
        assert any(new == pytest.approx(limit, rel=1e-6) for new, limit in limits)
    train(model, ours, range(SPIKE + 1, 20))
    train(twin, theirs, range(SPIKE + 1, 20))
    assert_same_weights(model, twin)


@pytest.mark.parametrize("proj_type", ["reverse_std", "left", "right"])
@pytest.mark.parametrize("method", sorted(OURS))
def test_every_projection_side_gives_the_official_weights(method, proj_type):
    official_cls, scale_key = official(method)
    torch.manual_seed(0)
    for shape in [(24, 16), (16, 24)]:
        ours_param = torch.nn.Parameter(torch.randn(shape))
        theirs_param = torch.nn.Parameter(ours_param.detach().clone())
        group = {"rank": 4, "update_proj_gap": 3, "proj_type": proj_type}
        ours = OURS[method]([{"params": [ours_param], "scale": 0.5, **group}], lr=LR, weight_decay=WEIGHT_DECAY)
        theirs = official_cls([{"params": [theirs_param], scale_key: 0.5, **group}], lr=LR,
                              weight_decay=WEIGHT_DECAY, no_deprecation_warning=True)
        for _ in range(8):
            grad = torch.randn(shape)
            ours_param.grad, theirs_param.grad = grad.clone(), grad.clone()
            ours.step()
            theirs.step()
        torch.testing.assert_close(ours_param, theirs_param, rtol=0, atol=0)


def test_reverse_std_on_a_wide_matrix_with_full_rank_works_where_the_official_crashes():
    """Deviation: the official project_back infers the side from the low-rank matrix's shape and fails
    for rank ≥ m on an m×n (m < n) weight; lrzoo takes the side from the weight's shape."""
    official_cls, _ = official("galore")
    weight = torch.randn(4, 8)
    group = {"rank": 4, "update_proj_gap": 2, "scale": 1.0, "proj_type": "reverse_std"}
    ours_param, theirs_param = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    ours_param.grad, theirs_param.grad = torch.randn(4, 8), torch.randn(4, 8)
    # beside a wider weight that rank 4 does project: full rank on some weights only is a warning, not an error
    wider = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.warns(UserWarning, match=r"rank=4 is ≥ min\(m, n\) of 1 of the 2 projected weights"):
        ours = GaLoreAdamW([{"params": [ours_param, wider], **group}])
    ours.step()
    assert not torch.equal(ours_param, weight)
    with pytest.raises(RuntimeError):
        official_cls([{"params": [theirs_param], **group}], no_deprecation_warning=True).step()


@pytest.mark.parametrize("method", sorted(OURS))
def test_the_projector_holds_r_singular_vectors_where_the_official_keeps_the_whole_svd_factor(method):
    """Deviation: the official projector is a view of U or Vᵀ, which keeps min(m, n)² floats alive;
    lrzoo copies the r·min(m, n) it uses."""
    model = tiny_llama()
    twin = copy.deepcopy(model)
    ours = make(model, method)
    theirs = official_twin(ours, model, twin, method)
    train(model, ours, range(1))
    train(twin, theirs, range(1))
    for ours_param, twin_param in zip(model.parameters(), twin.parameters()):
        if "projector" in ours.state[ours_param]:
            d = min(ours_param.shape)
            assert ours.state[ours_param]["projector"].untyped_storage().nbytes() == OPTIONS["rank"] * d * 4
            assert theirs.state[twin_param]["projector"].ortho_matrix.untyped_storage().nbytes() == d * d * 4


@pytest.mark.parametrize("method", sorted(OURS))
def test_state_reloaded_mid_period_continues_bit_exactly_across_a_refresh(method):
    model = tiny_llama()
    optimizer = make(model, method)
    train(model, optimizer, range(8))  # refreshes at t = 1, 6
    saved_weights = copy.deepcopy(model.state_dict())
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    projectors = {p: s["projector"].clone() for p, s in optimizer.state.items() if "projector" in s}

    train(model, optimizer, range(8, 14))  # refresh at t = 11, and the spike
    assert all(not torch.equal(optimizer.state[p]["projector"], before) for p, before in projectors.items())

    reloaded = tiny_llama()
    reloaded.load_state_dict(saved_weights)
    reloaded_optimizer = make(reloaded, method)
    buffer.seek(0)
    reloaded_optimizer.load_state_dict(torch.load(buffer, weights_only=True))
    train(reloaded, reloaded_optimizer, range(8, 14))
    assert_same_weights(model, reloaded)
    for ours, theirs in zip(model.parameters(), reloaded.parameters()):
        for key, value in optimizer.state[ours].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(reloaded_optimizer.state[theirs][key])), key


@pytest.mark.parametrize("method", sorted(OURS))
def test_projected_state_is_rank_over_d_of_adamws(method):
    """Per m×n weight: moments r·max(m, n) each + P r·min(m, n) against AdamW's 2mn (+ its 0-d step):
    the moments are exactly r/min(m, n) of AdamW's, all of it between r/d and 1.5·r/d (d = min(m, n); Fira's
    0-d residual norm adds 4 bytes)."""
    model = tiny_llama()
    twin = copy.deepcopy(model)
    ours = make(model, method)
    adamw = torch.optim.AdamW(twin.parameters(), lr=LR)
    train(model, ours, range(1))
    train(twin, adamw, range(1))
    r, extra = OPTIONS["rank"], (4 if method == "fira" else 0)  # Fira's residual norm: one fp32 scalar
    position = {id(p): i for i, p in enumerate(model.parameters())}
    twin_params = list(twin.parameters())
    projected = projection_targets(model)
    for param in projected:
        (m, n), twin_param = param.shape, twin_params[position[id(param)]]
        d = min(m, n)
        moments = sum(ours.state[param][k].nbytes for k in ("exp_avg", "exp_avg_sq"))
        assert moments / (2 * m * n * 4) == r / d
        assert state_bytes(ours, [param]) == (2 * r * max(m, n) + r * d) * 4 + extra
        assert state_bytes(adamw, [twin_param]) == 2 * m * n * 4 + 4
        ratio = state_bytes(ours, [param]) / state_bytes(adamw, [twin_param])
        assert r / d <= ratio < 1.51 * r / d
    total = state_bytes(ours, projected) / state_bytes(adamw, [twin_params[position[id(p)]] for p in projected])
    assert total == pytest.approx(sum((2 * r * max(p.shape) + r * min(p.shape)) * 4 + extra for p in projected)
                                  / sum(2 * p.numel() * 4 + 4 for p in projected))


def test_list_optimizers_names_galore_and_fira_and_adapters_stay_adapters():
    assert {"galore", "fira"} <= set(lrzoo.list_optimizers())
    assert not {"galore", "fira"} & set(lrzoo.list_adapters())


@pytest.mark.parametrize("model_name, expected", [
    ("llama", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj"}),
    ("bert", {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"}),
])
def test_default_targets_are_the_linear_layers_of_the_blocks(model_name, expected):
    model = MODELS[model_name]()
    names = {id(module.weight): name for name, module in model.named_modules() if hasattr(module, "weight")}
    chosen = [names[id(w)] for w in projection_targets(model)]
    assert len(chosen) == 2 * len(expected)
    assert {re.sub(r"^.*?\.\d+\.", "", name) for name in chosen} == expected  # the name inside the block
    assert not any(word in name for name in chosen for word in ("embed", "lm_head", "pooler", "classifier"))


def test_make_optimizer_groups_projected_weights_and_plain_adamw_for_the_rest():
    model = tiny_bert()
    optimizer = lrzoo.make_optimizer(model, lr=1e-3, method="galore", weight_decay=0.1, rank=2,
                                     target_modules=["query", "value"], eps=1e-8)
    assert isinstance(optimizer, torch.optim.Optimizer)
    projected = [g for g in optimizer.param_groups if "rank" in g]
    assert len(projected) == 1 and len(projected[0]["params"]) == 4
    assert {k: projected[0][k] for k in ("rank", "update_proj_gap", "scale", "proj_type", "weight_decay", "eps")} == \
        {"rank": 2, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "weight_decay": 0.1, "eps": 1e-8}
    plain = [p for g in optimizer.param_groups if "rank" not in g for p in g["params"]]
    assert len(plain) + 4 == len(list(model.parameters()))
    assert all((g["weight_decay"] == 0.1) == (g["params"][0].dim() >= 2) for g in optimizer.param_groups)


def test_head_lr_applies_to_the_marked_head():
    model = tiny_bert()
    set_record(model, TrainingRecord(head_modules=("classifier",)))
    optimizer = lrzoo.make_optimizer(model, lr=1e-3, method="fira", head_lr=5e-3, rank=2)
    head = {id(p) for p in model.classifier.parameters()}
    for group in optimizer.param_groups:
        assert all((id(p) in head) == (group["lr"] == 5e-3) for p in group["params"])


@pytest.mark.parametrize("call, message", [
    (lambda m: lrzoo.make_optimizer(m, lr=1e-3, method="galroe"), "Did you mean 'galore'"),
    (lambda m: lrzoo.make_optimizer(m, lr=1e-3, method="galore", loraplus_lr_ratio=16.0), "optimizer of its own"),
    (lambda m: lrzoo.make_optimizer(m, lr=1e-3, method="galore", target_modules=["nope"]), "match no module"),
    (lambda m: lrzoo.make_optimizer(lrzoo.wrap(m, "lora", r=2), lr=1e-3, method="fira"), "plain model"),
    (lambda m: lrzoo.make_optimizer(m, lr=1e-3, method="galore", proj_type="full"), "proj_type='full'"),
    (lambda m: GaLoreAdamW([{"params": [m.model.norm.weight], "rank": 2, "update_proj_gap": 1, "scale": 1.0,
                             "proj_type": "std"}]), "2-D weights only"),
    (lambda m: GaLoreAdamW([{"params": [m.lm_head.weight], "rank": 2}]), "missing: update_proj_gap, scale, proj_type"),
])
def test_misuse_fails_with_the_fix(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call(tiny_llama())


def test_a_misspelt_option_is_refused_not_ignored():
    with pytest.raises(TypeError, match="update_proj_gaps"):
        lrzoo.make_optimizer(tiny_llama(), lr=1e-3, method="galore", update_proj_gaps=10)


@pytest.mark.parametrize("method", lrzoo.list_optimizers())
def test_every_optimizer_has_a_docs_page_linked_from_the_index(method):
    assert (REPO / "docs" / "optimizers" / f"{method}.md").is_file()
    assert f"(optimizers/{method}.md)" in (REPO / "docs" / "index.md").read_text()


# Issue 25 item 6: options that would train wrong are refused with the option and its valid range.
@pytest.mark.parametrize("method", sorted(OURS))
@pytest.mark.parametrize("options, message", [
    ({"scale": -1.0}, r"scale must be a finite number > 0, got -1.0"),  # would reverse every update
    ({"scale": float("nan")}, r"scale must be a finite number > 0, got nan"),  # NaN weights after one step
    ({"scale": 0.0}, r"scale must be a finite number > 0"),
    ({"lr": float("nan")}, r"lr must be a finite number > 0, got nan"),
    ({"lr": float("inf")}, r"lr must be a finite number > 0, got inf"),
    ({"eps": 0.0}, r"eps must be a finite number > 0"),
    ({"eps": float("nan")}, r"eps must be a finite number > 0"),
    ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\)"),
    ({"betas": (float("nan"), 0.999)}, r"betas must be two numbers in \[0, 1\)"),
    ({"weight_decay": float("nan")}, r"weight_decay must be a finite number ≥ 0"),
    ({"weight_decay": 200.0}, r"lr·weight_decay must be < 1"),
    ({"update_proj_gap": 0}, r"update_proj_gap must be a positive integer"),
    ({"rank": 0}, r"rank must be a positive integer"),
])
def test_an_option_that_would_train_wrong_is_refused_naming_its_range(method, options, message):
    options = dict(options)
    lr = options.pop("lr", LR)
    with pytest.raises(ValueError, match=message):
        lrzoo.make_optimizer(tiny_llama(), lr=lr, method=method, **{**OPTIONS, **options})


@pytest.mark.parametrize("limit", [float("nan"), 0.5, float("inf")])
def test_fira_refuses_a_norm_growth_limit_outside_its_range(limit):
    with pytest.raises(ValueError, match=r"norm_growth_limit \(γ\) must be a finite number ≥ 1"):
        make(tiny_llama(), "fira", norm_growth_limit=limit)


def test_a_param_group_of_its_own_is_checked_too():
    weight = torch.nn.Parameter(torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"GaLoreAdamW: scale must be a finite number > 0, got -1"):
        GaLoreAdamW([{"params": [weight], "rank": 2, "update_proj_gap": 1, "scale": -1, "proj_type": "std"}])
    optimizer = GaLoreAdamW([torch.nn.Parameter(torch.randn(4))])
    with pytest.raises(ValueError, match=r"lr \(of a param group\) must be a finite number > 0, got nan"):
        optimizer.add_param_group({"params": [weight], "lr": float("nan"), "rank": 2, "update_proj_gap": 1,
                                   "scale": 1.0, "proj_type": "std"})


@pytest.mark.parametrize("method", sorted(OURS))
def test_a_rank_that_projects_no_weight_is_refused(method):
    """tiny LLaMA's projected weights are 32×32, 16×32, 48×32, 32×48: rank 32 keeps every gradient whole."""
    with pytest.raises(ValueError, match=r"rank=32 is ≥ min\(m, n\) of every projected weight "
                                         r"\(model\.layers\.0\.self_attn\.q_proj\.weight \(32×32\).*Choose rank < 32"):
        make(tiny_llama(), method, rank=32)


@pytest.mark.parametrize("method", sorted(OURS))
def test_a_rank_full_for_some_weights_only_warns_once_naming_them(method):
    """rank 16 projects the 32-wide weights but not the 16×32 k/v projections (grouped-query attention)."""
    with pytest.warns(UserWarning) as caught:
        optimizer = make(tiny_llama(), method, rank=16)
    full = [str(w.message) for w in caught if "min(m, n)" in str(w.message)]
    assert len(full) == 1, full
    assert "rank=16 is ≥ min(m, n) of 4 of the 14 projected weights" in full[0]
    assert "model.layers.0.self_attn.k_proj.weight (16×32)" in full[0] and "q_proj" not in full[0]
    assert sum(len(g["params"]) for g in optimizer.param_groups if "rank" in g) == 14  # still built, still GaLore
