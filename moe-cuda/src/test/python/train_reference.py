"""PyTorch peer of the end-to-end training benchmark (dev.moe4j.cuda.TrainBench), run on the same GPU in the same call.

The same model in PyTorch eager: GPT with learned positions, pre-LN blocks, causal attention through
F.scaled_dot_product_attention, GELU (tanh) MLPs with bias, LM head tied to the token embedding; on every other
block (1, 3, 5, ...) an MoE FFN instead: fp32 gate (no bias), softmax, top-1, the gate value times the chosen
expert's output, dropless experts with bias through torch._grouped_mm on tokens sorted by expert, DeepSpeed's
load-balancing loss l_aux = E * sum_e mean_s(gates[s,e]) * (count_e / S) added with coefficient 0.01.

Precision: bf16 autocast over fp32 parameters (the fp32 parameters are the master weights; AdamW state and
gradients fp32), the gate and the loss in fp32. MoE4J keeps bf16 weights beside fp32 masters; both compute in bf16.
Optimizer: torch.optim.AdamW(fused=True), betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices, gradient
clipping at 1.0, the same cosine schedule as TrainBench. Batches: fresh uniform random tokens every step.
Timing as TrainBench: 3 warm-up steps, then each step between two CUDA events, the median; each step ends with
the host read of its loss (as the MoE4J Trainer does). The dense bf16 GEMM rate is measured in the same run
(8192^3, random data, 2 warm-up calls, median of 10). Prints one JSON line with TrainBench's fields.

FLOPs per token = 6 * active parameters + 6 * layers * seq_len * hidden (causal attention); active parameters:
all but the position table, routed experts counted k of E.

Usage: python3 train_reference.py [preset] [micro_batch] [seq_len] [steps]   (defaults 350M+MoE-16 8 1024 10)
       python3 train_reference.py --cpu-check   (tiny shapes, fp32 on the CPU: the sorted-token MoE against a
                                                 per-token loop, and a few training steps; no GPU needed)
"""
import json
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from cuda_timing import median_ms

PRESETS = {
    # name: layers, hidden, heads, ffn, vocab, experts, k
    "350M+MoE-16": (24, 1024, 16, 4096, 50304, 16, 1),
    "tiny-moe": (4, 128, 4, 512, 256, 8, 1),
}
AUX_COEFF = 0.01


def causal_attention(q, k, v):
    """[B,H,T,D] -> [B,H,T,D]; SDPA where it exists (torch >= 2.0), else the explicit softmax (the CPU check)."""
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    t = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    att = att.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return att.softmax(-1) @ v


class Attention(nn.Module):
    def __init__(self, c, heads, out_std):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        nn.init.normal_(self.qkv.weight, std=0.02)
        nn.init.normal_(self.proj.weight, std=out_std)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):                                   # x [B,T,C]
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B,H,T,D]
        y = causal_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class Mlp(nn.Module):
    def __init__(self, c, f, out_std):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, f), nn.Linear(f, c)
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.normal_(self.fc2.weight, std=out_std)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh")), None


