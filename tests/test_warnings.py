"""What a user sees: hypergrad passes on no warning of torch's about torch itself.

torch warns about its own deprecations from inside ``torch.func.jvp`` (``torch.jit.script``, a
``DeprecationWarning`` in torch 2.13 and a ``FutureWarning`` from 2.14) and from inside
``torch.compile``. The suite's ``filterwarnings`` ignores those (they are torch's business), so
these tests run in a fresh interpreter with every warning shown: the first ``jvp`` of a process
is the one that warns.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import hypergrad as hg
from hypergrad._engine.notices import torch_notices_hidden

FORWARD_CALL = """
import torch
import hypergrad as hg

loss = lambda p, a, x: ((p["w"] - a * x) ** 2).sum()
g = hg.hypergrad(lambda p, a, y: (p["w"] ** 2).sum(), loss, {"w": torch.ones(2)},
                 hg.optim.adam(lr=0.1), torch.ones(3, 2), None, aux=torch.tensor(0.5),
                 method="forward", wrt=("aux", "lr"))
print("ok", float(g.aux))
"""


def run_showing_every_warning(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_forward_mode_shows_the_user_no_torch_deprecation():
    done = run_showing_every_warning(FORWARD_CALL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
    assert "Warning" not in done.stderr, done.stderr


def test_hiding_torch_notices_keeps_the_users_and_ours():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torch_notices_hidden():
            warnings.warn_explicit("torch's", FutureWarning, "_script.py", 1, module="torch.jit")
            warnings.warn_explicit(
                "dynamo's", DeprecationWarning, "g.py", 1, module="torch._dynamo"
            )
            warnings.warn_explicit("the user's", FutureWarning, "mine.py", 1, module="mine")
            warnings.warn_explicit("a torchvision", FutureWarning, "v.py", 1, module="torchvision")
            warnings.warn("ours", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["the user's", "a torchvision", "ours"]


def test_the_unused_aux_warning_still_reaches_the_user():
    inner = lambda p, a, x: ((p["w"] - x) ** 2).sum()  # noqa: E731  (aux["unused"] is unused)
    outer = lambda p, a, y: (p["w"] ** 2).sum()  # noqa: E731
    with pytest.warns(UserWarning, match=r"aux\['unused'\] does not affect the outer loss"):
        hg.hypergrad(outer, inner, {"w": torch.ones(1)}, hg.optim.sgd(lr=0.1),
                     torch.ones(2, 1), None, aux={"unused": torch.ones(1)})  # fmt: skip


def test_the_readme_example_prints_what_it_says_and_nothing_else():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"^```python\n(.*?)^```", readme, re.M | re.S).group(1)
    done = run_showing_every_warning(code)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # no warning of torch's, none of ours
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and re.fullmatch(
        r"val loss [0-9.]+  d/d strength -?[0-9.]+  d/d lr -?[0-9.]+", lines[0]
    ), done.stdout
    for line, name in zip(lines[1:], ("strength", "lr")):  # both derivatives, checked
        assert re.fullmatch(
            rf"d/d {name}: matches central finite differences \(relative error [0-9.e+-]+\)", line
        ), line
