"""Run timm's and transformers' own model tests on models patched by ToMe.

A drop-in patch should pass the peers' test suites wherever the unpatched model does.
This script fetches the source distributions of the installed ``timm`` and
``transformers`` from the package index (their wheels carry no tests), runs the
selected model tests three ways (unpatched, patched at r = 0, patched at r > 0;
``plugin.py`` patches every model the tests create) and reports, per setting, the
tests that pass unpatched but fail patched. Needs the package index (not the model
hubs: tests that download weights are deselected).

transformers' sdist has ``tests/test_modeling_common.py`` but not the per-model
files, so ``hf_testers.py`` supplies small configs for ViT, DeiT and DINOv2; its
``ExportTesterMixin`` and ``GenerationTesterMixin`` bases are missing too and are
replaced by empty classes (so ``torch.export`` and generation tests do not run here;
export has its own tests in ``tests/test_export.py``).

Usage (the command docs/compatibility.md records)::

    uv run python benchmarks/peer_suites/run.py --json benchmarks/out/peer-suites.json

Prints a Markdown table; ``--json`` keeps every test's outcome per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# timm architectures of the families ToMe patches (random weights; timm's test_* models are tiny).
TIMM_MODELS = [
    "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_tiny_distilled_patch16_224",
    "vit_base_patch16_reg4_gap_256", "test_vit", "test_vit2", "test_vit3",
    "eva02_tiny_patch14_224", "vit_small_patch16_dinov3",
]
# Tests that download weights, or that check things outside the model (ToMe changes none of them).
TIMM_DESELECT = "not test_model_inference and not pretrained and not test_model_default_cfgs_non_std"


def fetch(package: str, cache: Path) -> Path:
    """Extract the installed version's source distribution into ``cache``; returns its root."""
    release = f"{package}-{version(package)}"
    root = cache / release
    if (root / "tests").is_dir():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    pip = [shutil.which("uvx") or "uvx", "pip"] if shutil.which("uvx") else [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["download", "--no-deps", "--no-binary", ":all:", "-d", str(cache), f"{package}=={version(package)}"],
                   check=True)
    archive = next(cache.glob(f"{release}.tar.gz"))
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(f"{release}/tests/")]
        tar.extractall(cache, members=members, filter="data")
    return root


def prepare_transformers(root: Path) -> None:
    tests = root / "tests"
    (tests / "__init__.py").touch()
    for package, mixin in (("exporters", "test_export.ExportTesterMixin"), ("generation", "test_utils.GenerationTesterMixin")):
        (tests / package).mkdir(exist_ok=True)
        (tests / package / "__init__.py").touch()
        module, name = mixin.split(".")
        path = tests / package / f"{module}.py"
        if not path.exists():
            path.write_text(f"class {name}:  # not in transformers' source distribution\n    pass\n")
    shutil.copy(HERE / "hf_testers.py", tests / "test_tome_patched.py")


def run_suite(root: Path, args: List[str], setting: str, out: Path, extra: List[str]) -> Dict[str, str]:
    """Run pytest in ``root`` with the plugin at ``setting``; returns ``{test id: outcome}``."""
    shutil.copy(HERE / "plugin.py", root / "tome_peer_plugin.py")
    xml = out.with_suffix(".xml")
    env = {**os.environ, "TOME_PEER_R": setting, "TOME_PEER_LOG": str(out.with_suffix(".log")), "PYTHONPATH": str(root)}
    command = ["uv", "run", "--project", str(REPO), *extra, "python", "-m", "pytest", "-p", "no:cacheprovider",
               "-p", "tome_peer_plugin", "-q", "--no-header", f"--junitxml={xml}", *args]
    start = time.perf_counter()
    subprocess.run(command, cwd=root, env=env, stdout=open(out.with_suffix(".txt"), "w"), stderr=subprocess.STDOUT)
    print(f"  {setting}: {time.perf_counter() - start:.0f} s", flush=True)
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed")
    return outcomes


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append", choices=["timm", "transformers"],
                        help="suites to run (default: both)")
    parser.add_argument("--settings", default="none,0,4",
                        help="comma-separated: 'none' (unpatched, the baseline) and values of r (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tome-peer-suites",
                        help="where the source distributions are unpacked (default: ~/.cache/tome-peer-suites)")
    parser.add_argument("--json", type=Path,
                        help="every outcome; settings already in this file and not rerun are kept")
    args = parser.parse_args(argv)
    suites = args.suite or ["timm", "transformers"]
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    for setting in settings:
        if setting != "none" and not setting.isdigit():
            parser.error(f"--settings: {setting!r} is neither 'none' nor a non-negative integer r")
    stored = json.loads(args.json.read_text()) if args.json is not None and args.json.exists() else {}
    results: Dict[str, Dict[str, Dict[str, str]]] = stored.get("results", {})
    logs = args.cache / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    for suite in suites:
        print(f"{suite} {version(suite)}", flush=True)
        if suite == "timm":
            root = fetch("timm", args.cache)
            selection = " or ".join(TIMM_MODELS)
            pytest_args, extra = ["tests/test_models.py", "-k", f"({selection}) and {TIMM_DESELECT}"], []
        else:
            root = fetch("transformers", args.cache)
            prepare_transformers(root)
            pytest_args, extra = ["tests/test_tome_patched.py"], ["--with", "parameterized"]
        by_setting = results.setdefault(suite, {})
        for setting in settings:
            by_setting[setting] = run_suite(root, pytest_args, setting, logs / f"{suite}-{setting}", extra)
    rows = ["| suite | setting | passed | failed | skipped | fail patched, pass unpatched |", "|---|---|---|---|---|---|"]
    for suite, by_setting in results.items():
        base = by_setting.get("none", {})
        for setting, outcomes in sorted(by_setting.items(), key=lambda item: (item[0] != "none", item[0])):
            counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
            new = sorted(t for t, v in outcomes.items() if v == "failed" and base.get(t) == "passed")
            label = "unpatched" if setting == "none" else f"r = {setting}"
            shown = ", ".join(t.split("::")[-1] for t in new[:12]) + (f", ... ({len(new)})" if len(new) > 12 else "")
            rows.append(f"| {suite} {version(suite)} | {label} | {counts['passed']} | {counts['failed']} | "
                        f"{counts['skipped']} | {shown or '-'} |")
    print("\n".join(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        versions = {**stored.get("versions", {}), **{suite: version(suite) for suite in suites}}
        args.json.write_text(json.dumps({"versions": versions, "results": results}, indent=1))


if __name__ == "__main__":
    main()
