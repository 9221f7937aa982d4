"""Methods that live outside the package: a pip-installed one from ``lmms-prune new-method`` runs through the
lmms-eval command line, ``lmms-prune methods`` and ``check-method``; deliberately broken ones (duplicate or
out-of-range indices, a budget ignored, a random draw, an undeclared parameter) fail ``check-method`` with the
reason; a name clash is refused naming both modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_runs import REPO, run_lmms_eval

from lmms_prune import methods
from lmms_prune.cli import new_method
from lmms_prune.cli.main import main

EXAMPLE = REPO / "examples" / "lmms_prune_example_method" / "lmms_prune_example_method" / "method.py"
OLD_SCORE = "return mix * S.minmax(attention) + (1 - mix) * S.minmax(norms)  # SCORE"
NEW_SCORE = "return 1 - S.minmax(norms)  # SCORE: the LOWEST hidden-state norms"


def _python(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    env.pop(methods.ENV_VAR, None)
    env.update(extra)
    return env


@pytest.mark.cli
def test_new_method_package_installed_with_pip_runs_through_lmms_eval(tmp_path, monkeypatch):
    name = "normprune"
    pkg, site = tmp_path / "pkg", tmp_path / "site"
    assert main(["new-method", name, "--out", str(pkg)]) == 0
    assert sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*") if p.is_file()) == sorted(new_method.files(name))
    method = pkg / f"lmms_prune_{name}" / "method.py"
    text = method.read_text()
    assert OLD_SCORE in text
    method.write_text(text.replace(OLD_SCORE, NEW_SCORE).replace("attention and hidden-state norm",
                                                                 "lowest hidden-state norms"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                           "--target", str(site), str(pkg)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    path = os.pathsep.join([str(site), str(REPO)])
    env = _env(PYTHONPATH=path)

    listed = _python(["-m", "lmms_prune.cli.main", "methods"], env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert f"{name}: lowest hidden-state norms" in listed.stdout and f"{name}_mix" in listed.stdout
    assert f"lmms_prune_{name}.method ({site}" in listed.stdout.split("External method modules")[1]

    out = tmp_path / "check.json"
    checked = _python(["-m", "lmms_prune.cli.main", "check-method", name, "--families", "internvl_llama",
                       "--json", str(out)], env)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["passed"] and {r["status"] for r in report["results"]} <= {"pass", "n/a"}
    assert [r["check"] for r in report["results"] if r["status"] == "n/a"] == ["video prune = mask"]

    monkeypatch.setenv("PYTHONPATH", path)  # cli_env copies the environment
    run = run_lmms_eval(tmp_path, f"internvl_{name}", "pretrained=tiny-grounder,keep_ratio=0.1,max_num=2", limit=2)
    assert run.efficiency["method"] == name and "pope_accuracy,none" in run.metrics["pope_tiny"]
    assert [s["visual_after"] for s in run.efficiency["samples"]] == [
        max(1, round(0.1 * s["visual_before"])) for s in run.efficiency["samples"]]


BROKEN = '''
import torch

from lmms_prune.api import Preset, Selector, sel


class Duplicates(Selector):
    name = "dup_select"

    def __call__(self, image, scores, n):
        idx = sel.topk(scores, n)
        return torch.cat([idx[:1], idx[:-1]])  # n indices, the first one twice


class OutOfRange(Selector):
    name = "oob_select"

    def __call__(self, image, scores, n):
        return sel.topk(scores, n) + image.num_tokens // 2


class IgnoresBudget(Selector):
    name = "greedy_select"

    def __call__(self, image, scores, n):
        return torch.arange(min(10, image.num_tokens))


class Nondeterministic(Selector):
    name = "dice_select"

    def __call__(self, image, scores, n):
        return torch.randperm(image.num_tokens)[:n].sort().values


class Undeclared(Selector):
    name = "sneaky_select"  # reads the random baseline's seed without listing it in params

    def __call__(self, image, scores, n):
        return sel.topk(scores + 0 * self.config.seed, n)


SELECTORS = (Duplicates, OutOfRange, IgnoresBudget, Nondeterministic, Undeclared)
PRESETS = tuple(Preset(s.name.split("_")[0], "broken on purpose",
                       dict(stage="llm", score="attention", selector=s.name, prune_layer=2)) for s in SELECTORS)
'''

CHECK_ALL = '''
import json, sys
from dataclasses import asdict
from lmms_prune import conformance
from lmms_prune.toy.models import build_processor, build_tiny_model

model, proc = build_tiny_model("internvl_llama"), build_processor("internvl_llama")
proc.tokenizer.padding_side = "left"
checks = ("params", "prune = mask", "budget 1", "budget N", "deterministic")  # the ones that catch these bugs
print(json.dumps({p: [asdict(r) for r in conformance.check_family(p, "internvl_llama", model=model, proc=proc,
                                                                   decode=2, checks=checks)]
                  for p in sys.argv[1:]}))
'''


@pytest.mark.cli
def test_broken_external_methods_fail_check_method_with_the_reason(tmp_path):
    module = tmp_path / "broken_methods.py"
    module.write_text(BROKEN)
    done = _python(["-c", CHECK_ALL, "dup", "oob", "greedy", "dice", "sneaky"], _env(LMMS_PRUNE_METHODS=str(module)))
    assert done.returncode == 0, done.stderr[-3000:]
    results = {p: {r["check"]: r for r in rs} for p, rs in json.loads(done.stdout.splitlines()[-1]).items()}

    def failed(preset, check, reason):
        r = results[preset][check]
        assert r["status"] == "fail" and reason in r["reason"], (preset, check, r)

    failed("dup", "budget N", "duplicate indices")
    failed("dup", "prune = mask", "duplicate indices")
    failed("oob", "prune = mask", "out of bounds")
    failed("greedy", "budget 1", "kept 10, not 1")
    failed("greedy", "budget N", "kept 10, not 256")
    failed("dice", "deterministic", "a second run kept other tokens")
    failed("dice", "prune = mask", "kept sets differ between prune and mask mode")
    failed("sneaky", "params", "its plug-ins read seed without declaring it")
    for preset in ("greedy", "dice"):  # what they get right still passes
        assert results[preset]["params"]["status"] == "pass"
    assert {r["status"] for c, r in results["sneaky"].items() if c != "params"} <= {"pass", "n/a"}


def _collect_with(monkeypatch, *files: Path) -> dict:
    monkeypatch.setenv(methods.ENV_VAR, os.pathsep.join(map(str, files)))
    return methods._collect()


def test_a_clash_with_a_builtin_name_is_refused_naming_both_modules(tmp_path, monkeypatch):
    cases = {
        "preset": ('PRESETS = (Preset("fastv", "mine", dict(stage="llm", selector="topk", score="attention", '
                   'prune_layer=2)),)', "preset name 'fastv'", "lmms_prune.methods.fastv"),
        "parameter": ('PARAMS = (Param("alpha", 0.5, "mine"),)', "parameter name 'alpha'", "lmms_prune.methods.d2pruner"),
        "score": ('class A(Score):\n    name = "key_norm"\nSCORES = (A,)', "score name 'key_norm'",
                  "lmms_prune.methods.dart"),
        "selector": ('class T(Selector):\n    name = "topk"\nSELECTORS = (T,)', "selector name 'topk'",
                     "lmms_prune.methods.fastv"),
    }
    for kind, (body, what, builtin) in cases.items():
        path = tmp_path / f"clash_{kind}.py"
        path.write_text("from lmms_prune.api import Param, Preset, Score, Selector\n" + body + "\n")
        with pytest.raises(ValueError) as err:
            _collect_with(monkeypatch, path)
        assert what in str(err.value) and builtin in str(err.value) and str(path) in str(err.value), str(err.value)
    # two external modules clash with each other: both named as well
    one, two = tmp_path / "mine_one.py", tmp_path / "mine_two.py"
    for path in (one, two):
        path.write_text('from lmms_prune.api import Param\nPARAMS = (Param("shared_knob", 1.0, "mine"),)\n')
    with pytest.raises(ValueError, match="shared_knob.*mine_one.*mine_two"):
        _collect_with(monkeypatch, one, two)
    # a method parameter named like a parameter every method has is refused when the config is built
    common = tmp_path / "common_clash.py"
    common.write_text('from lmms_prune.api import Param\nPARAMS = (Param("keep_ratio", 0.5, "mine"),)\n')
    done = _python(["-c", "import lmms_prune.presets"], _env(LMMS_PRUNE_METHODS=str(common),
                                                               PYTHONPATH=str(REPO)))
    assert done.returncode != 0
    assert "'keep_ratio' is declared by both lmms_prune.presets" in done.stderr and str(common) in done.stderr


def test_external_modules_register_after_the_builtins(tmp_path, monkeypatch):
    """The example method and new-method's template, named by the environment variable (a file or a module):
    their presets, scores and selectors join the built-in ones, and ORIGINS says where each came from."""
    pkg = tmp_path / "pkg"
    assert main(["new-method", "tmplcheck", "--out", str(pkg)]) == 0
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv(methods.ENV_VAR, os.pathsep.join([str(EXAMPLE), "lmms_prune_tmplcheck.method"]))
    tables = methods._collect()
    assert list(tables["PRESETS"])[-2:] == ["gridtopk", "tmplcheck"]
    assert set(methods.PRESETS) < set(tables["PRESETS"])  # every built-in is still there
    assert str(EXAMPLE) in tables["ORIGINS"]["selector", "gridtopk"]
    assert tables["ORIGINS"]["score", "tmplcheck_score"].startswith("lmms_prune_tmplcheck.method")
    assert tables["ORIGINS"]["preset", "fastv"] == "lmms_prune.methods.fastv"
    assert "tmplcheck_mix" in tables["PARAMS"] and len(tables["EXTERNAL"]) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["new-method", "Bad-Name", "--out", "{tmp}/x"], "NAME='Bad-Name'"),
    (["new-method", "fastv", "--out", "{tmp}/x"], "a preset of that name exists"),
    (["new-method", "fine", "--out", "{tmp}/full"], "is not an empty folder"),
    (["check-method", "nope"], "preset 'nope': unknown"),
    (["check-method", "fastv", "--families", "internvl,qwen"], "--families 'internvl,qwen': unknown internvl, qwen"),
    (["check-method", "fastv", "--param", "keep_ratio"], "expected KEY=VALUE"),
    (["check-method", "fastv", "--param", "bogus=1"], "unknown pruning parameter(s) bogus"),
])
def test_bad_input_is_refused_before_anything_runs(tmp_path, capsys, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_generated_readme_and_test_name_the_method(tmp_path):
    files = new_method.files("my_method")
    assert '"lmms_prune.methods"]\nmy_method = "lmms_prune_my_method.method"' in files["pyproject.toml"]
    assert "check-method" in files["tests/test_my_method.py"] and "internvl_my_method" in files["README.md"]
    assert textwrap.dedent(files["lmms_prune_my_method/method.py"]).count("class ") == 2
