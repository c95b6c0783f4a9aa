"""Q-GaLore (lrzoo.optimizers.q_galore): the official algorithm's weights and INT8 codes step for step, a reload
that continues bit-exactly, and INT8 weights that really take a quarter of fp32's bytes.

The official optimizer (``q_galore_torch.QGaLoreAdamW8bit``, PyPI ``q-galore-torch`` 1.0 = VITA-Group/Q-GaLore
@5bd2f1c) cannot step on CPU: it calls ``torch.cuda.synchronize()`` and drives bitsandbytes' CUDA update.
So :class:`OfficialStep` below ports its ``step`` around the official pieces that do run on CPU, imported
from the package: the projector (``GaLoreProjector``: SVD, INT4 quantization, the lazy cosine-queue gap), the
weight (de)quantizers and the stochastic rounding (``AdamW8bit._dequantize`` / ``_quantize`` /
``_quantize_stochastic_round``, unbound: they use no state). Ported (by us): the INT8 layer of
``utils/quantization.py`` (not in the wheel: a uint8 weight whose gradient accumulates in ``float_grad``) and
bitsandbytes' 32-bit Adam (``backends/default/ops.py``: every tensor here is below ``min_8bit_size`` 4096, so
the official code would take its 32-bit path too). Tolerance: none.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn

import lrzoo
from conftest import tiny_llama
from lrzoo.optimizers import state_bytes
from lrzoo.optimizers.group_quant import dequantize, quantize
from lrzoo.optimizers.int8_linear import Int8Linear
from lrzoo.optimizers.q_galore import QGaLoreAdamW, optimizer_state_bytes, weight_bytes

LR, WEIGHT_DECAY, GROUP = 1e-2, 0.1, 32
#: T = 2 from step 0; group 32 divides every tiny-LLaMA weight (32×32, 16×32, 48×32, 32×48) and projector (4×32)
OPTIONS = {"rank": 4, "update_proj_gap": 2, "scale": 0.5, "proj_group_size": GROUP, "weight_group_size": GROUP}
SPIKE = 12


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(1000 + step))


def loss_of(model, step: int) -> torch.Tensor:
    x = batch(step)
    return model(input_ids=x, labels=x).loss * (20.0 if step == SPIKE else 1.0)


def train(model, optimizer, steps) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()


def make(model, **options):
    return lrzoo.make_optimizer(model, lr=LR, method="q_galore", weight_decay=WEIGHT_DECAY, **{**OPTIONS, **options})


def int8_layers(model) -> dict[str, Int8Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, Int8Linear)}


# --- the official algorithm, ported around the package's own pieces ------------------------------------------
class _OfficialW8Function(torch.autograd.Function):
    """utils/quantization.py's W8Linear: dequantize in x's dtype, x Wᵀ (+ b), ∂W accumulated in float_grad."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        from q_galore_torch.q_galore_adamw8bit import AdamW8bit

        ctx.save_for_backward(x, weight, bias)
        w = AdamW8bit._dequantize(None, weight, x.dtype, weight.group_size, weight.scales, weight.zeros)
        return x @ w.t() + bias if bias is not None else x @ w.t()

    @staticmethod
    def backward(ctx, grad_output):
        from q_galore_torch.q_galore_adamw8bit import AdamW8bit

        x, weight, bias = ctx.saved_tensors
        w = AdamW8bit._dequantize(None, weight, x.dtype, weight.group_size, weight.scales, weight.zeros)
        out_features, in_features = weight.shape
        grad = grad_output.reshape(-1, out_features).t() @ x.reshape(-1, in_features)
        weight.float_grad = grad if weight.float_grad is None else weight.float_grad + grad
        return grad_output @ w, None, None


class OfficialW8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        from q_galore_torch.q_galore_adamw8bit import AdamW8bit

        super().__init__()
        codes, scales, zeros = AdamW8bit._quantize(None, linear.weight.data, q_group_size=GROUP)
        self.weight = nn.Parameter(codes, requires_grad=False)
        self.weight.scales, self.weight.zeros, self.weight.group_size = scales, zeros, GROUP
        self.weight.float_grad = None

    def forward(self, x):
        return _OfficialW8Function.apply(x, self.weight, None)


