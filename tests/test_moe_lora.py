import gc
import os
import weakref

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import fcmoe_hf.tuners.moe_lora.layer as moe_layer_module
from fcmoe_hf import MoELoraConfig
from fcmoe_hf.tuners.moe_lora import MOE_LORA_PEFT_TYPE, load_balancing_loss, route, router_z_loss

from .conftest import VOCAB, build_model, tiny_llama_config, tiny_moe_config

DENSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def expected_trainable(model, targets, r, num_experts):
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += num_experts * (r * module.in_features + module.out_features * r + module.in_features)
    return total


def train_steps(model, batch, steps=3, lr=1e-2, aux_coef=0.01):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(**batch, labels=batch["input_ids"])
        aux, z = model.router_losses()
        (out.loss + aux_coef * aux + 1e-3 * z).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("arch", ["llama", "mixtral", "qwen2_moe", "olmoe"])
def test_get_peft_model_trainable_identity_and_training(arch, batch):
    config = tiny_llama_config() if arch == "llama" else tiny_moe_config(arch)
    base = build_model(config)
    reference = logits(base, batch)
    targets = DENSE_TARGETS if arch == "llama" else ["q_proj", "k_proj", "v_proj", "o_proj"]
    expected = expected_trainable(base, targets, r=4, num_experts=4)

    model = get_peft_model(base, MoELoraConfig(r=4, num_experts=4, top_k=2))  # default target modules per arch
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".moe_lora_" in n for n in trainable)
    assert sum(trainable.values()) == expected
    # the MoE base's own router and experts are left alone
    assert not any(".mlp.gate." in n or ".experts." in n for n in trainable)

    torch.testing.assert_close(logits(model, batch), reference, rtol=0, atol=0)  # B = 0 at init
    train_steps(model, batch)
    assert not torch.allclose(logits(model, batch), reference, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), reference, rtol=0, atol=0)


def test_moe_layer_matches_per_token_reference():
    """The batched gated computation equals the definition, token by token."""
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    torch.manual_seed(0)
    config = MoELoraConfig(r=2, num_experts=3, top_k=2, target_modules=["0"], init_lora_weights=False, lora_alpha=4)
    model = get_peft_model(base, config)
    layer = model.base_model.model[0]
    x = torch.randn(4, 3, 6)
    out = layer(x)
    A, B, W = (layer.moe_lora_A["default"], layer.moe_lora_B["default"], layer.moe_lora_router["default"])
    expected = torch.empty_like(out)
    for i in range(4):
        for t in range(3):
            token = x[i, t]
            probs = torch.softmax(W @ token, dim=-1)
            top_p, top_e = probs.topk(2)
            top_p = top_p / top_p.sum()
            delta = sum(p * (B[e] @ (A[e] @ token)) for p, e in zip(top_p, top_e))
            expected[i, t] = layer.base_layer(token) + 2.0 * delta
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def single_layer_model(**config):
    torch.manual_seed(0)
    kwargs = dict(r=3, num_experts=4, top_k=2, target_modules=["0"], init_lora_weights=False, lora_alpha=6)
    kwargs.update(config)
    return get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 12)), MoELoraConfig(**kwargs))


def test_fused_router_gemm_matches_unfused_path(monkeypatch):
    """One GEMM for router logits + down-projections, scaling on the gates and addmm are an optimisation only."""
    routed = []
    monkeypatch.setattr(moe_layer_module, "route", lambda *a, **k: routed.append(1) or route(*a, **k))
    model = single_layer_model().train()
    layer = model.base_model.model[0]
    params = {"A": layer.moe_lora_A["default"], "B": layer.moe_lora_B["default"], "router": layer.moe_lora_router["default"]}
    x = torch.randn(3, 5, 16)
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(layer, "_can_fuse_router", lambda adapter_name: False)
        model.zero_grad()
        inp = x.clone().requires_grad_(True)
        out = layer(inp)
        aux, z = model.router_losses()
        (out.square().sum() + aux + z).backward()
        assert len(routed) == (0 if fused else 1)  # the fp32, no-dropout, no-jitter case takes the fused path
        grads = {name: p.grad.clone() for name, p in params.items()}
        runs.append((out.detach(), aux.detach(), z.detach(), inp.grad, grads))
    (out_f, aux_f, z_f, dx_f, grads_f), (out_u, aux_u, z_u, dx_u, grads_u) = runs
    torch.testing.assert_close(out_f, out_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_f, aux_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_f, z_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_f, dx_u, rtol=1e-5, atol=1e-5)
    for name in params:
        assert grads_f[name].abs().sum() > 0
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-5, atol=1e-5, msg=name)
    # the public per-adapter delta is the same contribution, without the base output
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(layer.base_layer(x) + layer.moe_lora_delta(x, "default"), out_f, rtol=1e-5, atol=1e-5)

    # dropout and jitter perturb only one of the router / expert inputs: they must keep the separate GEMMs
    for config in ({"lora_dropout": 0.1}, {"router_jitter_noise": 0.1}):
        routed.clear()
        monkeypatch.setattr(moe_layer_module, "route", lambda *a, **k: routed.append(1) or route(*a, **k))
        single_layer_model(**config).train()(x)
        assert routed == [1], config
    # so must autocast, which would compute the fused GEMM (router logits included) in bf16
    routed.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        single_layer_model().train()(x)
    assert routed == [1]


