#!/usr/bin/env python3
"""PyTorch references for the MoE layer benchmark (forward + backward, bf16, one GPU, all experts local).

Run on the GPU host in the same call as MoE4J's own benchmark, so both are measured on the same GPU:

    python3 bench/moe_layer_reference.py --out $OUT/reference.jsonl

Two implementations of the same layer (fp32 gate, top-k with capacity, GeLU expert FFN fc2(gelu(fc1(x)))):
  einsum   DeepSpeed-style: dense one-hot dispatch/combine masks [S, E, C] and einsums, experts as one bmm
  grouped  tokens sorted by expert, torch._grouped_mm over variable-size expert segments (dropless)
and the two hardware ceilings of the floor: a dense bf16 GEMM (8192^3, random data) and a device copy.

Every figure is the median of timed repetitions after warm-up, timed with CUDA events.
One JSON object per line goes to --out and a table to stdout.
"""
import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F

CONFIGS = [
    # name, tokens S, hidden M, ffn F, experts E, k
    ("350M+MoE-128", 8192, 1024, 4096, 128, 1),
    ("1.3B+MoE-128", 8192, 2048, 8192, 128, 1),
    ("1.3B+MoE-64-top2", 8192, 2048, 8192, 64, 2),
    ("mixtral-8e-top2", 8192, 4096, 14336, 8, 2),
    ("1.3B+MoE-128 share at EP=8", 8192, 2048, 8192, 16, 1),
]