class MoE(nn.Module):
    """Top-k dropless MoE FFN: W1 [E,C,F], b1 [E,F], W2 [E,F,C], b2 [E,C]; fp32 gate Wg [E,C]."""

    def __init__(self, c, f, experts, k, out_std, grouped=True):
        super().__init__()
        self.e, self.k, self.grouped = experts, k, grouped
        self.wg = nn.Parameter(torch.randn(experts, c) * 0.02)
        self.w1 = nn.Parameter(torch.randn(experts, c, f) * 0.02)
        self.b1 = nn.Parameter(torch.zeros(experts, f))
        self.w2 = nn.Parameter(torch.randn(experts, f, c) * out_std)
        self.b2 = nn.Parameter(torch.zeros(experts, c))

    def gate(self, x):                                      # x [S,C] -> gates [S,E] fp32, top-k values/indices [S,k]
        with torch.autocast(device_type=x.device.type, enabled=False):
            gates = (x.float() @ self.wg.float().t()).softmax(-1)
        topv, topi = gates.topk(self.k, dim=-1)
        if self.k > 1:
            topv = topv / topv.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
        return gates, topv, topi

    def experts_grouped(self, xs, eid, offs):
        """xs [R,C] sorted by expert eid [R]; offs [E] int32 end offsets. One grouped GEMM per weight."""
        dt = torch.bfloat16
        # index_select, not b[eid]: the advanced-indexing backward (a sort-based index_put_ over 8192 rows into E
        # biases) took 6 ms a call on an H100, 150 ms of the 350M+MoE-16 step; index_select's is an index_add_
        h = torch._grouped_mm(xs.to(dt), self.w1.to(dt), offs=offs) + self.b1.to(dt).index_select(0, eid)
        h = F.gelu(h, approximate="tanh")
        return torch._grouped_mm(h, self.w2.to(dt), offs=offs) + self.b2.to(dt).index_select(0, eid)

    def experts_loop(self, xs, eid, counts):
        """The CPU check's fallback (no _grouped_mm before torch 2.8): one GEMM per expert (host-read counts)."""
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            h = F.gelu(xs[start:start + n] @ self.w1[e] + self.b1[e], approximate="tanh")
            out.append(h @ self.w2[e] + self.b2[e])
            start += n
        return torch.cat(out)

    def forward(self, x):                                   # x [B,T,C]
        shape = x.shape
        x = x.reshape(-1, shape[-1])                        # [S,C]
        s = x.shape[0]
        gates, topv, topi = self.gate(x)
        flat = topi.reshape(-1)                             # [S*k]
        order = torch.argsort(flat, stable=True)
        tok = order // self.k
        eid = flat[order]
        # counts without a host sync (bincount and one_hot read the maximum back to the host)
        counts = torch.zeros(self.e, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        xs = x[tok]                                         # [S*k,C] sorted by expert
        if self.grouped:
            ys = self.experts_grouped(xs, eid, torch.cumsum(counts, 0).to(torch.int32))
        else:
            ys = self.experts_loop(xs, eid, counts)
        w = topv.reshape(-1)[order].unsqueeze(1)
        out = torch.zeros(s, shape[-1], device=x.device, dtype=ys.dtype).index_add_(0, tok, (ys.float() * w).to(ys.dtype))
        first = torch.zeros(self.e, device=x.device).scatter_add_(0, topi[:, 0], torch.ones(s, device=x.device))
        l_aux = self.e * torch.sum(gates.mean(0) * first / s)
        return out.view(shape), l_aux


class Block(nn.Module):
    def __init__(self, c, heads, f, experts, k, out_std, grouped):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.attn = Attention(c, heads, out_std)
        self.ffn = MoE(c, f, experts, k, out_std, grouped) if experts > 0 else Mlp(c, f, out_std)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        y, aux = self.ffn(self.ln2(x))
        return x + y, aux


class Gpt(nn.Module):
    def __init__(self, layers, c, heads, f, vocab, experts, k, seq_len, grouped=True):
        super().__init__()
        out_std = 0.02 / math.sqrt(2 * layers)
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(seq_len, c)
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(c, heads, f, experts if i % 2 == 1 else 0, k, out_std, grouped) for i in range(layers))
        self.lnf = nn.LayerNorm(c)

    def forward(self, idx, targets):                        # idx, targets [B,T]
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        aux = torch.zeros((), device=idx.device)
        for blk in self.blocks:
            x, a = blk(x)
            if a is not None:
                aux = aux + AUX_COEFF * a
        logits = self.lnf(x) @ self.wte.weight.t()         # tied head [B,T,V]
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, aux


def param_counts(model, k):
    total = sum(p.numel() for p in model.parameters())
    active = 0
    for name, p in model.named_parameters():
        if name == "wpe.weight":
            continue
        moe = name.split(".")[-1] in ("w1", "b1", "w2", "b2")
        active += p.numel() // p.shape[0] * k if moe else p.numel()
    return total, active


