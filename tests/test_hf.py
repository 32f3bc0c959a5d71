"""moe_kernels.hf against transformers: from_hf per family, weight sharing, patch_model,
the "moe_kernels" experts backend, on the reference backend and (for the layer and the
experts backend) the SIMT emulator. Tiny random models (2 layers, H=64, 8 experts), bf16.

Tolerances. Everything runs in bfloat16, and we do not reproduce the blocks' rounding
order (e.g. HF rounds each weighted expert row to bf16 and index_adds in bf16, or rounds
the routing weights to bf16 first; we sum a token's rows in float32 and round once). Two
correct bf16 implementations therefore differ by a few bf16 ulps of the output, which is
about the size of the block's own error against a float32 run of the same block. So the
bound is ``max(2 * block_err, 2**-7 * max|ref|)`` where block_err is the block's bf16
error against its float32 copy and 2**-7 is two bf16 ulps at the largest magnitude.
Routing itself is reproduced exactly (same router weight, same compute dtype), so a
routing difference (a whole expert's contribution, O(|ref|)) would fail this bound.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration needs transformers")

import moe_kernels  # noqa: E402
from moe_kernels import MoE, hf  # noqa: E402

H = 64
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v3", "gpt_oss", "olmoe",
            "llama4"]
COMMON = dict(vocab_size=64, hidden_size=H, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, max_position_embeddings=64)


def _config(family):
    c = dict(COMMON)
    if family == "mixtral":
        return transformers.MixtralConfig(**c, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)
    if family == "qwen2_moe":  # not renormalized, sigmoid-gated shared expert
        return transformers.Qwen2MoeConfig(**c, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                           num_experts_per_tok=2, shared_expert_intermediate_size=48,
                                           norm_topk_prob=False)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**c, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                           num_experts_per_tok=2, norm_topk_prob=True)
    if family == "qwen3_next":
        return transformers.Qwen3NextConfig(**c, intermediate_size=64, moe_intermediate_size=32, num_experts=8,
                                            num_experts_per_tok=2, shared_expert_intermediate_size=32,
                                            layer_types=["linear_attention", "full_attention"],
                                            linear_key_head_dim=16, linear_value_head_dim=16,
                                            linear_num_key_heads=2, linear_num_value_heads=2)
    if family == "deepseek_v3":  # layer 0 dense, layer 1 MoE: 4 groups of 2, best 2 groups
        c.pop("head_dim")
        c["num_key_value_heads"] = 2
        return transformers.DeepseekV3Config(**c, intermediate_size=64, moe_intermediate_size=32,
                                             n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                                             n_shared_experts=1, first_k_dense_replace=1,
                                             routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=32,
                                             qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    if family == "gpt_oss":
        return transformers.GptOssConfig(**c, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                                         layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    if family == "olmoe":
        return transformers.OlmoeConfig(**c, intermediate_size=32, num_experts=8, num_experts_per_tok=2)
    if family == "llama4":
        return transformers.Llama4TextConfig(**c, intermediate_size=32, intermediate_size_mlp=64,
                                             num_local_experts=8, num_experts_per_tok=1, moe_layers=[0, 1])
    raise KeyError(family)


_MODELS = {}


def _model(family):
    """The tiny bf16 model of `family` (cached; callers deep-copy before mutating). The MoE
    blocks are re-initialised with std 0.15 (HF's 0.02 makes the experts' output ~1e-3 of
    the input, too small to test anything), DeepSeek's e_score_correction_bias randomised."""
    if family not in _MODELS:
        torch.manual_seed(0)
        config = _config(family)
        if family == "llama4":  # the text-only model (AutoModelForCausalLM maps llama4_text there too)
            model = transformers.Llama4ForCausalLM._from_config(config, dtype=torch.bfloat16)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp." in name or ".feed_forward." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            for name, b in model.named_buffers():
                if "e_score_correction_bias" in name:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.1)
        _MODELS[family] = model.eval()
    return _MODELS[family]


def _block(model):
    return next(m for m in model.modules() if type(m).__name__ in hf.SUPPORTED_BLOCKS)


def _x(shape=(2, 5, H), requires_grad=False):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    return x.requires_grad_(requires_grad)


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


def _bound(ref_bf16, ref_fp32):
    block_err = (ref_bf16.float() - ref_fp32.float()).abs().max().item()
    return max(2 * block_err, 2 ** -7 * ref_bf16.float().abs().max().item())


def _block_fp32(block, x):
    """The block's own output in float32 (a float32 copy of the block, eager experts)."""
    block32 = copy.deepcopy(block).float()
    return _hidden(block32(x.float()))


