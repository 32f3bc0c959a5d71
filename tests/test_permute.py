"""permute / unpermute: kernels (simt, cuda) vs the PyTorch reference vs a naive loop."""

import math

import pytest
import torch

import moe_kernels
from moe_kernels import emulator, reference
from conftest import device_of, misaligned_copy, native, needs_observer, run

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# permute only moves bits: every output is compared exactly. unpermute sums in float32 in
# slot order with each product rounded on its own, exactly as the reference's separate
# mul and add do, so it is compared exactly too (the kernels use no fused multiply-add).


def ref_permute(*args, **kwargs):
    return moe_kernels.PermuteResult(*reference.permute(*args, **kwargs))


def naive_permute(ids, num_experts, capacity=None, align=1, drop_policy="position",
                  weights=None, expert_range=None):
    """Independent oracle: a loop over the segments (experts) and assignments."""
    T, k = ids.shape
    if isinstance(expert_range, torch.Tensor):  # an expert map: segments in local order
        local = expert_range.tolist()
        num_local = sum(v >= 0 for v in local)
        segments = [local.index(i) for i in range(num_local)] + [None] * (num_experts - num_local)
    else:
        start, end = expert_range or (0, num_experts)
        segments = [e if start <= e < end else None for e in range(num_experts)]
    ids_list = ids.tolist()
    w_list = weights.tolist() if weights is not None else None
    row_map = [[-1] * k for _ in range(T)]
    offsets, row, kept_total = [0], 0, 0
    for e in segments:
        if e is None:
            offsets.append(row)
            continue
        mine = [(t, j) for t in range(T) for j in range(k) if ids_list[t][j] == e]
        if capacity is not None:
            if drop_policy == "weight":
                def key(tj):
                    w = w_list[tj[0]][tj[1]]
                    return (float("inf") if math.isnan(w) else -w, tj)
                keep = set(sorted(mine, key=key)[:capacity])
                mine = [tj for tj in mine if tj in keep]
            else:
                mine = mine[:capacity]
        for i, (t, j) in enumerate(mine):
            row_map[t][j] = row + i
        kept_total += len(mine)
        if capacity is None:
            row += -(-len(mine) // align) * align
        else:
            row += -(-capacity // align) * align
        offsets.append(row)
    return torch.tensor(row_map, dtype=torch.long).view(T, k), torch.tensor(offsets), kept_total


def make_inputs(T, H, E, k, dtype, seed=0, weights=True, distinct=True):
    g = torch.Generator().manual_seed(seed)
    # Small multiples of 1/4: exact in every dtype, and sums of a few are exact in fp32.
    x = (torch.randint(-16, 17, (T, H), generator=g).float() / 4).to(dtype)
    if distinct and k <= E:
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
    else:
        ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    w = torch.rand(T, k, generator=g) if weights else None
    return x, ids.contiguous(), w


def check_permute_outputs(out, x, ids, E, **kw):
    """The reference's outputs vs the naive loop, and x / weights vs row_map."""
    row_map, offsets, kept = naive_permute(ids, E, weights=kw.get("weights"), **{
        k: v for k, v in kw.items() if k != "weights"})
    assert torch.equal(out.row_map.cpu(), row_map)
    assert torch.equal(out.offsets.cpu(), offsets)
    assert out.num_rows.cpu().tolist() == [int(offsets[-1])]
    assert int(((row_map >= 0).sum())) == kept
    expected = torch.zeros_like(out.x.cpu())
    for t, j in (row_map >= 0).nonzero().tolist():
        expected[row_map[t, j]] = x[t]
    assert torch.equal(out.x.cpu(), expected)


# T, H, E, k, dtype, kwargs: one axis at a time around a base, then combinations.
BASE = dict(T=257, H=72, E=8, k=2, dtype=torch.bfloat16)
CASES = (
    [dict(BASE, T=t) for t in (0, 1, 3, 257)] + [dict(BASE, T=4099, H=8)] +
    # T * k = 1024 is one index tile (the one-launch path), 1026 two tiles.
    [dict(BASE, T=512, H=8, capacity=100), dict(BASE, T=513, H=8, capacity=100)] +
    [dict(BASE, H=h) for h in (7, 8, 1024)] + [dict(BASE, T=33, H=1024)] +
    [dict(BASE, E=e) for e in (1, 60, 256, 384)] +
    [dict(BASE, k=1), dict(BASE, k=8, E=60), dict(BASE, T=1000, H=8, E=256, k=8)] +
    [dict(BASE, dtype=d) for d in (torch.float32, torch.float16)] +
    [dict(BASE, align=a) for a in (8, 128)] +
    [dict(BASE, capacity=c) for c in (0, 20, 70)] +
    [dict(BASE, capacity=20, drop_policy="weight"), dict(BASE, capacity=0, drop_policy="weight")] +
    [dict(BASE, capacity=20, align=8), dict(BASE, capacity=45, align=8, drop_policy="weight")] +
    [dict(BASE, expert_range=(2, 5)), dict(BASE, E=60, k=8, expert_range=(0, 7), align=8),
     dict(BASE, E=60, k=8, expert_range=(30, 60), capacity=10, drop_policy="weight")] +
    [dict(T=4099, H=7, E=384, k=8, dtype=torch.float32, capacity=90, drop_policy="weight",
          align=8, expert_range=(100, 300)),
     dict(T=1500, H=24, E=60, k=8, dtype=torch.float16, capacity=70, align=128),
     dict(T=300, H=1032, E=8, k=1, dtype=torch.float32, align=8),
     # > 256 assignments per expert: the weight select's scans carry across chunks.
     dict(T=1500, H=8, E=8, k=2, dtype=torch.float32, capacity=200, drop_policy="weight")]
)


def case_id(c):
    return "-".join(f"{k}={str(v).replace('torch.', '')}" for k, v in c.items())


def split_case(case):
    c = dict(case)
    shape = {k: c.pop(k) for k in ("T", "H", "E", "k", "dtype")}
    return shape, c


@pytest.mark.parametrize("case", CASES[:12] + CASES[-6:], ids=case_id)
def test_reference_matches_naive_loop(case):
    shape, kw = split_case(case)
    if shape["T"] * shape["k"] > 3000:
        shape["T"] = 3000 // shape["k"]  # the naive loop is slow
    x, ids, w = make_inputs(shape["T"], shape["H"], shape["E"], shape["k"], shape["dtype"])
    out = ref_permute(x, ids, shape["E"], weights=w, **kw)
    check_permute_outputs(out, x, ids, shape["E"], weights=w, **kw)
    assert out.x.shape[0] == reference.permute_num_rows_bound(
        shape["T"], shape["k"], shape["E"], kw.get("capacity"), kw.get("align", 1))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_kernel_matches_reference(kernel_backend, case):
    shape, kw = split_case(case)
    x, ids, w = make_inputs(shape["T"], shape["H"], shape["E"], shape["k"], shape["dtype"],
                            seed=shape["T"] + shape["E"])
    dev = device_of(kernel_backend)
    out = run(kernel_backend, moe_kernels.permute, x.to(dev), ids.to(dev), shape["E"],
              weights=w.to(dev), **kw)
    ref = ref_permute(x, ids, shape["E"], weights=w, **kw)
    for name in ("x", "row_map", "offsets", "num_rows", "weights"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got.cpu(), want), name  # all M rows: padding and tail are zero
    y = run(kernel_backend, moe_kernels.unpermute, out.x, out.row_map, w.to(dev))
    assert torch.equal(y.cpu(), reference.unpermute(ref.x, ref.row_map, w))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 8])
