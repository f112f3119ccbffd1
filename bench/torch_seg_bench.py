"""PyTorch side of `evax bench --model seg-s --input-size 512`: the original's segmentation model
(REFERENCE.md 8) rebuilt from public parts, random weights, 2 threads. The backbone is timm's Eva
configured as EVA-X-S (as ../shared/bench/torch_bench.py does) at 512 with its last block's patch
tokens as a map; the ViTDet pyramid and mmsegmentation's UPerHead (256 channels, pool scales 1, 2, 3,
6, BN + ReLU, one output channel) are written out here, since mmsegmentation 0.x does not install
on current PyTorch. The shared torch_bench.py has no segmentation model.

usage: torch_seg_bench.py infer BATCH SIZE ITERS [cuda] [bf16] | train BATCH SIZE ITERS [cuda]
(bf16: inference under torch.autocast with bfloat16, as `evax bench --precision bf16`)
Prints the median seconds per iteration (a forward pass to logits at the input size, or one AdamW
step with drop path 0.15 and BCE on a random mask)."""
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.eva import Eva

torch.set_num_threads(2)


def conv_bn_relu(cin, cout, k):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class UperHead(nn.Module):
    def __init__(self, cin=384, ch=256, scales=(1, 2, 3, 6)):
        super().__init__()
        self.scales = scales
        self.psp = nn.ModuleList([conv_bn_relu(cin, ch, 1) for _ in scales])
        self.bottleneck = conv_bn_relu(cin + len(scales) * ch, ch, 3)
        self.lateral = nn.ModuleList([conv_bn_relu(cin, ch, 1) for _ in range(3)])
        self.fpn = nn.ModuleList([conv_bn_relu(ch, ch, 3) for _ in range(3)])
        self.fuse = conv_bn_relu(4 * ch, ch, 3)
        self.drop = nn.Dropout2d(0.1)
        self.cls = nn.Conv2d(ch, 1, 1)

    def forward(self, feats):
        top = feats[3]
        up = lambda x, like: F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)
        psp = [top] + [up(m(F.adaptive_avg_pool2d(top, s)), top) for s, m in zip(self.scales, self.psp)]
        lat = [m(f) for m, f in zip(self.lateral, feats[:3])] + [self.bottleneck(torch.cat(psp, 1))]
        for i in range(3, 0, -1):
            lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1])
        outs = [m(l) for m, l in zip(self.fpn, lat[:3])] + [lat[3]]
        outs = [outs[0]] + [up(o, outs[0]) for o in outs[1:]]
        return self.cls(self.drop(self.fuse(torch.cat(outs, 1))))


class Seg(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.backbone = Eva(img_size=size, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                            mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(14, 14),
                            num_classes=0, drop_path_rate=0.15)
        c = 384
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, 2), nn.BatchNorm2d(c), nn.GELU(),
                                  nn.ConvTranspose2d(c, c, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(c, c, 2, 2)
        self.head = UperHead(c)

    def forward(self, x):
        b, _, h, w = x.shape
        t = self.backbone.forward_features(x)[:, 1:]
        m = t.transpose(1, 2).reshape(b, 384, h // 16, w // 16)
        feats = [self.fpn1(m), self.fpn2(m), m, F.max_pool2d(m, 2)]
        return F.interpolate(self.head(feats), size=(h, w), mode="bilinear", align_corners=False)


def main():
    mode, b, size, iters = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rest = sys.argv[5:]
    dev = next((a for a in rest if a.startswith("cuda")), "cpu")
    bf16 = "bf16" in rest
    if dev != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    sync = torch.cuda.synchronize if dev != "cpu" else (lambda: None)
    m = Seg(size).to(dev)
    x = torch.randn(b, 3, size, size, device=dev)
    ts = []
    if mode == "infer":
        m.eval()
        dt = torch.bfloat16 if bf16 else torch.float32
        with torch.inference_mode(), torch.autocast(dev.split(":")[0], dtype=dt, enabled=bf16):
            m(x)
            sync()
            for _ in range(iters):
                t = time.perf_counter(); m(x); sync(); ts.append(time.perf_counter() - t)
    else:
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=6e-5, weight_decay=0.05)
        y = (torch.rand(b, 1, size, size, device=dev) > 0.5).float()
        for i in range(iters + 1):
            t = time.perf_counter()
            opt.zero_grad(); F.binary_cross_entropy_with_logits(m(x), y).backward(); opt.step()
            sync()
            if i: ts.append(time.perf_counter() - t)
    print(statistics.median(ts))


if __name__ == "__main__":
    main()