@pytest.mark.parametrize("backend", ["reference", "simt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_forward_matches_block(family, backend):
    block = _block(_model(family))
    x = _x()
    with torch.no_grad():
        ref = _hidden(block(x)).reshape(x.shape)
        ref32 = _block_fp32(block, x).reshape(x.shape)
        layer = MoE.from_hf(block)
        if backend == "simt":
            with moe_kernels.use_backend("simt"):
                y = layer(x)
        else:
            y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= _bound(ref, ref32), (family, err, _bound(ref, ref32))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_shares_weights(family):
    block = _block(_model(family))
    layer = MoE.from_hf(block)
    experts = block.experts
    router = getattr(block, "gate", None) or block.router
    shared = [(layer.w13, experts.gate_up_proj), (layer.w2, experts.down_proj),
              (layer.router_weight, router.weight)]
    if family == "gpt_oss":
        shared += [(layer.b13, experts.gate_up_proj_bias), (layer.b2, experts.down_proj_bias),
                   (layer.router_bias, router.bias)]
    if family == "deepseek_v3":
        shared.append((layer.selection_bias, router.e_score_correction_bias))
    mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if mlp is not None:
        shared.append((layer.shared_w2, mlp.down_proj.weight))
        # the one copy: gate_proj and up_proj concatenated into shared_w13
        assert layer.shared_w13.data_ptr() != mlp.gate_proj.weight.data_ptr()
        assert torch.equal(layer.shared_w13, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    if getattr(block, "shared_expert_gate", None) is not None:
        shared.append((layer.shared_gate, block.shared_expert_gate.weight))
    for ours, theirs in shared:
        assert ours is theirs and ours.data_ptr() == theirs.data_ptr()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _model_bound(model, ids, ref):
    """As _bound, for the whole model's logits: the model's own bf16 error vs float32."""
    model32 = copy.deepcopy(model).float()
    model32.set_experts_implementation("eager")
    return _bound(ref, _logits(model32, ids))


TIE = 0.05  # selection-value gap (logits, or DeepSeek's biased sigmoid scores) of a near-tie


def _near_ties(model, ids):
    """``[B * S]`` bool: tokens with a near-tie in some MoE block's selection (the k-th vs
    (k+1)-th selection value, DeepSeek also the last kept vs first dropped group).

    A whole-model comparison cannot bound those tokens: a patched block matches the
    block to a bf16 ulp, so the next block's input differs by an ulp and a near-tie
    there may select another expert, changing that token's output by O(1) (seen on
    Mixtral: probabilities 0.1414 vs 0.1402). Routing is identical given identical input
    (test_from_hf_forward_matches_block), and the first MoE block sees identical input,
    so only the last block can flip, which changes only that token's logits."""
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append((m, i[0])))
             for m in model.modules() if type(m).__name__ in hf.SUPPORTED_BLOCKS]
    _logits(model, ids)
    for h in hooks:
        h.remove()
    tie = torch.zeros(ids.numel(), dtype=torch.bool)
    with torch.no_grad():
        for block, x in inputs:
            layer = MoE.from_hf(block)
            values = layer.router_logits(x).reshape(-1, layer.num_experts).float()
            gaps, tie_gap = [], TIE
            if layer.selection_bias is not None:  # DeepSeek-V3
                tie_gap = TIE / 4  # sigmoid'(x) <= 1/4: a logit gap of TIE or less
                values = values.sigmoid() + layer.selection_bias
                groups = values.reshape(values.shape[0], layer.gating["num_groups"], -1)
                group_scores = groups.topk(2, dim=-1).values.sum(-1).sort(-1, descending=True).values
                n = layer.gating["topk_groups"]
                gaps.append(group_scores[:, n - 1] - group_scores[:, n])
            top = values.sort(-1, descending=True).values
            gaps.append(top[:, layer.k - 1] - top[:, layer.k])
            for gap in gaps:
                tie |= gap < tie_gap
    return tie


_CHECKS = {}


def _check_logits(family, ids, ref, out):
    """out vs ref within the model's bound on the tokens without a near-tie (at least
    half). The bound and the ties come from the original model (cached per ids)."""
    key = (family, tuple(ids.flatten().tolist()))
    if key not in _CHECKS:
        model = _model(family)
        _CHECKS[key] = (~_near_ties(model, ids), _model_bound(model, ids, _logits(model, ids)))
    keep, bound = _CHECKS[key]
    assert keep.sum() >= ids.numel() // 2, (family, keep)
    err = (out - ref).reshape(ids.numel(), -1)[keep].abs().max().item()
    assert err <= bound, (family, err, bound)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_model_logits(family):
    model = _model(family)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    ref = _logits(model, ids)
    patched, skipped = hf.patch_model(copy.deepcopy(model))
    assert skipped == []
    blocks = [m for m in patched.modules() if isinstance(m, hf.PatchedMoEBlock)]
    assert len(blocks) == (1 if family == "deepseek_v3" else 2)
    assert not any(type(m).__name__ in hf.SUPPORTED_BLOCKS for m in patched.modules())
    _check_logits(family, ids, ref, _logits(patched, ids))


def test_patch_model_output_structure():
    """The patched blocks return what the blocks returned (tuples for GPT-OSS, Llama 4)."""
    for family in ("gpt_oss", "llama4"):
        block = _block(_model(family))
        x = _x()
        with torch.no_grad():
            ref = block(x)
            out = hf.PatchedMoEBlock(MoE.from_hf(block), hf._family(block)[1])(x)
        assert isinstance(ref, tuple) and isinstance(out, tuple) and len(out) == len(ref)
        for a, b in zip(out, ref):
            assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(out[1].float(), ref[1].float(), rtol=0, atol=0)  # scores / logits


def test_patch_model_skips_unsupported():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.Linear(2, 2)

    model = torch.nn.Sequential(Odd())
    with pytest.warns(UserWarning, match="unpatched"):
        _, skipped = hf.patch_model(model)
    assert skipped == [("0", "Odd", "unsupported block")]
    with pytest.raises(NotImplementedError):
        hf.from_hf(model[0])


EXPERTS_FAMILIES = [f for f in FAMILIES if f != "llama4"]  # Llama 4's experts have no interface


@pytest.mark.parametrize("backend", ["reference", "simt"])
@pytest.mark.parametrize("family", EXPERTS_FAMILIES)
def test_experts_backend_matches_eager(family, backend):
    model = copy.deepcopy(_model(family))
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    model.set_experts_implementation("eager")
    ref = _logits(model, ids)
    model.set_experts_implementation("moe_kernels")
    assert model.config._experts_implementation == "moe_kernels"
    if backend == "simt":
        with moe_kernels.use_backend("simt"):
            out = _logits(model, ids)
    else:
        out = _logits(model, ids)
    _check_logits(family, ids, ref, out)


def test_experts_backend_from_config():
    """experts_implementation="moe_kernels" passes transformers' validation at load."""
    model = transformers.AutoModelForCausalLM.from_config(_config("qwen3_moe"), dtype=torch.bfloat16,
                                                          experts_implementation="moe_kernels")
    assert model.config._experts_implementation == "moe_kernels"
    ids = torch.randint(0, 64, (1, 3))
    assert torch.isfinite(_logits(model, ids)).all()


def test_experts_backend_unfused_gate():
    """A gate our kernels cannot fuse (interleaved silu) runs self._apply_gate in torch."""
    from transformers.integrations.moe import grouped_mm_experts_forward
    experts = copy.deepcopy(_block(_model("mixtral")).experts)
    experts.is_concatenated = False  # _default_apply_gate still chunks: must not be fused
    assert hf._fused_experts_activation(experts) is None
    x = _x((6, H))
    idx = torch.randint(0, 8, (6, 2), generator=torch.Generator().manual_seed(5))
    w = torch.rand(6, 2, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = grouped_mm_experts_forward(experts, x, idx, w)
        out = hf.moe_kernels_experts_forward(experts, x, idx, w)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())


def test_from_hf_backward_matches_block():
    """Gradient of x through the layer vs through the block (Qwen2-MoE: routed experts,
    shared expert and its gate), reference backend."""
    block = _block(_model("qwen2_moe"))
    grad_out = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(7)).bfloat16()
    x_ref, x = _x(requires_grad=True), _x(requires_grad=True)
    (block(x_ref) * grad_out).float().sum().backward()
    (MoE.from_hf(block)(x) * grad_out).float().sum().backward()
    x32 = _x().float().requires_grad_(True)
    (_block_fp32(block, x32) * grad_out.float()).sum().backward()
    err = (x.grad.float() - x_ref.grad.float()).abs().max().item()
    assert err <= _bound(x_ref.grad, x32.grad), err
    block.zero_grad(set_to_none=True)


