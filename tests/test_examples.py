"""Smoke tests of the examples: a few steps of each at the --quick setting, in a temporary folder.

Each checks that the training loss falls and that the CSV (and, when matplotlib is installed, the
PNG) outputs are written.
"""

import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_example(script, out, *args, env=None):
    command = [sys.executable, str(EXAMPLES / script), "--quick", "--device", "cpu",
               "--out", str(out), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def by(rows, key):
    groups = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    return groups


def losses(rows):
    return [float(r["train_loss"]) for r in rows if not math.isnan(float(r["train_loss"]))]


def check_plot(path):
    if HAS_MATPLOTLIB:
        assert path.stat().st_size > 1000
    else:
        assert not path.exists()


def test_train_lm(tmp_path):
    run_example("train_lm.py", tmp_path, "--steps", "30", "--eval-every", "15")
    runs = by(read_csv(tmp_path / "lm_curves.csv"), "run")
    assert set(runs) == {"nce", "negative_sampling", "sampled_softmax", "full_softmax"}
    for name, rows in runs.items():
        assert [int(r["step"]) for r in rows] == [0, 15, 30]
        first, last = losses(rows)[0], losses(rows)[-1]
        assert last < first, f"{name}: training loss did not fall ({first} -> {last})"
        if name != "negative_sampling":  # its scores are not log-probabilities
            assert float(rows[-1]["val_ppl"]) < float(rows[0]["val_ppl"]), name
    # -log V bias: every model starts self-normalized.
    assert abs(float(runs["nce"][0]["log_z_mean"])) < 0.5
    summary = read_csv(tmp_path / "lm_summary.csv")
    assert [r["run"] for r in summary] == list(runs)
    assert all(float(r["tokens_per_s"]) > 0 for r in summary)
    check_plot(tmp_path / "lm_perplexity.png")


def test_word2vec(tmp_path):
    stdout = run_example("word2vec.py", tmp_path, "--steps", "60", "--eval-every", "20")
    rows = read_csv(tmp_path / "w2v_curve.csv")
    assert [int(r["step"]) for r in rows] == [0, 20, 40, 60]
    assert losses(rows)[-1] < losses(rows)[0]
    assert all(0.0 <= float(r["planted_p10"]) <= 1.0 for r in rows)
    assert "precision@10" in stdout
    assert (tmp_path / "w2v_neighbours.txt").read_text().count("\n") >= 3
    check_plot(tmp_path / "w2v_quality.png")


@pytest.mark.parametrize("script, optimizer, objectives", [
    ("train_lm.py", "row-adam", "nce,full_softmax"),  # full softmax: a dense output gradient
    ("train_lm.py", "row-adagrad", "nce"),
    ("word2vec.py", "row-sgd", None),
])
def test_row_optimizers_in_examples(tmp_path, script, optimizer, objectives):
    """--optimizer row-*: the output layer on a row optimizer; training still makes progress."""
    if script == "train_lm.py":
        run_example(script, tmp_path, "--steps", "20", "--eval-every", "10", "--objectives",
                    objectives, "--optimizer", optimizer)
        runs = by(read_csv(tmp_path / "lm_curves.csv"), "run")
        assert set(runs) == set(objectives.split(","))
        for name, rows in runs.items():
            assert {r["optimizer"] for r in rows} == {optimizer}
            assert losses(rows)[-1] < losses(rows)[0], name
            assert float(rows[-1]["val_ppl"]) < float(rows[0]["val_ppl"]), name
    else:
        run_example(script, tmp_path, "--steps", "30", "--eval-every", "10", "--optimizer",
                    optimizer)
        rows = read_csv(tmp_path / "w2v_curve.csv")
        assert {r["optimizer"] for r in rows} == {optimizer}
        assert losses(rows)[-1] < losses(rows)[0]


def test_recsys(tmp_path):
    run_example("recsys.py", tmp_path, "--steps", "40", "--eval-every", "20")
    models = by(read_csv(tmp_path / "recsys_curves.csv"), "model")
    assert set(models) == {"full_softmax", "sampled_softmax", "sampled_softmax_no_logq",
                           "in_batch", "in_batch_true_logq", "in_batch_no_logq", "mixed"}
    for name, rows in models.items():
        if name in ("in_batch", "mixed"):
            # Their log q is the estimator's, still settling over 40 steps: the loss is not
            # comparable from step to step, the recall is.
            assert float(rows[-1]["recall@10"]) > float(rows[0]["recall@10"]), name
        else:
            assert losses(rows)[-1] < losses(rows)[0], name
        assert all(0.0 <= float(r["recall@10"]) <= float(r["recall@50"]) <= 1.0 for r in rows)
    summary = by(read_csv(tmp_path / "recsys_summary.csv"), "model")
    assert "popularity" in summary
    assert all(float(summary[name][0]["epoch_s"]) > 0 for name in models)
    check_plot(tmp_path / "recsys_recall.png")


def test_recsys_with_hard_negatives_and_gbce(tmp_path):
    run_example("recsys.py", tmp_path, "--steps", "40", "--eval-every", "20", "--models",
                "sampled_softmax_hard,gbce")
    models = by(read_csv(tmp_path / "recsys_curves.csv"), "model")
    assert set(models) == {"sampled_softmax_hard", "gbce"}
    for name, rows in models.items():
        assert losses(rows)[-1] < losses(rows)[0], name
        assert float(rows[-1]["recall@10"]) > float(rows[0]["recall@10"]), name


def test_examples_run_without_matplotlib_and_tqdm(tmp_path):
    # Packages that fail to import shadow the installed ones.
    for name in ("matplotlib", "tqdm"):
        (tmp_path / "blocked" / name).mkdir(parents=True)
        (tmp_path / "blocked" / name / "__init__.py").write_text("raise ImportError('blocked')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path / "blocked"),
                                                      env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    run_example("train_lm.py", out, "--steps", "4", "--eval-every", "2", "--objectives", "nce",
                env=env)
    assert (out / "lm_curves.csv").exists()
    assert not (out / "lm_perplexity.png").exists()
