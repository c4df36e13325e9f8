"""docs/science.md holds the committed comparison tables verbatim (experiments.compare.science_doc)."""

from pathlib import Path

import pytest

from experiments.compare.science_doc import BLOCK, DOC, main, render


def test_the_committed_document_includes_the_committed_tables():
    assert len(BLOCK.findall(DOC.read_text())) >= 4  # both comparisons, interference, top-k
    assert main(["--check"]) == 0


def test_a_stale_block_is_rewritten_demoted_and_a_missing_file_is_named(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "t.md").write_text("# Title\n\n| a |\n|---|\n| 1 |\n\n![p](p.png) [x](https://x.org/a)\n")
    doc = "intro\n<!-- include: out/t.md demote=2 -->\nold table\n<!-- end include -->\noutro\n"
    assert render(doc, root=tmp_path, doc_dir=".") == (
        "intro\n<!-- include: out/t.md demote=2 -->\n### Title\n\n| a |\n|---|\n| 1 |\n\n![p](out/p.png) [x](https://x.org/a)\n"
        "<!-- end include -->\noutro\n")
    with pytest.raises(FileNotFoundError, match="gone.md"):
        render("<!-- include: gone.md -->\n<!-- end include -->", root=tmp_path)
