"""A quick end-to-end check: one model family's MoE layer on the best backend present,
against the PyTorch reference.

    python -m moe_kernels.demo [--preset NAME] [--tokens N] [--backend cuda|simt]
                               [--hidden H] [--intermediate I] [--experts E] [--dtype bfloat16|float16]

Builds ``MoE.from_preset(NAME)`` scaled down (``presets.scaled_config``; default
deepseek_v3), runs a forward and one backward (the gradients of x and of every parameter)
on the cuda backend when a GPU and the CUDA kernels are there, else on the simt backend
(the same kernels in the CPU emulator, on small shapes), then the same layer, input and
output gradient on the reference backend, and compares: the output within
``FORWARD_RTOL * max|y_ref|``, every gradient within ``BACKWARD_RTOL * max|grad_ref|``.
Prints what it ran, the errors against their tolerances and the times; exits 0 when all
match, 1 on a mismatch.
"""

import argparse
import sys
import time

import torch

from . import available_backends, use_backend
from .layer import MoE
from .presets import PRESETS, scaled_config

# The forward is deterministic and rounds as the reference does (bit-exact on the emulator);
# the backward's sums run in other orders (a few bf16 ulps of the largest gradient).
FORWARD_RTOL = 1e-2
BACKWARD_RTOL = 3e-2
# Default sizes per backend: the emulator runs small shapes in a fraction of a second.
SIZES = {"cuda": dict(hidden_size=1024, intermediate_size=512, max_experts=64),
         "simt": dict(hidden_size=64, intermediate_size=32, max_experts=16),
         "reference": dict(hidden_size=64, intermediate_size=32, max_experts=16)}


def best_backend():
    """cuda when a GPU and the CUDA kernels are present, else simt (the emulator), else the
    reference alone."""
    available = available_backends()
    if "cuda" in available and torch.cuda.is_available():
        return "cuda"
    return "simt" if "simt" in available else "reference"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m moe_kernels.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deepseek_v3", choices=sorted(PRESETS),
                        help="model family (moe_kernels.presets.PRESETS; default deepseek_v3)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens in the batch (default 16)")
    parser.add_argument("--backend", choices=("cuda", "simt"), default=None,
                        help="backend to check (default: cuda if present, else simt)")
    parser.add_argument("--hidden", type=int, default=None, help="hidden size H (default 1024 on cuda, 64 on simt)")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="expert width I (default 512 on cuda, 32 on simt)")
    parser.add_argument("--experts", type=int, default=None,
                        help="routed experts E (default the preset's, at most 64 on cuda, 16 on simt)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error("--tokens: expected a positive number")
    return args


def run(layer, backend, x, grad_y):
    """y and the gradients (x first, then the parameters) on `backend`; (y, grads, fwd s,
    fwd+bwd s)."""
    params = [p for p in layer.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with use_backend(backend):
        with torch.no_grad():  # a warm-up forward (kernel loading, caches), untimed
            layer(x)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            layer(x)
        sync()
        forward_s = time.perf_counter() - t0
        xg = x.detach().requires_grad_(True)
        t0 = time.perf_counter()
        y = layer(xg)
        grads = torch.autograd.grad(y, [xg] + params, grad_y)
        sync()
        both_s = time.perf_counter() - t0
    return y.detach(), grads, forward_s, both_s


def max_error(a, b):
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def main(argv=None):
    args = parse_args(argv)
    backend = args.backend or best_backend()
    if backend not in available_backends() or (backend == "cuda" and not torch.cuda.is_available()):
        print(f"demo: backend {backend!r} is not available here (available: {available_backends()})",
              file=sys.stderr)
        return 2
    sizes = SIZES[backend]
    base_experts = PRESETS[args.preset]["num_experts"]
    config = scaled_config(args.preset, hidden_size=args.hidden or sizes["hidden_size"],
                           intermediate_size=args.intermediate or sizes["intermediate_size"],
                           num_experts=args.experts or min(base_experts, sizes["max_experts"]))
    device = "cuda" if backend == "cuda" else "cpu"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    layer = MoE(**config, dtype=dtype, device=device).eval()
    build_s = time.perf_counter() - t0
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(args.tokens, config["hidden_size"], generator=g, device=device).to(dtype)
    grad_y = torch.randn(args.tokens, config["hidden_size"], generator=g, device=device).to(dtype)

    print(f"moe_kernels demo: preset {args.preset} ({layer.extra_repr()})")
    print(f"  backend {backend} on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else
             " (the CUDA kernels in the SIMT emulator)" if backend == "simt" else "") + f", dtype {args.dtype}")
    print(f"  x [{args.tokens}, {config['hidden_size']}], w13 {list(layer.w13.shape)}, w2 {list(layer.w2.shape)}"
          + (f", shared w13 {list(layer.shared_w13.shape)}" if layer.shared_w13 is not None else "")
          + f"; built in {build_s * 1e3:.0f} ms")
    if backend == "reference":
        print("  note: neither the CUDA kernels nor the emulator is built: the reference checks itself")

    y, grads, fwd_s, both_s = run(layer, backend, x, grad_y)
    y_ref, grads_ref, ref_fwd_s, ref_both_s = run(layer, "reference", x, grad_y)

    scale = y_ref.float().abs().max().item()
    fwd_err, fwd_tol = max_error(y, y_ref), FORWARD_RTOL * scale + 1e-6
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    worst = None  # (error / tolerance, name, error, tolerance)
    for name, a, b in zip(names, grads, grads_ref):
        err, tol = max_error(a, b), BACKWARD_RTOL * b.float().abs().max().item() + 1e-6
        if worst is None or err / tol > worst[0]:
            worst = (err / tol, name, err, tol)
    ok_fwd, ok_bwd = fwd_err <= fwd_tol, worst[0] <= 1.0
    print(f"  forward : max |y - y_ref| = {fwd_err:.3e}  (tolerance {fwd_tol:.3e} = {FORWARD_RTOL:g} x max|y_ref|)"
          f"  {'ok' if ok_fwd else 'MISMATCH'}")
    print(f"  backward: worst of {len(names)} gradients: d{worst[1]}, max error {worst[2]:.3e}  (tolerance "
          f"{worst[3]:.3e} = {BACKWARD_RTOL:g} x its max)  {'ok' if ok_bwd else 'MISMATCH'}")
    print(f"  time    : {backend} forward {fwd_s * 1e3:.1f} ms, forward+backward {both_s * 1e3:.1f} ms; "
          f"reference {ref_fwd_s * 1e3:.1f} ms, {ref_both_s * 1e3:.1f} ms (one call each, after a warm-up"
          + ("; the emulator is not a speed figure)" if backend == "simt" else ")"))
    ok = ok_fwd and ok_bwd
    print("PASS" if ok else "FAIL: the backend does not match the reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
