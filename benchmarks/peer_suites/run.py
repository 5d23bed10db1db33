"""Run timm's, transformers' and diffusers' own model tests on models patched by ToMe.

A drop-in patch should pass the peers' test suites wherever the unpatched model does.
This script fetches the source distributions of the installed ``timm`` and
``transformers`` from the package index (their wheels carry no tests), runs the
selected model tests three ways (unpatched, patched at r = 0, patched at r > 0;
``plugin.py`` patches every model the tests create) and reports, per setting, the
tests that pass unpatched but fail patched. Needs the package index (not the model
hubs: tests that download weights are deselected).

diffusers' source distribution holds only ``tests/testing_utils.py``, so its model
tests come from a git clone of the diffusers repository (``--diffusers-git``, a
bare or working repository): the tag of the installed version where the clone has
it, else its ``HEAD`` (the report says which). For diffusers the settings are
ratios (``none,0,0.5``), the accelerator gates of the compile, offload and memory
tests are lifted (they run on the CPU; see ``plugin.py``), and the report adds, per
setting > 0, how many tests ran a patched denoiser whose attention calls all kept
their ratio-0 lengths (nothing merged) and how many got ToMe's "nothing merged"
warning.

transformers' sdist has ``tests/test_modeling_common.py`` but not the per-model
files, so ``hf_testers.py`` supplies small configs for ViT, DeiT and DINOv2; its
``ExportTesterMixin`` and ``GenerationTesterMixin`` bases are missing too and are
replaced by empty classes (so ``torch.export`` and generation tests do not run here;
export has its own tests in ``tests/test_export.py``).

Usage (the commands docs/compatibility.md records)::

    uv run python benchmarks/peer_suites/run.py --json benchmarks/out/peer-suites.json
    uv run python benchmarks/peer_suites/run.py --suite diffusers --diffusers-git PATH \\
        --json benchmarks/out/peer-suites.json

Prints a Markdown table; ``--json`` keeps every test's outcome per setting.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from importlib.metadata import version
from pathlib import Path
from typing import Dict, List, Tuple

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


# diffusers' model test files, per denoiser (tests/models/ of the diffusers repository).
DIFFUSERS_FILES = {
    "FluxTransformer2DModel": "transformers/test_models_transformer_flux.py",
    "WanTransformer3DModel": "transformers/test_models_transformer_wan.py",
    "SD3Transformer2DModel": "transformers/test_models_transformer_sd3.py",
    "PixArtTransformer2DModel": "transformers/test_models_pixart_transformer2d.py",
    "UNet2DConditionModel": "unets/test_models_unet_2d_condition.py",
}
# Left out: single-file loading downloads checkpoints from the hub; the quantization
# backends (bitsandbytes, GGUF, Quanto, TorchAO, ModelOpt, SDNQ) are not installed here and
# download weights; context and tensor parallelism spawn one process per GPU.
DIFFUSERS_DESELECT = ("not SingleFile and not BitsAndBytes and not GGUF and not Quanto and not TorchAo and not ModelOpt "
                      "and not SDNQ and not ContextParallel and not TensorParallel")
# Left out by default to fit a CPU run (--all-tests keeps them): hub loading and the UNet's
# integration tests download weights; LoRA, LoRA hot-swapping, IP-Adapter, custom diffusion,
# Flux's attention-backend matrix and SD3.5's copy of the SD3 classes; AOT-inductor packaging and
# dynamic-shape compilation (minutes of C++ compilation per test on a CPU).
DIFFUSERS_FOR_TIME = ("not HubLoading and not IntegrationTests and not LoRA and not IPAdapter and not CustomDiffusion "
                      "and not AttentionBackend and not SD35 and not test_compile_works_with_aot "
                      "and not test_compile_on_different_shapes")
DIFFUSERS_SUPPORT = ["tests/__init__.py", "tests/conftest.py", "tests/testing_utils.py", "tests/models/__init__.py",
                     "tests/models/testing_utils", "tests/models/test_modeling_common.py",
                     "tests/models/unets/__init__.py", "tests/models/transformers/__init__.py",
                     "tests/others/__init__.py", "tests/others/test_utils.py"]


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


def fetch_diffusers(cache: Path, clone: Path | None) -> Tuple[Path, str]:
    """diffusers' model tests for the installed version: its source distribution when that
    has ``tests/models``, else the files of a git clone at ``v<version>`` (or its ``HEAD``
    when the clone lacks that tag). Returns the root and where the tests came from."""
    installed = version("diffusers")
    root = fetch("diffusers", cache)
    if (root / "tests" / "models").is_dir() and not (root / "TESTS_FROM").exists():
        return root, f"source distribution {installed}"
    if clone is None:
        raise SystemExit(f"diffusers {installed}'s source distribution has no tests/models; pass --diffusers-git, "
                         "a git clone of https://github.com/huggingface/diffusers")
    git = ["git", f"--git-dir={clone}" if (clone / "HEAD").is_file() else f"--git-dir={clone / '.git'}"]
    tag = f"v{installed}"
    has_tag = subprocess.run(git + ["rev-parse", "--verify", "--quiet", f"{tag}^{{commit}}"],
                             capture_output=True, text=True).returncode == 0
    ref = tag if has_tag else "HEAD"
    commit = subprocess.run(git + ["rev-parse", ref], capture_output=True, text=True, check=True).stdout.strip()
    stated = subprocess.run(git + ["show", f"{commit}:setup.py"], capture_output=True, text=True).stdout
    found = re.search(r'version="([^"]+)"', stated)
    origin = f"git {ref} {commit[:10]} (version {found.group(1) if found else '?'})"
    note = "" if has_tag else f"; the clone has no tag {tag}"
    tests = root / "tests"
    if (root / "TESTS_FROM").exists() and (root / "TESTS_FROM").read_text().strip() == origin:
        return root, origin + note  # already there (and maybe in use by another run)
    shutil.rmtree(tests, ignore_errors=True)
    paths = DIFFUSERS_SUPPORT + [f"tests/models/{f}" for f in DIFFUSERS_FILES.values()]
    archive = subprocess.run(git + ["archive", commit, *paths], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "TESTS_FROM").write_text(origin + "\n")
    return root, origin + note


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


def run_suite(root: Path, args: List[str], settings: List[str], logs: Path, suite: str, extra: List[str],
              env_extra: Dict[str, str] | None = None, parallel: bool = False) -> Dict[str, Dict[str, str]]:
    """Run pytest in ``root`` with the plugin at each setting (one after another, or all
    at once with ``parallel``); returns ``{setting: {test id: outcome}}``."""
    shutil.copy(HERE / "plugin.py", root / "tome_peer_plugin.py")
    running = []
    for setting in settings:
        out = logs / f"{suite}-{setting}.run"  # a suffix of its own: with_suffix must not eat a ratio's ".5"
        for old in (out.with_suffix(".log"), out.with_suffix(".log.jsonl"), out.with_suffix(".xml")):
            old.unlink(missing_ok=True)
        env = {**os.environ, "TOME_PEER_R": setting, "TOME_PEER_LOG": str(out.with_suffix(".log")),
               "PYTHONPATH": str(root), **(env_extra or {})}
        command = ["uv", "run", "--project", str(REPO), *extra, "python", "-m", "pytest", "-p", "no:cacheprovider",
                   "-p", "tome_peer_plugin", "-q", "--no-header", f"--junitxml={out.with_suffix('.xml')}", *args]
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=root, env=env, stdout=open(out.with_suffix(".txt"), "w"),
                                   stderr=subprocess.STDOUT)
        running.append((setting, out, start, process))
        if not parallel:
            process.wait()
    results = {}
    for setting, out, start, process in running:
        process.wait()
        print(f"  {setting}: {time.perf_counter() - start:.0f} s", flush=True)
        outcomes = {}
        for case in ET.parse(out.with_suffix(".xml")).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            kinds = {child.tag for child in case}
            outcomes[name] = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed")
        results[setting] = outcomes
    return results


def attention_report(jsonl: Path, baseline: Path) -> Dict[str, Dict[str, int]]:
    """Per test (JUnit id): ``ran`` (1 if the test called attention), ``same`` (1 if every
    attention call kept its length in the ``baseline`` run, ratio 0: nothing merged),
    ``warned`` (ToMe's "nothing merged" warnings), from the plugin's JSON lines."""

    def read(path: Path) -> Dict[str, Dict[str, object]]:
        tests: Dict[str, Dict[str, object]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                test = tests.setdefault(entry.pop("test"), {})
                test["nothing_merged"] = test.get("nothing_merged", 0) + entry.pop("nothing_merged", 0)
                test.update(entry)
        return tests

    now, base = read(jsonl), read(baseline)
    report = {}
    for test, entry in now.items():
        calls = entry.get("attention") or []
        report[_junit_id(test)] = {"ran": int(bool(calls)), "warned": int(entry.get("nothing_merged", 0)),
                        "same": int(bool(calls) and calls == base.get(test, {}).get("attention"))}
    return report


def _junit_id(nodeid: str) -> str:
    """A pytest node id (``dir/test_x.py::Class::test``) as the JUnit XML names it
    (``dir.test_x.Class::test``), the key of the outcomes."""
    path, *names = nodeid.split("::")
    module = path[:-3] if path.endswith(".py") else path
    return ".".join([module.replace("/", "."), *names[:-1]]) + "::" + names[-1]


def _is_setting(setting: str, ratio: bool) -> bool:
    if setting == "none":
        return True
    if not ratio:
        return setting.isdigit()
    try:
        return 0 <= float(setting) < 1
    except ValueError:
        return False


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append", choices=["timm", "transformers", "diffusers"],
                        help="suites to run (default: timm and transformers)")
    parser.add_argument("--settings",
                        help="comma-separated: 'none' (unpatched, the baseline) and values of r (timm, transformers; "
                             "default none,0,4) or of the ratio (diffusers; default none,0,0.5)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "tome-peer-suites",
                        help="where the source distributions are unpacked (default: ~/.cache/tome-peer-suites)")
    parser.add_argument("--diffusers-git", type=Path,
                        help="a git clone of the diffusers repository, for its model tests (its source distribution "
                             "has none)")
    parser.add_argument("--model", action="append", choices=sorted(DIFFUSERS_FILES),
                        help="diffusers: the denoisers whose test files run (default: all)")
    parser.add_argument("-k", dest="keyword", help="diffusers: a further pytest -k selection")
    parser.add_argument("--all-tests", action="store_true",
                        help="diffusers: also the test classes left out for time (DIFFUSERS_FOR_TIME)")
    parser.add_argument("--parallel", action="store_true",
                        help="run the settings at the same time (one pytest process each, one thread each)")
    parser.add_argument("--json", type=Path,
                        help="every outcome; settings already in this file and not rerun are kept")
    parser.add_argument("--report", action="store_true", help="print the table of --json and run nothing")
    args = parser.parse_args(argv)
    suites = args.suite or ["timm", "transformers"]
    stored = json.loads(args.json.read_text()) if args.json is not None and args.json.exists() else {}
    results: Dict[str, Dict[str, Dict[str, str]]] = stored.get("results", {})
    merging: Dict[str, Dict[str, Dict[str, Dict[str, int]]]] = stored.get("merging", {})
    origins: Dict[str, str] = stored.get("origins", {})
    if args.report:
        print(table(results, merging))
        return
    logs = args.cache / "runs"
    logs.mkdir(parents=True, exist_ok=True)
    for suite in suites:
        ratio = suite == "diffusers"
        settings = [s.strip() for s in (args.settings or ("none,0,0.5" if ratio else "none,0,4")).split(",") if s.strip()]
        for setting in settings:
            if not _is_setting(setting, ratio):
                what = "a ratio in [0, 1)" if ratio else "a non-negative integer r"
                parser.error(f"--settings: {setting!r} is neither 'none' nor {what} (suite {suite})")
        print(f"{suite} {version(suite)}", flush=True)
        env: Dict[str, str] = {}
        if suite == "timm":
            root = fetch("timm", args.cache)
            selection = " or ".join(TIMM_MODELS)
            pytest_args, extra = ["tests/test_models.py", "-k", f"({selection}) and {TIMM_DESELECT}"], []
        elif suite == "transformers":
            root = fetch("transformers", args.cache)
            prepare_transformers(root)
            pytest_args, extra = ["tests/test_tome_patched.py"], ["--with", "parameterized"]
        else:
            root, origins[suite] = fetch_diffusers(args.cache, args.diffusers_git)
            print(f"  tests from {origins[suite]}", flush=True)
        by_setting = results.setdefault(suite, {})
        if suite != "diffusers":
            by_setting.update(run_suite(root, pytest_args, settings, logs, suite, extra, env, args.parallel))
            continue
        keyword = DIFFUSERS_DESELECT + ("" if args.all_tests else f" and {DIFFUSERS_FOR_TIME}")
        keyword += f" and ({args.keyword})" if args.keyword else ""
        extra = ["--with", "parameterized", "--with", "requests-mock"]
        env = {"TOME_PEER_DIFFUSERS": "1", "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": "1"} if args.parallel else {})}
        for model in args.model or DIFFUSERS_FILES:  # one pytest run per test file: each result is kept as it comes
            print(f"  {model}", flush=True)
            pytest_args = [f"tests/models/{DIFFUSERS_FILES[model]}", "-k", keyword, "-p", "no:randomly"]
            name = f"{suite}-{model}"
            for setting, outcomes in run_suite(root, pytest_args, settings, logs, name, extra, env, args.parallel).items():
                stem = Path(DIFFUSERS_FILES[model]).stem
                kept = {t: v for t, v in by_setting.get(setting, {}).items() if stem not in t}
                by_setting[setting] = {**kept, **outcomes}
                if setting not in ("none", "0"):
                    report = attention_report(logs / f"{name}-{setting}.log.jsonl", logs / f"{name}-0.log.jsonl")
                    stored_report = merging.setdefault(suite, {}).setdefault(setting, {})
                    for test in [t for t in stored_report if stem in t]:
                        del stored_report[test]
                    stored_report.update(report)
            if args.json:
                save(args.json, stored, suites, origins, results, merging)
    print(table(results, merging))
    if args.json:
        save(args.json, stored, suites, origins, results, merging)


def table(results: Dict, merging: Dict) -> str:
    """The Markdown table of ``results`` (and, for diffusers, of ``merging``)."""
    rows = ["| suite | setting | passed | failed | skipped | fail patched, pass unpatched | ran, merged nothing |",
            "|---|---|---|---|---|---|---|"]
    for suite, by_setting in results.items():
        groups = {"": by_setting}
        if suite == "diffusers":  # one row group per denoiser's test file
            groups = {model: {s: {t: v for t, v in o.items() if Path(file).stem in t} for s, o in by_setting.items()}
                      for model, file in DIFFUSERS_FILES.items()}
        for group, settings_of in groups.items():
            base = settings_of.get("none", {})
            for setting, outcomes in sorted(settings_of.items(), key=lambda item: (item[0] != "none", item[0])):
                if not outcomes:
                    continue
                counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
                new = sorted(t for t, v in outcomes.items() if v == "failed" and base.get(t) == "passed")
                label = "unpatched" if setting == "none" else f"{'ratio' if suite == 'diffusers' else 'r'} = {setting}"
                shown = ", ".join(t.split("::")[-1] for t in new[:12]) + (f", ... ({len(new)})" if len(new) > 12 else "")
                report = {t: v for t, v in merging.get(suite, {}).get(setting, {}).items() if t in outcomes}
                nothing = "-"
                if report:
                    ran = sum(v["ran"] for v in report.values())
                    same = sum(v["same"] for v in report.values())
                    warned = sum(v["warned"] > 0 for v in report.values())
                    nothing = f"{ran}, {same} (warned in {warned})"
                name = f"{suite} {version(suite)}" + (f" {group}" if group else "")
                rows.append(f"| {name} | {label} | {counts['passed']} | {counts['failed']} | "
                            f"{counts['skipped']} | {shown or '-'} | {nothing} |")
    return "\n".join(rows)


def save(path: Path, stored: Dict, suites: List[str], origins: Dict, results: Dict, merging: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    versions = {**stored.get("versions", {}), **{suite: version(suite) for suite in suites}}
    path.write_text(json.dumps({"versions": versions, "origins": origins, "results": results, "merging": merging},
                               indent=1))


if __name__ == "__main__":
    main()
