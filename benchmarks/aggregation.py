"""Measure aggregation: kernel time against memory bandwidth, and accuracy against float64.

`kernel` builds K updates of transformer-like models (12 blocks of 12 tensors plus a
BatchNorm, about 150 tensors) with about 10M and 100M float32 parameters. It times
`fedserve.aggregation.aggregate("FedAvg", ...)` next to a pass that only reads the K
inputs once (`tensor.sum()` on every tensor) and next to per-key Python loops over the
state dicts, the common way to write FedAvg. Two accumulations that were considered and
rejected (a float64 sum and a compensated Kahan sum, both in steps of 1M elements) are
timed too. Every figure is the best of `--repeats` runs.

`accuracy` sums lazily made 1M-element updates and prints the relative error
`||result - reference|| / ||reference||` against a float64 sum, for plain float32
accumulation (what fedserve does) and for Kahan summation.

    .venv/bin/python benchmarks/aggregation.py [kernel|accuracy|all] [--sizes 10M,100M]
        [--updates 10] [--repeats 3] [--threads N]

On a machine where other processes keep the cores busy, torch's parallel regions wait
for descheduled threads and every figure slows down many times. `--threads 1` gives
steadier figures there.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Callable, Iterator

import torch

from fedserve.aggregation import aggregate, weighted_average

BLOCKS = 12
STEP = 1 << 20

State = dict[str, torch.Tensor]


def make_state(width: int, generator: torch.Generator) -> State:
    """Return a transformer-like state dict with a BatchNorm stem, filled with noise."""
    shapes: dict[str, tuple[int, ...]] = {
        "stem.weight": (width, 16),
        "stem.bn.weight": (width,),
        "stem.bn.bias": (width,),
        "stem.bn.running_mean": (width,),
        "stem.bn.running_var": (width,),
    }
    for block in range(BLOCKS):
        prefix = f"blocks.{block}"
        shapes[f"{prefix}.attn.qkv.weight"] = (3 * width, width)
        shapes[f"{prefix}.attn.qkv.bias"] = (3 * width,)
        shapes[f"{prefix}.attn.out.weight"] = (width, width)
        shapes[f"{prefix}.attn.out.bias"] = (width,)
        shapes[f"{prefix}.norm1.weight"] = (width,)
        shapes[f"{prefix}.norm1.bias"] = (width,)
        shapes[f"{prefix}.mlp.fc1.weight"] = (4 * width, width)
        shapes[f"{prefix}.mlp.fc1.bias"] = (4 * width,)
        shapes[f"{prefix}.mlp.fc2.weight"] = (width, 4 * width)
        shapes[f"{prefix}.mlp.fc2.bias"] = (width,)
        shapes[f"{prefix}.norm2.weight"] = (width,)
        shapes[f"{prefix}.norm2.bias"] = (width,)

    state = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    state["stem.bn.num_batches_tracked"] = torch.randint(0, 1000, (), generator=generator)
    return state


def width_for(parameters: int) -> int:
    """Return the block width, a multiple of 8, that gives about `parameters` parameters."""
    return max(8, round(math.sqrt(parameters / (12 * BLOCKS)) / 8) * 8)


# Clock of best_times: time.perf_counter (wall) or time.process_time (user + sys CPU
# time of this process, which excludes time spent waiting for a busy core).
clock: Callable[[], float] = time.perf_counter


def best_times(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Return the best time of each function over `repeats` rounds, on `clock`.

    Each round runs every function once, in turn, so that a change in the load from
    other processes affects all of them alike.
    """
    best = dict.fromkeys(functions, math.inf)
    for _ in range(repeats):
        for name, function in functions.items():
            gc.collect()
            start = clock()
            result = function()
            best[name] = min(best[name], clock() - start)
            del result
    return best


# The baselines below are the common way to write FedAvg over state dicts.


def loop_with_temporaries(states: list[State], weights: list[float]) -> State:
    """Average key by key, adding a new `tensor * weight` product for every update."""
    total = sum(weights)
    average: State = {}
    for key, first in states[0].items():
        if not first.dtype.is_floating_point:
            average[key] = torch.stack([state[key] for state in states]).max(dim=0).values
            continue
        summed = first * weights[0]
        for state, weight in zip(states[1:], weights[1:], strict=True):
            summed += state[key] * weight
        average[key] = summed / total
    return average