def test_round_trip_is_k_times_x(backend, dtype, k):
    x, ids, _ = make_inputs(67, 40, 16, k, dtype, seed=k)
    dev = device_of(backend)
    out = run(backend, moe_kernels.permute, x.to(dev), ids.to(dev), 16, align=8)
    y = run(backend, moe_kernels.unpermute, out.x, out.row_map)
    assert torch.equal(y.cpu(), (x.float() * k).to(dtype))
    ones = torch.ones(67, k, device=dev)
    assert torch.equal(run(backend, moe_kernels.unpermute, out.x, out.row_map, ones).cpu(),
                       (x.float() * k).to(dtype))


def test_duplicate_expert_in_one_token(backend):
    # Token 0 goes to expert 2 twice, token 1 to expert 0 three times: one row per slot.
    ids = torch.tensor([[2, 1, 2], [0, 0, 0], [2, 2, 1]], dtype=torch.int32)
    x = torch.arange(3 * 8, dtype=torch.float32).view(3, 8)
    dev = device_of(backend)
    out = run(backend, moe_kernels.permute, x.to(dev), ids.to(dev), 3)
    assert out.row_map.cpu().tolist() == [[5, 3, 6], [0, 1, 2], [7, 8, 4]]
    assert out.offsets.cpu().tolist() == [0, 3, 5, 9]
    y = run(backend, moe_kernels.unpermute, out.x, out.row_map)
    assert torch.equal(y.cpu(), 3 * x)


def test_empty_experts_and_fixed_capacity_slots(backend):
    ids = torch.tensor([[5, 1], [5, 2], [1, 5], [5, 1]], dtype=torch.int32)
    x = torch.randn(4, 16)
    w = torch.tensor([[0.1, 0.9], [0.5, 0.5], [0.3, 0.5], [0.8, 0.2]])
    dev = device_of(backend)
    out = run(backend, moe_kernels.permute, x.to(dev), ids.to(dev), 7, align=4)
    assert out.offsets.cpu().tolist() == [0, 0, 4, 8, 8, 8, 12, 12]
    assert out.num_rows.cpu().tolist() == [12]  # the valid prefix: offsets[E], padding included
    # Capacity 2, align 4: expert e owns rows [4e, 4e + 4) whether or not it has tokens.
    out = run(backend, moe_kernels.permute, x.to(dev), ids.to(dev), 7, capacity=2, align=4,
              weights=w.to(dev), drop_policy="weight")
    assert out.x.shape == (28, 16)
    assert out.offsets.cpu().tolist() == [4 * e for e in range(8)]
    # Expert 5: weights 0.1 (t0), 0.5 (t1), 0.5 (t2), 0.8 (t3) -> keeps t3 and t1 (tie
    # with t2 goes to the lower token), laid out in token order.
    assert out.row_map.cpu()[:, 0].tolist() == [-1, 20, 5, 21]
    assert out.row_map.cpu()[2, 1].item() == -1
    assert out.weights.cpu()[20:24].tolist() == [0.5, 0.800000011920929, 0.0, 0.0]
    assert torch.all(out.x.cpu()[22:28] == 0)


def test_deterministic(kernel_backend):
    x, ids, w = make_inputs(1500, 24, 60, 8, torch.bfloat16, distinct=False)
    dev = device_of(kernel_backend)
    args = (x.to(dev), ids.to(dev), 60)
    kw = dict(weights=w.to(dev), align=8)
    for extra in ({}, dict(capacity=150, drop_policy="weight")):
        first = run(kernel_backend, moe_kernels.permute, *args, **kw, **extra)
        second = run(kernel_backend, moe_kernels.permute, *args, **kw, **extra)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        y1 = run(kernel_backend, moe_kernels.unpermute, first.x, first.row_map, w.to(dev))
        y2 = run(kernel_backend, moe_kernels.unpermute, first.x, first.row_map, w.to(dev))
        assert torch.equal(y1, y2)


def test_unaligned_rows_use_scalar_copies(kernel_backend):
    x = torch.randn(9, 64)  # rows start 4 bytes past a 16-byte boundary, on the device
    ids = torch.randint(0, 4, (9, 2), dtype=torch.int32)
    out = run(kernel_backend, moe_kernels.permute, misaligned_copy(x, device_of(kernel_backend)),
              ids.to(device_of(kernel_backend)), 4)
    assert torch.equal(out.x.cpu(), reference.permute(x, ids, 4)[0])


# (1600, 700): > 1024 assignments per expert, past what the select keeps in registers.
@pytest.mark.parametrize("tokens,capacity", [(300, 1), (300, 37), (300, 150), (1600, 700)])
def test_weight_ties_keep_lower_token(backend, tokens, capacity):
    """Weights on a coarse grid tie often: the select must break ties by (token, slot)."""
    g = torch.Generator().manual_seed(capacity)
    ids = torch.randint(0, 3, (tokens, 2), generator=g, dtype=torch.int32)
    w = torch.randint(0, 5, (tokens, 2), generator=g).float() / 4
    w[::7, 0] = -w[::7, 0]  # negative weights and -0.0 too
    x = torch.randn(tokens, 8)
    dev = device_of(backend)
    out = run(backend, moe_kernels.permute, x.to(dev), ids.to(dev), 3, capacity=capacity,
              weights=w.to(dev), drop_policy="weight", align=4)
    row_map, offsets, kept = naive_permute(ids, 3, capacity, 4, "weight", w)
    assert torch.equal(out.row_map.cpu(), row_map)
    assert torch.equal(out.offsets.cpu(), offsets)
    assert out.num_rows.cpu().tolist() == [int(offsets[-1])]
    assert int((row_map >= 0).sum()) == kept


def test_nan_weights_rank_last(backend):
    ids = torch.zeros(4, 1, dtype=torch.int32)
    w = torch.tensor([[float("nan")], [0.2], [-0.0], [0.0]])
    dev = device_of(backend)
    out = run(backend, moe_kernels.permute, torch.randn(4, 8, device=dev), ids.to(dev), 1,
              capacity=2, weights=w.to(dev), drop_policy="weight")
    assert out.row_map.cpu().flatten().tolist() == [-1, 0, 1, -1]  # -0 ties +0: lower token


# ----------------------------------------------------------------------------------------
# Gradients: the kernels' autograd Functions vs torch.autograd through the reference.

GRAD_CASES = [dict(T=37, H=24, E=8, k=2), dict(T=37, H=7, E=5, k=3, capacity=9, align=4),
              dict(T=50, H=16, E=12, k=4, capacity=10, drop_policy="weight",
                   expert_range=(3, 9))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GRAD_CASES, ids=case_id)
