"""bench/run_all.py --only: re-running one benchmark replaces just its section of RESULTS.md."""

from __future__ import annotations

import os
import re
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.common import ROOT
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
    assert {
        "startup",
        "slider",
        "photo_http",
        "train_step",
        "train_ab",
        "detect",
        "r1_precision",
        "g_precision",
        "cuda",
    } <= known


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
    from bench.train_ab import compare

    tiny = {"disc_preset": "discriminator-tiny"}
    trees = {"a": ROOT, "b": ROOT, "c": ROOT}
    recipe = {"c": {"rec_fraction": 0.5}}  # c's config only
    result = compare(trees, "stgan-tiny", rounds=3, steps=1, batch=4, size=32, overrides=tiny, tree_overrides=recipe)
    assert list(result) == ["a", "b", "c"]
    for timings in result.values():
        assert len(timings.seconds) == 3 and all(t > 0 for t in timings.seconds)
        assert timings.precision in ("fp32", "bf16")
    assert result["a"].flops == result["b"].flops > 0  # the same code counts the same step
    assert result["c"].flops < 0.9 * result["a"].flops  # half the batch reconstructed


def test_the_per_round_speedup_pairs_turns_of_one_round() -> None:
    from bench.train_ab import per_round_speedup

    # the new code is twice as fast in four rounds of five, but the VM slowed down while the old code's turns
    # were mostly fast and the new code's mostly slow: the ratio of the medians says 0.67x, the rounds 2x
    old, new = [1.0, 1.0, 1.0, 3.0, 3.0], [0.5, 0.5, 2.5, 1.5, 1.5]
    assert statistics.median(old) / statistics.median(new) == pytest.approx(2 / 3)
    assert per_round_speedup(old, new) == 2.0 and per_round_speedup(new, old) == 0.5
    assert per_round_speedup([2.0, 1.0, 4.0], [1.0, 1.0, 1.0]) == 2.0  # odd count: the middle ratio


TINY_TRAINING = (("stgan-tiny", {"disc_preset": "discriminator-tiny"}),)


def tiny_cuda_bench(weights: Path, out: Path | None = None, photos: tuple[Path, ...] = ()) -> str:
    """bench/gpu.py's run on the CPU with tiny models: every part, a few repeats."""
    from bench import gpu

    return gpu.run(
        weights,
        torch.device("cpu"),
        repeats=2,
        seconds=0.3,
        clients=(1, 3),
        train_steps=1,
        train_batches=(2,),
        train_presets=TINY_TRAINING,
        train_size=32,
        compiled=False,
        photos=photos,
        photo_runs=(1, 2),
        out=out,
    )