def to_official_int8(model, names) -> None:
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, OfficialW8Linear(model.get_submodule(name)))


class OfficialStep:
    """``QGaLoreAdamW8bit.step`` on CPU: the official projector and quantizers, bitsandbytes' 32-bit Adam."""

    def __init__(self, groups, betas, eps):
        from q_galore_torch.q_galore_projector import GaLoreProjector

        self.groups, self.betas, self.eps, self.state = groups, betas, eps, {}
        self.projector_cls = GaLoreProjector

    def zero_grad(self):
        for group in self.groups:
            for p in group["params"]:
                p.grad = None
                if hasattr(p, "float_grad"):
                    p.float_grad = None

    @staticmethod
    def _bnb_adam32(g, p, state, beta1, beta2, eps, weight_decay, lr):  # bitsandbytes/backends/default/ops.py
        state["step"] += 1
        step = state["step"]
        p_vals = p.float()
        s1 = state["state1"] * beta1 + (1.0 - beta1) * g
        s2 = state["state2"] * beta2 + (1.0 - beta2) * g * g
        correction1 = 1.0 - beta1 ** step
        correction2 = math.sqrt(1.0 - beta2 ** step)
        step_size = -lr * correction2 / correction1
        if weight_decay > 0.0:
            p_vals = p_vals * (1.0 - lr * weight_decay)
        p_vals = p_vals + 1.0 * step_size * (s1 / (torch.sqrt(s2) + eps * correction2))
        state["state1"], state["state2"] = s1, s2
        p.copy_(p_vals)

    @torch.no_grad()
    def step(self):
        from q_galore_torch.q_galore_adamw8bit import AdamW8bit

        beta1, beta2 = self.betas
        for group in self.groups:
            for p in group["params"]:
                int8 = hasattr(p, "float_grad")
                grad = p.float_grad if int8 else p.grad
                if grad is None:
                    continue
                state = self.state.setdefault(p, {"step": 0})
                data = AdamW8bit._dequantize(None, p.data, grad.dtype, p.group_size, p.scales, p.zeros) if int8 \
                    else p.data
                if "rank" in group:
                    if "projector" not in state:
                        state["projector"] = self.projector_cls(
                            group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                            proj_type="std", quant=True, group_size=group["proj_group_size"], n_bit=4,
                            cos_threshold=group["cos_threshold"], gamma_proj=2, queue_size=5)
                    grad = state["projector"].project(grad, state["step"])
                    saved, data = data.clone(), torch.zeros_like(grad)
                if "state1" not in state:
                    state["state1"], state["state2"] = torch.zeros_like(grad), torch.zeros_like(grad)
                weight_decay = 0.0 if "rank" in group else group["weight_decay"]
                self._bnb_adam32(grad, data, state, beta1, beta2, self.eps, weight_decay, group["lr"])
                if "rank" in group:
                    data = saved.add_(state["projector"].project_back(data))
                    if group["weight_decay"] > 0:
                        data.add_(data, alpha=-group["lr"] * group["weight_decay"])
                if int8:
                    p.data, p.scales, p.zeros = AdamW8bit._quantize_stochastic_round(None, data.clone(),
                                                                                     q_group_size=p.group_size)
                elif "rank" in group:
                    p.data = data


def official_twin(ours, model, twin, cos_threshold):
    """The official step over ``twin`` (a float copy of ``model`` made before make_optimizer) with ours's groups."""
    pytest.importorskip("q_galore_torch")
    names = list(int8_layers(model))
    to_official_int8(twin, names)
    ours_params = {id(p): name for name, p in model.named_parameters()}
    twin_params = dict(twin.named_parameters())
    groups = []
    for group in ours.param_groups:
        twin_group = {"params": [twin_params[ours_params[id(p)]] for p in group["params"]], "lr": group["lr"],
                      "weight_decay": group["weight_decay"]}
        if "rank" in group:
            twin_group.update(rank=group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                              proj_group_size=group["proj_group_size"], cos_threshold=cos_threshold)
        groups.append(twin_group)
    return OfficialStep(groups, ours.defaults["betas"], ours.defaults["eps"])


