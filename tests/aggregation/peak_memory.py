"""Measure the peak RSS growth of aggregating lazily made updates, in a fresh process.

Run by test_memory.py as `python peak_memory.py UPDATES [--keep-all]`. It prints one
JSON object. `growth` is the peak anonymous resident memory (RssAnon, sampled every
millisecond on a thread) while aggregating, minus RssAnon just before, with the global
state already built. Anonymous memory leaves out the pages of mapped files such as
libtorch, which the kernel may drop and fault in again when the machine is busy.
`--keep-all` keeps every update alive, to show that the measurement records growth.
"""

from __future__ import annotations

import gc
import json
import sys
import threading

import torch

from fedserve.aggregation import aggregate
from fedserve.memory import use_fixed_mmap_threshold

# 24 layers of 1024 x 1024 float32 weights: about 100 MB of parameters.
LAYERS = 24
WIDTH = 1024


def make_state(value: float) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for layer in range(LAYERS):
        state[f"layers.{layer}.weight"] = torch.full((WIDTH, WIDTH), value)
        state[f"layers.{layer}.bias"] = torch.full((WIDTH,), value)
    state["norm.running_mean"] = torch.full((WIDTH,), value)
    state["norm.running_var"] = torch.full((WIDTH,), value)
    state["norm.num_batches_tracked"] = torch.tensor(int(value), dtype=torch.int64)
    return state


def anonymous_rss() -> int:
    """Return the process's resident anonymous memory in bytes, from /proc/self/status."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError("/proc/self/status has no RssAnon line")


def main() -> None:
    count = int(sys.argv[1])
    keep_all = "--keep-all" in sys.argv[2:]
    kept_updates: list[dict[str, torch.Tensor]] = []

    def lazy_updates():
        # Yield without binding a local name, because a local would keep the previous
        # update alive while the next one is made. A model-store loader must avoid that too.
        for index in range(1, count + 1):
            if keep_all:
                kept_updates.append(make_state(float(index)))
                yield kept_updates[-1], float(index)
            else:
                yield make_state(float(index)), float(index)

    # As in `fedserve serve` and `fedserve worker`: without it, glibc's heap keeps freed
    # update tensors resident and the growth depends on allocation history.
    use_fixed_mmap_threshold()

    # Warm up with a tiny model, so that first-call allocations are not counted.
    aggregate("FedAvg", {"w": torch.zeros(4)}, iter([({"w": torch.ones(4)}, 1.0)]))

    global_state = make_state(0.0)
    model_bytes = sum(t.numel() * t.element_size() for t in global_state.values())
    gc.collect()
    before = anonymous_rss()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, anonymous_rss())
            done.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = aggregate("FedAvg", global_state, lazy_updates())
    finally:
        done.set()
        sampler.join()
    peak = max(peak, anonymous_rss())
    print(
        json.dumps(
            {
                "model_bytes": model_bytes,
                "growth": peak - before,
                "weight_0": result["layers.0.weight"][0, 0].item(),
                "num_batches_tracked": result["norm.num_batches_tracked"].item(),
            }
        )
    )


if __name__ == "__main__":
    main()
