"""PyTorch side of `evax bench --train --precision bf16` on the CPU: the training step of
../shared/bench/torch_bench.py (its model builder, imported from there; AdamW on BCE, batch at
224) with the forward and the loss under CPU bf16 autocast, as PyTorch users train in bf16.

usage: EVAX_SHARED=../shared python torch_cpu_bf16_train.py MODEL BATCH ITERS
Prints the median seconds per step."""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.environ.get("EVAX_SHARED", "../shared"), "bench"))
from torch_bench import build  # noqa: E402


def main():
    name, b, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    m = build(name, 224).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(b, 3, 224, 224)
    y = (torch.rand(b, 14) > 0.7).float()
    ts = []
    for i in range(iters + 1):
        t = time.perf_counter()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.binary_cross_entropy_with_logits(m(x).float(), y)
        loss.backward()
        opt.step()
        if i:
            ts.append(time.perf_counter() - t)
    print(statistics.median(ts))


if __name__ == "__main__":
    main()
