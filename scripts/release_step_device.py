#!/usr/bin/env python3
"""Times one full GCA-HNG training step of the authors' release (no backbone: the embedding
head, graph, GNN twice, synthesis, all losses, three AdamW steps) on a chosen torch device,
the GPU counterpart of ../shared/tools/release/bench_step.py (whose loader it reuses, minus
its "cuda" -> "cpu" rewrite, so the release runs on the device it was written for).
usage: release_step_device.py TOOLS_DIR RELEASE_DIR DEVICE C P D LAYERS HEADS [REPEATS]
TOOLS_DIR holds make_fixtures.py; DEVICE is cuda or cpu. Prints the median seconds per step."""
import os, sys, time, statistics
tools, ref, device = sys.argv[1], sys.argv[2], sys.argv[3]
C, P, D, L, H = map(int, sys.argv[4:9])
reps = int(sys.argv[9]) if len(sys.argv) > 9 else 10
import numpy as np, torch
torch.manual_seed(0); np.random.seed(0)
# The shim's scatter buffers and the release's own tensors are made on the default device.
torch.set_default_device(device)
src = open(os.path.join(tools, "make_fixtures.py")).read()
head = src.split("# ---- config")[0]
rewrite = """src = src.replace('device="cuda"', 'device="cpu"').replace(".cuda()", ".cpu()").replace('device = "cuda"', 'device = "cpu"')"""
assert rewrite in head, "make_fixtures.py changed: its cuda->cpu rewrite is not where expected"
if device == "cuda":
    head = head.replace(rewrite, "pass")
import tempfile
sys.argv = [sys.argv[0], ref, tempfile.gettempdir(), "bench", "0", str(C), str(P), str(D), str(L), str(H), "100"]
g = {"__name__": "fixture_loader"}
exec(compile(head, "make_fixtures.py", "exec"), g)
models = g["models"]
class A(dict):
    __getattr__ = dict.__getitem__
cfg = A(MODEL=A(BACKBONE="Googlenet", ATT_HEAD=H, GNN_LAYER=L), TRAIN=A(NUM_SAMPLED_CLASSES=C, NUM_PER_CLASS=P),
        LOSS=A(DIV_WEIGHT=60.0, DOT_WEIGHT=20.0, BETA=20.0, ALPHA=5.0, SOFTMAX_FACTOR=20.0), SOLVER=A(GRAD_CLIP=True, GRAD_L2_CLIP=10.0))
m = models.GCA_HNG(cfg, embedding_size=D, n_class=100, beta=20.0, softmax_factor=20.0, pretrained=False,
                   num_per_class=P, gnn_layers=L, is_norm=False, is_pooling=False, bn_freeze=False).to(device)
m.train()
oc = torch.optim.AdamW(m.feature_extractor.parameters(), lr=1e-4, weight_decay=1e-4)
og = torch.optim.AdamW(m.gnn.parameters(), lr=1e-4, weight_decay=1e-4)
os_ = torch.optim.AdamW(m.softmax_classifier.parameters(), lr=1e-3)
y = torch.arange(C).repeat(P)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
times = []
for i in range(reps + 3):
    x = torch.randn(C * P, 3, 4, 4)
    sync(); t0 = time.perf_counter(); m(x, y, 2.5, 3.0, oc, os_, og); sync(); t1 = time.perf_counter()
    if i >= 3:
        times.append(t1 - t0)
name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
print(f"release step on {name} C={C} P={P} d={D} L={L} H={H} torch={torch.__version__}: "
      f"median {statistics.median(times):.4f} s (min {min(times):.4f}, max {max(times):.4f})")