@pytest.mark.parametrize("cos_threshold", [-1.0, 0.4])
def test_thirty_steps_give_the_official_algorithms_int8_weights(cos_threshold):
    """cos_threshold −1: every weight's gap doubles at each refresh once the queue is full (refreshes at steps 0,
    2, ..., 8, then 10 (T → 4), 12 (T → 8), 16 (T → 16)); 0.4, the paper's: as the gradients decide."""
    model = tiny_llama()
    twin = copy.deepcopy(model)
    ours = make(model, cos_threshold=cos_threshold)
    theirs = official_twin(ours, model, twin, cos_threshold)
    assert len(int8_layers(model)) == 14
    train(model, ours, range(30))
    torch.manual_seed(ours.seed)  # the official rounding draws from the global RNG; ours from a generator seeded so
    train(twin, theirs, range(30))

    twin_modules = dict(twin.named_modules())
    for name, layer in int8_layers(model).items():
        official = twin_modules[name].weight
        assert torch.equal(layer.weight_codes, official.data), name
        assert torch.equal(layer.weight_scales, official.scales) and torch.equal(layer.weight_zeros, official.zeros)
        ours_state = ours.state[layer.weight]
        projector = theirs.state[official]["projector"]
        assert ours_state["update_proj_gap"] == projector.update_proj_gap
        assert torch.equal(ours_state["projector_codes"].reshape(projector.ortho_matrix.shape), projector.ortho_matrix)
        if cos_threshold == -1.0:
            assert projector.update_proj_gap == 16 and projector.svd_count == 8
    gaps = {ours.state[layer.weight]["update_proj_gap"] for layer in int8_layers(model).values()}
    if cos_threshold == 0.4:
        assert gaps != {2}, "the lazy refresh never lengthened a gap: the test does not exercise it"
    twin_params = dict(twin.named_parameters())
    for name, param in model.named_parameters():
        if not name.endswith("proj.weight"):
            torch.testing.assert_close(param, twin_params[name], rtol=0, atol=0, msg=name)


def test_state_reloaded_mid_run_continues_bit_exactly_across_a_refresh_and_a_gap_change():
    model = tiny_llama()
    optimizer = make(model, cos_threshold=-1.0)
    train(model, optimizer, range(9))  # refreshes at 0, 2, 4, 6, 8
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    train(model, optimizer, range(9, 18))  # refreshes at 10 (T → 4), 12 (T → 8), 16 (T → 16); the spike

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    reloaded = tiny_llama(seed=1)  # other initial weights: everything must come from the checkpoint
    reloaded.load_state_dict(saved["model"])
    reloaded_optimizer = make(reloaded, cos_threshold=-1.0)
    reloaded_optimizer.load_state_dict(saved["optimizer"])
    train(reloaded, reloaded_optimizer, range(9, 18))

    reloaded_layers = int8_layers(reloaded)
    for name, layer in int8_layers(model).items():
        for ours, theirs in zip(layer.quantized, reloaded_layers[name].quantized):
            assert torch.equal(ours, theirs), name
        assert optimizer.state[layer.weight]["update_proj_gap"] == 16
    for (name, ours), theirs in zip(model.named_parameters(), reloaded.parameters()):
        if not name.endswith("proj.weight"):
            assert torch.equal(ours, theirs), name
    for ours, theirs in zip(model.parameters(), reloaded.parameters()):
        for key, value in optimizer.state[ours].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(reloaded_optimizer.state[theirs][key])), key


