"""PyTorch peer of dev.moe4j.comm.ep.EpLayerBench: the expert-parallel MoE layer, forward + backward.

    python3 -m torch.distributed.run --nproc_per_node=2 ep_layer_reference.py [--iters N] [--node-size G (ignored)] [config names...]

Per GPU: S = 8192 tokens, El experts (16 for 350M+MoE-128 and 1.3B+MoE-128 with k = 1, 8 for 1.3B+MoE-64-top2
with k = 2), E = El * P experts in all. bf16 tokens and expert weights W1 [El,M,F], W2 [El,F,M] (GELU, tanh
approximation, no bias), fp32 gate Wg [E,M], plain top-k (no RTS, no noise), training. Two modes as in
EpLayerBench: capacity factor 1.0 (capacity C = ceil(S*k/E); choice j of every token ranks after all choices
< j, as DeepSpeed's gating does; choices past C are dropped and the kept gate weights renormalised for k > 1) and
dropless. The EP layer:
  gate -> kept choices sorted by global expert -> per-expert counts exchanged with all_to_all_single
  -> one host read of the splits -> variable-split all_to_all_single of the token rows
  -> regroup (source rank, local expert) to (local expert, source rank) -> torch._grouped_mm over the local
  experts -> inverse regroup -> all_to_all_single back -> weighted combine (index_add)
and its backward the same all-to-alls reversed (autograd). Capacity mode sends only the kept rows (the padding
of an [E, C, M] buffer is zeros), so both modes run the same code. The no-communication layer is the same layer
over the El local experts only (gate over El, P = 1): the figure EP=2 is compared against.

Timing as EpLayerBench (BenchTiming): 200 warm-up steps, then the median of 20, each between two CUDA events on the
current stream. Rank 0 prints one JSON line per config and mode, after a line from check(): the EP layer against
the one-rank layer over all experts at small shapes (ep_layer_reference_cpu_check.py runs that check on CPU ranks).
"""
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

# the shared timing helper: beside this script in a GPU bundle, else in moe-cuda's test scripts
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..", "moe-cuda", "src", "test", "python"))
from cuda_timing import median_ms  # noqa: E402

# name, S tokens per GPU, M, F, experts per GPU, k
CONFIGS = [
    ("350M+MoE-128", 8192, 1024, 4096, 16, 1),
    ("1.3B+MoE-128", 8192, 2048, 8192, 16, 1),
    ("1.3B+MoE-64-top2", 8192, 2048, 8192, 8, 2),
]
WARMUP = 200
bf = torch.bfloat16


