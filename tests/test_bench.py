"""bench/run_all.py --only: re-running one benchmark replaces just its section of RESULTS.md."""

from __future__ import annotations

from bench.run_all import header, replace_section


def test_replace_section_swaps_only_the_named_section() -> None:
    text = header() + "\n### Slider move\n\nold slider\n\n### Training step (batch 16)\n\nold training\n"
    text = replace_section(text, "### Training step (batch 16)\n\nnew training\n")
    text = replace_section(text, "### Slider move\n\nnew slider\n")
    assert text.count("### ") == 2 and "old" not in text
    assert text.index("new slider") < text.index("### Training step") < text.index("new training")
    assert "new slider\n\n### Training step" in text  # sections stay separated by a blank line
    text = replace_section(text, "### Server memory\n\nrss\n")  # a new section is appended
    assert text.endswith("### Server memory\n\nrss\n")


def test_the_new_rows_run_with_only() -> None:
    from pathlib import Path

    from bench.run_all import benchmarks

    assert {"startup", "slider", "photo_http", "train_step"} <= set(benchmarks(Path("weights"), quick=True))
