"""examples/sequential_recsys.py: the loaders read every supported format back to the same
sequences, and a few seconds of training rank far better than most-popular.

The data are synthetic (a Markov chain over items: each item mostly leads to one fixed next
item), written in each format to a temporary folder.
"""

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import sequential_recsys as sr  # noqa: E402


def synthetic_sequences(num_users=300, num_items=120, seed=0):
    """Per user a list of item ids (strings, no repeats): item i is followed by succ[i] with
    probability 0.85, else by a random unseen item."""
    rng = random.Random(seed)
    succ = list(range(num_items))
    rng.shuffle(succ)
    users = []
    for _ in range(num_users):
        length = rng.randint(8, 25)
        seq = [rng.randrange(num_items)]
        while len(seq) < length:
            nxt = succ[seq[-1]]
            if rng.random() > 0.85 or nxt in seq:
                nxt = rng.choice([i for i in range(num_items) if i not in seq])
            seq.append(nxt)
        users.append([str(100 + i) for i in seq])
    return users


def events(users, seed=1):
    """``(user, item, rating, time)`` rows in a shuffled order (time gives the sequence order)."""
    rows = [(str(u + 1), item, 4, 1_000_000 + 10 * t)
            for u, seq in enumerate(users) for t, item in enumerate(seq)]
    random.Random(seed).shuffle(rows)
    return rows


def as_sequences(data):
    """The users' full sequences (training items + target) in original ids, as a set."""
    return {tuple(data.item_ids[i] for i in train.tolist() + [int(target)])
            for train, target in zip(data.train, data.eval_target)}


@pytest.fixture(scope="module")
def users():
    return synthetic_sequences()


@pytest.mark.parametrize("fmt", ["ratings.dat", "u.data", "ml.inter", "seqs.txt"])
def test_loaders_round_trip(tmp_path, users, fmt):
    path = tmp_path / fmt
    rows = events(users)
    if fmt == "ratings.dat":
        path.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
        expected_format = "movielens_dat"
    elif fmt == "u.data":
        path.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
        expected_format = "movielens_udata"
    elif fmt == "ml.inter":
        path.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                        + "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
        expected_format = "recbole"
    else:
        path.write_text("".join(" ".join(seq) + "\n" for seq in users))
        expected_format = "sequences"
    assert sr.detect_format(path) == expected_format
    data = sr.load_data(path)
    assert as_sequences(data) == {tuple(seq) for seq in users}
    assert data.num_items == len({i for seq in users for i in seq})
    assert all(len(inp) == len(s) for inp, s in zip(data.eval_input, data.train))


def write_gsasrec(folder, users, val_users):
    for name in ("train", "val", "test"):
        (folder / name).mkdir(parents=True)
    lines = lambda seqs: "".join(" ".join(s) + "\n" for s in seqs)  # noqa: E731
    (folder / "train" / "input.txt").write_text(
        lines(seq[:-3] if u in val_users else seq[:-2] for u, seq in enumerate(users)))
    (folder / "val" / "input.txt").write_text(lines(users[u][:-2] for u in val_users))
    (folder / "val" / "output.txt").write_text(lines(users[u][-2:-1] for u in val_users))
    (folder / "test" / "output.txt").write_text(lines(seq[-1:] for seq in users))


def test_gsasrec_folder(tmp_path, users):
    val_users = sorted(random.Random(2).sample(range(len(users)), 40))
    write_gsasrec(tmp_path / "ml", users, val_users)
    assert sr.detect_format(tmp_path / "ml") == "gsasrec"
    loo = sr.load_data(tmp_path / "ml", "loo")  # leave-one-out of every user's items[:-2]
    assert as_sequences(loo) == {tuple(seq[:-2]) for seq in users}
    exact = sr.load_data(tmp_path / "ml", "exact")
    assert len(exact.train) == len(users) and len(exact.eval_target) == len(val_users)
    for j, u in enumerate(val_users):
        assert [exact.item_ids[i] for i in exact.eval_input[j].tolist()] == users[u][:-1]
        assert exact.item_ids[int(exact.eval_target[j])] == users[u][-1]
        assert [exact.item_ids[i] for i in exact.train[u].tolist()] == users[u][:-3]


def test_evaluation_masks_history_and_ranks():
    data = sr.SplitData(train=[torch.tensor([0, 1])] * 2,
                        eval_input=[torch.tensor([0, 1]), torch.tensor([3])],
                        eval_target=torch.tensor([2, 0]), num_items=5, item_ids=list("abcde"))
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])  # item 0 best
    out = sr.evaluate(lambda padded: scores.expand(len(padded), -1), data, torch.device("cpu"),
                      max_len=4, chunk=1)
    # user 0: items 0 and 1 masked, target 2 ranks first; user 1: target 0 ranks first.
    assert out == {"ndcg10": 1.0, "recall10": 1.0, "recall1": 1.0}


@pytest.mark.parametrize("loss", [
    ["--loss", "full"],
    ["--loss", "sampled_softmax", "--negatives", "32", "--shared", "--shared-sets", "4"],
])
def test_short_run_beats_most_popular(tmp_path, users, loss, capsys):
    path = tmp_path / "seqs.txt"
    path.write_text("".join(" ".join(seq) + "\n" for seq in users))
    csv_path = tmp_path / "runs.csv"
    threads = torch.get_num_threads()
    try:  # one thread: a model this small only waits for a second one on a busy machine
        rows = sr.main(["--data", str(path), *loss, "--epochs", "10", "--dim", "32",
                        "--max-len", "32", "--batch-size", "32", "--lr", "5e-3",
                        "--dropout", "0.1", "--eval-every", "1000", "--device", "cpu",
                        "--threads", "1", "--csv", str(csv_path)])
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    popular = lines[0]
    assert popular["run"] == "most popular"
    final = rows[-1]
    assert final == lines[-1] and final["epoch"] == 10
    assert {"ndcg10", "recall10", "recall1", "train_seconds", "epoch"} <= set(final)
    assert final["ndcg10"] > max(0.3, 3 * popular["ndcg10"]), (popular, final)
    sr.main(["--plot", str(csv_path), "--out", str(tmp_path)])
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "sequential_recsys_ndcg.png").stat().st_size > 1000