def loop_with_stack(states: list[State], weights: list[float]) -> State:
    """Average key by key, stacking the K tensors of each key and reducing them."""
    total = sum(weights)
    weight_column = torch.tensor(weights)
    average: State = {}
    for key, first in states[0].items():
        stacked = torch.stack([state[key] for state in states])
        if not first.dtype.is_floating_point:
            average[key] = stacked.max(dim=0).values
            continue
        scale = weight_column.view(-1, *([1] * first.dim()))
        average[key] = (stacked * scale).sum(dim=0) / total
    return average


def loop_in_place(states: list[State], weights: list[float]) -> State:
    """Average key by key with in-place `add_(tensor, alpha=weight)`, with no temporaries."""
    total = sum(weights)
    average: State = {}
    for key, first in states[0].items():
        if not first.dtype.is_floating_point:
            average[key] = torch.stack([state[key] for state in states]).max(dim=0).values
            continue
        summed = torch.mul(first, weights[0])
        for state, weight in zip(states[1:], weights[1:], strict=True):
            summed.add_(state[key], alpha=weight)
        average[key] = summed.div_(total)
    return average


# Accumulations considered for fedserve and rejected. The accuracy part shows why.


def float64_in_steps(states: list[State], weights: list[float]) -> torch.Tensor:
    """Sum all float entries into one float64 vector, widening 1M elements at a time."""
    keys = [key for key, value in states[0].items() if value.dtype.is_floating_point]
    summed = torch.zeros(sum(states[0][key].numel() for key in keys), dtype=torch.float64)
    for state, weight in zip(states, weights, strict=True):
        offset = 0
        for key in keys:
            source = state[key].view(-1)
            for start in range(0, source.numel(), STEP):
                part = source[start : start + STEP]
                summed[offset + start : offset + start + part.numel()].add_(part, alpha=weight)
            offset += source.numel()
    return summed.div_(sum(weights)).float()


def kahan_in_steps(states: list[State], weights: list[float]) -> torch.Tensor:
    """Sum all float entries in float32 with Kahan compensation, 1M elements at a time."""
    keys = [key for key, value in states[0].items() if value.dtype.is_floating_point]
    numel = sum(states[0][key].numel() for key in keys)
    summed = torch.zeros(numel)
    compensation = torch.zeros(numel)
    for state, weight in zip(states, weights, strict=True):
        offset = 0
        for key in keys:
            source = state[key].view(-1)
            for start in range(0, source.numel(), STEP):
                stop = offset + start + min(STEP, source.numel() - start)
                kahan_step(
                    summed[offset + start : stop],
                    compensation[offset + start : stop],
                    source[start : start + STEP],
                    weight,
                )
            offset += source.numel()
    return summed.div_(sum(weights))


def kahan_step(
    summed: torch.Tensor, compensation: torch.Tensor, source: torch.Tensor, weight: float
) -> None:
    """Add `weight * source` to `summed`, carrying the rounding error in `compensation`."""
    corrected = torch.mul(source, weight).sub_(compensation)
    new_sum = summed + corrected
    compensation.copy_(new_sum).sub_(summed).sub_(corrected)
    summed.copy_(new_sum)


def read_pass(states: list[State]) -> float:
    """Read every input once: the memory-bandwidth bound for anything that reads them."""
    total = 0.0
    for state in states:
        for tensor in state.values():
            total += float(tensor.sum())
    return total


def max_relative_error(result: State, states: list[State], weights: list[float]) -> float:
    """Return the largest per-tensor ||result - reference|| / ||reference|| over the keys."""
    total = sum(weights)
    worst = 0.0
    for key, value in result.items():
        if not value.dtype.is_floating_point:
            continue
        reference = sum(state[key].double() * w for state, w in zip(states, weights, strict=True))
        reference = reference / total
        error = float((value.double() - reference).norm() / reference.norm())
        worst = max(worst, error)
    return worst


