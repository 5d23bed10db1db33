"""Peak memory of source tracing: one group index per original token vs a dense map.

Each measurement runs in a fresh Python process (``python memory.py --worker ...``)
so allocator caches of one approach cannot hide the other's peak.

CPU: torch's CPU allocations are invisible to ``tracemalloc``, so the peak is the
process's resident set: ``/proc/self/clear_refs`` (writing ``5``) resets the
kernel's high-water mark ``VmHWM``, and the reported figure is ``VmHWM`` after
the measured code minus ``VmRSS`` before it. CUDA: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``, minus the memory allocated before.

Two measurements:

* ``isolated``: only the bookkeeping of source tracing through a whole schedule,
  at full batch: the assignments of every layer are computed first (real
  ``tome.merge.match_bipartite`` on random metrics), then the peak of updating
  (a) the ``(batch, original tokens)`` group index as the library does and
  (b) a dense ``(batch, tokens, original tokens)`` float map with
  ``tome.merge.merge_source`` (the published approach) is measured.
  "read" is building the dense map once from the final group index, which is
  what ``model._tome_info["source"]`` does on access.
* ``forward``: one whole forward of the patched model with ``trace_source=False``,
  ``True`` (group index) and an emulated dense map (the dense map is carried
  alongside the library's state, updated with ``merge_source`` in every block).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import List, Optional

__all__ = ["run_memory"]


# --------------------------------------------------------------------------- measuring


class _Peak:
    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.device = device

    def __enter__(self) -> "_Peak":
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.before = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before = _status_kb("VmRSS") * 1024
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
            self.peak_bytes = self.torch.cuda.max_memory_allocated() - self.before
        else:
            self.peak_bytes = _status_kb("VmHWM") * 1024 - self.before
        self.seconds = time.perf_counter() - self.start


def _decode_schedule(text: str):
    """JSON back to a schedule: ``[16, -1.0]`` (a float second entry) is ``(16, -1.0)``."""
    value = json.loads(text)
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], float):
        return tuple(value)
    return value


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _median_seconds(fn, device, repeats: int = 5) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (after the measured first one)."""
    import statistics

    import torch

    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker_isolated(args) -> dict:
    import torch

    import tome
    from tome.merge import match_bipartite, merge_source
    from tome.patch._shared import sources_from_groups

    device = torch.device(args.device)
    torch.manual_seed(0)
    batch, tokens = args.batch, args.tokens
    schedule = tome.parse_r(args.depth, _decode_schedule(args.schedule))
    assignments = []
    n = tokens
    with torch.inference_mode():
        for r in schedule:
            assignment = match_bipartite(torch.randn(batch, n, 64, device=device), r, args.protected)
            if assignment is not None:
                assignments.append(assignment)
                n = assignment.num_out
        result = {"final_tokens": n, "layers_merging": len(assignments)}
        if args.approach == "groups":

            def track():
                groups = torch.arange(tokens, device=device).expand(batch, -1)
                for assignment in assignments:
                    groups = assignment.dest.gather(1, groups)  # as ToMeState.merge does
                return groups

            with _Peak(device) as peak:
                groups = track()
            result.update(track_peak_bytes=peak.peak_bytes, track_s=_median_seconds(track, device),
                          state_bytes=groups.numel() * groups.element_size())
            with _Peak(device) as peak:
                dense = sources_from_groups(groups, n)
            result.update(read_peak_bytes=peak.peak_bytes, read_bytes=dense.numel() * dense.element_size())
        else:
            stub = torch.empty(batch, tokens, 1, device=device)

            def track():
                source = None
                for assignment in assignments:
                    source = merge_source(assignment, stub, source)
                return source

            with _Peak(device) as peak:
                source = track()
            result.update(track_peak_bytes=peak.peak_bytes, track_s=_median_seconds(track, device),
                          state_bytes=source.numel() * source.element_size())
    return result


