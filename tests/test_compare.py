"""compare.py end to end on a tiny setting: every loss and seed trained, the table, the plots,
and a rerun that trains nothing again."""

import json
import shutil

import pytest

from conftest import compare


@pytest.mark.heavy
def test_table_over_seeds_and_plots(compared):
    out, stdout = compared
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["loss"], r["seed"]) for r in results["runs"]) == [
        (o, s) for o in ("ce", "focal", "mile") for s in (1, 2)]
    # every run is its own training: the seeds differ, and so do the losses
    ce = {(r["loss"], r["seed"]): r["ce"] for r in results["runs"]}
    assert len(set(ce.values())) == 6
    for loss in ("ce", "focal", "mile"):
        mean, std = results["summary"][loss]["ce"]
        values = [ce[loss, 1], ce[loss, 2]]
        assert mean == pytest.approx(sum(values) / 2) and std == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    table = (out / "results.md").read_text()
    assert table.count("\n| ") == 3 and "MiLe (gamma 1)" in table and "±" in table and table in stdout + "\n"
    for name in ("curves.png", "buckets.png", "weights.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the runs carry the setting: gamma 1, the seed, the loss
    config = json.loads((out / "focal-seed2" / "config.json").read_text())
    assert (config["loss"], config["gamma"], config["seed"], config["max_iters"]) == ("focal", 1.0, 2, 8)


def test_rerun_trains_nothing_again(compared, tmp_path):
    out = tmp_path / "compare"
    shutil.copytree(compared[0], out)  # the copy's files keep their times
    before = (out / "mile-seed1" / "ckpt.pt").stat().st_mtime_ns
    proc = compare(out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("finished before, not trained again") == 6
    assert (out / "mile-seed1" / "ckpt.pt").stat().st_mtime_ns == before


def test_bad_seeds_are_one_sentence(tmp_path):
    proc = compare(tmp_path, "--seeds=1")
    assert proc.returncode == 2 and "at least two seeds" in proc.stderr
