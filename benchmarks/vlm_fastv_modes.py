"""FastV-select against FastV-drop on the small VLMs trained here: accuracy kept per layer and budget.

For each shipped model (``vqa-qwen2_5_vl``, ``vqa-llava`` of :mod:`tome.vlm_models`), each
``fastv_mode`` (``"select"``: a probe ranks at layer K, then every layer runs on the kept
tokens; ``"drop"``: the paper's in-layer drop, layers below K on the full sequence), each
``fastv_layer`` K and each budget (a fraction of an image's visual tokens): the greedy first
answer token of one forward on the first ``--questions`` validation questions of
:mod:`tome.data.vqa`, paired with the unreduced model on the same questions (share kept and
delta with their standard errors, as ``benchmarks/vlm_study.py``, whose evaluation is reused).

The table also gives each row's prefill cost in layer passes over the full sequence (F) and the
short one (S): select at K costs ``K F + D S`` (its probe runs K layers, then all D layers run
short), drop at K costs ``K F + (D - K) S``.

Usage (the command docs/vlm_reduction.md records):

    OMP_NUM_THREADS=1 uv run python benchmarks/vlm_fastv_modes.py --questions 250
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlm_study  # noqa: E402

import tome  # noqa: E402
from tome.data import vqa  # noqa: E402
from tome.vlm_models import SHIPPED_VLMS  # noqa: E402

SETTINGS = (("select", 1), ("select", 2), ("drop", 1), ("drop", 2))


def study(name: str, samples: Sequence[vqa.VQASample], budgets: Sequence[float],
          settings: Sequence[tuple] = SETTINGS) -> List[Dict[str, Any]]:
    """One row per (mode, layer, budget) on the shipped model ``name``."""
    model, processor, arch = vlm_study.load(SHIPPED_VLMS[name])
    depth = model.config.get_text_config().num_hidden_layers
    full = vlm_study.hits(model, processor, arch, samples)
    rows = []
    for fraction in budgets:
        for mode, layer in settings:
            tome.apply_patch(model, visual_tokens=fraction, method="fastv", fastv_layer=layer, fastv_mode=mode)
            try:
                reduced = vlm_study.hits(model, processor, arch, samples)
            finally:
                tome.remove_patch(model)
            cost = f"{layer} F + {depth if mode == 'select' else depth - layer} S"
            rows.append(dict(vlm_study.paired(reduced, full), model=name, mode=mode, layer=layer, budget=fraction,
                             cost=cost))
    return rows


def table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ["| model | budget | mode | K | prefill layers | accuracy % | share kept % | delta (points) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['budget']:.0%} | {r['mode']} | {r['layer']} | {r['cost']} | "
                     f"{100 * r['accuracy']:.1f} | {r['share']:.1f} ± {r['share_se']:.1f} | "
                     f"{r['delta']:.1f} ± {r['delta_se']:.1f} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=250, help="validation questions (default: %(default)s)")
    parser.add_argument("--budgets", type=vlm_study._budgets, default=[0.25, 0.11])
    parser.add_argument("--seed", type=int, default=0, help="the task's seed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error(f"--questions {args.questions} must be at least 1")
    samples = [vqa.make_sample(i, "val", seed=args.seed, image_size=224) for i in range(args.questions)]
    rows = [row for name in ("vqa-qwen2_5_vl", "vqa-llava") for row in study(name, samples, args.budgets)]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
