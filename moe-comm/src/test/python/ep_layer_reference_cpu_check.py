"""Checks ep_layer_reference.py's expert-parallel layer on CPU ranks, without a GPU: its check() (the EP layer
against the one-rank layer over all experts: output, input, expert and gate gradients, k = 1, 2, capacity and
dropless) on 2 processes over gloo, in fp32 (gloo may lack bf16), with torch._grouped_mm replaced by a per-expert
loop where the installed torch lacks it (e.g. Debian's python3-torch 1.13). Start one process per rank:

    for r in 0 1; do MASTER_ADDR=127.0.0.1 MASTER_PORT=29711 RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r \\
        python3 ep_layer_reference_cpu_check.py & done; wait

Each rank prints its largest relative error (fp32: ~1e-7) and exits non-zero above 1e-5.
"""
import importlib.util
import json
import os
import sys

import torch
import torch.distributed as dist

if not hasattr(torch, "_grouped_mm"):
    def _grouped_mm(a, b, offs):
        outs, start = [], 0
        for i, end in enumerate(offs.tolist()):
            outs.append(a[start:end] @ b[i])
            start = end
        return torch.cat(outs)

    torch._grouped_mm = _grouped_mm

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "ep_layer_reference.py")
spec = importlib.util.spec_from_file_location("ep_layer_reference", path)
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
ref.bf = torch.float32
dist.init_process_group("gloo")
P, rank = dist.get_world_size(), dist.get_rank()
err = ref.check(P, rank, "cpu")
print(json.dumps({"rank": rank, "ranks": P, "torch": torch.__version__, "max_rel_err": err}), flush=True)
dist.destroy_process_group()
sys.exit(0 if err < 1e-5 else 1)
