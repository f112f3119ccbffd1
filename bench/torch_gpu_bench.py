"""PyTorch side of `evax bench --device cuda`: timm's Eva configured as EVA-X Ti/S/B (the same
configuration as ../shared/bench/torch_bench.py builds for the CPU), random weights, on one GPU, in
fp32 (TF32 off, PyTorch's default for matrix products) or under bf16 / f16 autocast.

usage: torch_gpu_bench.py infer MODEL BATCH SIZE ITERS [f32|bf16|f16]
       torch_gpu_bench.py train MODEL BATCH ITERS [f32|bf16|f16]
MODEL: ti | s | b. Prints the median seconds per iteration (the GPU synchronised after each); the
training step is one AdamW update on BCE with drop path 0.1, as `evax bench --train` times."""
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from timm.models.eva import Eva

CFG = {"ti": (192, 3, {}), "s": (384, 6, {}), "b": (768, 12, {"qkv_fused": False, "scale_mlp": True})}
DTYPES = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}


def build(name, size, drop_path=0.0):
    dim, heads, extra = CFG[name]
    return Eva(img_size=size, patch_size=16, embed_dim=dim, depth=12, num_heads=heads, mlp_ratio=4 * 2 / 3,
               swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(14, 14), num_classes=14,
               global_pool="avg", drop_path_rate=drop_path, **extra).cuda()


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    mode, name = sys.argv[1], sys.argv[2]
    if mode == "infer":
        b, size, iters = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        prec = sys.argv[6] if len(sys.argv) > 6 else "f32"
        m = build(name, size).eval()
        x = torch.randn(b, 3, size, size, device="cuda")

        def step():
            with torch.inference_mode(), torch.autocast("cuda", dtype=DTYPES[prec] or torch.float32,
                                                         enabled=DTYPES[prec] is not None):
                m(x)
    else:
        b, iters = int(sys.argv[3]), int(sys.argv[4])
        prec = sys.argv[5] if len(sys.argv) > 5 else "f32"
        m = build(name, 224, drop_path=0.1).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.05)
        scaler = torch.amp.GradScaler("cuda", enabled=prec == "f16")
        x = torch.randn(b, 3, 224, 224, device="cuda")
        y = (torch.rand(b, 14, device="cuda") > 0.7).float()

        def step():
            opt.zero_grad()
            with torch.autocast("cuda", dtype=DTYPES[prec] or torch.float32, enabled=DTYPES[prec] is not None):
                loss = F.binary_cross_entropy_with_logits(m(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    print(timed(step, iters))


if __name__ == "__main__":
    main()