class AllToAll(torch.autograd.Function):
    """Variable-split all_to_all_single of rows; its backward is the reverse all-to-all (DeepSpeed's _AllToAll)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits):
        ctx.splits = (out_splits, in_splits)
        out = x.new_empty(sum(out_splits), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
        return out

    @staticmethod
    def backward(ctx, dy):
        out_splits, in_splits = ctx.splits
        dx = dy.new_empty(sum(in_splits), dy.shape[1])
        dist.all_to_all_single(dx, dy.contiguous(), in_splits, out_splits)
        return dx, None, None


def gating(x, wg, k, cap):
    """fp32 gate over wg's E experts -> (token, weight) of every choice, kept ones first sorted by expert; kept
    choices per expert [E]. Dropped choices sort last, so that no host read is needed here."""
    S, E = x.shape[0], wg.shape[0]
    gates = (x.float() @ wg.t()).softmax(-1)             # [S,E] fp32
    topv, topi = gates.topk(k, dim=-1)                   # [S,k]
    flat = topi.reshape(-1)                              # [S*k], choice i = s*k + j
    if cap > 0:
        keep = torch.empty_like(topi, dtype=torch.bool)
        base = torch.zeros(E, device=x.device, dtype=torch.long)
        for j in range(k):                               # choice j after all choices < j (DeepSpeed's priority)
            mask = F.one_hot(topi[:, j], E)              # [S,E]
            loc = (torch.cumsum(mask, 0) - 1 + base).gather(1, topi[:, j:j + 1]).squeeze(1)
            base = base + mask.sum(0)
            keep[:, j] = loc < cap
        topv = topv * keep
        flat = torch.where(keep.reshape(-1), flat, E)    # dropped: a virtual expert E, sorted last
    if k > 1:
        topv = topv / topv.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E + 1)[:E]   # kept choices per expert
    return order // k, topv.reshape(-1)[order], counts


def moe_layer(x, wg, w1, w2, k, cap, P):
    """x [S,M] bf16 -> [S,M]; P == 1: no communication (wg covers the local experts only). One host read per
    layer: the splits (EP), or the number of kept choices (local layer, capacity mode)."""
    El = w1.shape[0]
    tok, w, counts = gating(x, wg, k, cap)
    if P == 1:
        kept = int(counts.sum()) if cap > 0 else tok.shape[0]
        tok, w = tok[:kept], w[:kept]
        xs = x.index_select(0, tok)                                    # [R,M] sorted by expert
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = F.gelu(torch._grouped_mm(xs, w1, offs=offs), approximate="tanh")
        ys = torch._grouped_mm(h, w2, offs=offs)
    else:
        # counts exchange: rcounts[p*El + j] = rows rank p sends to my local expert j
        rcounts = torch.empty_like(counts)
        dist.all_to_all_single(rcounts, counts)
        sc, rc = counts.view(P, El), rcounts.view(P, El)
        splits = torch.stack([sc.sum(1), rc.sum(1)]).tolist()   # the one host read of the layer
        send, recv = splits[0], splits[1]
        tok, w = tok[:sum(send)], w[:sum(send)]
        xs = x.index_select(0, tok)                                    # [R,M] sorted by global expert: one block per rank
        xr = AllToAll.apply(xs, recv, send)              # [Rq,M] ordered (source p, local expert j, row)
        Rq = sum(recv)
        # layout transform (p, j) -> (j, p): one segment per local expert for the grouped GEMM
        rowexp = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(P), rcounts, output_size=Rq)
        perm = torch.argsort(rowexp, stable=True)
        inv = torch.argsort(perm)
        offs = torch.cumsum(rc.sum(0), 0).to(torch.int32)
        xin = xr[perm]
        h = F.gelu(torch._grouped_mm(xin, w1, offs=offs), approximate="tanh")
        yl = torch._grouped_mm(h, w2, offs=offs)
        ys = AllToAll.apply(yl[inv], send, recv)         # back in xs's layout
    return torch.zeros_like(x).index_add(0, tok, ys * w.to(bf).unsqueeze(1))


def run(name, S, M, Fh, El, k, dropless, P, rank, reps):
    """Median ms of one forward + backward of the layer with El local experts of El * P (P = 1: local layer)."""
    E = El * P
    g = torch.Generator(device="cuda")
    g.manual_seed(1)                                     # same gate on every rank; experts are this rank's rows
    wg = (torch.randn(E, M, device="cuda", generator=g) * 0.02).requires_grad_()
    w1all = torch.randn(E, M, Fh, device="cuda", dtype=bf, generator=g) * 0.02
    w2all = torch.randn(E, Fh, M, device="cuda", dtype=bf, generator=g) * 0.02
    me = rank if P > 1 else 0
    w1 = w1all[me * El:(me + 1) * El].clone().requires_grad_()
    w2 = w2all[me * El:(me + 1) * El].clone().requires_grad_()
    del w1all, w2all
    g.manual_seed(100 + rank)                            # each rank its own tokens
    x = torch.randn(S, M, device="cuda", dtype=bf, generator=g).requires_grad_()
    dy = torch.randn(S, M, device="cuda", dtype=bf, generator=g) * 1e-3
    cap = 0 if dropless else math.ceil(S / E * k * 1.0)

    def step():
        for t in (x, wg, w1, w2):
            t.grad = None
        moe_layer(x, wg, w1, w2, k, cap, P).backward(dy)

    ms = median_ms(step, reps, warmup=WARMUP)
    del x, dy, wg, w1, w2
    torch.cuda.empty_cache()
    return ms


def check(P, rank, dev, S=96, M=32, Fh=64, El=2):
    """The EP layer against the one-rank layer over all E = El * P experts, run on every rank's tokens in turn:
    this rank's output and input gradient, its local experts' gradients (summed over all ranks' tokens) and the
    gate gradient (all-reduced), for k = 1, 2 in both modes. Returns the largest error relative to the largest
    reference entry (bf16 rounding: ~1e-2)."""
    worst = 0.0
    E = El * P
    for k in (1, 2):
        for dropless in (False, True):
            cap = 0 if dropless else math.ceil(S / E * k * 1.0)
            g = torch.Generator(device=dev)
            g.manual_seed(5)                             # the same weights and all ranks' data on every rank
            wg = torch.randn(E, M, device=dev, generator=g)
            w1 = (torch.randn(E, M, Fh, device=dev, generator=g) * 0.2).to(bf)
            w2 = (torch.randn(E, Fh, M, device=dev, generator=g) * 0.2).to(bf)
            xs = torch.randn(P, S, M, device=dev, generator=g).to(bf)
            dys = torch.randn(P, S, M, device=dev, generator=g).to(bf)
            lo, hi = rank * El, (rank + 1) * El
            # expert parallel: this rank's tokens, its experts
            x = xs[rank].clone().requires_grad_()
            wge, w1e, w2e = wg.clone().requires_grad_(), w1[lo:hi].clone().requires_grad_(), w2[lo:hi].clone().requires_grad_()
            out = moe_layer(x, wge, w1e, w2e, k, cap, P)
            out.backward(dys[rank])
            dwg = wge.grad.clone()
            dist.all_reduce(dwg)
            # reference: one layer with every expert, each rank's tokens in turn (gradients accumulate)
            wgr, w1r, w2r = wg.clone().requires_grad_(), w1.clone().requires_grad_(), w2.clone().requires_grad_()
            for r in range(P):
                xr = xs[r].clone().requires_grad_()
                o = moe_layer(xr, wgr, w1r, w2r, k, cap, 1)
                o.backward(dys[r])
                if r == rank:
                    ref_out, ref_dx = o.detach(), xr.grad
            for a, b in ((out.detach(), ref_out), (x.grad, ref_dx), (w1e.grad, w1r.grad[lo:hi]), (w2e.grad, w2r.grad[lo:hi]),
                         (dwg, wgr.grad)):
                a, b = a.float(), b.float()
                worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def main():
    reps, only, args = 20, set(), sys.argv[1:]
    i = 0
    while i < len(args):
        if args[i] == "--iters":
            reps = int(args[i + 1])
            i += 2
        elif args[i] == "--node-size":   # MoE4J's hierarchical option; torch.distributed has one flat all-to-all
            i += 2
        elif args[i] == "--overlap":     # MoE4J's self-first overlap; the PyTorch layer is timed as it is
            i += 1
        else:
            only.add(args[i])
            i += 1
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    P, rank = dist.get_world_size(), dist.get_rank()
    err = check(P, rank, "cuda")                          # the layer is right before it is timed
    if rank == 0:
        print(json.dumps({"impl": "torch", "check": "EP layer vs one-rank layer over all experts", "max_rel_err": round(err, 5),
                          "ok": err < 3e-2}), flush=True)
    for name, S, M, Fh, El, k in CONFIGS:
        if only and name not in only:
            continue
        for dropless in (False, True):
            mode = "dropless" if dropless else "capacity 1.0"
            try:
                ep = run(name, S, M, Fh, El, k, dropless, P, rank, reps)
                dist.barrier()
                loc = run(name, S, M, Fh, El, k, dropless, 1, rank, reps)
                dist.barrier()
            except Exception as e:  # noqa: BLE001 - report and go on
                print(json.dumps({"impl": "torch", "config": name, "mode": mode, "rank": rank, "error": str(e)}), flush=True)
                continue
            if rank == 0:
                print(json.dumps({"impl": "torch", "config": name, "mode": mode, "ranks": P, "tokens_per_gpu": S,
                                  "hidden": M, "ffn": Fh, "experts": El * P, "experts_per_gpu": El, "k": k,
                                  f"ep{P}_ms": round(ep, 3), "local_ms": round(loc, 3), "ratio": round(ep / loc, 3),
                                  "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
