"""Sequential recommendation (SASRec-style) on real interaction data: sampled losses against full
softmax, measured the way papers measure it (leave-one-out, full ranking over every item).

The model is SASRec's (Kang & McAuley 2018): item embeddings plus learned positions, 2 blocks of
causal self-attention, dropout, and the item embeddings shared as the output layer. Every position
of a user's training sequence predicts the next item. The output layer is trained by one of

* ``full``: ``F.cross_entropy`` over every item (the baseline);
* ``sampled_softmax``: ``fused_nce.sampled_softmax_loss`` with logQ correction, uniform or
  popularity noise, per-example negatives, or shared ones (``--shared``), optionally one shared
  set per block of rows (``--shared-sets S``);
* ``negative_sampling``: binary cross-entropy with k negatives (SASRec's own loss at k = 1);
* ``gbce``: gSASRec's calibrated BCE (``--gbce-t``, uniform negatives by default);
* ``in_batch``: ``fused_nce.in_batch_softmax_loss`` over chunks of ``--in-batch-size`` positions,
  logQ from a ``fused_nce.FrequencyEstimator``.

Data (``--data PATH``, format detected): MovieLens ``ratings.dat`` (``user::item::rating::time``)
or ``u.data`` (tab-separated), RecBole ``.inter`` (a typed header), one user per line of item
ids (oldest first), or gSASRec's pre-split folder (``train/input.txt``, ``val/``, ``test/``).
Split: leave-one-out by time, each user's last item is the target, the items before it are the
training sequence and the model's input at evaluation. For the gSASRec folder, ``--protocol loo``
does that to every user's ``items[:-2]`` (the folder's training lines, and ``val/input.txt`` for
its validation users); ``--protocol exact`` trains on ``train/input.txt`` and tests its 512
validation users on their last item with input ``items[:-1]``, the published test protocol.
Evaluation scores every item for every user in chunks of users, the user's input items masked,
and prints one JSON line per evaluation (NDCG@10, Recall@10, Recall@1).

    python examples/sequential_recsys.py --data ratings.dat --loss full --seconds 600
    python examples/sequential_recsys.py --data ml1m/ --loss sampled_softmax --noise popularity \\
        --negatives 256 --shared --shared-sets 16 --csv runs.csv
    python examples/sequential_recsys.py --plot runs.csv --out plots/
    python examples/sequential_recsys.py --profile --items 100000
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import fused_nce
from _corpus import (append_csv, pick_device, plot_against_time, print_table, progress,
                     set_postfix)

LOSSES = ("full", "sampled_softmax", "negative_sampling", "gbce", "in_batch")


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

@dataclass
class SplitData:
    """Item ids are 0..num_items-1 (remapped in order of first appearance)."""

    train: List[torch.Tensor]  # per user: training sequence, oldest first (may be empty)
    eval_input: List[torch.Tensor]  # per evaluated user: the model's input (masked in ranking)
    eval_target: torch.Tensor  # int64 [E]: the item to rank
    num_items: int
    item_ids: List[str]  # original id of each item
    description: str = ""

    def counts(self) -> torch.Tensor:
        """Training interactions per item (float64)."""
        seqs = [s for s in self.train if len(s)]
        return torch.bincount(torch.cat(seqs), minlength=self.num_items).double()


def detect_format(path: Path) -> str:
    """``gsasrec``, ``movielens_dat``, ``movielens_udata``, ``recbole`` or ``sequences``."""
    if path.is_dir():
        if (path / "train" / "input.txt").exists():
            return "gsasrec"
        raise ValueError(f"{path}: a folder without train/input.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        first = next((line.strip() for line in f if line.strip()), "")
    if not first:
        raise ValueError(f"{path} is empty")
    if ":token" in first or ":float" in first:
        return "recbole"
    if "::" in first:
        return "movielens_dat"
    fields = first.split("\t")
    if len(fields) == 4 and all(_is_number(x) for x in fields):
        return "movielens_udata"
    if all(_is_number(x) for x in first.replace(",", " ").split()):
        return "sequences"
    raise ValueError(f"{path}: unknown format (first line {first[:80]!r})")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_interactions(path: Path, fmt: str) -> Dict[str, List[Tuple[float, int, str]]]:
    """``{user: [(time, line, item), ...]}`` from a MovieLens or RecBole file."""
    users: Dict[str, List[Tuple[float, int, str]]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = iter(f)
        if fmt == "recbole":
            header = [h.split(":")[0] for h in next(lines).rstrip("\n").split("\t")]
            try:
                u_col, i_col = header.index("user_id"), header.index("item_id")
            except ValueError:
                raise ValueError(f"{path}: the header needs user_id and item_id, has {header}")
            t_col = header.index("timestamp") if "timestamp" in header else None
        else:
            u_col, i_col, t_col = 0, 1, 3
        sep = "::" if fmt == "movielens_dat" else "\t"
        for number, line in enumerate(lines):
            fields = line.rstrip("\n").split(sep)
            if len(fields) <= max(u_col, i_col):
                continue
            stamp = float(fields[t_col]) if t_col is not None and t_col < len(fields) else 0.0
            users.setdefault(fields[u_col], []).append((stamp, number, fields[i_col]))
    return users


def read_sequences(path: Path) -> List[List[str]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.replace(",", " ").split() for line in f]


class ItemIndex:
    """Original item ids to 0..n-1, in order of first appearance."""

    def __init__(self) -> None:
        self.index: Dict[str, int] = {}
        self.ids: List[str] = []

    def __call__(self, items: Sequence[str]) -> torch.Tensor:
        out = []
        for item in items:
            if item not in self.index:
                self.index[item] = len(self.ids)
                self.ids.append(item)
            out.append(self.index[item])
        return torch.tensor(out, dtype=torch.long)


def leave_one_out(sequences: Sequence[Sequence[str]], description: str) -> SplitData:
    """Each user's last item is the target; the items before it train the model. Users with
    fewer than 2 items are dropped."""
    index = ItemIndex()
    seqs = [index(s) for s in sequences if len(s) >= 2]
    return SplitData(train=[s[:-1] for s in seqs], eval_input=[s[:-1] for s in seqs],
                     eval_target=torch.stack([s[-1] for s in seqs]), num_items=len(index.ids),
                     item_ids=index.ids, description=description)


def load_gsasrec(folder: Path, protocol: str) -> SplitData:
    train_lines = read_sequences(folder / "train" / "input.txt")
    val_input = read_sequences(folder / "val" / "input.txt")
    val_output = read_sequences(folder / "val" / "output.txt")
    test_output = read_sequences(folder / "test" / "output.txt")
    # Which lines are the validation users: their training line is their val input but its last
    # item (the folder does not list them; identical lines are taken in order).
    lines_of: Dict[Tuple[str, ...], List[int]] = {}
    for user, line in enumerate(train_lines):
        lines_of.setdefault(tuple(line), []).append(user)
    val_users = []
    for inp in val_input:
        candidates = lines_of.get(tuple(inp[:-1]))
        if not candidates:
            raise ValueError(f"{folder}: a val/input.txt line matches no train/input.txt line")
        val_users.append(candidates.pop(0))
    full = list(train_lines)  # items[:-2] of every user
    for user, inp in zip(val_users, val_input):
        full[user] = inp
    if protocol == "loo":
        return leave_one_out(full, f"{folder} (loo: leave-one-out of items[:-2], all users)")
    if protocol != "exact":
        raise ValueError(f"unknown protocol {protocol!r}")
    index = ItemIndex()
    train = [index(s) for s in train_lines]
    eval_input = [index(val_input[j] + val_output[j]) for j in range(len(val_users))]
    target = torch.cat([index(test_output[u]) for u in val_users])
    return SplitData(train=train, eval_input=eval_input, eval_target=target,
                     num_items=len(index.ids), item_ids=index.ids,
                     description=f"{folder} (exact: the {len(val_users)} validation users' "
                                 "items[-1], input items[:-1])")


def load_data(path: Path, protocol: str = "loo") -> SplitData:
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gsasrec":
        return load_gsasrec(path, protocol)
    if fmt == "sequences":
        return leave_one_out(read_sequences(path), f"{path} (one user per line, leave-one-out)")
    users = read_interactions(path, fmt)
    # By time; equal times keep the file's order.
    sequences = [[item for _, _, item in sorted(events)] for events in users.values()]
    return leave_one_out(sequences, f"{path} ({fmt}, leave-one-out by time)")


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm causal self-attention and a position-wise feed-forward layer, as SASRec's
    (``F.scaled_dot_product_attention``; dropout after each sub-layer, not on the attention
    weights: half the step time of ``nn.TransformerEncoderLayer`` on a CPU)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, dim = x.shape
        q, k, v = (self.qkv(self.norm1(x)).view(b, length, 3, self.heads, dim // self.heads)
                   .permute(2, 0, 3, 1, 4))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.dropout(self.proj(attended.transpose(1, 2).reshape(b, length, dim)))
        return x + self.dropout(self.ff2(self.dropout(F.relu(self.ff1(self.norm2(x))))))


class SASRec(nn.Module):
    """Causal self-attention over the last ``max_len`` items; item ``num_items`` is padding
    (left padding: a position attends to itself and earlier ones only, so the padding before a
    user's first item is all it can see of the padding)."""

    def __init__(self, num_items: int, dim: int = 64, max_len: int = 200, blocks: int = 2,
                 heads: int = 1, dropout: float = 0.2):
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.items = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        self.positions = nn.Embedding(max_len, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, dropout) for _ in range(blocks)))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.items.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.items.weight[num_items].zero_()

    @property
    def output_weight(self) -> torch.Tensor:
        """``[num_items, D]``: the shared item embeddings, padding row excluded."""
        return self.items.weight[:self.num_items]

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` item ids (left-padded with ``num_items``) -> ``[B, L, D]``."""
        length = seq.shape[1]
        x = self.items(seq) * math.sqrt(self.items.embedding_dim)
        x = self.dropout(x + self.positions.weight[self.max_len - length:])
        x = x.masked_fill((seq == self.num_items)[..., None], 0.0)
        return self.norm(self.blocks(x))


def left_pad(seqs: Sequence[torch.Tensor], length: int, pad: int) -> torch.Tensor:
    out = torch.full((len(seqs), length), pad, dtype=torch.long)
    for row, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[row, length - len(s):] = s
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(score: Callable[[torch.Tensor], torch.Tensor], data: SplitData,
             device: torch.device, max_len: int, chunk: int = 512) -> dict:
    """NDCG@10, Recall@10, Recall@1 of each target among all items, the user's input items
    masked. ``score(padded_inputs)`` gives ``[chunk, items]``: no larger matrix is ever held."""
    n = len(data.eval_target)
    ndcg = recall10 = recall1 = 0.0
    for start in range(0, n, chunk):
        inputs = data.eval_input[start:start + chunk]
        padded = left_pad(inputs, max_len, data.num_items).to(device)
        scores = score(padded).float()
        # Every input item is masked, also those older than the model's window.
        lengths = torch.tensor([len(s) for s in inputs])
        user_rows = torch.repeat_interleave(torch.arange(len(inputs)), lengths)
        seen = torch.zeros(len(inputs), data.num_items, dtype=torch.bool, device=device)
        if len(user_rows):
            seen[user_rows.to(device), torch.cat(list(inputs)).to(device)] = True
        scores = scores.masked_fill(seen, -math.inf)
        target = data.eval_target[start:start + chunk].to(device)
        rank = (scores > scores.gather(1, target[:, None])).sum(1).double()
        ndcg += float(torch.where(rank < 10, 1.0 / torch.log2(rank + 2.0), 0.0).sum())
        recall10 += float((rank < 10).sum())
        recall1 += float((rank < 1).sum())
    return {"ndcg10": ndcg / n, "recall10": recall10 / n, "recall1": recall1 / n}


def most_popular(data: SplitData, device: torch.device, max_len: int) -> dict:
    counts = data.counts().float().to(device)
    return evaluate(lambda padded: counts.expand(len(padded), -1), data, device, max_len)


def model_scores(model: SASRec) -> Callable[[torch.Tensor], torch.Tensor]:
    def score(padded: torch.Tensor) -> torch.Tensor:
        return model(padded)[:, -1] @ model.output_weight.T
    return score


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

class OutputLoss:
    """The training loss of ``--loss`` over rows ``hidden [N, D]`` with targets ``[N]``."""

    def __init__(self, args: argparse.Namespace, counts: torch.Tensor, device: torch.device):
        self.args = args
        num_items = len(counts)
        weights = (fused_nce.unigram_weights(counts, power=1.0) if args.noise == "popularity"
                   else torch.ones(num_items))
        self.noise = fused_nce.AliasSampler(weights, device=device)
        self.estimator = (fused_nce.FrequencyEstimator(2 ** 16, alpha=0.01).to(device)
                          if args.loss == "in_batch" else None)
        self.generator = torch.Generator(device).manual_seed(args.seed)

    def __call__(self, hidden: torch.Tensor, weight: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
        args = self.args
        if args.loss == "full":
            return F.cross_entropy(hidden @ weight.T, target)
        if args.loss == "in_batch":  # chunks of shuffled rows, each its own in-batch softmax
            order = torch.randperm(len(target), generator=self.generator,
                                   device=target.device)
            total = hidden.new_zeros(())
            for rows in order.split(args.in_batch_size):
                ids = target[rows]
                self.estimator.update(ids)
                total = total + fused_nce.in_batch_softmax_loss(
                    hidden[rows], weight[ids], ids, log_q=self.estimator.log_expected_count(ids),
                    reduction="sum")
            return total / len(target)
        fn = {"sampled_softmax": fused_nce.sampled_softmax_loss,
              "negative_sampling": fused_nce.negative_sampling_loss,
              "gbce": fused_nce.gbce_loss}[args.loss]
        extra = {"t": args.gbce_t} if args.loss == "gbce" else {}
        common = dict(num_negatives=args.negatives, generator=self.generator,
                      remove_accidental_hits=True, **extra)
        if not args.shared or args.shared_sets <= 1:
            return fn(hidden, weight, None, target, self.noise, shared_negatives=args.shared,
                      **common)
        # Several independent shared sets: the rows split into blocks, each with its own draw.
        total = hidden.new_zeros(())
        for h, t in zip(hidden.chunk(args.shared_sets), target.chunk(args.shared_sets)):
            total = total + fn(h, weight, None, t, self.noise, shared_negatives=True,
                               reduction="sum", **common)
        return total / len(target)


def run_label(args: argparse.Namespace) -> str:
    if args.name:
        return args.name
    if args.loss == "full":
        return "full softmax"
    if args.loss == "in_batch":
        return f"in-batch softmax, logQ, chunks of {args.in_batch_size}"
    label = f"{args.loss} {args.noise} k={args.negatives}"
    if args.loss == "gbce":
        label += f" t={args.gbce_t}"
    if args.shared:
        label += " shared" + (f" x{args.shared_sets} sets" if args.shared_sets > 1 else "")
    return label


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def train(args: argparse.Namespace, data: SplitData, device: torch.device) -> List[dict]:
    """Trains until ``--seconds`` of training steps or ``--epochs``; returns the evaluations."""
    torch.manual_seed(args.seed)
    model = SASRec(data.num_items, args.dim, args.max_len, args.blocks, args.heads,
                   args.dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    loss_fn = OutputLoss(args, data.counts(), device)
    users = [u for u, s in enumerate(data.train) if len(s) >= 2]
    # Training windows: the last max_len + 1 items of each user's training sequence.
    windows = left_pad([data.train[u] for u in users], args.max_len + 1, data.num_items)
    order_gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(users) / args.batch_size)
    label, rows, step_s = run_label(args), [], []
    train_s, step, next_eval = 0.0, 0, args.eval_every

    def record() -> None:
        model.eval()
        row = {"run": label, "loss": args.loss, "epoch": round(step / steps_per_epoch, 3),
               "step": step, "train_seconds": round(train_s, 2),
               "step_ms": round(1000 * statistics.median(step_s), 1) if step_s else None,
               **{k: round(v, 5) for k, v in evaluate(model_scores(model), data, device,
                                                      args.max_len).items()}}
        model.train()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.csv:
            append_csv(args.csv, [row])

    max_steps = args.epochs * steps_per_epoch if args.epochs else None
    bar = progress(range(max_steps) if max_steps else iter(int, 1), desc=label, unit="step",
                   total=max_steps, leave=False)
    model.train()
    done = False
    for _ in bar:
        if step % steps_per_epoch == 0:
            batches = torch.randperm(len(users), generator=order_gen).split(args.batch_size)
        window = windows[batches[step % steps_per_epoch]].to(device)
        start = time.perf_counter()
        inputs, targets = window[:, :-1], window[:, 1:]
        hidden = model(inputs)
        valid = (targets != data.num_items) & (inputs != data.num_items)
        loss = loss_fn(hidden[valid], model.output_weight, targets[valid])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        step_s.append(elapsed)
        train_s += elapsed
        step += 1
        set_postfix(bar, loss=f"{loss.item():.3f}")
        done = (args.seconds is not None and train_s >= args.seconds) or step == max_steps
        if done or train_s >= next_eval:
            record()
            next_eval = train_s + args.eval_every
        if done:
            break
    return rows


# ----------------------------------------------------------------------------------------------
# Profile: the loss layer's share of a step, and sampled vs full softmax at a large catalogue
# ----------------------------------------------------------------------------------------------

def profile(args: argparse.Namespace, device: torch.device, num_items: int, batch: int,
            repeats: int = 5) -> List[dict]:
    """Per objective: the median step (forward + backward + Adam) and the median time of the
    loss layer alone (its forward + backward on the same hidden rows), on random sequences of
    full length over ``num_items`` items."""
    torch.manual_seed(args.seed)
    model = SASRec(num_items, args.dim, args.max_len, args.blocks, args.heads,
                   args.dropout).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    counts = 1.0 / (torch.arange(num_items, dtype=torch.float64) + 1.0)  # Zipfian popularity
    window = torch.multinomial(counts, batch * (args.max_len + 1), replacement=True)
    window = window.view(batch, args.max_len + 1).to(device)
    settings = [("full", {}), ("sampled_softmax", dict(noise="popularity")),
                ("sampled_softmax", dict(noise="popularity", shared=True)),
                ("sampled_softmax", dict(noise="popularity", shared=True, shared_sets=16)),
                ("negative_sampling", dict(negatives=1, noise="uniform")),
                ("gbce", dict(noise="uniform")), ("in_batch", {})]
    rows = []
    for loss_name, overrides in settings:
        run_args = argparse.Namespace(**{**vars(args), "loss": loss_name, "name": None,
                                         "shared": False, "shared_sets": 1, **overrides})
        loss_fn = OutputLoss(run_args, counts, device)
        step_times, loss_times = [], []
        for i in range(repeats + 1):
            start = time.perf_counter()
            hidden = model(window[:, :-1]).flatten(0, 1)
            loss = loss_fn(hidden, model.output_weight, window[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step = time.perf_counter() - start
            detached = hidden.detach().requires_grad_()
            start = time.perf_counter()
            loss_fn(detached, model.output_weight, window[:, 1:].flatten()).backward()
            layer = time.perf_counter() - start
            if i:  # the first is a warm-up
                step_times.append(step)
                loss_times.append(layer)
        step_ms = 1000 * statistics.median(step_times)
        loss_ms = 1000 * statistics.median(loss_times)
        rows.append({"items": num_items, "rows": batch * args.max_len,
                     "objective": run_label(run_args), "step_ms": round(step_ms, 1),
                     "loss_ms": round(loss_ms, 1), "loss_share": round(loss_ms / step_ms, 3)})
        print(json.dumps(rows[-1]), flush=True)
    full = rows[0]["step_ms"]
    for row in rows:
        row["full_step_over_this"] = round(full / row["step_ms"], 2)
    return rows


# ----------------------------------------------------------------------------------------------
# Plot and summary of several runs
# ----------------------------------------------------------------------------------------------

def read_runs(paths: Sequence[Path]) -> List[dict]:
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for key in ("epoch", "train_seconds", "ndcg10", "recall10", "recall1", "step_ms"):
                    row[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
                rows.append(row)
    return rows


def at_epoch(curve: Sequence[dict], epoch: float) -> float:
    """NDCG@10 at ``epoch``, linear between evaluations (from 0 at epoch 0); nan past the end."""
    points = [(0.0, 0.0)] + [(r["epoch"], r["ndcg10"]) for r in curve]
    for (e0, v0), (e1, v1) in zip(points, points[1:]):
        if e0 <= epoch <= e1:
            return v0 + (v1 - v0) * (epoch - e0) / (e1 - e0) if e1 > e0 else v1
    return math.nan


def summarize(rows: Sequence[dict], epoch: Optional[float] = None) -> List[dict]:
    """Per run: the last evaluation, the training time at which NDCG@10 first reached 95% of
    that final value, and (``epoch``) NDCG@10 interpolated at that epoch."""
    out = []
    for name in dict.fromkeys(r["run"] for r in rows):
        curve = [r for r in rows if r["run"] == name]
        last = curve[-1]
        reach = next(r["train_seconds"] for r in curve if r["ndcg10"] >= 0.95 * last["ndcg10"])
        out.append({"run": name, "ndcg10": last["ndcg10"], "recall10": last["recall10"],
                    "recall1": last["recall1"], "epochs": last["epoch"],
                    "train_s": last["train_seconds"], "s_to_95pct": reach,
                    "step_ms": last["step_ms"]})
        if epoch is not None:
            out[-1][f"ndcg10_at_epoch_{epoch:g}"] = at_epoch(curve, epoch)
    return out


def plot_runs(paths: Sequence[Path], out: Path, baseline: Optional[float] = None,
              epoch: Optional[float] = None) -> None:
    rows = read_runs(paths)
    summary = summarize(rows, epoch)
    print_table(summary, list(summary[0]))
    curves = [{"run": r["run"], "step": 1, "train_s": r["train_seconds"], "ndcg10": r["ndcg10"]}
              for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    plot_against_time(curves, "run", "ndcg10", "NDCG@10 (full ranking)",
                      out / "sequential_recsys_ndcg.png",
                      reference=(baseline, "most popular") if baseline else None)


# ----------------------------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, help="interaction file or gSASRec folder")
    p.add_argument("--protocol", choices=("loo", "exact"), default="loo",
                   help="gSASRec folder only (see the module docstring)")
    p.add_argument("--loss", choices=LOSSES, default="sampled_softmax")
    p.add_argument("--negatives", type=int, default=256, help="k")
    p.add_argument("--noise", choices=("uniform", "popularity"), default="popularity")
    p.add_argument("--shared", action="store_true", help="shared negatives per batch")
    p.add_argument("--shared-sets", type=int, default=1,
                   help="with --shared: S independent shared sets, one per block of rows")
    p.add_argument("--gbce-t", type=float, default=0.75)
    p.add_argument("--in-batch-size", type=int, default=512,
                   help="in_batch: positions per in-batch softmax")
    p.add_argument("--seconds", type=float, help="budget of training time (evaluations excluded)")
    p.add_argument("--epochs", type=int, help="budget of epochs (one pass over the users)")
    p.add_argument("--eval-every", type=float, default=30.0, help="seconds of training")
    p.add_argument("--batch-size", type=int, default=128, help="users per step")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--name", help="run label (default: from the loss settings)")
    p.add_argument("--csv", type=Path, help="append each evaluation to this CSV")
    p.add_argument("--plot", type=Path, nargs="+", metavar="CSV",
                   help="plot and summarize the runs in these CSVs instead of training")
    p.add_argument("--baseline", type=float, help="--plot: most-popular NDCG@10 to draw")
    p.add_argument("--at-epoch", type=float,
                   help="--plot: also each run's NDCG@10 at this epoch (interpolated)")
    p.add_argument("--profile", action="store_true",
                   help="time one step per objective on random sequences instead of training")
    p.add_argument("--items", type=int, default=3416, help="--profile: catalogue size")
    p.add_argument("--profile-batch", type=int, default=16, help="--profile: users per step")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = p.parse_args(argv)
    if not (args.plot or args.profile or args.data):
        p.error("--data is required (or --plot / --profile)")
    if args.seconds is None and args.epochs is None and not (args.plot or args.profile):
        args.epochs = 10
    return args


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:
        plot_runs(args.plot, args.out, args.baseline, args.at_epoch)
        return []
    device = pick_device(args.device)
    if args.profile:
        rows = profile(args, device, args.items, args.profile_batch)
        if args.csv:
            append_csv(args.csv, rows)
        return rows
    data = load_data(args.data, args.protocol)
    popular = most_popular(data, device, args.max_len)
    print(f"{data.description}: {len(data.train):,} users, {data.num_items:,} items, "
          f"{sum(len(s) for s in data.train):,} training interactions, "
          f"{len(data.eval_target):,} evaluated; device {device}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    print(json.dumps({"run": "most popular", **{k: round(v, 5) for k, v in popular.items()}}),
          flush=True)
    return train(args, data, device)


if __name__ == "__main__":
    main()
