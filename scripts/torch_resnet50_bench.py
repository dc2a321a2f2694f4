"""Times torchvision's ResNet-50 forward+backward (batch 81, 224 px, BatchNorm in training mode)
on the GPU, in float32 with TF32 matrix units off and on, and under bf16 autocast. The reference figure that
BENCHMARKS.md compares gca-hng's backbones with."""
import statistics
import time

import torch
import torchvision


def bench(tf32: bool, iters: int = 20, warmup: int = 5, autocast=None) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    model = torchvision.models.resnet50().cuda().train()
    x = torch.randn(81, 3, 224, 224, device="cuda")
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if autocast is None:
            model(x).sum().backward()
        else:
            with torch.autocast("cuda", dtype=autocast):
                y = model(x)
            y.float().sum().backward()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
torch.backends.cudnn.benchmark = True
print(f"resnet50 b81 224px fwd+bwd fp32 (no tf32): median {bench(False):.4f} s")
print(f"resnet50 b81 224px fwd+bwd tf32: median {bench(True):.4f} s")
print(f"resnet50 b81 224px fwd+bwd autocast bf16: median {bench(True, autocast=torch.bfloat16):.4f} s")
