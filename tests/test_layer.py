"""The MoE layer (fused_moe, MoE): the kernels (simt, cuda) against the reference backend,
forward and backward, for every preset; the reference layer against a naive per-token loop;
the capacity, expert-choice, weight-on-input and 4-bit modes; losses, the bias update, bad
inputs, torch.compile, CUDA graphs.

Tolerances. The layer rounds to x's dtype where the models do: the first GEMM's activated
output, each expert's weighted output row, the combined sum, and the sum with the shared
expert. The kernels and the reference sum the same fp32 products in different orders, so an
intermediate can round to the neighbouring bf16 value (2^-8 relative) and carry that into
the second GEMM: the output differs by a few bf16 units of its own scale. We allow one unit
of 2^-7 relative plus 2^-7 of the output's largest magnitude, as test_gemm does for one
GEMM; the naive loop (float64 with the same rounding points) gets the same bound.
"""

import math

import pytest
import torch

import moe_kernels
from moe_kernels import emulator, reference
from moe_kernels.layer import MoE, fused_moe, phase_hook
from moe_kernels.presets import PRESETS, scaled_config

from conftest import device_of, needs_observer, run

TOL = 2.0 ** -7


def assert_close(got, want, tol=TOL):
    scale = max(want.float().abs().max().item(), 1e-3) if want.numel() else 1.0
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=tol, atol=tol * scale)


def make_layer(name, seed=0, **overrides):
    torch.manual_seed(seed)
    layer = MoE(**scaled_config(name, **overrides))
    with torch.no_grad():
        if layer.selection_bias is not None:
            layer.selection_bias.normal_(0, 0.1)  # so the bias changes the selection
        if layer.b13 is not None:
            layer.b13.normal_(0, 0.1)
            layer.b2.normal_(0, 0.1)
        if layer.router_bias is not None:
            layer.router_bias.normal_(0, 0.1)
    return layer


def tokens(layer, num_tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, layer.hidden_size, generator=g).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------
# The naive per-token loop.