def time_ms(fn, warmup=5, reps=20):
    """Median milliseconds of fn() over reps runs after warmup runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gemm_rate_tflops(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=3, reps=10)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def copy_rate_gbs(nbytes=2 << 30):
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9  # bytes read + written


def floor_terms(S, M, Fh, E, k):
    """FLOPs and the fewest bytes the layer must move (forward + backward), bf16.

    FLOPs: the expert GEMMs, 2 per direction and 3 directions (forward, dX, dW): 12 * S*k * M * F.
    Bytes: expert weights read in forward and twice in backward (dX, and their layout for dW is the same
    read) counted as 2 reads + 1 gradient write of 2*E*M*F bf16 values; routed activations: x read, the
    permuted copy written and read, h [S*k, F] written and read in both directions, outputs written.
    """
    flops = 12.0 * S * k * M * Fh
    weights = 2 * E * M * Fh * 2            # bytes of W1 + W2
    weight_bytes = 2 * weights + weights     # read forward, read backward, write gradients
    act = 2 * (S * M + 2 * S * k * M + 2 * S * k * Fh + S * M)  # forward
    act_bytes = 2 * act                      # backward moves about as much again
    return flops, weight_bytes + act_bytes


class Experts(torch.nn.Module):
    def __init__(self, E, M, Fh):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(E, M, Fh, device="cuda", dtype=torch.bfloat16) * 0.02)
        self.w2 = torch.nn.Parameter(torch.randn(E, Fh, M, device="cuda", dtype=torch.bfloat16) * 0.02)


def topk_capacity(logits, k, capacity):
    """fp32 softmax gates; top-k experts; slot of each (token, choice) in its expert, first choices first."""
    gates = F.softmax(logits, dim=-1)
    topv, topi = torch.topk(gates, k, dim=-1)                    # [S, k]
    E = logits.shape[1]
    masks = [F.one_hot(topi[:, j], E) for j in range(k)]        # k x [S, E]
    locations, base = [], torch.zeros(E, device=logits.device, dtype=torch.long)
    for j in range(k):
        loc = torch.cumsum(masks[j], dim=0) - 1 + base            # position within the expert
        base = base + masks[j].sum(0)
        locations.append((loc * masks[j]).sum(-1))                # [S]
    keep = [(locations[j] < capacity) for j in range(k)]
    weights = torch.stack([topv[:, j] * keep[j] for j in range(k)], dim=-1)
    if k > 1:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    return topi, torch.stack(locations, -1), torch.stack(keep, -1), weights


def einsum_layer(x, wg, ex, k, capacity):
    S, M = x.shape
    E = wg.shape[1]
    logits = x.float() @ wg
    topi, loc, keep, w = topk_capacity(logits, k, capacity)
    # Dense [S, E, C] combine weights and dispatch mask: the cubic-size tensors DeepSpeed builds.
    combine = torch.zeros(S, E, capacity, device=x.device, dtype=torch.float32)
    for j in range(k):
        s = torch.nonzero(keep[:, j]).squeeze(-1)
        combine[s, topi[s, j], loc[s, j]] += w[s, j]
    dispatch = (combine > 0).to(x.dtype)
    xe = torch.einsum("sec,sm->ecm", dispatch, x)                # [E, C, M]
    h = F.gelu(torch.bmm(xe, ex.w1), approximate="tanh")
    ye = torch.bmm(h, ex.w2)                                     # [E, C, M]
    return torch.einsum("sec,ecm->sm", combine.to(x.dtype), ye)


def grouped_layer(x, wg, ex, k):
    S, M = x.shape
    E = wg.shape[1]
    logits = x.float() @ wg
    gates = F.softmax(logits, dim=-1)
    topv, topi = torch.topk(gates, k, dim=-1)
    if k > 1:
        topv = topv / topv.sum(-1, keepdim=True)
    flat = topi.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // k]                                           # [S*k, M] sorted by expert
    h = F.gelu(torch._grouped_mm(xs, ex.w1, offs=offs), approximate="tanh")
    ys = torch._grouped_mm(h, ex.w2, offs=offs)
    y = torch.zeros(S * k, M, device=x.device, dtype=x.dtype)
    y[order] = ys
    return (y.view(S, k, M) * topv.unsqueeze(-1).to(x.dtype)).sum(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="reference.jsonl")
    ap.add_argument("--configs", default="all", help="comma-separated config names, or all")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    gemm = gemm_rate_tflops()
    copy = copy_rate_gbs()
    rows = [{"kind": "ceilings", "gpu": dev, "gemm_tflops": gemm, "copy_gbs": copy}]
    print(f"{dev}: dense bf16 GEMM {gemm:.1f} TFLOP/s, copy {copy:.0f} GB/s")
    print(f"{'config':30s} {'einsum ms':>10s} {'grouped ms':>11s} {'floor ms':>9s}")
    wanted = None if args.configs == "all" else set(args.configs.split(","))
    for name, S, M, Fh, E, k in CONFIGS:
        if wanted and name not in wanted:
            continue
        x = torch.randn(S, M, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        wg = torch.nn.Parameter(torch.randn(M, E, device="cuda", dtype=torch.float32) * 0.02)
        ex = Experts(E, M, Fh)
        dy = torch.randn(S, M, device="cuda", dtype=torch.bfloat16)
        capacity = max(math.ceil(S / E * 1.0 * k), 4)

        def run(layer):
            def step():
                x.grad = None
                wg.grad = None
                ex.w1.grad = None
                ex.w2.grad = None
                layer().backward(dy)
            return step

        result = {"kind": "moe_layer", "config": name, "S": S, "M": M, "F": Fh, "E": E, "k": k, "gpu": dev}
        try:
            result["einsum_ms"] = time_ms(run(lambda: einsum_layer(x, wg, ex, k, capacity)))
        except torch.OutOfMemoryError:
            result["einsum_ms"] = None
        torch.cuda.empty_cache()
        result["grouped_ms"] = time_ms(run(lambda: grouped_layer(x, wg, ex, k)))
        flops, nbytes = floor_terms(S, M, Fh, E, k)
        result["floor_ms"] = max(flops / (gemm * 1e12), nbytes / (copy * 1e9)) * 1e3
        result["flops"] = flops
        result["bytes"] = nbytes
        rows.append(result)
        e = result["einsum_ms"]
        print(f"{name:30s} {e if e is None else round(e, 3)!s:>10s} {result['grouped_ms']:11.3f} {result['floor_ms']:9.3f}")
        del x, wg, ex, dy
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