def table_rows(doc: str, title: str) -> list[list[str]]:
    """The body rows of the Markdown table under ``title`` (cells stripped)."""
    block = doc.split(title, 1)[1].split("\n#", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("| ")][1:]  # without the header
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_the_cuda_bench_measures_every_part_and_compares_with_the_cpu(tmp_path: Path) -> None:
    from bench.common import EDIT_SETUPS, machine_kind
    from tests.server_utils import PHOTOS, make_weights

    weights = make_weights(tmp_path / "weights", generators=("stgan-tiny", "mugan-tiny"))
    out = tmp_path / "cuda.md"
    doc = tiny_cuda_bench(weights, out, photos=(PHOTOS / "group-six-faces.jpg",))
    assert "failed" not in doc.replace("| failed |", "")
    decoder = table_rows(doc, "#### Decoder on the device")
    assert sorted({(r[0], r[1]) for r in decoder}) == [("mugan", "1"), ("mugan", "16"), ("stgan", "1"), ("stgan", "16")]
    assert all(float(r[4]) > 0 for r in decoder)
    # the CPU against itself: identical in fp32; bf16 rows (a CPU with bf16 units) near it
    assert all(float(r[6]) == 0.0 for r in decoder if r[2] == "fp32") and any(r[2] == "fp32" for r in decoder)
    assert all(0.0 < float(r[6]) < 0.1 for r in decoder if r[2] == "bf16")
    edits = table_rows(doc, "#### The edit path on the device")
    assert [(r[0], r[1]) for r in edits] == [(label, n) for label, _, _ in EDIT_SETUPS for n in ("1", "3")]
    assert all(float(r[2]) > 0 and r[4] == "0" for r in edits)  # edits/s measured, none failed
    # the CPU against itself in fp32: identical; where the CPU has bf16 units the precision trial may serve the
    # tiny model in bf16 (its speed-up is noise at this size), and then the edit is near the fp32 one
    served = re.search(r"Default model \w+ \((\w+)\).*largest pixel difference (\d+) of 255", doc)
    assert served is not None
    assert int(served[2]) == 0 if served[1] == "fp32" else int(served[2]) <= 12  # bf16_tolerance 0.08 of [-1, 1]
    photos = table_rows(doc, "#### Whole photos on the device")
    assert [r[:2] for r in photos] == [
        ["group-six-faces.jpg", "first request"],
        ["group-six-faces.jpg", "again (cache hit)"],
    ]
    assert "detect" in photos[0][4] and "detect" not in photos[1][4]  # the second request hit the cache
    # the whole photo against the CPU's edit: identical, unless one of the two services' precision trials
    # chose bf16 (a CPU with bf16 units; the tiny model's speed-up is noise), then within bf16's tolerance
    from models.precision import cpu_has_bf16_units

    photo = re.search(r"group-six-faces\.jpg: 6 faces \(CPU 6\), largest pixel difference (\d+)", doc)
    assert photo is not None
    assert int(photo[1]) <= (12 if cpu_has_bf16_units() else 0)
    training = table_rows(doc, "#### Training step on the device")
    from bench.gpu import precisions_for

    want_precisions = list(precisions_for(torch.device("cpu")))  # bf16 too where the CPU has bf16 units
    assert [(r[0], r[1], r[2]) for r in training] == [("stgan-tiny", "2", p) for p in want_precisions]
    assert all(float(r[3]) > 0 for r in training)
    # the file is the RESULTS.md section, titled with the machine's kind as run_all titles it
    assert out.read_text().splitlines()[0] == f"### CUDA paths — {machine_kind()}"


def test_a_part_of_the_cuda_bench_that_fails_is_written_down_and_the_rest_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import gpu
    from tests.server_utils import make_weights

    def broken(*args: object, **kwargs: object) -> str:
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(gpu, "edit_path_section", broken)
    weights = make_weights(tmp_path / "weights")
    out = tmp_path / "cuda.md"
    doc = tiny_cuda_bench(weights, out)
    assert "#### edit path: failed" in doc and "no kernel image is available" in doc
    assert table_rows(doc, "#### Decoder on the device") and table_rows(doc, "#### Training step on the device")
    assert out.read_text().endswith(doc.split("\n", 1)[1])  # written after the last part too


def test_the_cuda_bench_times_the_servers_compiled_decoder_of_each_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.compiled
    from bench import gpu
    from tests.server_utils import make_weights

    built: list[str] = []

    def eager_stand_in(served: Any, *args: Any) -> Any:  # the compile itself is tested in test_compiled.py
        built.append(served.name)
        return served.net.decode

    monkeypatch.setattr(server.compiled, "build_compiled_decoder", eager_stand_in)
    weights = make_weights(tmp_path / "weights", generators=("stgan-tiny", "mugan-tiny"))
    rows = table_rows(gpu.compiled_section(weights, torch.device("cpu"), repeats=2), "#### Compiled decoder")
    assert built == ["mugan", "stgan"] and [r[0] for r in rows] == built
    assert all(r[3].startswith("compiled in") and float(r[4]) > 0 for r in rows)


@pytest.mark.slow
def test_the_gpu_machines_command_logs_its_versions_and_writes_the_section(tmp_path: Path) -> None:
    """``bash bench/gpu.sh run`` (what the device tool runs) on the CPU: the log names the versions the rows
    were measured with before the bench's output, and the section is written beside it."""
    import subprocess
    import sys

    from tests.server_utils import make_weights

    weights = make_weights(tmp_path / "weights")
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    args = ["run", "--device", "cpu", "--quick", "--weights", str(weights), "--photos"]
    done = subprocess.run(["bash", "bench/gpu.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (tmp_path / "gpu.log").read_text().splitlines()
    versions = next(line for line in log if line.startswith("python "))  # after nvidia-smi's lines, where present
    assert f"torch {torch.__version__}" in versions and "scikit-image" in versions
    assert log.index(versions) < next(i for i, line in enumerate(log) if " INFO " in line)
    section = (tmp_path / "cuda.md").read_text()
    assert section.startswith("### CUDA paths") and "failed" not in section.replace("| failed |", "")
    assert table_rows(section, "#### Training step on the device")