def test_gradients_match_reference_autograd(kernel_backend, case, dtype):
    shape, kw = split_case(dict(case, dtype=dtype))
    x, ids, w = make_inputs(shape["T"], shape["H"], shape["E"], shape["k"], dtype, seed=3)
    g = torch.Generator().manual_seed(7)
    dev = device_of(kernel_backend)

    def forward(backend_name, device):
        xs = x.clone().to(device).requires_grad_()  # fresh leaves for each backend
        ws = w.clone().to(device).requires_grad_()
        with moe_kernels.use_backend(backend_name):
            out = moe_kernels.permute(xs, ids.to(device), shape["E"], weights=ws, **kw)
            # An "expert" that depends on the rows and the permuted weights.
            y_perm = (out.x.float() * 1.5 + out.weights[:, None]).to(dtype)
            y = moe_kernels.unpermute(y_perm, out.row_map, ws)
        return xs, ws, y

    xs, ws, y = forward(kernel_backend, dev)
    xr, wr, yr = forward("reference", "cpu")
    assert xs is not xr and ws is not wr
    grad = torch.randn(yr.shape, generator=g).to(dtype)
    (y.float() * grad.to(dev).float()).sum().backward()
    (yr.float() * grad.float()).sum().backward()
    assert torch.equal(y.detach().cpu(), yr.detach())
    # grad x: in float32 the same sums in the same order -> exact. In bfloat16, PyTorch's
    # indexing backward accumulates a token's k rows in bfloat16 while the kernel sums in
    # float32 and rounds once: up to k - 1 extra bfloat16 roundings (2^-8 each) there.
    if dtype == torch.float32:
        assert torch.equal(xs.grad.cpu(), xr.grad)
    else:
        torch.testing.assert_close(xs.grad.cpu(), xr.grad, rtol=shape["k"] * 2.0 ** -8, atol=1e-6)
    # grad weights: dot products over H in float32, summed in a different order than
    # torch's reduction: a few float32 ulp of the dot's magnitude.
    torch.testing.assert_close(ws.grad.cpu(), wr.grad, rtol=1e-5, atol=1e-5 * shape["H"])


def test_unpermute_gradients_without_weights(kernel_backend):
    dev = device_of(kernel_backend)
    y_perm = torch.randn(10, 8, dtype=torch.float16)
    row_map = torch.tensor([[3, -1], [0, 9], [5, 4]])
    yk = y_perm.clone().to(dev).requires_grad_()
    yr = y_perm.clone().requires_grad_()
    run(kernel_backend, moe_kernels.unpermute, yk, row_map.to(dev)).float().sum().backward()
    reference.unpermute(yr, row_map).float().sum().backward()
    assert torch.equal(yk.grad.cpu(), yr.grad)
    assert yk.grad.cpu()[[1, 2, 6, 7, 8]].abs().sum() == 0  # rows no token reads


# ----------------------------------------------------------------------------------------
# Ids / rows out of range, and bad input.

def test_out_of_range_ids_are_dropped_by_the_kernel(kernel_backend):
    """GPU tensors are not checked on the host: the kernels drop bad ids, never index them.
    (The emulator runs under AddressSanitizer in CI.) The adapter is called directly: the
    public API would reject these CPU ids."""
    ids = torch.tensor([[0, 7], [-1, 2], [2, 1 << 30]], dtype=torch.int32)
    x = torch.randn(3, 8)
    dev = device_of(kernel_backend)
    out = native(kernel_backend).permute(x.to(dev), ids.to(dev), None, 4, -1, 1, False, 0, 4)
    assert out[1].cpu().tolist() == [[0, -1], [-1, 1], [2, -1]]
    assert out[2].cpu().tolist() == [0, 1, 1, 3, 3]
    ref = ref_permute(x, ids, 4)
    assert torch.equal(ref.row_map, out[1].cpu()) and torch.equal(ref.x[:3], out[0][:3].cpu())


def test_out_of_range_rows_are_skipped_by_the_kernel(kernel_backend):
    y_perm = torch.randn(4, 8)
    row_map = torch.tensor([[0, 4], [-5, 3]])
    dev = device_of(kernel_backend)
    y = native(kernel_backend).unpermute(y_perm.to(dev), row_map.to(dev), None)
    assert torch.equal(y.cpu(), torch.stack([y_perm[0], y_perm[3]]))


@pytest.mark.parametrize("factor,expected", [(1.0, 16), (1.25, 20), (1.1, 18), (0.0, 0), (2, 32)])
def test_capacity_from_factor(factor, expected):
    assert moe_kernels.capacity_from_factor(32, 2, 4, factor) == expected
    assert moe_kernels.capacity_from_factor(3, 1, 2, 1.0) == 2  # ceil


@pytest.mark.parametrize("args,error,match", [
    ((32, 2, 4, -0.5), ValueError, "factor: expected a finite number"),
    ((32, 2, 4, float("inf")), ValueError, "factor: expected a finite number"),
    ((32, 2, 4, "1.25"), TypeError, "factor: expected a number"),
    ((32, 2, 4, 10**400), ValueError, "factor: expected a finite number"),
    ((32, 2, 0, 1.0), ValueError, "num_experts: expected"),
    ((32, 0, 4, 1.0), ValueError, "k: expected"),
    ((-1, 2, 4, 1.0), ValueError, "num_tokens: expected"),
    ((32.0, 2, 4, 1.0), TypeError, "num_tokens: expected an int"),
])
def test_bad_capacity_factor_input(args, error, match):
    with pytest.raises(error, match=match):
        moe_kernels.capacity_from_factor(*args)


def good_args():
    return dict(x=torch.randn(4, 8), ids=torch.randint(0, 6, (4, 2), dtype=torch.int32),
                num_experts=6)