def test_the_dense_state_dict_is_a_plain_model_and_loads_back_quantized():
    model = tiny_llama()
    make(model)
    layer = model.model.layers[0].mlp.up_proj
    dense = model.state_dict()
    assert torch.equal(dense["model.layers.0.mlp.up_proj.weight"], layer.dense_weight())
    plain = tiny_llama(seed=1)
    plain.load_state_dict(dense)  # keys and shapes of the plain model
    x = batch(0)
    torch.testing.assert_close(plain(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stored as INT8 codes"):
        layer.weight.copy_(torch.zeros(layer.weight.shape))
    layer.weight.copy_(layer.weight.detach().clone())  # its own NaNs (a trainer checkpoint's copy): a no-op
    # a dense state dict loaded into the INT8 model is quantized (round to nearest), nothing reported missing
    other = tiny_llama(seed=2).state_dict()
    assert not model.load_state_dict(other).missing_keys
    assert torch.equal(layer.weight_codes, quantize(other["model.layers.0.mlp.up_proj.weight"], GROUP, 8).codes)


def test_gradients_accumulate_in_weight_grad_like_a_linear_layers():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    layer = Int8Linear(copy.deepcopy(linear), group_size=32)
    linear.weight.data.copy_(layer.dense_weight())
    for _ in range(2):  # two micro-batches: the gradient accumulates
        x = torch.randn(3, 5, 32)
        (linear(x) ** 2).sum().backward()
        (layer(x) ** 2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, linear.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, linear.bias.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad.shape == (16, 32) and layer.weight.untyped_storage().nbytes() == 4
    with pytest.raises(RuntimeError, match="single memory location"):  # any other optimizer fails loudly
        torch.optim.SGD([layer.weight], lr=0.1).step()


def test_stochastic_rounding_is_unbiased_where_rounding_to_nearest_loses_small_updates():
    torch.manual_seed(0)
    weight = torch.randn(4, 64)
    codes = quantize(weight, 64, 8)
    grid = dequantize(codes, 64, torch.float32)
    # 1% of one INT8 step on every element but each row's min and max (so the grid itself stays as it was)
    step = codes.scales.expand(4, 64)
    interior = (grid != grid.amax(1, keepdim=True)) & (grid != grid.amin(1, keepdim=True))
    nudged = grid + 1e-2 * step * interior
    nearest = dequantize(quantize(nudged, 64, 8), 64, torch.float32)
    torch.testing.assert_close(nearest, grid, rtol=0, atol=1e-6)  # round to nearest: the update is lost
    generator = torch.Generator().manual_seed(0)
    mean = torch.stack([dequantize(quantize(nudged, 64, 8, generator), 64, torch.float32)
                        for _ in range(400)]).mean(0)
    moved = (mean - nearest)[interior].mean() / (nudged - grid)[interior].mean()
    assert 0.7 < moved.item() < 1.3  # on average the update survives


def measure(rank: int = 64):
    """One step of GaLore and of Q-GaLore on the pre-training config A of the spec (LLaMA d 256, 4 layers, ffn
    688, vocabulary 8,192; rank d/4): bytes of the weights and of the optimizer state."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    figures = {}
    for method in ("galore", "q_galore"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        dense_projected = sum(p.numel() * 4 for p in lrzoo.optimizers.projection_targets(model))
        options = {"rank": rank, "update_proj_gap": 200}
        optimizer = lrzoo.make_optimizer(model, lr=1e-3, method=method, **options)
        x = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        projected = [m.weight_bytes() for m in int8_layers(model).values()] if method == "q_galore" else [
            p.numel() * 4 for p in lrzoo.optimizers.projection_targets(model)]
        figures[method] = {"weights": weight_bytes(model), "projected_weights": sum(projected),
                           "dense_projected_weights": dense_projected,
                           "optimizer_state": optimizer_state_bytes(optimizer),
                           "projected_state": state_bytes(optimizer, [p for g in optimizer.param_groups
                                                                      if "rank" in g for p in g["params"]])}
    return figures


def test_int8_weights_take_about_a_quarter_of_fp32s_bytes():
    figures = measure()
    galore, q_galore = figures["galore"], figures["q_galore"]
    assert galore["projected_weights"] == galore["dense_projected_weights"] == q_galore["dense_projected_weights"]
    ratio = q_galore["projected_weights"] / galore["projected_weights"]
    assert 0.25 < ratio <= 0.26  # 1 byte of 4 per weight + 8 bytes (scale, zero point) per group of 256
    # the whole model (fp32 embeddings and head unchanged) and the optimizer state: INT4 P (uint8 codes) < fp32 P
    assert galore["weights"] - q_galore["weights"] == galore["projected_weights"] - q_galore["projected_weights"]
    assert q_galore["projected_state"] < galore["projected_state"]
    total = (q_galore["weights"] + q_galore["optimizer_state"]) / (galore["weights"] + galore["optimizer_state"])
    assert total < 0.86  # embeddings and LM head (8,192 × 256 each, fp32, AdamW state) dominate this small model


@pytest.mark.parametrize("options, message", [
    ({"proj_group_size": 256}, r"the projector of model\.layers\.0\.self_attn\.q_proj\.weight \(r×n\) has 128 "
                               r"elements, not a multiple of the quantization group size 256"),
    ({"weight_group_size": 100}, r"has 1024 elements, not a multiple of the quantization group size 100"),
    ({"cos_threshold": 2.0}, r"cos_threshold must be a number in \[-1, 1\]"),
    ({"gamma_proj": 0.5}, r"gamma_proj must be a finite number ≥ 1"),
    ({"proj_bits": 16}, r"proj_bits must be ≤ 8"),
    ({"stochastic_round": "yes"}, r"stochastic_round must be true or false"),
    ({"scale": -1.0}, r"scale must be a finite number > 0"),
])
def test_an_option_that_would_train_wrong_is_refused_naming_its_range(options, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        make(model, **options)
    if "scale" not in options:  # refused before the model was changed (scale is the optimizer's own check)
        assert not int8_layers(model)


def test_int8_weights_on_float_parameters_are_refused_with_the_fix():
    weight = nn.Parameter(torch.randn(32, 32))
    group = {"params": [weight], "rank": 4, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std",
             "proj_group_size": 32}
    with pytest.raises(ValueError, match=r"int8_weights=True but a weight is a float weight.*int8_weights=False"):
        QGaLoreAdamW([group])
    optimizer = QGaLoreAdamW([group], int8_weights=False)  # INT4 projector and lazy refresh on float weights
    weight.grad = torch.randn(32, 32)
    before = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(weight, before)


def test_list_optimizers_names_q_galore():
    assert "q_galore" in lrzoo.list_optimizers()


def test_the_ported_adam_is_bitsandbytes_own_32bit_update():
    """The Adam of the parity test's port (and of lrzoo) against bitsandbytes' CPU kernel itself (its default
    backend, compiled by torch where it can be, hence a rounding-level tolerance rather than 0)."""
    functional = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    theirs = torch.randn(64, 8)
    ours = theirs.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(theirs), torch.zeros_like(theirs)
    state, group = {"step": 0}, {"betas": (0.9, 0.95), "lr": 1e-2, "eps": 1e-8, "weight_decay": 0.1}
    for step in range(1, 11):
        grad = torch.randn(64, 8)
        functional.optimizer_update_32bit("adam", grad, theirs, exp_avg, 0.9, 1e-8, step, 1e-2, exp_avg_sq, 0.95,
                                          weight_decay=0.1, gnorm_scale=1.0)
        ours = QGaLoreAdamW._adam(grad, ours, state, group)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"], exp_avg_sq, rtol=1e-6, atol=0)


def test_int8_state_loaded_into_float_weights_is_refused():
    model = tiny_llama()
    optimizer = make(model)
    train(model, optimizer, range(1))
    float_optimizer = make(tiny_llama(), int8_weights=False)
    with pytest.raises(ValueError, match=r"holds INT8 codes for parameter \d+, which is no INT8 layer's weight"):
        float_optimizer.load_state_dict(optimizer.state_dict())


def test_a_second_optimizer_over_an_int8_model_projects_the_same_weights():
    """Building the optimizer again (a new run phase, a notebook cell run twice) found no linear layer to project:
    the first one had already stored them as Int8Linear."""
    model = tiny_llama()
    first = make(model)
    layers = int8_layers(model)
    second = make(model)
    projected = lambda optimizer: {id(p) for g in optimizer.param_groups if "rank" in g for p in g["params"]}  # noqa: E731
    assert projected(second) == projected(first) == {id(layer.weight) for layer in layers.values()}
    assert int8_layers(model).keys() == layers.keys()  # nothing converted twice
    train(model, second, range(2))  # and it trains
