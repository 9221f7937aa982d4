"""``lmms-prune new-method NAME --out DIR``: write a small installable package holding one external method.

The package has the method module (a worked score, selector, parameter and preset written with
:mod:`lmms_prune.api`), a ``pyproject.toml`` whose entry point (group ``lmms_prune.methods``) registers it, a
README and a test that runs ``lmms-prune check-method NAME``. After ``pip install -e DIR`` the preset is
``method=NAME`` everywhere and the lmms-eval models ``<family>_NAME`` exist (``--model internvl_NAME``).
"""

from __future__ import annotations

import argparse
import keyword
import re
from pathlib import Path

NAME = re.compile(r"^[a-z][a-z0-9_]*$")

METHOD = '''"""{name}: a visual-token pruning method for lmms-prune (written from ``lmms-prune new-method``).

Score: a mix of the last prompt token's attention at layer K-1 and the L2 norm of each visual token's hidden
state at layer K's input, both min-max normalised (``{name}_mix`` weighs them). Selector: the ``n`` highest
scores, ascending. Only :mod:`lmms_prune.api` is used; nothing heavy is imported at module level (lmms-eval
reads the preset names at start-up), the tensor maths runs through ``S`` and ``sel`` on first use.
"""

from __future__ import annotations

from lmms_prune.api import Needs, Param, Preset, S, Score, Selector, sel

PARAMS = (
    Param("{name}_mix", 0.5, "{name}: weight of the attention score against the hidden-state norm", low=0.0,
          high=1.0),
)


class {cls}Score(Score):
    """``mix * minmax(A) + (1 - mix) * minmax(||h||)`` over the image's ``N`` visual tokens: ``[N]``."""

    name = "{name}_score"
    params = ("score_layer", "{name}_mix")  # every config field read: others are refused when a user sets them
    subsets = True  # works on any subset of the image's tokens (multi-stage pruning)

    @classmethod
    def needs(cls, config):
        return Needs(attention=(config.effective_score_layer,), hidden=True)

    def __call__(self, image):
        attention = image.attention[self.config.effective_score_layer].float()  # [N]
        norms = image.hidden.float().norm(dim=-1)  # [N]
        mix = self.config.{name}_mix
        return mix * S.minmax(attention) + (1 - mix) * S.minmax(norms)  # SCORE


class {cls}Select(Selector):
    """The ``n`` highest scores, as ascending indices in ``[0, N)`` (what the engine expects)."""

    name = "{name}_select"
    subsets = True

    def __call__(self, image, scores, n):
        return sel.topk(scores, n)


SCORES = ({cls}Score,)
SELECTORS = ({cls}Select,)
PRESETS = (
    Preset("{name}", "{name}: attention and hidden-state norm at layer K-1, top-k (K=2)",
           dict(stage="llm", score="{name}_score", selector="{name}_select", prune_layer=2)),
)
'''

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "{name}: a visual-token pruning method for lmms-prune"
requires-python = ">=3.10"
dependencies = ["lmms-prune"]

# lmms-prune finds the method here: the value is the method module (PARAMS, SCORES, SELECTORS, PRESETS)
[project.entry-points."lmms_prune.methods"]
{name} = "{package}.method"

[tool.setuptools]
packages = ["{package}"]
'''

README = '''# {dist}

The pruning method `{name}` for [lmms-prune](https://github.com/), as an external plug-in.

```bash
pip install -e .                              # registers the entry point lmms_prune.methods: {name}
lmms-prune methods | grep {name}              # the preset, its score, selector and parameter {name}_mix
lmms-prune check-method {name}                # the engine's proofs on every family's tiny model
python -m lmms_eval --model internvl_{name} --model_args pretrained=tiny-grounder,keep_ratio=0.1 ...
```

Without installing: `LMMS_PRUNE_METHODS=$PWD/{package}/method.py lmms-prune check-method {name}`.

Edit `{package}/method.py`: the score (`{cls}Score`), the selector (`{cls}Select`), the parameters (`PARAMS`)
and the preset (`PRESETS`). The public API is `lmms_prune.api`; its docstring lists every signal a method can
ask for through `Needs`, with its shape and layer. `pytest tests` runs `check-method` on two families.
'''

TEST = '''"""``lmms-prune check-method {name}``: the engine's proofs hold for this method (prune = mask, cache, batch,
budget, determinism, an unread parameter refused)."""

import subprocess
import sys


def test_check_method_passes():
    done = subprocess.run([sys.executable, "-m", "lmms_prune.cli.main", "check-method", "{name}",
                           "--families", "internvl_qwen2,qwen2_5_vl"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAIL" not in done.stdout
'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the method's preset name: lower-case letters, digits and '_' (e.g. mymethod)")
    parser.add_argument("--out", required=True, help="folder to write the package into (must be empty or absent)")


def files(name: str) -> dict[str, str]:
    """The package's files: relative path -> text."""
    package = f"lmms_prune_{name}"
    values = {"name": name, "package": package, "dist": f"lmms-prune-{name.replace('_', '-')}",
              "cls": "".join(part.capitalize() for part in name.split("_"))}
    return {f"{package}/__init__.py": f'"""The lmms-prune method {name} (see method.py)."""\n',
            f"{package}/method.py": METHOD.format(**values), "pyproject.toml": PYPROJECT.format(**values),
            "README.md": README.format(**values), f"tests/test_{name}.py": TEST.format(**values)}


def run(args: argparse.Namespace) -> int:
    from lmms_prune.presets import PRESETS

    name, out = args.name, Path(args.out)
    if not NAME.match(name) or keyword.iskeyword(name) or name == "prune":
        raise ValueError(f"NAME={name!r}: use lower-case letters, digits and '_', starting with a letter, not 'prune' "
                         "(it becomes the lmms-eval model internvl_NAME)")
    if name in PRESETS:
        raise ValueError(f"NAME={name!r}: a preset of that name exists already; choose another name")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r}: exists and is not an empty folder; give a new folder")
    for rel, text in files(name).items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote the method package {name!r} to {out}: pip install -e {out}; lmms-prune check-method {name}")
    return 0
