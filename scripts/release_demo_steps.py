#!/usr/bin/env python3
"""Times the release's training steps on the emoji demo setting, with its code unchanged.

Runs ../shared/tools/release/emoji_train.py (the release's model, losses and optimisers on
the emoji data) and wraps time.time so that every call the script itself makes is logged
with its line number. The script calls time.time() at the start of each step, after the
batch is built, and at the end of each epoch; a step's wall time is the next step's start
(or the epoch's end) minus its own start, loader included, as `gca-hng bench train` counts.
Prints the median of the last epoch's steps after the first WARMUP of them.

usage: release_demo_steps.py WARMUP emoji_train.py ARGS...
"""
import runpy
import statistics
import sys
import time

warmup, script = int(sys.argv[1]), sys.argv[2]
real = time.time
log = []


def wrapped():
    t = real()
    frame = sys._getframe(1)
    if frame.f_code.co_filename == script:
        log.append((frame.f_lineno, t))
    return t


time.time = wrapped
sys.argv = [script] + sys.argv[3:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    time.time = real

src = open(script).read().splitlines()


def kind(line):
    s = src[line - 1]
    if "t0 = time.time()" in s:
        return "step"
    if "sec = time.time() - t_ep" in s:
        return "epoch_end"
    if "t_ep = time.time()" in s:
        return "epoch_start"
    return "other"


epochs = []
for k, t in ((kind(line), t) for line, t in log):
    if k == "epoch_start":
        epochs.append([])
    elif k == "step" and epochs:
        if epochs[-1] and "end" not in epochs[-1][-1]:
            epochs[-1][-1]["end"] = t
        epochs[-1].append({"start": t})
    elif k == "epoch_end" and epochs and epochs[-1] and "end" not in epochs[-1][-1]:
        epochs[-1][-1]["end"] = t
if not epochs:
    sys.exit("no epoch was timed: did emoji_train.py change its time.time() calls?")
walls = [s["end"] - s["start"] for s in epochs[-1] if "end" in s][warmup:]
if not walls:
    sys.exit(f"the last epoch has no steps after the {warmup} warm-up steps")
print(
    f"release demo: median {statistics.median(walls):.3f} s per step over {len(walls)} steps "
    f"(min {min(walls):.3f}, max {max(walls):.3f})"
)
