"""torch.distributed peer of dev.moe4j.comm.nccl.CommBench: all_to_all_single and all_reduce bus bandwidth.

    python3 -m torch.distributed.run --nproc_per_node=2 comm_bench_reference.py

Same sizes, dtype (bf16), warm-up (200 calls), repetitions (20, median) and bus-bandwidth formulas as CommBench, timed
with CUDA events; rank 0 prints one JSON line per size.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

# the shared timing helper: beside this script in a GPU bundle, else in moe-cuda's test scripts
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..", "moe-cuda", "src", "test", "python"))
from cuda_timing import median_ms  # noqa: E402


def main():
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    p, rank = dist.get_world_size(), dist.get_rank()
    size = 16 << 10
    while size <= (1 << 30):
        cols = 1024
        rows = max(p, size // (2 * cols) // p * p)
        send = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16).uniform_(-1, 1)
        recv = torch.empty_like(send)
        nbytes = rows * cols * 2
        a2a = median_ms(lambda: dist.all_to_all_single(recv, send), 20, warmup=200)
        ar = median_ms(lambda: dist.all_reduce(send), 20, warmup=200)
        if rank == 0:
            print(json.dumps({"impl": "torch.distributed", "ranks": p, "bytes": nbytes,
                              "all_to_all_ms": round(a2a, 4), "all_to_all_busbw": round(nbytes / (a2a * 1e-3) / 1e9 * (p - 1) / p, 2),
                              "all_reduce_ms": round(ar, 4), "all_reduce_busbw": round(nbytes / (ar * 1e-3) / 1e9 * 2 * (p - 1) / p, 2)}),
                  flush=True)
        size *= 4
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