@pytest.mark.parametrize("change,error,match", [
    (dict(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "x: expected dtype"),
    (dict(x=torch.randn(32)), ValueError, "x: expected a 2-D tensor"),
    (dict(ids=torch.zeros(4, 2, dtype=torch.float32)), TypeError, "ids: expected dtype int32, int64"),
    (dict(ids=torch.zeros(4, 2, dtype=torch.int16)), TypeError, "ids: expected dtype int32, int64"),
    (dict(ids=torch.zeros(8, dtype=torch.int32)), ValueError, "ids: expected a 2-D tensor"),
    (dict(ids=torch.zeros(5, 2, dtype=torch.int32)), ValueError, "ids: expected 4 rows"),
    (dict(ids=torch.zeros(4, 0, dtype=torch.int32)), ValueError, "ids: expected at least one column"),
    (dict(ids=torch.full((4, 2), 6, dtype=torch.int32)), ValueError, r"ids: expected expert ids in \[0, 6\)"),
    (dict(ids=torch.full((4, 2), -1, dtype=torch.int32)), ValueError, "ids: expected expert ids"),
    (dict(num_experts=0), ValueError, "num_experts: expected 1 <= num_experts"),
    (dict(num_experts=4097), ValueError, "num_experts: expected"),
    (dict(num_experts=6.0), TypeError, "num_experts: expected an int"),
    (dict(capacity=-1), ValueError, "capacity: expected 0 <= capacity"),
    (dict(capacity=2.5), TypeError, "capacity: expected an int"),
    (dict(align=0), ValueError, "align: expected 1 <= align"),
    (dict(align=-8), ValueError, "align: expected"),
    (dict(drop_policy="random"), ValueError, "drop_policy: expected one of"),
    (dict(drop_policy="weight", capacity=2), ValueError, "weights: drop_policy='weight' needs"),
    (dict(weights=torch.rand(4, 3)), ValueError, r"weights: expected shape \(4, 2\)"),
    (dict(weights=torch.rand(4, 2, dtype=torch.float64)), TypeError, "weights: expected dtype float32"),
    (dict(expert_range=(3, 3)), ValueError, "expert_range: expected 0 <= start < end"),
    (dict(expert_range=(0, 7)), ValueError, "expert_range: expected"),
    (dict(expert_range=(-1, 2)), ValueError, "expert_range: expected"),
    (dict(expert_range=3), TypeError, "expert_range: expected a"),
])
def test_bad_permute_input(backend, change, error, match):
    args = dict(good_args(), **change)
    dev = device_of(backend)
    args = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    x, ids, E = args.pop("x"), args.pop("ids"), args.pop("num_experts")
    with pytest.raises(error, match=match):
        run(backend, moe_kernels.permute, x, ids, E, **args)


@pytest.mark.parametrize("args,error,match", [
    ((torch.randn(4, 8, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.long)), TypeError, "y_perm: expected dtype"),
    ((torch.randn(32), torch.zeros(2, 1, dtype=torch.long)), ValueError, "y_perm: expected a 2-D"),
    ((torch.randn(4, 8), torch.zeros(2, 1, dtype=torch.int16)), TypeError, "row_map: expected dtype int64, int32"),
    ((torch.randn(4, 8), torch.zeros(2, dtype=torch.long)), ValueError, "row_map: expected a 2-D"),
    ((torch.randn(4, 8), torch.full((2, 1), 4)), ValueError, r"row_map: expected values in \[-1, 4\)"),
    ((torch.randn(4, 8), torch.full((2, 1), -2)), ValueError, "row_map: expected values"),
    ((torch.randn(4, 8), torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 2)), ValueError, "weights: expected shape"),
    ((torch.randn(4, 8), torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 1).half()), TypeError, "weights: expected dtype"),
])
def test_bad_unpermute_input(backend, args, error, match):
    dev = device_of(backend)
    with pytest.raises(error, match=match):
        run(backend, moe_kernels.unpermute, *[a.to(dev) for a in args])


@pytest.mark.parametrize("call,match", [
    (lambda m: m.permute(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32), None, 4, -1, 0, False, 0, 4), "align"),
    (lambda m: m.permute(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32), None, 4, -2, 1, False, 0, 4), "capacity"),
    (lambda m: m.permute(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32), None, 4, 3, 1, True, 0, 4), "weights"),
    (lambda m: m.permute(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32), None, 4, -1, 1, False, 2, 5), "expert_range"),
    (lambda m: m.permute(torch.randn(4, 8), torch.zeros(3, 2, dtype=torch.int32), None, 4, -1, 1, False, 0, 4), "ids"),
    (lambda m: m.permute(torch.randn(4, 8).half(), torch.zeros(4, 2, dtype=torch.int32), torch.rand(4, 3), 4, -1, 1, False, 0, 4), "weights"),
    (lambda m: m.permute(torch.randn(4, 8), torch.zeros(4, 2, dtype=torch.int32), None, 0, -1, 1, False, 0, 4), "num_experts"),
    (lambda m: m.permute(torch.randn(4, 8, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.int32), None, 4, -1, 1, False, 0, 4), "x"),
    (lambda m: m.unpermute(torch.randn(4, 8), torch.zeros(2, 1, dtype=torch.int32), None), "row_map"),
    (lambda m: m.unpermute(torch.randn(4, 8), torch.zeros(2, 1, dtype=torch.long), torch.rand(2, 2)), "weights"),
    (lambda m: m.unpermute_backward(torch.randn(3, 8), torch.randn(4, 8), torch.zeros(2, 1, dtype=torch.long), None, True, False), "grad_y"),
    (lambda m: m.unpermute_backward(torch.randn(2, 8), torch.randn(4, 8), torch.zeros(2, 1, dtype=torch.long), None, False, True), "weights"),
])
def test_native_adapter_checks(call, match):
    """The C++ adapter validates on its own too: a direct call never crashes."""
    with pytest.raises((ValueError, TypeError), match=match):
        call(native("simt"))


def test_padding_rows_are_zero_over_dirty_memory(kernel_backend):
    """The kernels write the padding and the tail past offsets[E]: zero even when the
    allocator hands back a buffer full of NaN (freed just before, of the same size)."""
    x, ids, _ = make_inputs(20, 16, 6, 2, torch.float32, seed=5)
    dev = device_of(kernel_backend)
    for kw in (dict(align=8), dict(capacity=5, align=4), dict(capacity=5, align=4, expert_range=(2, 5)),
               dict(align=8, expert_range=(0, 2))):
        rows = reference.permute_num_rows_bound(20, 2, 6, kw.get("capacity"), kw["align"])
        dirty = torch.full((rows, 16), float("nan"), device=dev)
        del dirty
        out = run(kernel_backend, moe_kernels.permute, x.to(dev), ids.to(dev), 6, **kw)
        assert torch.equal(out.x.cpu(), ref_permute(x, ids, 6, **kw).x)


def _available_memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.skipif(_available_memory_bytes() < (12 << 30),
                    reason="needs ~4.3 GB of address space plus headroom")
def test_row_offsets_past_2_to_the_31_elements(kernel_backend):
    """Row r of a [M, H] tensor starts at element r*H >= 2^31: 64-bit addressing. Only the
    touched rows are committed (torch.empty), so this costs a few MB of real memory."""
    H = 1 << 17
    rows = (1 << 14) + 2
    dev = device_of(kernel_backend)
    y_perm = torch.empty(rows, H, dtype=torch.float16, device=dev)
    y_perm[rows - 1] = 1.5
    y_perm[3] = 0.25
    row_map = torch.tensor([[rows - 1, 3]], device=dev)  # (rows-1)*H > 2^31
    assert (rows - 1) * H > 1 << 31
    w = torch.tensor([[2.0, 4.0]], device=dev)
    y = run(kernel_backend, moe_kernels.unpermute, y_perm, row_map, w)
    assert torch.all(y.cpu() == 4.0)


# ----------------------------------------------------------------------------------------
# permute_plan: the index stage alone.

def naive_gather(row_map, num_out_rows):
    """Independent oracle of gather: the token of each row, -1 where none."""
    gather = [-1] * num_out_rows
    for t, rows in enumerate(row_map.tolist()):
        for r in rows:
            if r >= 0:
                gather[r] = t
    return torch.tensor(gather, dtype=torch.long)


