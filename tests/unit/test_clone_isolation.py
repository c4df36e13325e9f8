"""Each clone runs its own code: its ./.venv is its own, and every entry point imports this clone.

Two clones on one machine used to share one venv, so `copd`/`copd-operator` in clone A ran
whichever clone was set up last. scripts/setup.sh now syncs a venv per clone from uv.lock;
tests/cluster/test_two_clones.py checks two real clones against each other.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests import ROOT

VENV = ROOT / ".venv"
PROBE = ("import json, copd_core, copd_runtime, copd_operator; "
         "print(json.dumps({m.__name__: m.__file__ for m in (copd_core, copd_runtime, copd_operator)}))")


def test_venv_belongs_to_this_clone():
    assert VENV.is_dir() and not VENV.is_symlink(), f"{VENV} must be this clone's own venv (run make setup)"
    cfg = (VENV / "pyvenv.cfg").read_text()
    assert "uv =" in cfg, "the venv is made by uv sync from uv.lock"


def test_entry_points_import_this_clone():
    # from another directory, with no PYTHONPATH: what the installed distribution resolves to
    out = subprocess.run([str(VENV / "bin/python"), "-c", PROBE], capture_output=True, text=True, check=True,
                         cwd="/", env={"PATH": "/usr/bin:/bin"}).stdout
    for mod, path in json.loads(out).items():
        assert Path(path).resolve().is_relative_to(ROOT), f"{mod} comes from {path}, not this clone {ROOT}"
    for script in ("copd", "copd-operator", "lint-imports", "ruff"):
        exe = VENV / "bin" / script
        assert exe.exists(), exe
    shebang = (VENV / "bin/copd").read_text().splitlines()[0]
    assert shebang.startswith(f"#!{VENV}"), shebang
    shebang = (VENV / "bin/copd-operator").read_text().splitlines()[0]
    assert shebang.startswith(f"#!{VENV}"), shebang


def test_copd_help_has_no_science_harness():
    out = subprocess.run([str(VENV / "bin/copd"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "compare" not in out and "stage" in out
