"""torch.compile of a patched model: full graph, no recompiles, faster than eager."""

from __future__ import annotations

import time
from typing import Callable

import torch

from .models import Schedule, autocast, build_model, patched_twin, schedule_label
from .timing import Variant, summarize, time_variants

__all__ = ["run_compile"]


def run_compile(
    model_key: str,
    batch_size: int,
    schedule: Schedule,
    precision: str,
    rounds: int,
    warmup: int,
    device: torch.device,
    compile_base: bool = False,
    repeats: int = 3,
    progress: Callable[[str], None] = print,
) -> dict:
    """Compile the patched model with ``fullgraph=True`` and time it against eager.

    Checks, in order: ``torch._dynamo.explain`` finds one graph and no break;
    the compiled model matches eager; ``repeats`` further batches of the same
    shape (new data) trigger no recompilation (``torch._dynamo.config.error_on_recompile``
    is set while they run, and the number of compiled graphs is read from
    dynamo's counters). Then eager timm, eager ToMe and compiled ToMe (and
    compiled timm with ``compile_base``) are timed interleaved.
    """
    from torch._dynamo.utils import counters

    base, spec = build_model(model_key, device)
    patched = patched_twin(base)
    patched.r = schedule
    x = torch.randn(batch_size, 3, spec.image_size, spec.image_size, device=device)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(patched)(x[:2])
    result = {
        "model": model_key,
        "timm_name": spec.timm_name,
        "batch": batch_size,
        "precision": precision,
        "schedule": list(schedule) if isinstance(schedule, tuple) else schedule,
        "explain_graphs": explanation.graph_count,
        "explain_graph_breaks": explanation.graph_break_count,
        "explain_break_reasons": [str(reason.reason) for reason in explanation.break_reasons],
    }
    progress(f"  explain: {explanation.graph_count} graph(s), {explanation.graph_break_count} break(s)")

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(patched, fullgraph=True)
    compiled_base = torch.compile(base, fullgraph=True) if compile_base else None
    with torch.no_grad(), autocast(precision, device):
        start = time.perf_counter()
        out = compiled(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result["compile_s"] = time.perf_counter() - start
        result["max_abs_diff_vs_eager"] = (out - patched(x)).abs().max().item()
        graphs_after_first = counters["stats"]["unique_graphs"]
        previous = torch._dynamo.config.error_on_recompile
        torch._dynamo.config.error_on_recompile = True
        try:
            for _ in range(repeats):
                compiled(torch.randn_like(x))
            result["recompiled"] = False
        except Exception as error:  # torch._dynamo.exc.RecompileError
            result["recompiled"] = True
            result["recompile_error"] = f"{type(error).__name__}: {error}"
        finally:
            torch._dynamo.config.error_on_recompile = previous
        result["graphs_compiled"] = counters["stats"]["unique_graphs"]
        result["graphs_after_first_call"] = graphs_after_first
        if compiled_base is not None:
            compiled_base(x)
    progress(
        f"  compiled in {result['compile_s']:.1f}s, max |diff| vs eager {result['max_abs_diff_vs_eager']:.2e}, "
        f"recompiled on {repeats} more batches: {result['recompiled']}"
    )

    label = f"tome {schedule_label(schedule)}"
    variants = [
        Variant("timm eager", lambda: base(x), merges=False),
        Variant(f"{label} eager", lambda: patched(x)),
        Variant(f"{label} compiled", lambda: compiled(x), merges=False),
    ]
    if compiled_base is not None:
        variants.append(Variant("timm compiled", lambda: compiled_base(x), merges=False))
    with torch.no_grad(), autocast(precision, device):
        time_variants(variants, rounds, warmup, device, lambda line: progress("  " + line))
    result["timings"] = summarize(variants, batch_size)
    eager = result["timings"][f"{label} eager"]
    fast = result["timings"][f"{label} compiled"]
    result["compiled_vs_eager_speedup"] = statistics_ratio(eager["times_s"], fast["times_s"])
    return result


def statistics_ratio(slow, fast) -> float:
    """Median over rounds of ``slow / fast`` (paired by round)."""
    import statistics

    return statistics.median(s / f for s, f in zip(slow, fast))