def run_kernel(sizes: list[int], updates: int, repeats: int) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, K = {updates}, "
        f"{'CPU' if clock is time.process_time else 'wall'} time"
    )
    print()
    print(
        "| parameters | tensors | read pass | fedserve | loop, temporaries | loop, stack | "
        "loop, in-place | float64 steps | Kahan steps |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for parameters in sizes:
        measure_size(parameters, updates, repeats)
        gc.collect()


def measure_size(parameters: int, updates: int, repeats: int) -> None:
    """Print one table row, and a summary comment, for models of about `parameters`."""
    generator = torch.Generator().manual_seed(parameters)
    width = width_for(parameters)
    global_state = make_state(width, generator)
    states = [make_state(width, generator) for _ in range(updates)]
    weights = [float(torch.randint(100, 10_000, (), generator=generator)) for _ in states]
    numel = sum(t.numel() for t in global_state.values() if t.dtype.is_floating_point)

    def run_fedserve() -> State:
        return aggregate("FedAvg", global_state, iter(list(zip(states, weights, strict=True))))

    times = best_times(
        {
            "read": lambda: read_pass(states),
            "fedserve": run_fedserve,
            "temporaries": lambda: loop_with_temporaries(states, weights),
            "stack": lambda: loop_with_stack(states, weights),
            "in place": lambda: loop_in_place(states, weights),
        },
        repeats,
    )
    # The rejected accumulations are slow, so they run once.
    slow = best_times(
        {
            "float64": lambda: float64_in_steps(states, weights),
            "kahan": lambda: kahan_in_steps(states, weights),
        },
        1,
    )
    error = max_relative_error(run_fedserve(), states, weights)
    read, ours, in_place = times["read"], times["fedserve"], times["in place"]

    def cell(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms ({seconds / read:.1f}x)"

    print(
        f"| {numel / 1e6:.1f}M | {len(global_state)} | {read * 1000:.0f} ms | {cell(ours)} | "
        f"{cell(times['temporaries'])} | {cell(times['stack'])} | {cell(in_place)} | "
        f"{cell(slow['float64'])} | {cell(slow['kahan'])} |"
    )
    common = min(times["temporaries"], times["stack"])
    print(
        f"<!-- {numel / 1e6:.1f}M: fedserve takes {ours / read:.2f}x the read pass. Speedup "
        f"over the faster common loop: {common / ours:.2f}x, over the in-place loop: "
        f"{in_place / ours:.2f}x. Maximum relative error against float64: {error:.1e} -->"
    )


def lazy_updates(
    count: int, numel: int, *, near_global: bool
) -> Iterator[tuple[torch.Tensor, float]]:
    """Yield `count` random updates one at a time, the same ones for the same arguments.

    With `near_global`, every update is one random model plus 1% noise, like local
    models trained from one global model. Otherwise the updates are independent.
    """
    generator = torch.Generator().manual_seed(count)
    base = torch.randn(numel, generator=generator)
    for _ in range(count):
        noise = torch.randn(numel, generator=generator)
        weight = float(torch.randint(10, 1000, (), generator=generator))
        yield (base + 0.01 * noise if near_global else noise), weight


def run_accuracy(counts: list[int], numel: int) -> None:
    print(f"relative error against float64, {numel / 1e6:.0f}M elements")
    print()
    print("| updates | near one model: float32 | Kahan | independent: float32 | Kahan |")
    print("|---|---|---|---|---|")
    for count in counts:
        cells = [
            error
            for near_global in (True, False)
            for error in measure_errors(count, numel, near_global=near_global)
        ]
        print(f"| {count} | " + " | ".join(f"{value:.1e}" for value in cells) + " |")


def measure_errors(count: int, numel: int, *, near_global: bool) -> tuple[float, float]:
    """Return the relative errors of fedserve's float32 average and of a Kahan average."""
    reference = torch.zeros(numel, dtype=torch.float64)
    total = 0.0
    for update, weight in lazy_updates(count, numel, near_global=near_global):
        reference.add_(update.double(), alpha=weight)
        total += weight
    reference /= total

    plain = weighted_average(
        torch.zeros(numel), lazy_updates(count, numel, near_global=near_global)
    )

    summed = torch.zeros(numel)
    compensation = torch.zeros(numel)
    for update, weight in lazy_updates(count, numel, near_global=near_global):
        kahan_step(summed, compensation, update, weight)
    kahan = summed.div_(total)

    return (
        float((plain.double() - reference).norm() / reference.norm()),
        float((kahan.double() - reference).norm() / reference.norm()),
    )


def parse_size(text: str) -> int:
    text = text.strip().upper()
    factor = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * factor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default="all", choices=["kernel", "accuracy", "all"])
    parser.add_argument(
        "--sizes", default="10M,100M", help="comma-separated parameter counts, such as 10M,100M"
    )
    parser.add_argument("--updates", type=int, default=10, help="number of updates K")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure, best printed")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads; 0 keeps torch's default (one per core)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or CPU time of the process (steadier on a busy machine)",
    )
    parser.add_argument(
        "--accuracy-updates",
        default="10,100,1000",
        help="comma-separated update counts for the accuracy part",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global clock
        clock = time.process_time

    if args.part in ("kernel", "all"):
        run_kernel([parse_size(size) for size in args.sizes.split(",")], args.updates, args.repeats)
        print()
    if args.part in ("accuracy", "all"):
        counts = [int(count) for count in args.accuracy_updates.split(",")]
        run_accuracy(counts, 1_000_000)


if __name__ == "__main__":
    main()
