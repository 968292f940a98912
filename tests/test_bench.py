"""bench/run_all.py --only: re-running one benchmark replaces just its section of RESULTS.md."""

from __future__ import annotations

from bench.run_all import for_machine, header, replace_section


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

    known = set(benchmarks(Path("weights"), quick=True))
    assert {"startup", "slider", "photo_http", "train_step", "train_ab", "detect"} <= known


def test_each_kind_of_machine_keeps_its_own_sections() -> None:
    xeon = for_machine("### Slider move\n\nxeon rows\n", "Intel Xeon, bf16 units")
    epyc_old = for_machine("### Slider move\n\nold epyc rows\n", "AMD EPYC, no bf16 units")
    text = replace_section(replace_section(header(), xeon), epyc_old)
    assert text.count("### Slider move") == 2
    text = replace_section(text, for_machine("### Slider move\n\nnew epyc rows\n", "AMD EPYC, no bf16 units"))
    assert "xeon rows" in text and "new epyc rows" in text and "old epyc rows" not in text
    assert text.count("### Slider move") == 2


def test_a_title_that_only_begins_another_is_another_section() -> None:
    text = replace_section(header(), for_machine("### Slider move\n\nepyc rows\n", "AMD EPYC"))
    text = replace_section(text, "### Slider move\n\nrows of an untitled machine\n")
    assert "epyc rows" in text and "rows of an untitled machine" in text


def test_the_interleaved_training_bench_times_each_tree_in_turn() -> None:
    from bench.common import ROOT
    from bench.train_ab import compare

    tiny = {"disc_preset": "discriminator-tiny"}
    result = compare({"a": ROOT, "b": ROOT}, "stgan-tiny", rounds=3, steps=1, batch=4, size=32, overrides=tiny)
    assert list(result) == ["a", "b"]
    for timings in result.values():
        assert len(timings.seconds) == 3 and all(t > 0 for t in timings.seconds)
        assert timings.precision in ("fp32", "bf16")
    assert result["a"].flops == result["b"].flops > 0  # the same code counts the same step