def test_router_gates_and_losses():
    torch.manual_seed(0)
    hidden, weight = torch.randn(10, 8), torch.randn(4, 8)
    out = route(hidden.bfloat16(), weight.bfloat16(), top_k=2, renormalize=True)
    assert out.logits.dtype == torch.float32 and out.gates.dtype == torch.float32
    assert ((out.gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(10))
    switch = route(hidden, weight, top_k=1, renormalize=False)
    torch.testing.assert_close(switch.gates.max(-1).values, switch.probs.max(-1).values)  # raw top-1 probability
    # mixed-precision training: autocast must not turn the router GEMM into bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_logits = route(hidden, weight, top_k=2, renormalize=True).logits
    torch.testing.assert_close(autocast_logits, hidden @ weight.T, rtol=1e-6, atol=1e-6)

    # perfectly balanced: each expert gets 1/E of the tokens and probability mass -> loss 1
    probs = torch.full((8, 4), 0.25)
    index = torch.arange(8).remainder(4).unsqueeze(-1)
    torch.testing.assert_close(load_balancing_loss(probs, index), torch.tensor(1.0))
    # all tokens to one expert with all the probability -> E
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 1
    torch.testing.assert_close(load_balancing_loss(collapsed, torch.zeros(8, 1, dtype=torch.long)), torch.tensor(4.0))
    # padding tokens are ignored
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    skewed = torch.cat([probs[:4], collapsed[:4]])
    skewed_index = torch.cat([index[:4], torch.zeros(4, 1, dtype=torch.long)])
    torch.testing.assert_close(load_balancing_loss(skewed, skewed_index, mask), torch.tensor(1.0))
    logits_ = torch.zeros(3, 4)
    torch.testing.assert_close(router_z_loss(logits_), torch.log(torch.tensor(4.0)) ** 2)


def test_top1_router_gets_task_gradient(tiny_llama, batch):
    model = get_peft_model(tiny_llama, MoELoraConfig(r=4, num_experts=4, top_k=1, init_lora_weights=False))
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    router = model.base_model.model.model.layers[0].self_attn.q_proj.moe_lora_router["default"]
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_routing_statistics_count_real_tokens_and_reset(tiny_llama, batch):
    model = get_peft_model(tiny_llama, MoELoraConfig(r=4, num_experts=4, top_k=2))
    logits(model, batch)
    logits(model, batch)
    stats = model.routing_statistics()
    assert len(stats) == 2 * len(DENSE_TARGETS)
    real_tokens = int(batch["attention_mask"].sum())
    for layer_stats in stats.values():
        assert int(layer_stats.num_tokens) == 2 * real_tokens
        assert int(layer_stats.activation_counts.sum()) == 2 * real_tokens * 2  # top-2
        torch.testing.assert_close(layer_stats.mean_probability.sum().float(), torch.tensor(1.0))
    model.reset_routing_statistics()
    assert model.routing_statistics() == {}
    model.set_routing_statistics_tracking(False)
    logits(model, batch)
    assert model.routing_statistics() == {}


def test_unread_router_losses_are_not_held(tiny_llama, batch):
    """A loop that never calls router_losses() (a plain Trainer) must not keep their autograd graphs alive."""
    model = get_peft_model(tiny_llama, MoELoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False)).train()
    layers = list(model.base_model.moe_layers().values())

    def step():
        model(**batch, labels=batch["input_ids"]).loss.backward()

    # collected by default; a no-grad forward before reading them keeps them (TRL's SFTTrainer runs one)...
    step()
    assert all(set(layer.router_losses) == {"default"} for layer in layers)
    unread = weakref.ref(layers[0].router_losses["default"][0])
    with torch.no_grad():
        model(**batch)
    assert unread() is not None
    # ...the next training forward drops them, even one that records none itself
    with model.disable_adapter():
        model(**batch)
    gc.collect()
    assert unread() is None
    assert not any(layer.router_losses for layer in layers)

    # off: nothing is computed nor held, from the moment it is turned off
    model.set_router_loss_collection(False)
    assert not any(layer.router_losses for layer in layers)
    step()
    assert not any(layer.router_losses for layer in layers)
    assert model.router_losses() is None

    model.set_router_loss_collection(True)
    model(**batch, labels=batch["input_ids"])
    aux, z = model.router_losses()
    assert aux.requires_grad and torch.isfinite(aux) and torch.isfinite(z)
    assert not any(layer.router_losses for layer in layers)  # read losses are released too