def naive_activation(name, pre, alpha, limit):
    if name == "swiglu_oai":
        gate = pre[0::2].clamp(max=limit)
        up = pre[1::2].clamp(min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(alpha * gate)
    gated = name.endswith("_and_mul")
    half = pre.shape[0] // 2
    a = pre[:half] if gated else pre
    base = name[:-len("_and_mul")] if gated else name
    if base == "silu":
        a = a * torch.sigmoid(a)
    elif base == "relu":
        a = a.clamp(min=0)
    elif base == "gelu":
        a = 0.5 * a * (1 + torch.erf(a / math.sqrt(2)))
    elif base == "gelu_tanh":
        a = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    return a * pre[half:] if gated else a


def naive_moe(layer, x, weights, ids, kept):
    """Token by token, slot by slot, in float64, rounding to x's dtype at the layer's
    rounding points. weights/ids: the routing ([T, k]); kept: which assignments survive
    the capacity."""
    dtype = x.dtype
    rnd = lambda v: v.to(dtype).double()  # noqa: E731
    w13, w2 = layer.w13.detach().double(), layer.w2.detach().double()
    if layer.w_layout == "kn":
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    y = torch.zeros(x.shape[0], layer.hidden_size, dtype=torch.float64)
    for t in range(x.shape[0]):
        acc = torch.zeros(layer.hidden_size, dtype=torch.float64)
        for j in range(ids.shape[1]):
            if not kept[t, j]:
                continue
            e, w = int(ids[t, j]), float(weights[t, j])
            inp = rnd(x[t].double() * rnd(torch.tensor(w, dtype=torch.float64))) if layer.weight_on_input \
                else x[t].double()
            pre = w13[e] @ inp
            if layer.b13 is not None:
                pre = pre + layer.b13[e].detach().double()
            h = rnd(naive_activation(layer.activation, pre, layer.alpha, layer.limit))
            out = w2[e] @ h
            if layer.b2 is not None:
                out = out + layer.b2[e].detach().double()
            acc += rnd(out if layer.weight_on_input else out * w)
        y[t] = rnd(acc)
    if layer.shared_w13 is not None:
        xs = x.double()
        h = rnd(torch.stack([naive_activation(layer.activation, layer.shared_w13.detach().double() @ xs[t],
                                              layer.alpha, layer.limit) for t in range(x.shape[0])]))
        out = h @ layer.shared_w2.detach().double().t()
        if layer.shared_gate is not None:
            gate = torch.sigmoid((x @ layer.shared_gate.detach().t()).double()).to(dtype).double()
            out = out * gate
        y = rnd(y + rnd(out))
    return y.to(dtype)


def routing_of(layer, x):
    logits = layer.router_logits(x).detach()
    with moe_kernels.use_backend("reference"):
        weights, ids = moe_kernels.topk_gating(logits, layer.k, bias=layer.selection_bias, **layer.gating)
    return weights, ids


def position_kept(ids, num_experts, capacity):
    """The Switch/GShard drop rule, by hand: each expert keeps its first `capacity`
    assignments in (token, slot) order."""
    seen = [0] * num_experts
    kept = torch.zeros(ids.shape, dtype=torch.bool)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            kept[t, j] = capacity is None or seen[e] < capacity
            seen[e] += 1
    return kept


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_reference_layer_matches_naive_loop(name):
    layer = make_layer(name)
    x = tokens(layer)
    weights, ids = routing_of(layer, x)
    kept = position_kept(ids, layer.num_experts, layer.capacity(x.shape[0]))
    with torch.no_grad():
        got = run("reference", layer, x)
    assert_close(got, naive_moe(layer, x, weights, ids, kept))


def test_capacity_drops_contribute_zero():
    # Switch (top-1) with a small capacity: some tokens lose their only expert and get zero.
    layer = make_layer("switch", num_experts=4, capacity_factor=0.5)
    x = tokens(layer, 16)
    weights, ids = routing_of(layer, x)
    capacity = layer.capacity(16)
    assert capacity == 2 == moe_kernels.capacity_from_factor(16, 1, 4, 0.5)
    assert make_layer("gshard", capacity_factor=1.1).capacity(30) == moe_kernels.capacity_from_factor(30, 2, 16, 1.1)
    kept = position_kept(ids, 4, capacity)
    assert not kept.all()
    for backend in ("reference", "simt"):
        with torch.no_grad():
            y = run(backend, layer, x)
        assert_close(y, naive_moe(layer, x, weights, ids, kept))
        assert (y[~kept[:, 0]] == 0).all()


def test_capacity_drop_by_weight():
    layer = make_layer("gshard", num_experts=4, capacity_factor=0.5, drop_policy="weight")
    x = tokens(layer, 12)
    with torch.no_grad():
        want = run("reference", layer, x)
        got = run("simt", layer, x)
    assert_close(got, want)
    # Against the drop rule by hand: each expert keeps its `capacity` largest weights.
    weights, ids = routing_of(layer, x)
    capacity = layer.capacity(12)
    kept = torch.zeros(ids.shape, dtype=torch.bool)
    for e in range(4):
        slots = [(float(weights[t, j]), -(t * 2 + j), t, j) for t in range(12) for j in range(2) if ids[t, j] == e]
        for _, _, t, j in sorted(slots, reverse=True)[:capacity]:
            kept[t, j] = True
    assert_close(want, naive_moe(layer, x, weights, ids, kept))


def test_expert_choice_matches_naive_loop():
    layer = make_layer("mixtral", num_experts=4, routing="expert_choice", capacity_factor=1.0)
    x = tokens(layer, 6)
    logits = layer.router_logits(x).detach()
    probs = torch.softmax(logits.double(), dim=-1)
    capacity = layer.capacity(6)
    # Each expert: its `capacity` best tokens (ties to the lower token), weight = probability.
    weights = torch.zeros(6, 4, dtype=torch.float64)
    for e in range(4):
        order = sorted(range(6), key=lambda t: (-probs[t, e].item(), t))[:capacity]
        for t in order:
            weights[t, e] = probs[t, e].float().item()
    ids = torch.arange(4).expand(6, 4)
    want = naive_moe(layer, x, weights, ids, weights > 0)
    for backend in ("reference", "simt"):
        with torch.no_grad():
            assert_close(run(backend, layer, x), want)


# ---------------------------------------------------------------------------------------
# Kernels against the reference, forward and backward, every preset.

def layer_grads(backend, layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with moe_kernels.use_backend(backend):
        y = layer(x)
        g = torch.Generator().manual_seed(5)
        (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    grads = {"x": x.grad}
    grads.update({n.removeprefix("_orig_mod."): p.grad for n, p in layer.named_parameters()})
    return y.detach(), grads


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_kernels_match_reference_forward_backward(kernel_backend, name):
    layer = make_layer(name).to(device_of(kernel_backend))
    x = tokens(layer).to(device_of(kernel_backend))
    y_want, want = layer_grads("reference", layer, x) if kernel_backend != "cuda" else \
        layer_grads("reference", layer.cpu(), x.cpu())
    layer.to(device_of(kernel_backend))
    y_got, got = layer_grads(kernel_backend, layer, x)
    assert_close(y_got, y_want)
    for param, grad in want.items():
        assert (grad is None) == (got[param] is None), param
        if grad is not None:
            # A gradient sums over the tokens and experts the forward's roundings touched;
            # the same bound as the output, relative to the gradient's own scale.
            assert_close(got[param], grad, tol=2 * TOL)
    assert want["x"] is not None and want["w13"] is not None and want["router_weight"] is not None


def test_kernels_are_deterministic(kernel_backend):
    layer = make_layer("deepseek_v3").to(device_of(kernel_backend))
    x = tokens(layer, 9).to(device_of(kernel_backend))
    first = layer_grads(kernel_backend, layer, x)
    second = layer_grads(kernel_backend, layer, x)
    assert torch.equal(first[0], second[0])
    for param, grad in first[1].items():
        if grad is not None:
            assert torch.equal(grad, second[1][param]), param


def test_four_bit_weights():
    layer = make_layer("qwen3_moe", hidden_size=64, intermediate_size=64)
    x = tokens(layer)
    dequantized = make_layer("qwen3_moe", hidden_size=64, intermediate_size=64)
    layer.quantize(group_size=32)
    with torch.no_grad():
        dequantized.w13.copy_(moe_kernels.quant.dequantize(layer.w13))
        dequantized.w2.copy_(moe_kernels.quant.dequantize(layer.w2))
        got = run("simt", layer, x)
        want = run("simt", dequantized, x)
        ref = run("reference", layer, x)
    # W4A16 computes exactly grouped_gemm(x, dequantize(w)): the same bits.
    assert torch.equal(got, want)
    assert_close(got, ref)
    # x still gets its gradient through the 4-bit GEMMs.
    xg = x.clone().requires_grad_(True)
    with moe_kernels.use_backend("simt"):
        layer(xg).float().sum().backward()
    xd = x.clone().requires_grad_(True)
    with moe_kernels.use_backend("simt"):
        dequantized(xd).float().sum().backward()
    assert_close(xg.grad, xd.grad, tol=2 * TOL)


def test_four_bit_checkpoints_through_the_importers():
    from moe_kernels import quant
    # GPTQ: the importer's weight gives the layer exactly what quantize() gave it.
    layer = make_layer("olmoe", hidden_size=64, intermediate_size=64)
    x = tokens(layer)
    w13 = quant.quantize_int4(layer.w13.detach(), group_size=32, symmetric=False)
    w2 = quant.quantize_int4(layer.w2.detach(), group_size=32, symmetric=False)
    direct = make_layer("olmoe", hidden_size=64, intermediate_size=64).load_quantized(w13, w2)
    imported = make_layer("olmoe", hidden_size=64, intermediate_size=64).load_quantized(
        quant.from_gptq(**quant.to_gptq(w13)), quant.from_awq(**quant.to_awq(w2)))
    with torch.no_grad():
        assert torch.equal(run("simt", imported, x), run("simt", direct, x))
    # GPT-OSS MXFP4 blocks ([E, 2I, H/32, 16], gate/up interleaved): the "nk" layout.
    gpt = make_layer("gpt_oss", hidden_size=64, intermediate_size=32, w_layout="nk")
    g = torch.Generator().manual_seed(3)

    def mxfp4(n, k):
        blocks = torch.randint(0, 256, (gpt.num_experts, n, k // 32, 16), generator=g, dtype=torch.uint8)
        scales = torch.randint(122, 126, (gpt.num_experts, n, k // 32), generator=g, dtype=torch.uint8)
        return quant.from_mxfp4(blocks, scales)

    gpt.load_quantized(mxfp4(64, 64), mxfp4(64, 32))
    assert "w13" not in dict(gpt.named_parameters())
    x = tokens(gpt)
    with torch.no_grad():
        assert_close(run("simt", gpt, x), run("reference", gpt, x))
    with pytest.raises(ValueError, match="w13: expected shape"):
        make_layer("olmoe").load_quantized(w13, w2)
    with pytest.raises(TypeError, match="w2: expected a QuantizedWeight"):
        make_layer("olmoe", hidden_size=64, intermediate_size=64).load_quantized(w13, layer.w2)
    # The layer's dtype conversion reaches the int4 scales (and leaves the codes alone).
    direct.to(torch.float16)
    assert direct.w13.scales.dtype == torch.float16 and direct.w13.codes.dtype == torch.uint8
    with torch.no_grad():
        assert run("simt", direct, x.half()).dtype == torch.float16


def test_three_dimensional_input_and_float16():
    layer = make_layer("olmoe", dtype=torch.float16)
    x = torch.randn(2, 3, layer.hidden_size).half()
    with torch.no_grad():
        y = run("simt", layer, x)
        flat = run("simt", layer, x.reshape(6, -1))
    assert y.shape == x.shape and y.dtype == torch.float16
    assert torch.equal(y.reshape(6, -1), flat)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "switch"])
def test_no_tokens(kernel_backend, name):
    layer = make_layer(name).to(device_of(kernel_backend))
    x = torch.zeros(0, layer.hidden_size, dtype=torch.bfloat16, device=device_of(kernel_backend),
                    requires_grad=True)
    y = run(kernel_backend, layer, x)
    assert y.shape == (0, layer.hidden_size)
    with moe_kernels.use_backend(kernel_backend):
        y.float().sum().backward()  # zero rows through every backward kernel
    assert x.grad.shape == x.shape
    assert layer.w13.grad is not None and not layer.w13.grad.any()


def test_gemms_compute_no_padding_rows():
    """The first GEMM writes exactly T * k rows of the activated output (no padding rows,
    no zero-filled tail), and every launch of the layer reads each expert weight byte at
    most once per token tile."""
    needs_observer()
    layer = make_layer("qwen3_moe", num_experts=16)
    x = tokens(layer, 5)
    with torch.no_grad(), moe_kernels.use_backend("simt"), emulator.traffic() as rows:
        layer(x)
    gemms = [r for r in rows if r["kernel"].startswith("grouped_gemm_kernel")]
    assert len(gemms) == 2
    h_bytes = 5 * layer.k * layer.intermediate_size * 2
    assert gemms[0]["unique_bytes_written"] == h_bytes
    assert gemms[1]["unique_bytes_written"] == 5 * layer.k * layer.hidden_size * 2


def test_phase_hook_sees_every_phase():
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            seen.append(self.name)

        def __exit__(self, *exc):
            return False

    layer = make_layer("qwen2_moe")
    with torch.no_grad(), phase_hook(Recorder):
        run("simt", layer, tokens(layer))
    assert set(seen) == {"route", "plan", "gemm1", "gemm2", "combine", "shared"}
    with torch.no_grad():
        run("simt", layer, tokens(layer))
    assert len(seen) == 7  # route twice (router matmul, gating), once each else; off afterwards


# ---------------------------------------------------------------------------------------
# Losses and the bias update.

def test_aux_and_z_losses():
    layer = make_layer("mixtral", aux_loss_coef=0.01, z_loss_coef=0.001)
    x = tokens(layer, 11)
    run("simt", layer, x)
    logits = layer.router_logits(x)
    _, ids = routing_of(layer, x)
    want_aux = moe_kernels.load_balancing_loss(logits, ids, layer.num_experts, alpha=0.01)
    torch.testing.assert_close(layer.aux_loss, want_aux)
    torch.testing.assert_close(layer.z_loss, 0.001 * torch.logsumexp(logits.float(), -1).square().mean())
    (layer.aux_loss + layer.z_loss).backward()
    assert layer.router_weight.grad is not None and layer.router_weight.grad.abs().sum() > 0


def test_selection_bias_update():
    layer = make_layer("deepseek_v3")
    x = tokens(layer, 13)
    with pytest.raises(ValueError, match="counts"):
        layer.update_selection_bias(0.01)
    with torch.no_grad():
        run("simt", layer, x)
    counts = layer.expert_counts
    assert counts.sum().item() == 13 * layer.k
    before = layer.selection_bias.clone()
    layer.update_selection_bias(0.01)
    step = torch.sign(counts.double().mean() - counts.double()).float() * 0.01
    torch.testing.assert_close(layer.selection_bias, before + step)
    with pytest.raises(ValueError, match="selection_bias"):
        make_layer("mixtral").update_selection_bias(0.01)


# ---------------------------------------------------------------------------------------
# Arguments.

def test_fused_moe_matches_module():
    layer = make_layer("gpt_oss")
    x = tokens(layer)
    with torch.no_grad(), moe_kernels.use_backend("simt"):
        want = layer(x)
        got = fused_moe(x, layer.router_logits(x), layer.w13, layer.w2, k=layer.k, **layer.gating,
                        activation="swiglu_oai", w_layout="kn", b13=layer.b13, b2=layer.b2)
    assert torch.equal(got, want)


def test_bad_inputs():
    layer = make_layer("qwen2_moe")
    x = tokens(layer)
    logits = layer.router_logits(x)
    args = dict(k=2, shared_w13=layer.shared_w13, shared_w2=layer.shared_w2)
    w13, w2 = layer.w13.detach(), layer.w2.detach()
    cases = [
        (dict(x=x.float()), TypeError, "x: expected dtype"),
        (dict(router_logits=logits[:, :3]), ValueError, "router_logits"),
        (dict(router_logits=logits[:4]), ValueError, "router_logits"),
        (dict(w13=w13[:, :, :8]), ValueError, "w13"),
        (dict(w2=w2[:, :, :8]), ValueError, "w2"),
        (dict(w2=w2.half()), TypeError, "w2"),
        (dict(k=0), ValueError, "k"),
        (dict(routing="hash"), ValueError, "routing"),
        (dict(routing="expert_choice"), ValueError, "capacity"),
        (dict(capacity=-1), ValueError, "capacity"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(w_layout="kk"), ValueError, "w_layout"),
        (dict(b13=torch.zeros(3, 3)), ValueError, "b13"),
        (dict(shared_w2=None), ValueError, "shared_w13"),
        (dict(shared_w13=layer.shared_w13[:, :8]), ValueError, "shared_w13"),
        (dict(shared_gate=torch.zeros(2, layer.hidden_size)), ValueError, "shared_gate"),
        (dict(weight_on_input=1), TypeError, "weight_on_input"),
        (dict(selection_bias=torch.zeros(3)), ValueError, "selection_bias"),
        (dict(selection_bias=torch.zeros(8, dtype=torch.int32)), TypeError, "selection_bias"),
    ]
    for change, error, match in cases:
        call = dict(x=x, router_logits=logits, w13=w13, w2=w2, **args)
        call.update(change)
        with pytest.raises(error, match=match):
            fused_moe(call.pop("x"), call.pop("router_logits"), call.pop("w13"), call.pop("w2"), **call)
    with pytest.raises(ValueError, match="name"):
        MoE.from_preset("mixtral_9000")
    with pytest.raises(TypeError, match="dtype"):
        MoE(64, 32, 8, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="k"):
        MoE(64, 32, 8, 9)
    with pytest.raises(ValueError, match="shared_gate"):
        MoE(64, 32, 8, 2, shared_gate=True)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(64, 32, 8, 2, capacity_factor=0)
    constructor_cases = [
        (dict(hidden_size=0), ValueError, "hidden_size"),
        (dict(intermediate_size=0), ValueError, "intermediate_size"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(routing="hash"), ValueError, "routing"),
        (dict(scoring="tanh"), ValueError, "scoring"),
        (dict(activation="tanh"), ValueError, "activation"),
        (dict(w_layout="kk"), ValueError, "w_layout"),
        (dict(drop_policy="random"), ValueError, "drop_policy"),
        (dict(router_dtype=torch.int32), TypeError, "router_dtype"),
        (dict(renormalize=1), TypeError, "renormalize"),
        (dict(weight_on_input="yes"), TypeError, "weight_on_input"),
        (dict(shared_intermediate_size=-1), ValueError, "shared_intermediate_size"),
        (dict(aux_loss_coef="big"), TypeError, "aux_loss_coef"),
    ]
    for change, error, match in constructor_cases:
        args = dict(hidden_size=64, intermediate_size=32, num_experts=8, k=2)
        args.update(change)
        with pytest.raises(error, match=match):
            MoE(**args)
    kn = MoE(64, 32, 8, 2, w_layout="kn")
    with pytest.raises(ValueError, match="w_layout"):
        kn.quantize(group_size=32)


def test_presets_build_at_model_sizes_on_meta():
    for name, config in PRESETS.items():
        layer = MoE.from_preset(name, device="meta")
        assert layer.num_experts == config["num_experts"] and layer.k == config["k"]
        assert layer.w13.shape[0] == config["num_experts"]


# ---------------------------------------------------------------------------------------
# torch.compile and CUDA graphs.

@pytest.mark.parametrize("name,overrides", [
    ("deepseek_v3", {}), ("switch", dict(capacity_factor=0.5)), ("llama4", {}),
    ("mixtral", dict(routing="expert_choice", capacity_factor=1.0))], ids=["topk", "capacity", "weight_on_input",
                                                                           "expert_choice"])
def test_compile_fullgraph_forward_backward(name, overrides):
    layer = make_layer(name, **overrides)
    x = tokens(layer, 6)
    eager_y, eager_grads = layer_grads("simt", layer, x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y, grads = layer_grads("simt", compiled, x)
    assert torch.equal(y, eager_y)
    for param, grad in eager_grads.items():
        if grad is not None:
            torch.testing.assert_close(grads[param], grad)


def test_segment_row_sum_opcheck():
    rows = torch.randn(6, 8).to(torch.bfloat16)
    gather = torch.tensor([2, -1, 0, 2, 1, 0])
    from moe_kernels.gemm import _gather_segments
    segment_rows, row_start = _gather_segments(gather, 3)
    torch.library.opcheck(torch.ops.moe_kernels.segment_row_sum.default,
                          ("simt", rows, segment_rows, row_start),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert_close(run("simt", moe_kernels.layer._token_sum, rows, gather, 3),
                 reference.token_sum(rows, gather, 3))


@pytest.mark.skipif(not torch.cuda.is_available() or "cuda" not in moe_kernels.available_backends(),
                    reason="CUDA graph capture needs a GPU and the built CUDA kernels")
def test_cuda_graph_capture_and_replay():
    layer = make_layer("deepseek_v3").cuda()
    x = tokens(layer, 8).cuda()
    with torch.no_grad():
        want = layer(x)
        static_x = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(static_x)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
        static_x.copy_(tokens(layer, 8, seed=3).cuda())
        graph.replay()
        assert torch.equal(static_y, layer(static_x))
        static_x.copy_(x)
        graph.replay()
        assert torch.equal(static_y, want)
