"""Per-kernel time of a profiled run, from Nsight Compute's CSV (`ncu --metrics gpu__time_duration.sum --csv
--print-units base`): for each kernel its time per step, calls per step and time per call, largest first.

Usage: python3 ncu_summary.py CSV STEPS [TOP]   (STEPS: the steps the profiled program ran, warm-up included)
Kernels with fewer calls than steps (initialisation, the GEMM tuner's trials) are listed apart and left out of the
per-step total. Standard library only.
"""
import collections
import csv
import sys


def summarise(path, steps, top=40):
    acc = collections.OrderedDict()
    header = None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if "Kernel Name" in row:
                header = row
                continue
            if header is None or len(row) != len(header):
                continue
            d = dict(zip(header, row))
            if d.get("Metric Name") != "gpu__time_duration.sum":
                continue
            a = acc.setdefault(d["Kernel Name"][:90], [0, 0.0])
            a[0] += 1
            a[1] += float(d["Metric Value"].replace(",", ""))   # ns
    per_step = [(n, c, t) for n, (c, t) in acc.items() if c >= steps]
    setup = [(n, c, t) for n, (c, t) in acc.items() if c < steps]
    total = sum(t for _, _, t in per_step) / steps
    lines = [f"per step: {total / 1e6:.3f} ms of kernels over {len(per_step)} kernels ({steps:g} steps profiled)"]
    for n, c, t in sorted(per_step, key=lambda x: -x[2])[:top]:
        lines.append(f"{t / steps / 1e6:9.3f} ms/step {c / steps:7.1f} calls/step {t / c / 1e3:10.1f} us/call  {n}")
    if setup:
        lines.append(f"not every step ({len(setup)} kernels, {sum(t for _, _, t in setup) / 1e6:.3f} ms in all): "
                     + ", ".join(n.split("(")[0][:40] for n, _, _ in sorted(setup, key=lambda x: -x[2])[:8]))
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(summarise(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 40))
