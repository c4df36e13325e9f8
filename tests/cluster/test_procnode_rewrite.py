"""The process node's path rule (pure: needs no cluster)."""

from tests.cluster.support import procnode_module

rewrite = procnode_module("pods").rewrite


def test_mount_paths_are_rewritten_as_whole_paths_in_one_pass(tmp_path):
    host_file = tmp_path / "venv-python"
    host_file.write_text("")
    mapping = {"/copd": str(tmp_path / "pvc"), "/tmp": "/H/tmp", "/dev/termination-log": "/H/term"}
    assert rewrite("--storage /copd/x --report-file /dev/termination-log", mapping) == \
        f"--storage {tmp_path}/pvc/x --report-file /H/term"
    assert rewrite("/copdx/y a/tmp/b", mapping) == "/copdx/y a/tmp/b"  # not whole-path prefixes
    assert rewrite("/tmp", mapping) == "/H/tmp"
    assert rewrite("/tmp/not-there-yet", mapping) == "/H/tmp/not-there-yet"
    # a host path under a mountPath (a checkout under /tmp) is left alone, and the
    # substituted host directory (itself under /tmp here) is not rewritten again
    assert rewrite(str(host_file), mapping) == str(host_file)
    if str(tmp_path).startswith("/tmp/"):
        assert rewrite("/copd/ckpt", mapping) == f"{tmp_path}/pvc/ckpt"
