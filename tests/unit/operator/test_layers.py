import subprocess
import sys


def test_operator_never_imports_torch():
    code = ("import sys; import copd_operator.main, copd_operator.handlers, copd_operator.reconcile, "
            "copd_operator.crd; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    # cwd=/ : the packages must come from the installed (editable) distribution, not the current directory
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "/usr/bin:/bin"}, cwd="/")
