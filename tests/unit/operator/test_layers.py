import subprocess
import sys

from tests import ROOT


def test_operator_never_imports_torch():
    code = ("import sys; import copd_operator.main, copd_operator.handlers, copd_operator.reconcile, "
            "copd_operator.crd; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'operator'}", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
