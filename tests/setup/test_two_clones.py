"""Two clones on one machine, each set up with the README's command, each run their own code.

A second clone of this repository is set up next to this one (COPD_SKIP_CLUSTER_BUILD=1: the
Go binaries are shared and hold no code of ours), twice at the same time to show that set-up is
safe to race. Then each clone's `copd`, `copd-operator` and `make lint` must import that clone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import ROOT

PROBE = ("import json, copd_core, copd_runtime, copd_operator; "
         "print(json.dumps([m.__file__ for m in (copd_core, copd_runtime, copd_operator)]))")


def modules_of(clone: Path) -> list[Path]:
    out = subprocess.run([str(clone / ".venv/bin/python"), "-c", PROBE], capture_output=True, text=True,
                         check=True, cwd="/", env={"PATH": "/usr/bin:/bin"}).stdout
    return [Path(p).resolve() for p in json.loads(out)]


def entry_point_python(clone: Path, script: str) -> Path:
    return Path((clone / ".venv/bin" / script).read_text().splitlines()[0].removeprefix("#!"))


@pytest.mark.slow
def test_two_clones_each_run_their_own_code(tmp_path):
    other = tmp_path / "clone-b"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(other)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_PROJECT", "PYTHONPATH"))}
    env["COPD_SKIP_CLUSTER_BUILD"] = "1"
    setups = [subprocess.Popen(["scripts/setup.sh"], cwd=other, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for p in setups:  # two set-ups of one clone at once: both succeed
        out, _ = p.communicate(timeout=900)
        assert p.returncode == 0, out
    try:
        assert (other / ".venv").is_dir() and not (other / ".venv").is_symlink()
        for clone in (ROOT, other):
            for path in modules_of(clone):
                assert path.is_relative_to(clone.resolve()), f"{clone}: imports {path}"
            for script in ("copd", "copd-operator"):
                assert entry_point_python(clone, script).is_relative_to(clone / ".venv"), (clone, script)
            subprocess.run([str(clone / ".venv/bin/copd"), "validate", "examples/copdrun.yaml"], cwd=clone,
                           check=True, capture_output=True)
            subprocess.run([str(clone / ".venv/bin/copd-operator"), "--help"], cwd=clone, check=True,
                           capture_output=True)
        # setting up B did not move A: A still imports A
        assert all(p.is_relative_to(ROOT.resolve()) for p in modules_of(ROOT))
        lint = subprocess.run(["make", "--no-print-directory", "lint"], cwd=other, env=env, capture_output=True,
                              text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        shutil.rmtree(other, ignore_errors=True)