def test_mixed_adapter_batch_matches_per_adapter_outputs():
    """peft's `adapter_names=[...]`: each row gets its own adapter ("__base__": none), routed on its own tokens."""
    model = get_peft_model(build_model(tiny_llama_config()), MoELoraConfig(r=4, num_experts=4, init_lora_weights=False))
    torch.manual_seed(1)
    model.add_adapter("other", MoELoraConfig(r=4, num_experts=4, init_lora_weights=False))
    model.eval()
    g = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(3, VOCAB, (4, 6), generator=g)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["attention_mask"][3, :2] = 0  # left padding on a row of "other"
    names = ["other", "__base__", "default", "other"]

    model.reset_routing_statistics()
    mixed = logits(model, {**inputs, "adapter_names": names})
    # statistics accumulate in place: read the token counts before the reference forwards below
    tokens = {name: [int(s.num_tokens) for s in model.routing_statistics(name).values()] for name in ("default", "other")}
    with model.disable_adapter():
        expected = {"__base__": logits(model, inputs)}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = logits(model, inputs)
    assert not torch.allclose(expected["default"], expected["other"], atol=1e-3)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], expected[name][row], rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")
    # each adapter's statistics count the real tokens of its own rows only
    mask = inputs["attention_mask"]
    for name, rows in (("default", [2]), ("other", [0, 3])):
        assert tokens[name] == [int(mask[rows].sum())] * (2 * len(DENSE_TARGETS))

    with pytest.raises(ValueError, match="non-existing adapter"):
        model(**inputs, adapter_names=["default", "typo", "default", "default"])
    with pytest.raises(ValueError, match="training mode"):
        model.train()(**inputs, adapter_names=names)


def test_save_load_roundtrip_and_multiple_adapters(tmp_path, batch):
    config = tiny_llama_config()
    model = get_peft_model(build_model(config), MoELoraConfig(r=4, num_experts=4, top_k=2))
    train_steps(model, batch)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path / "global")
    files = os.listdir(tmp_path / "global")
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    saved = load_file(tmp_path / "global" / "adapter_model.safetensors")
    assert saved and all(".moe_lora_" in k for k in saved)
    assert PeftConfig.from_pretrained(tmp_path / "global").peft_type == MOE_LORA_PEFT_TYPE

    # a per-client adapter with different weights
    train_steps(model, batch, steps=2, lr=5e-2)
    client_expected = logits(model, batch)
    model.save_pretrained(tmp_path / "client_3")

    loaded = PeftModel.from_pretrained(build_model(config), tmp_path / "global")
    assert isinstance(loaded.peft_config["default"], MoELoraConfig)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    loaded.load_adapter(tmp_path / "client_3", adapter_name="client_3")
    loaded.set_adapter("client_3")
    torch.testing.assert_close(logits(loaded, batch), client_expected, rtol=0, atol=0)
    loaded.set_adapter("default")
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
    assert set(loaded.peft_config) == {"default", "client_3"}


def test_gradient_checkpointing_matches_and_counts_once(batch):
    config = tiny_llama_config()
    grads = {}
    for checkpointing in (False, True):
        base = build_model(config)
        model = get_peft_model(base, MoELoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False))
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        model.train()
        out = model(**batch, labels=batch["input_ids"])
        aux, z = model.router_losses()
        (out.loss + 0.1 * aux + 0.01 * z).backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        counts = next(iter(model.routing_statistics().values())).activation_counts
        assert int(counts.sum()) == 2 * int(batch["attention_mask"].sum())  # recompute does not count twice
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6)


