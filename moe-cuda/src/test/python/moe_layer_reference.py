"""PyTorch peers of the MoE layer benchmark (dev.moe4j.cuda.MoeLayerBench), run on the same GPU in the same session.

Two implementations of the same layer (fp32 gate, top-k softmax gating, GELU expert FFN with W1 [E,M,F] and
W2 [E,F,M], bf16 parameters and activations, forward + backward):
  einsum   DeepSpeed style: capacity C = ceil(S/E * k * cf), one-hot dispatch/combine tensors [S,E,C] and
           einsum dispatch / bmm experts / einsum combine (deepspeed/moe/sharded_moe.py's data flow)
  grouped  sorted tokens: argsort by expert, gather, torch._grouped_mm over per-expert offsets, weighted
           scatter-add back (dropless)
It also measures the dense bf16 GEMM rate (8192^3, random data) and the device copy bandwidth, for the floor
max(expert GEMM FLOPs / GEMM rate, bytes / copy bandwidth) of GPU-HOST.md.

Usage: python3 moe_layer_reference.py [iterations] [config names...]
"""
import math
import sys

import torch
import torch.nn.functional as F

from cuda_timing import median_ms

CONFIGS = [
    ("350M+MoE-128", 8192, 1024, 4096, 128, 1),
    ("1.3B+MoE-128", 8192, 2048, 8192, 128, 1),
    ("1.3B+MoE-64-top2", 8192, 2048, 8192, 64, 2),
    ("mixtral-8e-top2", 8192, 4096, 14336, 8, 2),
    ("1.3B+MoE-128-EP8-share", 8192, 2048, 8192, 16, 1),
]
dev = "cuda"
bf = torch.bfloat16


def gating(x, wg, k):
    logits = x.float() @ wg.t()                      # [S,E] fp32 gate
    gates = logits.softmax(-1)
    topv, topi = gates.topk(k, dim=-1)               # [S,k]
    if k > 1:
        topv = topv / topv.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
    return gates, topv, topi


def einsum_layer(x, wg, w1, w2, k, cap):
    S, E = x.shape[0], w1.shape[0]
    gates, topv, topi = gating(x, wg, k)
    combine = torch.zeros(S, E, cap, device=dev, dtype=torch.float32)
    base = torch.zeros(E, device=dev, dtype=torch.long)
    for j in range(k):                               # choice j's slots after all slots of choices < j
        mask = F.one_hot(topi[:, j], E)              # [S,E]
        loc = torch.cumsum(mask, 0) - 1 + base       # slot per token
        base = base + mask.sum(0)
        keep = (loc < cap) & (mask > 0)
        slot = F.one_hot(loc.clamp(0, cap - 1), cap) * keep.unsqueeze(-1)  # [S,E,C]
        combine = combine + slot * topv[:, j].view(S, 1, 1)
    dispatch = (combine > 0).to(bf)
    xin = torch.einsum("sec,sm->ecm", dispatch, x)   # [E,C,M]
    h = F.gelu(torch.bmm(xin, w1), approximate="tanh")
    y = torch.bmm(h, w2)                             # [E,C,M]
    return torch.einsum("sec,ecm->sm", combine.to(bf), y)


def grouped_layer(x, wg, w1, w2, k):
    S, E = x.shape[0], w1.shape[0]
    gates, topv, topi = gating(x, wg, k)
    flat = topi.reshape(-1)                          # [S*k]
    order = torch.argsort(flat, stable=True)
    tok = order // k
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x.index_select(0, tok)                      # [S*k, M] sorted by expert (index_select: its backward is an index_add_)
    h = F.gelu(torch._grouped_mm(xs, w1, offs=offs), approximate="tanh")
    ys = torch._grouped_mm(h, w2, offs=offs)
    w = topv.reshape(-1)[order].to(bf).unsqueeze(1)
    out = torch.zeros_like(x)
    out.index_add_(0, tok, ys * w)
    return out


def main():
    iters = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    only = set(sys.argv[2:])
    torch.manual_seed(0)
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=bf)
    b = torch.randn(n, n, device=dev, dtype=bf)
    gemm_ms = median_ms(lambda: a @ b, 10, warmup=20)
    gemm_rate = 2 * n ** 3 / gemm_ms / 1e9           # TFLOP/s
    src = torch.empty(1 << 30, device=dev, dtype=torch.uint8)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), 10, warmup=20)
    copy_bw = 2 * (1 << 30) / copy_ms / 1e6          # GB/s, bytes read + written
    del a, b, src, dst
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}: dense bf16 GEMM {gemm_rate:.1f} TFLOP/s, copy {copy_bw:.0f} GB/s")
    for name, S, M, Fh, E, k in CONFIGS:
        if only and name not in only:
            continue
        x = torch.randn(S, M, device=dev, dtype=bf, requires_grad=True)
        wg = (torch.randn(E, M, device=dev) * 0.02).requires_grad_()
        w1 = (torch.randn(E, M, Fh, device=dev, dtype=bf) * 0.02).requires_grad_()
        w2 = (torch.randn(E, Fh, M, device=dev, dtype=bf) * 0.02).requires_grad_()
        dy = torch.randn(S, M, device=dev, dtype=bf)
        cap = math.ceil(S / E * k * 1.0)
        flops = 12.0 * S * k * M * Fh
        # bytes that must move: expert weights read forward and backward (2 x 2 matrices), bf16 grads written,
        # routed activations (x in, y out, forward and backward)
        wbytes = 2 * E * M * Fh * 2
        moved = 2 * wbytes + wbytes + 4 * S * k * M * 2
        floor = max(flops / gemm_rate / 1e9, moved / copy_bw / 1e6)
        res = {}
        for label, fn in (("einsum", lambda: einsum_layer(x, wg, w1, w2, k, cap)), ("grouped", lambda: grouped_layer(x, wg, w1, w2, k))):
            def step():
                for p in (x, wg, w1, w2):
                    p.grad = None
                fn().backward(dy)
            try:
                res[label] = median_ms(step, iters, warmup=200)  # as many as MoeLayerBench
            except Exception as e:  # noqa: BLE001 - report and go on
                res[label] = float("nan")
                print(f"{name} {label} failed: {e}")
            torch.cuda.empty_cache()
        print(f"{name:24s} S={S} M={M} F={Fh} E={E} k={k}: einsum {res['einsum']:.3f} ms, grouped_mm {res['grouped']:.3f} ms, "
              f"floor {floor:.3f} ms")
        del x, wg, w1, w2, dy
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
