"""permute / unpermute: kernels (simt, cuda) vs the PyTorch reference vs a naive loop."""

import math

import pytest
import torch

import moe_kernels
from moe_kernels import reference
from conftest import device_of, native, run

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# permute only moves bits: every output is compared exactly. unpermute sums in float32 in
# slot order with each product rounded on its own, exactly as the reference's separate
# mul and add do, so it is compared exactly too (the kernels use no fused multiply-add).


def ref_permute(*args, **kwargs):
    return moe_kernels.PermuteResult(*reference.permute(*args, **kwargs))


def naive_permute(ids, num_experts, capacity=None, align=1, drop_policy="position",
                  weights=None, expert_range=None):
    """Independent oracle: a loop over experts and assignments."""
    T, k = ids.shape
    start, end = expert_range or (0, num_experts)
    ids_list = ids.tolist()
    w_list = weights.tolist() if weights is not None else None
    row_map = [[-1] * k for _ in range(T)]
    offsets, row, kept_total = [0], 0, 0
    for e in range(num_experts):
        if not start <= e < end:
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
    base = torch.randn(9 * 64 + 1)
    x = base[1:].view(9, 64)  # rows start 4 bytes past a 16-byte boundary
    assert x.data_ptr() % 16 != 0
    ids = torch.randint(0, 4, (9, 2), dtype=torch.int32)
    out = run(kernel_backend, moe_kernels.permute, x.to(device_of(kernel_backend)),
              ids.to(device_of(kernel_backend)), 4)
    assert torch.equal(out.x.cpu(), reference.permute(x, ids, 4)[0])


@pytest.mark.parametrize("capacity", [1, 37, 150])
def test_weight_ties_keep_lower_token(backend, capacity):
    """Weights on a coarse grid tie often: the select must break ties by (token, slot)."""
    g = torch.Generator().manual_seed(capacity)
    ids = torch.randint(0, 3, (300, 2), generator=g, dtype=torch.int32)
    w = torch.randint(0, 5, (300, 2), generator=g).float() / 4
    w[::7, 0] = -w[::7, 0]  # negative weights and -0.0 too
    x = torch.randn(300, 8)
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
    (dict(x=torch.randn(8, 4).t()), ValueError, "x: expected a contiguous tensor"),
    (dict(ids=torch.zeros(4, 2, dtype=torch.int64)), TypeError, "ids: expected dtype int32"),
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
    ((torch.randn(4, 8), torch.zeros(2, 1, dtype=torch.int32)), TypeError, "row_map: expected dtype int64"),
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