def test_bf16_base_with_fp32_router(batch):
    base = build_model(tiny_llama_config()).to(torch.bfloat16)
    model = get_peft_model(base, MoELoraConfig(r=4, num_experts=4, top_k=2, init_lora_weights=False))
    for name, p in model.named_parameters():
        if ".moe_lora_" in name:
            p.data = p.data.float()  # adapter weights in fp32 over a bf16 base, as autocast_adapter_dtype does
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    aux, z = model.router_losses()
    assert aux.dtype == torch.float32 and torch.isfinite(aux) and torch.isfinite(z)
    (out.loss + 0.01 * aux).backward()
    router = model.base_model.model.model.layers[0].self_attn.q_proj.moe_lora_router["default"]
    assert router.grad is not None and router.grad.dtype == torch.float32 and torch.isfinite(router.grad).all()


def test_moe_base_own_aux_loss_is_not_double_counted(batch):
    config = tiny_moe_config("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    base = build_model(config)
    labels = batch["input_ids"]
    with torch.no_grad():
        base_out = base(**batch, labels=labels)
    assert base_out.aux_loss is not None
    model = get_peft_model(base, MoELoraConfig(r=4, num_experts=4, top_k=2))
    model.train()
    out = model(**batch, labels=labels)
    # identity adapter: the model's loss is exactly the base loss including the base's own aux term
    torch.testing.assert_close(out.loss, base_out.loss)
    aux, _ = model.router_losses()
    # the adapter's router loss is separate: averaged over the 2 layers x 4 attention projections only
    assert len(model.moe_layers()) == 2 * 4
    assert torch.isfinite(aux) and not torch.allclose(aux, base_out.aux_loss)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"top_k": 5, "num_experts": 4}, "top_k"), ({"r": 0}, "r"), ({"num_experts": 0}, "num_experts"),
     ({"top_k": 0}, "top_k"), ({"lora_dropout": 1.5}, "lora_dropout")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        MoELoraConfig(**kwargs)


def test_target_modules_matching_nothing(tiny_llama):
    with pytest.raises(ValueError, match="target_modules|Target modules"):
        get_peft_model(tiny_llama, MoELoraConfig(target_modules=["does_not_exist"]))


def test_merge_is_refused(tiny_llama):
    model = get_peft_model(tiny_llama, MoELoraConfig(r=2, num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    assert VOCAB == model.get_base_model().config.vocab_size


def test_peft_type_reads_like_a_peft_type_member(tmp_path, batch):
    """peft reads `config.peft_type.value` / `.name` (error messages, hotswap, mixed models): they must work for
    MoE-LoRA, while the type stays the string "MOE_LORA" on disk and as a mapping key."""
    import json

    from peft import PeftMixedModel
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils.hotswap import hotswap_adapter

    config = MoELoraConfig(r=2, num_experts=2, top_k=1)
    for peft_type in (config.peft_type, MOE_LORA_PEFT_TYPE):
        assert peft_type.value == peft_type.name == "MOE_LORA" and type(peft_type.value) is str
        assert peft_type == "MOE_LORA" and hash(peft_type) == hash("MOE_LORA") and f"{peft_type}" == "MOE_LORA"
    assert PEFT_TYPE_TO_CONFIG_MAPPING["MOE_LORA"] is MoELoraConfig
    assert type(config.to_dict()["peft_type"]) is str
    edited = MoELoraConfig()
    edited.peft_type = "MOE_LORA"  # a plain string assigned by hand stays usable
    assert edited.peft_type.value == "MOE_LORA"

    model = get_peft_model(build_model(tiny_llama_config()), config)
    model.save_pretrained(tmp_path / "adapter")
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["peft_type"] == "MOE_LORA"
    assert PeftConfig.from_pretrained(tmp_path / "adapter").peft_type.value == "MOE_LORA"
    loaded = PeftModel.from_pretrained(build_model(tiny_llama_config()), tmp_path / "adapter")
    assert loaded.peft_type.value == loaded.active_peft_config.peft_type.value == "MOE_LORA"
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)

    # Real peft paths that format `peft_type.value` into their error messages.
    with pytest.raises(ValueError, match="Hotswapping only supports .* MOE_LORA was passed"):
        hotswap_adapter(loaded, str(tmp_path / "adapter"), adapter_name="default", torch_device="cpu")
    with pytest.raises(ValueError, match="'MOE_LORA' is not compatible with the `PeftMixedModel`"):
        PeftMixedModel(build_model(tiny_llama_config()), MoELoraConfig(r=2, num_experts=2, top_k=1))
