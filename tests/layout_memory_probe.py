"""Measure the peak RSS growth of reading a large TorchScript archive's layout, in a new process.

Run by test_modelfiles_layout.py as
`python layout_memory_probe.py FOLDER [--full-load | --scan]`, with DJANGO_SETTINGS_MODULE
set. It writes a TorchScript archive of about 128 MB into FOLDER and prints one JSON object.
`growth` is the peak anonymous resident memory (RssAnon, sampled every millisecond on a
thread) while reading the layout, minus RssAnon just before. The archive is read through a
file object without a path, from which torch.jit.load reads the whole file. `--full-load`
loads the archive with torch.jit.load on the meta device instead, to show that the
measurement records growth. `--scan` checks every value for NaN and infinity with
find_non_finite, and prints its result as `problem`.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import django
import torch

from tests.aggregation.peak_memory import anonymous_rss


class WideLinear(torch.nn.Module):
    """32 Mi float32 weights (128 MiB) and a bias, zero-filled, so writing the file is fast."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(8192, 4096))
        self.bias = torch.nn.Parameter(torch.zeros(8192))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


def main() -> None:
    folder = Path(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "--layout"
    django.setup()
    from fedserve import modelfiles
    from fedserve.core.models import FileFormat
    from tests.factories import ReadOnlyFile

    path = folder / "wide.pt"
    module = torch.jit.script(WideLinear())
    model_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    torch.jit.save(module, str(path))
    del module

    # Warm up with a small archive, so that first-call allocations are not counted.
    small = folder / "small.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(small))
    with small.open("rb") as file:
        modelfiles.read_state_dict_layout(ReadOnlyFile(file), FileFormat.TORCHSCRIPT)
        modelfiles.find_non_finite(ReadOnlyFile(file), FileFormat.TORCHSCRIPT)

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
    figures: dict[str, object] = {"model_bytes": model_bytes}
    try:
        with path.open("rb") as file:
            reader = ReadOnlyFile(file)
            if mode == "--full-load":
                layout = modelfiles.load_state_dict(
                    reader, FileFormat.TORCHSCRIPT, map_location="meta"
                )
                figures["keys"] = len(layout)
            elif mode == "--scan":
                figures["problem"] = modelfiles.find_non_finite(reader, FileFormat.TORCHSCRIPT)
            else:
                layout = modelfiles.read_state_dict_layout(reader, FileFormat.TORCHSCRIPT)
                figures["keys"] = len(layout)
    finally:
        done.set()
        sampler.join()
    peak = max(peak, anonymous_rss())
    figures["growth"] = peak - before
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