def static_rows(T, k, E, capacity=None, align=1):
    """M, written out independently of the library."""
    if capacity is None:
        return T * k + E * (align - 1)
    return E * ((capacity + align - 1) // align * align)


PLAN_CASES = (
    [dict(T=t, E=8, k=2) for t in (0, 1, 257)] +
    [dict(T=0, E=8, k=2, capacity=3, drop_policy="weight", align=4),
     dict(T=0, E=8, k=2, capacity=3), dict(T=0, E=5, k=3, align=8)] +
    [dict(T=512, E=8, k=2, capacity=100), dict(T=513, E=8, k=2, capacity=100)] +  # 1 and 2 tiles
    [dict(T=257, E=e, k=2) for e in (1, 60, 384)] + [dict(T=300, E=60, k=8)] +
    [dict(T=257, E=8, k=2, align=a) for a in (8, 128)] +
    [dict(T=257, E=8, k=2, capacity=c) for c in (0, 20, 70)] +
    [dict(T=257, E=8, k=2, capacity=c, drop_policy="weight") for c in (0, 20)] +
    [dict(T=257, E=8, k=2, capacity=45, align=8, drop_policy="weight"),
     dict(T=257, E=8, k=2, expert_range=(2, 5)),
     dict(T=300, E=60, k=8, expert_range=(0, 7), align=8),
     dict(T=300, E=60, k=8, expert_range=(30, 60), capacity=10, drop_policy="weight"),
     dict(T=1500, E=8, k=2, capacity=200, drop_policy="weight", align=4),
     dict(T=2200, E=2, k=1, capacity=700, drop_policy="weight"),  # > 1024 per expert
     dict(T=1100, E=384, k=8, capacity=30, drop_policy="position", align=8, expert_range=(100, 300)),
     dict(T=600, E=4096, k=8), dict(T=600, E=4096, k=8, capacity=1, align=2),  # many experts, 5 tiles
     dict(T=520, E=512, k=10, capacity=7, expert_range=(0, 500))] +
    # 33 tiles x 300 experts: the offsets work on slices of 32 tiles (the last one partial)
    [dict(T=4200, E=300, k=8), dict(T=4200, E=300, k=8, capacity=100, align=4, expert_range=(10, 290))]
)


def plan_case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("case", PLAN_CASES, ids=plan_case_id)
def test_permute_plan_matches_reference_and_naive_loop(backend, case):
    kw = dict(case)
    T, E, k = kw.pop("T"), kw.pop("E"), kw.pop("k")
    _, ids, w = make_inputs(T, 1, E, k, torch.float32, seed=T + E, distinct=False)
    dev = device_of(backend)
    plan = run(backend, moe_kernels.permute_plan, ids.to(dev), E, weights=w.to(dev), **kw)
    assert isinstance(plan, moe_kernels.PermutePlan)
    ref = reference.permute_plan(ids, E, weights=w, **kw)
    M = static_rows(T, k, E, kw.get("capacity"), kw.get("align", 1))
    for name, want in zip(("row_map", "offsets", "gather", "weights", "num_rows"), ref):
        got = getattr(plan, name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.device == ids.to(dev).device, name
        assert torch.equal(got.cpu(), want), name
    assert plan.gather.shape == (M,)
    if T * k <= 3000:  # the naive loop is slow
        row_map, offsets, _ = naive_permute(ids, E, weights=w, **kw)
        assert torch.equal(plan.row_map.cpu(), row_map)
        assert torch.equal(plan.offsets.cpu(), offsets)
        assert torch.equal(plan.gather.cpu(), naive_gather(row_map, M))
        expected_w = torch.zeros(M)
        for t, j in (row_map >= 0).nonzero().tolist():
            expected_w[row_map[t, j]] = w[t, j]
        assert torch.equal(plan.weights.cpu(), expected_w)
        assert plan.num_rows.cpu().tolist() == [int(offsets[-1])]


# The multi-tile select (T * k > 1024, drop by weight) works on groups of up to 32
# consecutive local experts (fewer when experts average many assignments): many experts
# with a few assignments each (4096 and 512 experts, as the presets), a last group past the
# last expert, groups whose list is longer than the 4096 entries staged in shared memory
# (each expert staged on its own), an expert longer than that (worked on in global
# memory), local ranges and maps,
# capacity 0 and a capacity above every count, more tiles than the select kernel has warps.
# Weights on a grid of 1/8 tie often, some negative, -0.0 and NaN among them.
SELECT_CASES = [
    dict(T=600, E=4096, k=8, capacity=1),
    dict(T=600, E=4096, k=8, capacity=2, expert_range=(1000, 3100), align=4),
    dict(T=520, E=512, k=10, capacity=7),
    dict(T=3000, E=3, k=2, capacity=1500),  # one group of 6000 entries
    dict(T=3000, E=40, k=2, capacity=90, skew=True),  # the first group: 5000+ entries
    dict(T=5000, E=16, k=1, capacity=100, hot=True),  # expert 0: 4500+ entries
    dict(T=700, E=70, k=2, capacity=15, expert_range=(5, 69)),
    dict(T=700, E=70, k=2, capacity=15, expert_map=50),
    dict(T=700, E=70, k=2, capacity=0),
    dict(T=700, E=70, k=2, capacity=10000),
    dict(T=1100, E=64, k=8, capacity=100),  # 9 tiles: the select's warps take two tiles each
    dict(T=4200, E=300, k=8, capacity=100, expert_map=250),  # 33 tiles, in slices
]


@pytest.mark.parametrize("case", SELECT_CASES, ids=plan_case_id)
def test_multi_tile_select_matches_reference(backend, case):
    kw = dict(case, drop_policy="weight")
    T, E, k = kw.pop("T"), kw.pop("E"), kw.pop("k")
    g = torch.Generator().manual_seed(T + E)
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    if kw.pop("skew", False):
        ids[: T * 9 // 10] %= 4  # most assignments to 4 experts of the first group
    if kw.pop("hot", False):
        ids[: T * 9 // 10] = 0
    w = torch.randint(-2, 9, (T, k), generator=g).float() / 8
    w[::5, 0] = -0.0
    w[::11, -1] = float("nan")
    if "expert_map" in kw:
        kw["expert_range"] = random_expert_map(E, kw.pop("expert_map"), seed=T)
    dev = device_of(backend)
    plan = run(backend, moe_kernels.permute_plan, ids.to(dev), E, weights=w.to(dev), **kw)
    ref = reference.permute_plan(ids, E, weights=w, **kw)
    for name, want in zip(("row_map", "offsets", "gather", "weights", "num_rows"), ref):
        got = getattr(plan, name).cpu()
        if want.dtype == torch.float32:  # bit for bit: kept NaN weights too
            got, want = got.view(torch.int32), want.view(torch.int32)
        assert torch.equal(got, want), name
    if T * k <= 1500:  # the naive loop is slow
        row_map, _, _ = naive_permute(ids, E, weights=w, **kw)
        assert torch.equal(plan.row_map.cpu(), row_map)


# Memory traffic of the multi-tile drop-by-weight plan on the goal presets (DeepSeek-V3,
# Qwen3-Next, 4096 experts), from the emulator's counters: the count, offsets and select
# kernels and the place kernel's finish pass move at most 1.5x their minimum bytes (the
# select kernel wrote row_map in list order, one 32-byte sector per 8-byte entry: 2.0-2.4x).
@pytest.mark.parametrize("experts,k", [(256, 8), (512, 10), (4096, 8)])
def test_select_traffic(experts, k):
    needs_observer()
    tokens = 160  # T * k > 1024: the multi-tile path
    g = torch.Generator().manual_seed(experts)
    ids = torch.randn(tokens, experts, generator=g).topk(k, dim=1).indices
    w = torch.rand(tokens, k, generator=g)
    capacity = max(1, tokens * k // experts)
    with moe_kernels.use_backend("simt"), emulator.traffic() as rows:
        moe_kernels.permute_plan(ids, experts, capacity=capacity, drop_policy="weight", weights=w)
    assert [r["kernel"] for r in rows] == ["permute_count_kernel", "permute_offsets_kernel", "permute_place_kernel",
                                           "permute_select_kernel", "permute_place_kernel"]
    for r in rows[:2] + rows[3:]:
        assert r["amplification"] <= 1.5, (r["kernel"], r["amplification"])


def test_permute_plan_dropless_align_one_is_a_permutation(backend):
    _, ids, _ = make_inputs(100, 1, 16, 4, torch.float32, seed=1, distinct=False)
    dev = device_of(backend)
    plan = run(backend, moe_kernels.permute_plan, ids.to(dev), 16)
    assert plan.weights is None
    assert plan.gather.shape == (400,)  # M = T*k: nothing padded
    assert sorted(plan.row_map.flatten().tolist()) == list(range(400))
    assert torch.equal(plan.gather.cpu().sort().values, torch.arange(100).repeat_interleave(4))


@pytest.mark.parametrize("kw", [dict(align=8), dict(capacity=5, align=4, drop_policy="weight"),
                                dict(capacity=7, expert_range=(1, 4)), dict(capacity=0)])
def test_permute_is_the_plan_plus_a_row_copy(backend, kw):
    x, ids, w = make_inputs(40, 12, 6, 2, torch.bfloat16, seed=9, distinct=False)
    dev = device_of(backend)
    plan = run(backend, moe_kernels.permute_plan, ids.to(dev), 6, weights=w.to(dev), **kw)
    out = run(backend, moe_kernels.permute, x.to(dev), ids.to(dev), 6, weights=w.to(dev), **kw)
    gather = plan.gather.cpu()
    rows = torch.where(gather[:, None] >= 0, x[gather.clamp(min=0)], torch.zeros((), dtype=x.dtype))
    assert torch.equal(out.x.cpu(), rows)
    for name in ("row_map", "offsets", "weights", "num_rows"):
        assert torch.equal(getattr(out, name).cpu(), getattr(plan, name).cpu()), name


@pytest.mark.parametrize("kw", [dict(align=4), dict(capacity=3, drop_policy="weight"), dict(capacity=0)])
def test_permute_plan_weight_gradient(backend, kw):
    """Only the permuted weights carry gradient: d weights[t, j] = grad[row_map[t, j]]."""
    _, ids, w = make_inputs(30, 1, 5, 2, torch.float32, seed=4, distinct=False)
    dev = device_of(backend)
    ws = w.clone().to(dev).requires_grad_()
    plan = run(backend, moe_kernels.permute_plan, ids.to(dev), 5, weights=ws, **kw)
    for name in ("row_map", "offsets", "gather", "num_rows"):
        assert not getattr(plan, name).requires_grad, name
    g = torch.randn(plan.weights.shape, generator=torch.Generator().manual_seed(0))
    (plan.weights * g.to(dev)).sum().backward()
    row_map = plan.row_map.cpu()
    expected = torch.zeros(30, 2)
    for t, j in (row_map >= 0).nonzero().tolist():
        expected[t, j] = g[row_map[t, j]]
    assert torch.equal(ws.grad.cpu(), expected)


def test_permute_plan_compiles_fullgraph(kernel_backend):
    dev = device_of(kernel_backend)
    _, ids, w = make_inputs(20, 1, 8, 2, torch.float32, seed=2)

    def step(ids, w):
        plan = moe_kernels.permute_plan(ids, 8, capacity=4, align=2, drop_policy="weight", weights=w)
        return plan.row_map, plan.offsets, plan.gather, plan.weights * 2, plan.num_rows

    ws = w.clone().to(dev).requires_grad_()
    torch._dynamo.reset()
    with moe_kernels.use_backend(kernel_backend):
        eager = step(ids.to(dev), ws)
        traced = torch.compile(step, fullgraph=True, backend="aot_eager")(ids.to(dev), ws)
        for a, b in zip(eager, traced):
            assert torch.equal(a, b)
        grad_eager = torch.autograd.grad(eager[3].sum(), ws)[0]
        grad_traced = torch.autograd.grad(traced[3].sum(), ws)[0]
    assert torch.equal(grad_eager, grad_traced)


@pytest.mark.parametrize("args", [
    (torch.randint(0, 12, (6, 2), dtype=torch.int32), torch.rand(6, 2), 12, -1, 4, False, 0, 12),
    (torch.randint(0, 12, (6, 2), dtype=torch.int64), None, 12, 1, 1, False, 2, 10),
    (torch.randint(0, 12, (6, 2), dtype=torch.int32), torch.rand(6, 2), 12, 2, 2, True, 0, 12),
    (torch.zeros(0, 2, dtype=torch.int32), torch.rand(0, 2), 12, 2, 2, True, 0, 12),
], ids=["dropless", "int64-range", "weight", "empty"])
def test_permute_plan_opcheck(args):
    torch.library.opcheck(torch.ops.moe_kernels.permute_plan.default, ("simt",) + args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ----------------------------------------------------------------------------------------
# Inputs as users pass them.

def test_int64_and_non_contiguous_inputs(backend):
    """ids as torch.topk returns them (int64), views that are not contiguous: the same
    results as contiguous int32 inputs."""
    g = torch.Generator().manual_seed(11)
    scores = torch.rand(50, 16, generator=g)
    w64, ids64 = scores.topk(4, dim=1)
    assert ids64.dtype == torch.int64
    x_wide = torch.randn(50, 24, generator=g).to(torch.float16)
    x = x_wide[:, ::2]  # non-contiguous rows
    ids_nc = ids64.t().contiguous().t()  # int64, column-major
    w_nc = w64.t().contiguous().t()
    assert not x.is_contiguous() and not ids_nc.is_contiguous() and not w_nc.is_contiguous()
    dev = device_of(backend)
    kw = dict(capacity=14, align=4, drop_policy="weight")
    want = ref_permute(x.contiguous(), ids64.to(torch.int32), 16, weights=w64.contiguous(), **kw)
    out = run(backend, moe_kernels.permute, x.to(dev), ids_nc.to(dev), 16, weights=w_nc.to(dev), **kw)
    for got, expected in zip(out, want):
        assert torch.equal(got.cpu(), expected)
    plan = run(backend, moe_kernels.permute_plan, ids_nc.to(dev), 16, weights=w_nc.to(dev), **kw)
    assert torch.equal(plan.row_map.cpu(), want.row_map)
    # unpermute: a non-contiguous y_perm, int32 row_map, non-contiguous weights.
    y_wide = torch.randn(want.x.shape[0], 2 * 24, generator=g).to(torch.float16)
    y_perm = y_wide[:, ::4]
    expected = reference.unpermute(y_perm.contiguous(), want.row_map, w64.contiguous())
    got = run(backend, moe_kernels.unpermute, y_perm.to(dev), want.row_map.to(torch.int32).to(dev),
              w_nc.to(dev))
    assert torch.equal(got.cpu(), expected)


def test_int64_ids_beyond_int32_are_dropped_by_the_kernel(kernel_backend):
    """An int64 id is never truncated to an int32 one: 2^32 + 1 is out of range, not 1."""
    ids = torch.tensor([[1, (1 << 32) + 1], [-(1 << 40), 2], [3, 1]], dtype=torch.int64)
    dev = device_of(kernel_backend)
    row_map, offsets, gather, num_rows, _ = native(kernel_backend).permute_plan(
        ids.to(dev), None, 4, -1, 1, False, 0, 4)
    assert row_map.cpu().tolist() == [[0, -1], [-1, 2], [3, 1]]
    assert offsets.cpu().tolist() == [0, 0, 2, 3, 4]
    assert gather.cpu().tolist() == [0, 2, 1, 2, -1, -1]


# ----------------------------------------------------------------------------------------
# Edge cases: no tokens, no rows, non-finite weights, huge capacities.

def test_empty_batch_with_drop_by_weight(backend):
    dev = device_of(backend)
    x = torch.zeros(0, 8, device=dev)
    ids = torch.zeros(0, 2, dtype=torch.int32, device=dev)
    w = torch.zeros(0, 2, device=dev)
    out = run(backend, moe_kernels.permute, x, ids, 4, capacity=3, align=2, drop_policy="weight",
              weights=w)
    assert out.x.shape == (16, 8) and torch.all(out.x.cpu() == 0)
    assert out.row_map.shape == (0, 2)
    assert out.offsets.cpu().tolist() == [0, 4, 8, 12, 16]
    assert out.weights.shape == (16,) and torch.all(out.weights.cpu() == 0)
    plan = run(backend, moe_kernels.permute_plan, ids, 4, capacity=3, align=2, drop_policy="weight",
               weights=w)
    assert plan.gather.cpu().tolist() == [-1] * 16


@pytest.mark.parametrize("compiled", [False, True])
def test_capacity_zero_backward(backend, compiled):
    """capacity 0: no rows at all (M = 0); the backward gives zero gradients."""
    x, ids, w = make_inputs(6, 8, 4, 2, torch.float32)
    dev = device_of(backend)
    xs = x.to(dev).requires_grad_()
    ws = w.to(dev).requires_grad_()

    def step(xs, ws):
        out = moe_kernels.permute(xs, ids.to(dev), 4, capacity=0, weights=ws, drop_policy="weight")
        return out.x.sum() + out.weights.sum()

    torch._dynamo.reset()
    fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
    with moe_kernels.use_backend(backend):
        fn(xs, ws).backward()
    assert torch.equal(xs.grad.cpu(), torch.zeros(6, 8))
    assert torch.equal(ws.grad.cpu(), torch.zeros(6, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_weights,need", [  # the weight gradient needs weights
    (True, (True, True)), (True, (True, False)), (True, (False, True)), (True, (False, False)),
    (False, (True, False)), (False, (False, False))])
def test_unpermute_backward_opcheck(dtype, with_weights, need):
    row_map = torch.randperm(12)[:12].view(6, 2).long()
    weights = torch.rand(6, 2) if with_weights else None
    args = (torch.randn(6, 8).to(dtype), torch.randn(12, 8).to(dtype), row_map, weights) + need
    torch.library.opcheck(torch.ops.moe_kernels.unpermute_backward.default, ("simt",) + args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_unpermute_gradients_ignore_skipped_entries(backend):
    """A dropped slot (row_map -1) with a NaN weight, and a non-finite row 0 that no one
    reads: gradients stay finite and exact, as a naive loop computes them."""
    y_perm = torch.tensor([[float("inf"), float("nan")], [1.0, 2.0], [3.0, -1.0], [0.5, 0.25],
                           [2.0, 4.0]])
    row_map = torch.tensor([[1, -1], [-1, 2], [3, 4]])  # distinct rows, as permute makes them
    w = torch.tensor([[0.5, float("nan")], [float("inf"), 2.0], [1.0, 4.0]])
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    dev = device_of(backend)
    ys = y_perm.to(dev).requires_grad_()
    ws = w.to(dev).requires_grad_()
    y = run(backend, moe_kernels.unpermute, ys, row_map.to(dev), ws)
    (y * grad.to(dev)).sum().backward()
    expected_y = torch.zeros(5, 2)
    expected_w = torch.zeros(3, 2)
    for t in range(3):
        for j in range(2):
            r = int(row_map[t, j])
            if r >= 0:
                expected_y[r] += w[t, j] * grad[t]
                expected_w[t, j] = (grad[t] * y_perm[r]).sum()
    assert torch.equal(ys.grad.cpu(), expected_y)
    assert torch.equal(ws.grad.cpu(), expected_w)


@pytest.mark.parametrize("H", [64, 5])  # vector and scalar paths
def test_unpermute_weight_gradient_beyond_one_group_of_slots(kernel_backend, H):
    """The weight gradient's kernel reads a token's row once per group of 16 slots: k = 20
    takes two groups, with dropped slots (-1) in both. Integer-valued inputs make every dot
    product exact, so the result is compared exactly."""
    T, k, M = 6, 20, 130
    g = torch.Generator().manual_seed(11)
    y_perm = torch.randint(-4, 5, (M, H), generator=g).float()
    row_map = torch.randperm(T * k, generator=g).view(T, k)
    row_map[0, 3] = row_map[2, 17] = row_map[4, 0] = row_map[5, 19] = -1
    grad = torch.randint(-3, 4, (T, H), generator=g).float()
    w = torch.rand(T, k, generator=g)
    expected = torch.zeros(T, k)
    for t in range(T):
        for j in range(k):
            r = int(row_map[t, j])
            if r >= 0:
                expected[t, j] = (grad[t] * y_perm[r]).sum()
    dev = device_of(kernel_backend)
    _, got = native(kernel_backend).unpermute_backward(grad.to(dev), y_perm.to(dev), row_map.to(dev),
                                                       w.to(dev), False, True)
    assert torch.equal(got.cpu(), expected)


def test_unpermute_of_no_rows_is_differentiable(backend):
    dev = device_of(backend)
    ys = torch.zeros(0, 4, device=dev, requires_grad=True)
    ws = torch.rand(3, 2, device=dev, requires_grad=True)
    row_map = torch.full((3, 2), -1, device=dev)
    y = run(backend, moe_kernels.unpermute, ys, row_map, ws)
    assert y.shape == (3, 4) and torch.all(y.cpu() == 0)
    assert y.grad_fn is not None
    y.sum().backward()
    assert ys.grad.shape == (0, 4)
    assert torch.equal(ws.grad.cpu(), torch.zeros(3, 2))


@pytest.mark.parametrize("capacity", range(0, 9))
def test_weight_drop_ranks_nan_as_minus_inf(backend, capacity):
    """+inf first, NaN and -inf tie at the bottom (the lower (token, slot) wins the tie)."""
    nan, inf = float("nan"), float("inf")
    w = torch.tensor([[nan, -inf], [inf, 1.0], [-inf, nan], [0.5, -inf]])
    ids = torch.zeros(4, 2, dtype=torch.int32)
    dev = device_of(backend)
    plan = run(backend, moe_kernels.permute_plan, ids.to(dev), 1, capacity=capacity,
               weights=w.to(dev), drop_policy="weight")
    row_map, _, kept = naive_permute(ids, 1, capacity, 1, "weight", w)
    assert torch.equal(plan.row_map.cpu(), row_map)
    # Order by rank: inf (1,0), 1.0 (1,1), 0.5 (3,0), then NaN/-inf by (token, slot).
    by_rank = [(1, 0), (1, 1), (3, 0), (0, 0), (0, 1), (2, 0), (2, 1), (3, 1)]
    kept_set = {tuple(tj) for tj in (row_map >= 0).nonzero().tolist()}
    assert kept_set == set(by_rank[:capacity])


@pytest.mark.parametrize("kw,match", [
    (dict(capacity=(1 << 31) - 1), "capacity: the outputs would have"),
    (dict(capacity=(1 << 29) + 1, align=1 << 20), "capacity: the outputs would have"),
    (dict(align=1 << 20, num_experts=4096), "align: the outputs would have"),
    (dict(capacity=1 << 31), "capacity: expected"),
])
def test_outputs_beyond_2_to_the_31_rows_are_refused(backend, kw, match):
    kw = dict(kw)
    E = kw.pop("num_experts", 6)
    dev = device_of(backend)
    x, ids = torch.randn(4, 8, device=dev), torch.zeros(4, 2, dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match=match):
        run(backend, moe_kernels.permute, x, ids, E, **kw)
    with pytest.raises(ValueError, match=match):
        run(backend, moe_kernels.permute_plan, ids, E, **kw)


def test_outputs_beyond_2_to_the_31_rows_are_refused_by_the_adapter():
    m = native("simt")
    ids = torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="capacity: the outputs would have"):
        m.permute_plan(ids, None, 6, (1 << 31) - 1, 1, False, 0, 6)
    with pytest.raises(ValueError, match="align: the outputs would have"):
        m.permute(torch.randn(4, 8), ids, None, 4096, -1, 1 << 20, False, 0, 4096)


# ----------------------------------------------------------------------------------------
# Expert maps (vLLM's expert_map): global expert -> local index or -1.

def random_expert_map(E, L, seed):
    g = torch.Generator().manual_seed(seed)
    expert_map = torch.full((E,), -1, dtype=torch.int32)
    expert_map[torch.randperm(E, generator=g)[:L]] = torch.randperm(L, generator=g).to(torch.int32)
    return expert_map


@pytest.mark.parametrize("kw", [dict(), dict(align=8), dict(capacity=9), dict(capacity=4, align=4),
                                dict(capacity=7, drop_policy="weight", align=2)], ids=str)
def test_expert_map_matches_reference_and_naive_loop(backend, kw):
    x, ids, w = make_inputs(90, 8, 12, 3, torch.float32, seed=6, distinct=False)
    expert_map = random_expert_map(12, 5, seed=len(kw))
    dev = device_of(backend)
    plan = run(backend, moe_kernels.permute_plan, ids.to(dev), 12, weights=w.to(dev),
               expert_range=expert_map.to(dev), **kw)
    ref = reference.permute_plan(ids, 12, weights=w, expert_range=expert_map, **kw)
    for got, want in zip(plan, ref):
        assert torch.equal(got.cpu(), want)
    row_map, offsets, _ = naive_permute(ids, 12, weights=w, expert_range=expert_map, **kw)
    assert torch.equal(plan.row_map.cpu(), row_map)
    assert torch.equal(plan.offsets.cpu(), offsets)
    assert torch.all(plan.offsets.cpu()[5:] == plan.offsets.cpu()[5])  # past L: empty
    M = static_rows(90, 3, 12, kw.get("capacity"), kw.get("align", 1))
    assert torch.equal(plan.gather.cpu(), naive_gather(row_map, M))
    out = run(backend, moe_kernels.permute, x.to(dev), ids.to(dev), 12, weights=w.to(dev),
              expert_range=expert_map.to(torch.int64).to(dev), **kw)
    assert torch.equal(out.row_map.cpu(), row_map)
    assert torch.equal(out.x.cpu(), ref_permute(x, ids, 12, weights=w, expert_range=expert_map, **kw).x)


@pytest.mark.parametrize("kw", [dict(), dict(capacity=6, align=4)], ids=str)
def test_expert_range_is_the_map_special_case(backend, kw):
    """(start, end) lays out the rows as the map e - start does; its offsets keep the
    global positions (offsets[start:end + 1] are the map's offsets[:L + 1])."""
    _, ids, _ = make_inputs(60, 1, 10, 2, torch.float32, seed=8, distinct=False)
    start, end = 3, 7
    expert_map = torch.tensor([e - start if start <= e < end else -1 for e in range(10)])
    dev = device_of(backend)
    by_range = run(backend, moe_kernels.permute_plan, ids.to(dev), 10, expert_range=(start, end), **kw)
    by_map = run(backend, moe_kernels.permute_plan, ids.to(dev), 10, expert_range=expert_map.to(dev), **kw)
    assert torch.equal(by_range.row_map, by_map.row_map)
    assert torch.equal(by_range.gather, by_map.gather)
    assert torch.equal(by_range.offsets[start:end + 1], by_map.offsets[:end - start + 1])


@pytest.mark.parametrize("T", [40, 700])  # one tile, two tiles
def test_unchecked_expert_map_is_safe_in_the_kernel(kernel_backend, T):
    """A map that is not a permutation (as a GPU map may be: it is not read on the host):
    out-of-range entries count as -1, L = entries >= 0, local indices >= L are dropped,
    duplicates share a segment; the kernel agrees with the reference and never indexes out
    of bounds. The adapter is called directly (the public API checks CPU maps)."""
    expert_map = torch.tensor([4, -1, 0, 0, 9, -3], dtype=torch.int32)  # L = 3
    _, ids, w = make_inputs(T, 1, 6, 2, torch.float32, seed=3, distinct=False)
    dev = device_of(kernel_backend)
    for capacity, by_weight in ((-1, False), (5, False), (5, True)):
        got = native(kernel_backend).permute_plan(ids.to(dev), w.to(dev), 6, capacity, 2, by_weight, 0, 6,
                                                  expert_map.to(dev))
        want = reference.permute_plan(ids, 6, capacity=None if capacity < 0 else capacity, align=2,
                                      drop_policy="weight" if by_weight else "position", weights=w,
                                      expert_range=expert_map)
        for name, a, b in zip(("row_map", "offsets", "gather", "num_rows", "weights"), got,
                              (want[0], want[1], want[2], want[4], want[3])):
            assert torch.equal(a.cpu(), b), (capacity, name)


@pytest.mark.parametrize("expert_map,error,match", [
    (torch.tensor([0, 1, -1]), ValueError, "expert_range: expected an expert map of num_experts"),
    (torch.tensor([[0, 1, -1, -1]]), ValueError, "expert_range: expected a 1-D"),
    (torch.tensor([0.0, 1.0, -1.0, -1.0]), TypeError, "expert_range: expected dtype"),
    (torch.tensor([0, 0, -1, -1]), ValueError, "permutation of 0..L-1"),
    (torch.tensor([0, 2, -1, -1]), ValueError, "permutation of 0..L-1"),
    (torch.tensor([0, 1, -2, -1]), ValueError, "permutation of 0..L-1"),
])
def test_bad_expert_map(backend, expert_map, error, match):
    dev = device_of(backend)
    ids = torch.zeros(4, 2, dtype=torch.int32, device=dev)
    with pytest.raises(error, match=match):
        run(backend, moe_kernels.permute_plan, ids, 4, expert_range=expert_map.to(dev))
    with pytest.raises(error, match=match):
        run(backend, moe_kernels.permute, torch.randn(4, 8, device=dev), ids, 4,
            expert_range=expert_map.to(dev))