def _install_dense_emulation() -> None:
    """Carry a dense source map next to the library's state (benchmark-only)."""
    from tome.merge import merge_source
    from tome.patch import _shared

    last = {}
    match = _shared.match_bipartite

    def capture(metric, r, protected_tokens=0):
        last["assignment"] = assignment = match(metric, r, protected_tokens)
        return assignment

    merge = _shared.ToMeState.merge

    def merge_with_dense(self, x, metric, r):
        last["assignment"] = None
        out, state = merge(self, x, metric, r)
        if last["assignment"] is not None:
            dense = merge_source(last["assignment"], x, getattr(self, "_bench_dense", None))
            object.__setattr__(state, "_bench_dense", dense)
        return out, state

    _shared.match_bipartite = capture
    _shared.ToMeState.merge = merge_with_dense


def _worker_forward(args) -> dict:
    import timm
    import torch

    import tome

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(device)
    tome.patch.timm(model, trace_source=args.approach == "groups")
    model.r = _decode_schedule(args.schedule)
    if args.approach == "dense":
        _install_dense_emulation()
    size = model.patch_embed.img_size[0]
    x = torch.randn(args.batch, 3, size, size, device=device)
    with torch.inference_mode(), _Peak(device) as peak:
        model(x)
        if args.approach == "groups":
            model._tome_info["source"]  # built from the group index on read
    return {"forward_peak_bytes": peak.peak_bytes, "forward_s": peak.seconds}


# --------------------------------------------------------------------------- driver


def _spawn(argv: List[str]) -> dict:
    import torch

    here = os.path.abspath(__file__)
    threads = ["--threads", str(torch.get_num_threads())]  # as many as the parent uses
    proc = subprocess.run([sys.executable, here, "--worker", *argv, *threads], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {argv} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_memory(
    model_name: str,
    image_size: int,
    batch: int,
    schedule,
    device: str,
    forward_batch: Optional[int],
    progress=print,
) -> dict:
    """Source-tracing memory for a timm ViT geometry; see the module docstring."""
    import timm
    import torch

    with torch.device("meta"):  # geometry only, no weights
        config = timm.create_model(model_name, pretrained=False, img_size=image_size)
    tokens = config.patch_embed.num_patches + config.num_prefix_tokens
    depth, protected = len(config.blocks), config.num_prefix_tokens
    del config
    schedule_json = json.dumps(list(schedule) if isinstance(schedule, tuple) else schedule)
    common = ["--batch", str(batch), "--tokens", str(tokens), "--depth", str(depth), "--protected", str(protected),
              "--schedule", schedule_json, "--device", device]
    result = {
        "model": model_name,
        "image_size": image_size,
        "batch": batch,
        "tokens": tokens,
        "depth": depth,
        "schedule": schedule_json,
        "dense_first_layer_bytes_formula": f"{batch}*{tokens}*{tokens}*4",
        "dense_first_layer_bytes": batch * tokens * tokens * 4,
        "group_index_bytes": batch * tokens * 8,
        "isolated": {},
    }
    for approach in ("groups", "dense"):
        result["isolated"][approach] = _spawn(["isolated", "--approach", approach, *common])
        progress(f"  isolated {approach}: {result['isolated'][approach]}")
    if forward_batch:
        result["forward"] = {"batch": forward_batch}
        for approach in ("off", "groups", "dense"):
            measured = _spawn(["forward", "--approach", approach, "--model", model_name, "--batch", str(forward_batch),
                               "--schedule", schedule_json, "--device", device])
            result["forward"][approach] = measured
            progress(f"  forward batch {forward_batch}, source {approach}: {measured}")
    return result


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["isolated", "forward"], required=True)
    parser.add_argument("--approach", choices=["groups", "dense", "off"], required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=0)
    parser.add_argument("--depth", type=int, default=0)
    parser.add_argument("--protected", type=int, default=1)
    parser.add_argument("--schedule", required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = _worker_isolated(args) if args.worker == "isolated" else _worker_forward(args)
    print(json.dumps(result))


if __name__ == "__main__":
    _main()