def cosine_lr(step, max_lr=3e-4, min_lr=3e-5, warmup=2, total=1000):
    """TrainBench's schedule (dev.moe4j.core.optim.CosineSchedule)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model, fused):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.startswith(("wte", "wpe")))]
    kw = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    if fused:
        kw["fused"] = True
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], **kw)


def train_step(model, opt, step, batch, seq_len, vocab, dev, autocast):
    # fresh uniform random tokens; targets are the inputs shifted by one
    seq = torch.randint(0, vocab, (batch, seq_len + 1), device=dev)
    idx, tgt = seq[:, :-1], seq[:, 1:]
    for g in opt.param_groups:
        g["lr"] = cosine_lr(step)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=dev, dtype=torch.bfloat16, enabled=autocast):
        loss, aux = model(idx, tgt)
    (loss + aux).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()                                      # the step's host read, after the update is queued


def gemm_tflops(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    torch.cuda.synchronize()
    ms = median_ms(lambda: a @ b, 10)
    del a, b
    return 2 * n ** 3 / ms / 1e9


def bench(preset, batch, seq_len, steps, warmup=3):
    layers, c, heads, f, vocab, experts, k = PRESETS[preset]
    torch.manual_seed(0)
    rate = gemm_tflops()                                    # before the model takes the memory
    torch.cuda.empty_cache()
    model = Gpt(layers, c, heads, f, vocab, experts, k, seq_len).cuda()
    opt = make_optimizer(model, fused=True)
    total, active = param_counts(model, k)
    flops_per_token = 6.0 * active + 6.0 * layers * seq_len * c
    state = {"step": 0, "loss": float("nan")}

    def one():
        state["loss"] = train_step(model, opt, state["step"], batch, seq_len, vocab, "cuda", True)
        state["step"] += 1

    first = None
    for _ in range(warmup):
        one()
        first = state["loss"] if first is None else first
    torch.cuda.synchronize()
    ms = median_ms(one, steps)
    tps = batch * seq_len / (ms / 1e3)
    print(json.dumps({
        "impl": "torch-eager", "device": torch.cuda.get_device_name(), "torch": torch.__version__, "preset": preset,
        "dtype": "bf16 autocast, fp32 parameters", "micro_batch": batch, "seq_len": seq_len, "warmup_steps": warmup,
        "timed_steps": steps, "step_ms": round(ms, 3), "tokens_per_s": round(tps, 1), "params": total,
        "active_params": active, "flops_per_token": flops_per_token, "gemm_tflops": round(rate, 1),
        "mfu": round(flops_per_token * tps / (rate * 1e12), 4), "loss_first": round(first, 4),
        "loss_last": round(state["loss"], 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)}))


def cpu_check():
    """No GPU: the sorted-token MoE (experts looped) against a per-token reference, then a few fp32 steps."""
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, 1, 0.02, grouped=False)
    with torch.no_grad():
        for p in (moe.b1, moe.b2):
            p.normal_(0, 0.1)
    x = torch.randn(2, 5, 16)
    y, l_aux = moe(x)
    xs = x.reshape(-1, 16)
    gates = (xs @ moe.wg.t()).softmax(-1)
    ref = torch.stack([gates[s].max() * (F.gelu(xs[s] @ moe.w1[e] + moe.b1[e], approximate="tanh") @ moe.w2[e] + moe.b2[e])
                       for s, e in enumerate(gates.argmax(-1).tolist())])
    err = (y.reshape(-1, 16) - ref).abs().max().item()
    assert err < 1e-5, f"MoE output differs from the per-token reference by {err}"
    counts = torch.bincount(gates.argmax(-1), minlength=4).float()
    aux_ref = 4 * (gates.mean(0) * counts / 10).sum()
    assert abs(l_aux.item() - aux_ref.item()) < 1e-6, (l_aux.item(), aux_ref.item())
    layers, c, heads, f, vocab, experts, k = PRESETS["tiny-moe"]
    model = Gpt(layers, c, heads, f, vocab, experts, k, 32, grouped=False)
    opt = make_optimizer(model, fused=False)
    losses = [train_step(model, opt, s, 2, 32, vocab, "cpu", False) for s in range(3)]
    assert abs(losses[0] - math.log(vocab)) < 0.5 and all(math.isfinite(v) for v in losses), losses
    total, active = param_counts(model, k)
    print(json.dumps({"impl": "torch-eager", "check": "cpu", "torch": torch.__version__, "moe_max_err": err,
                      "losses": [round(v, 4) for v in losses], "params": total, "active_params": active}))


def main():
    if sys.argv[1:] == ["--cpu-check"]:
        cpu_check()
        return
    a = sys.argv[1:]
    if len(a) > 4 or (a and a[0] not in PRESETS):
        sys.exit(f"usage: train_reference.py [preset: one of {list(PRESETS)}] [micro_batch] [seq_len] [steps] | --cpu-check")
    bench(a[0] if a else "350M+MoE-16", int(a[1]) if len(a) > 1 else 8, int(a[2]) if len(a) > 2 else 1024,
          int(a[3]) if len(a) > 3 else 10)


if __name__ == "__main__":
    main()
