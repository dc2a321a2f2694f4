#!/usr/bin/env python3
"""Reference for `gca-hng bench data`: the release's training transform (PIL decode,
RandomResizedCrop(224), RandomHorizontalFlip, ToTensor, Normalize) over the train split of a
`folder` tree, in one process, and batches of C x P images; prints images per second.

    /usr/bin/python3 scripts/bench-torchvision-data.py ROOT [--batches 10] [--threads 1]
    /usr/bin/python3 scripts/bench-torchvision-data.py ROOT --make-synthetic

`--make-synthetic` writes the benchmark's stand-in for CUB instead: 400 train JPEGs
(40 classes x 10, 500x375 or 375x500, quality 90, smooth colour fields plus noise, about
88 KB each) and 20 test JPEGs, seeded, under ROOT/{train,test}/class_NNN/.
"""
import argparse
import random
import time

import torch
import torchvision.datasets as datasets
import torchvision.transforms as T

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("--batches", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--batch-size", type=int, default=81)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--make-synthetic", action="store_true")
a = p.parse_args()
if a.make_synthetic:
    import os
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, ncls in [("train", 40), ("test", 2)]:
        for c in range(ncls):
            d = f"{a.root}/{split}/class_{c:03d}"
            os.makedirs(d, exist_ok=True)
            for i in range(10):
                w, h = (500, 375) if i % 3 else (375, 500)
                base = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
                im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
                noise = rng.normal(0, 12, (h, w, 3))
                arr = np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(f"{d}/{i}.jpg", quality=90)
    raise SystemExit(0)
torch.set_num_threads(a.threads)
tf = T.Compose([
    T.RandomResizedCrop(224, (0.08, 1)),
    T.RandomHorizontalFlip(),
    T.ToTensor(),
    T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])
ds = datasets.ImageFolder(a.root + "/train", transform=tf)
random.seed(0)
n = 0
for b in range(a.warmup + a.batches):
    if b == a.warmup:
        start = time.perf_counter()
    idx = [random.randrange(len(ds)) for _ in range(a.batch_size)]
    x = torch.stack([ds[i][0] for i in idx])
    if b >= a.warmup:
        n += x.shape[0]
dt = time.perf_counter() - start
print(f"torchvision {torch.__version__}/{T.__name__}: {n / dt:.1f} images/s ({n} images in {dt:.2f} s, 1 process)")