def test_from_hf_quantized_runs():
    """A from_hf layer quantized to 4 bits runs through the same forward (no HF quantizer)."""
    block = _block(_model("qwen3_moe"))
    layer = MoE.from_hf(block)
    x = _x()
    with torch.no_grad():
        ref = layer(x)
        layer.quantize(group_size=32)
        y = layer(x)
        dequantized = MoE.from_hf(block)
        dequantized.w13 = torch.nn.Parameter(moe_kernels.quant.dequantize(layer.w13, torch.bfloat16))
        dequantized.w2 = torch.nn.Parameter(moe_kernels.quant.dequantize(layer.w2, torch.bfloat16))
        y_deq = dequantized(x)
    assert isinstance(layer.w13, moe_kernels.quant.QuantizedWeight)
    assert block.experts.gate_up_proj.dtype == torch.bfloat16  # the block keeps its weights
    # W4A16 equals the layer on the dequantized weights (up to fp32 summation order) ...
    torch.testing.assert_close(y.float(), y_deq.float(), rtol=2 ** -7, atol=2 ** -7 * y_deq.abs().max().item())
    # ... and stays near the bf16 layer (int4 of N(0, 0.15) weights: ~10% error per GEMM)
    rel = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 0.25, rel


def _run(code):
    import subprocess
    import sys
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=120)


def test_import_registers_lazily():
    """import moe_kernels does not import transformers; the backend is registered when
    transformers' experts interface is first imported."""
    _run("import sys, moe_kernels\n"
         "assert 'transformers' not in sys.modules and 'moe_kernels.hf' not in sys.modules\n"
         "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
         "assert 'moe_kernels' in ALL_EXPERTS_FUNCTIONS and 'moe_kernels.hf' in sys.modules\n")


def test_import_without_transformers():
    _run("import sys\n"
         "sys.modules['transformers'] = None  # as if not installed\n"
         "import moe_kernels, moe_kernels.hf\n"
         "assert not moe_kernels.hf.register_experts_backend()\n")
