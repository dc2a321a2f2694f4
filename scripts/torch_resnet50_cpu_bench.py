"""Times torchvision's ResNet-50 forward+backward on the CPU (BatchNorm in training mode, the
classifier replaced by the identity as in gca-hng's backbone, backward from the sum of the
2048-wide features): the PyTorch side of `gca-hng bench backbone --arch resnet50`.
usage: torch_resnet50_cpu_bench.py [BATCH] [SIZE] [ITERS] [THREADS]"""
import statistics
import sys
import time

import torch
import torchvision

batch, size, iters, threads = (int(a) for a in (sys.argv[1:] + ["8", "224", "3", "2"][len(sys.argv) - 1:]))
torch.set_num_threads(threads)
torch.manual_seed(0)
model = torchvision.models.resnet50()
model.fc = torch.nn.Identity()
model.train()
times = []
for i in range(1 + iters):
    x = torch.randn(batch, 3, size, size)
    start = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    if i:
        times.append(time.perf_counter() - start)
print(f"torch resnet50 b{batch} {size}px fwd+bwd threads={torch.get_num_threads()} torch={torch.__version__}: "
      f"median {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f})")
