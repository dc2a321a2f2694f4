#!/usr/bin/env python3
"""Reference for `gca-hng metrics`: times the release's own `evaluate_retrieval` (Recall@k,
MAP@R, R-Precision; scripts/eval_utils.py of PWenJay/GCA-HNG) on seeded random clustered
embeddings, and optionally runs `gca-hng metrics` on the very same .npy files, then compares
the values.

The release's code is loaded from a checkout given with --release-dir and runs UNCHANGED on
the CPU. Only two things are patched around it, never inside it:
  * `torch.Tensor.cuda` is made a no-op, so its `T.cuda()` keeps the labels on the CPU;
  * `torch_scatter` (imported at the top of the release's scripts/utils.py for its GNN
    softmax, which evaluation does not use) is replaced by a stub module when it is missing.

    /usr/bin/python3 scripts/bench-release-eval.py --release-dir /tmp/release \\
        --out-dir /tmp/metrics-bench [--only cub|sop] [--ours target/release/gca-hng]

Sets (seeded, labels shuffled): row = (class centre + noise) x a random scale in [0.5, 2],
centres and noise Gaussian, noise std 3.0 (cub) or 2.0 (sop) times the centres'.
  cub: 5,924 x 512, 100 classes (76 of 59, 24 of 60), neighbours 1,2,4,8
  sop: 60,502 x 512, 11,316 classes of 2-12 items each (mean 5.35, small ones most common),
       neighbours 1,10,100,1000

Each evaluation runs in its own child process; wall time and peak RSS come from os.wait4's
rusage of that child (the whole process: interpreter or binary start, loading the .npy files
and the evaluation). Use /usr/bin/python3 (Debian's python3-torch); the release's module also
needs numpy, scipy, scikit-learn and tqdm (python3-sklearn, python3-tqdm).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETS = {
    # items, classes, items per class, neighbours, noise std (the centres' std is 1)
    "cub": dict(n=5924, classes=100, min_per=59, max_per=60, ks=[1, 2, 4, 8], noise=3.0),
    "sop": dict(n=60502, classes=11316, min_per=2, max_per=12, ks=[1, 10, 100, 1000],
                noise=2.0),
}
DIM = 512


def class_sizes(rng, n, classes, lo, hi):
    """`classes` sizes in [lo, hi] summing to n: drawn with P(size) ~ q^(size - lo), q set so
    that the mean is n / classes (small classes are the most common, as in SOP), then single
    random classes moved up or down by one until the sum is n."""
    import numpy as np

    values = np.arange(lo, hi + 1)
    target = n / classes
    assert lo <= target <= hi, "impossible size rule"
    a, b = 1e-6, 1e6  # bisection on q: the mean grows with q
    for _ in range(200):
        q = (a * b) ** 0.5
        w = q ** (values - lo)
        a, b = (q, b) if (values * w).sum() / w.sum() < target else (a, q)
    sizes = rng.choice(values, size=classes, p=w / w.sum())
    while sizes.sum() != n:
        up = sizes.sum() < n
        sizes[rng.choice(np.flatnonzero(sizes < hi if up else sizes > lo))] += 1 if up else -1
    return sizes


def generate(name, out_dir, seed, noise):
    """Writes {name}_emb.npy (float32 [n, 512]) and {name}_labels.npy (int64 [n])."""
    import numpy as np

    spec = SETS[name]
    rng = np.random.default_rng(seed)
    sizes = class_sizes(rng, spec["n"], spec["classes"], spec["min_per"], spec["max_per"])
    labels = np.repeat(np.arange(spec["classes"], dtype=np.int64), sizes)
    labels = labels[rng.permutation(len(labels))]
    centres = rng.standard_normal((spec["classes"], DIM), dtype=np.float32)
    scale = rng.uniform(0.5, 2.0, size=(len(labels), 1)).astype(np.float32)  # norms vary
    x = (centres[labels] + noise * rng.standard_normal((len(labels), DIM), dtype=np.float32))
    x = (x * scale).astype(np.float32)
    os.makedirs(out_dir, exist_ok=True)
    emb, lab = paths(name, out_dir)
    np.save(emb, x)
    np.save(lab, labels)
    return emb, lab


def paths(name, out_dir):
    return (os.path.join(out_dir, f"{name}_emb.npy"), os.path.join(out_dir, f"{name}_labels.npy"))


def worker(release_dir, emb, lab, ks, out_json, threads):
    """Child process: runs the release's evaluate_retrieval on CPU and writes its results."""
    import types

    import numpy as np
    import torch

    torch.set_num_threads(threads)  # Debian's build otherwise starts with one OpenMP thread
    torch.Tensor.cuda = lambda self, *a, **k: self  # CPU run: `.cuda()` is a no-op
    try:
        import torch_scatter  # noqa: F401
    except ImportError:
        stub = types.ModuleType("torch_scatter")

        def missing(*a, **k):
            raise NotImplementedError("torch_scatter stub (not needed for evaluation)")

        stub.scatter_max = stub.scatter_add = missing
        sys.modules["torch_scatter"] = stub
    # Bind the package name `scripts` to the release's folder (this repository also has one).
    pkg = types.ModuleType("scripts")
    pkg.__path__ = [os.path.join(os.path.abspath(release_dir), "scripts")]
    sys.modules["scripts"] = pkg
    from scripts.eval_utils import evaluate_retrieval

    X = torch.from_numpy(np.load(emb))
    T = torch.from_numpy(np.load(lab))
    t0 = time.perf_counter()
    with torch.no_grad():
        recall, map_at_r, r_p = evaluate_retrieval(X, T, ks)
    secs = time.perf_counter() - t0
    res = {
        "recall": {str(k): 100.0 * r for k, r in zip(ks, recall)},
        "map_at_r": float(map_at_r),
        "r_precision": float(r_p),
        "evaluate_retrieval_s": secs,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(out_json, "w") as f:
        json.dump(res, f)


def timed(cmd, stdout=None):
    """Runs cmd; returns (exit code, wall s, peak RSS GB) of that child alone."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, ru.ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux


def repeat(times, cmd, out, what, stdout=False):
    """Runs cmd `times` times; returns the JSON it wrote (to `out`, or its stdout into `out`)
    with the median wall time, all wall times and the largest peak RSS added."""
    walls, rsss = [], []
    for _ in range(times):
        if stdout:
            with open(out, "w") as f:
                rc, wall, rss = timed(cmd, stdout=f)
        else:
            rc, wall, rss = timed(cmd)
        if rc != 0:
            sys.exit(f"{what}: {cmd[0]} failed with exit code {rc}")
        walls.append(wall)
        rsss.append(rss)
        print(f"{what}: {wall:.2f} s, peak RSS {rss:.2f} GB, load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
    with open(out) as f:
        res = json.load(f)
    res.update(process_s=statistics.median(walls), runs_s=walls, peak_rss_gb=max(rsss))
    return res


def main():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--release-dir", required=True,
                   help="checkout of PWenJay/GCA-HNG (the folder holding scripts/eval_utils.py)")
    p.add_argument("--out-dir", required=True, help="folder for the generated .npy files")
    p.add_argument("--only", choices=sorted(SETS), help="run one set only (default: both)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--noise", type=float,
                   help="noise std relative to the centres' (default: cub 3.0, sop 2.0)")
    p.add_argument("--regenerate", action="store_true",
                   help="rewrite the .npy files even if they exist")
    p.add_argument("--ours", help="path of the gca-hng binary: also run `metrics --no-nmi` "
                   "(and, for cub, with NMI) on the same files and compare")
    p.add_argument("--skip-release", action="store_true",
                   help="do not run the release's code (e.g. only generate, or only time ours)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads for the release's code (default: all cores)")
    p.add_argument("--repeat", type=int, default=1,
                   help="time each evaluation this many times; the median is reported")
    p.add_argument("--worker", nargs=4, metavar=("EMB", "LABELS", "KS", "OUT"),
                   help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        emb, lab, ks, out = a.worker
        worker(a.release_dir, emb, lab, [int(k) for k in ks.split(",")], out, a.threads)
        return

    if not os.path.isfile(os.path.join(a.release_dir, "scripts", "eval_utils.py")):
        p.error(f"{a.release_dir}/scripts/eval_utils.py not found")
    report = {}
    for name in [a.only] if a.only else list(SETS):
        spec = SETS[name]
        ks = ",".join(map(str, spec["ks"]))
        emb, lab = paths(name, a.out_dir)
        if a.regenerate or not (os.path.exists(emb) and os.path.exists(lab)):
            print(f"[{name}] generating {spec['n']} x {DIM} ...", flush=True)
            generate(name, a.out_dir, a.seed, spec["noise"] if a.noise is None else a.noise)
        entry = report[name] = {"size": f"{spec['n']} x {DIM}", "ks": spec["ks"]}

        if not a.skip_release:
            out = os.path.join(a.out_dir, f"{name}_release.json")
            print(f"[{name}] release evaluate_retrieval, neighbours {ks} ...", flush=True)
            cmd = [sys.executable, os.path.abspath(__file__), "--release-dir", a.release_dir,
                   "--out-dir", a.out_dir, "--threads", str(a.threads),
                   "--worker", emb, lab, ks, out]
            entry["release"] = repeat(a.repeat, cmd, out, f"[{name}] release")

        if a.ours:
            runs = [("ours_no_nmi", ["--no-nmi"])]
            if name == "cub":
                runs.append(("ours_nmi", ["--nmi-seed", "0"]))
            for key, extra in runs:
                cmd = [a.ours, "metrics", "--embeddings", emb, "--labels", lab, "--ks", ks] + extra
                print(f"[{name}] {' '.join(cmd)}", flush=True)
                out = os.path.join(a.out_dir, f"{name}_{key}.json")
                entry[key] = repeat(a.repeat, cmd, out, f"[{name}] ours ({key})", stdout=True)

        if "release" in entry and "ours_no_nmi" in entry:
            r, o = entry["release"], entry["ours_no_nmi"]
            diff = {f"R@{k}": o["recall"][str(k)] - r["recall"][str(k)] for k in spec["ks"]}
            # the same difference in queries (hits), free of the x100 rounding
            hits = lambda v: round(v * spec["n"] / 100)  # noqa: E731
            diff.update({f"R@{k} hits": hits(o["recall"][str(k)]) - hits(r["recall"][str(k)])
                         for k in spec["ks"]})
            diff["MAP@R"] = o["map_at_r"] - r["map_at_r"]
            diff["R-Precision"] = o["r_precision"] - r["r_precision"]
            entry["ours_minus_release"] = diff
            entry["speedup"] = r["process_s"] / o["process_s"]

    print(json.dumps(report, indent=2))
    with open(os.path.join(a.out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
