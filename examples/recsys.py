"""Two-tower item retrieval trained with sampled softmax and logQ correction, against full softmax.

The synthetic implicit-feedback data has a strong popularity skew: user ``u`` picks items from
``softmax(popularity_skew * log pop(i) + taste * <u, v_i> / sqrt(d))`` with Zipfian ``pop`` and
random taste vectors. One random interaction per user is held out.

The user tower mean-pools embeddings of the user's other items and passes them through an MLP;
the item tower is an embedding table, whose weight ``[items, D]`` is the output embedding of the
loss (score = dot product, as in approximate-nearest-neighbour retrieval). Models:

* ``full_softmax``: exact cross-entropy over all items (the reference);
* ``sampled_softmax``: ``k`` shared negatives drawn by popularity, logQ-corrected
  (``fused_nce.sampled_softmax_loss`` with the popularity noise);
* ``sampled_softmax_no_logq``: the same negatives without the correction (noise given as
  uniform), the popularity bias that logQ removes (Yi et al., 2019);
* ``in_batch``: in-batch softmax (``fused_nce.in_batch_softmax_loss``): every other positive
  of the batch is a negative, logQ-corrected with a streaming ``fused_nce.FrequencyEstimator``
  (Yi et al., 2019) updated with each batch's items (its log expected count per batch);
* ``in_batch_true_logq``: the same with the true log of each item's expected count in a batch
  (``log(B f_i)``, from the training frequencies);
* ``in_batch_no_logq``: the same without correction;
* ``mixed``: in-batch plus ``k`` extra negatives drawn uniformly from the catalogue (mixed
  negative sampling, Yang et al., 2020), estimator logQ for the in-batch columns and
  ``log(k / items)`` for the extras;
* ``popularity``: recommend the most popular unseen items (no training).

Two more, by ``--models``: ``sampled_softmax_hard`` adds ``--hard-negatives`` mined negatives
per example to ``sampled_softmax`` (the highest-scoring of 64 items drawn uniformly, scored by
the current model; a hard negative has no logQ term), and ``gbce`` trains with gBCE
(``fused_nce.gbce_loss``, gSASRec: ``k`` per-example negatives drawn uniformly, ``t`` =
``--gbce-t``).

Reported: recall@10 and recall@50 of the held-out item among all items the user has not seen,
and the share of top-10 recommendations that are among the 1% most popular items.

    python examples/recsys.py --quick
    python examples/recsys.py

Writes ``recsys_curves.csv``, ``recsys_summary.csv`` and ``recsys_recall.png`` to ``--out``
(``train_s``: time in training steps; ``examples_per_s``: from the median step time).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fused_nce
from _corpus import (StepLog, example_parser, fill_defaults, pick_device, plot_against_time,
                     print_table, progress, set_postfix, write_csv)

MODELS = ("full_softmax", "sampled_softmax", "sampled_softmax_no_logq", "in_batch",
          "in_batch_true_logq", "in_batch_no_logq", "mixed")
MORE_MODELS = ("sampled_softmax_hard", "gbce")


@dataclass
class Interactions:
    """Users' item histories with one held-out item each."""

    history: torch.Tensor  # int64 [U, L]: training items, padded with num_items
    lengths: torch.Tensor  # int64 [U]: number of training items (>= 2)
    held_out: torch.Tensor  # int64 [U]: the test item
    train_pairs: torch.Tensor  # int64 [P, 2]: (user, item) for every training interaction
    counts: torch.Tensor  # float64 [items]: training interactions per item
    num_items: int


def make_interactions(num_users: int, num_items: int, min_items: int, max_items: int,
                      taste_dim: int = 16, taste: float = 3.0, popularity_skew: float = 1.0,
                      seed: int = 0) -> Interactions:
    """Deterministic synthetic implicit feedback (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    log_pop = -popularity_skew * torch.log(torch.arange(num_items, dtype=torch.float64) + 1.0)
    items = torch.randn(num_items, taste_dim, generator=gen, dtype=torch.float64)
    users = torch.randn(num_users, taste_dim, generator=gen, dtype=torch.float64)
    lengths = torch.randint(min_items, max_items + 1, (num_users,), generator=gen)
    picked = []
    for chunk in torch.arange(num_users).split(1024):
        logits = log_pop + taste * users[chunk] @ items.T / math.sqrt(taste_dim)
        picked.append(torch.multinomial(torch.softmax(logits, 1), max_items, replacement=False,
                                        generator=gen))
    picked = torch.cat(picked)
    # Shuffle each user's items, then hold out the first: a uniformly random one.
    order = torch.rand(num_users, max_items, generator=gen)
    order[torch.arange(max_items) >= lengths[:, None]] = 2.0  # unpicked slots go last
    picked = picked.gather(1, order.argsort(1))
    held_out = picked[:, 0]
    lengths = lengths - 1
    valid = torch.arange(max_items - 1) < lengths[:, None]
    history = torch.where(valid, picked[:, 1:], torch.full_like(picked[:, 1:], num_items))
    user_ids = torch.arange(num_users)[:, None].expand_as(history)
    train_pairs = torch.stack([user_ids[valid], history[valid]], 1)
    counts = torch.bincount(history[valid], minlength=num_items).double()
    return Interactions(history, lengths, held_out, train_pairs, counts, num_items)


class TwoTower(nn.Module):
    """User tower: mean of the user's item embeddings through an MLP. Item tower: a table."""

    def __init__(self, num_items: int, dim: int):
        super().__init__()
        self.history = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        self.user_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.items = nn.Embedding(num_items, dim)
        nn.init.normal_(self.items.weight, std=0.1)

    def users(self, history: torch.Tensor, lengths: torch.Tensor,
              leave_out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, D]`` user vectors; ``leave_out`` (the training target) is removed from the pool
        so that the model cannot just look the answer up."""
        pooled = self.history(history).sum(1)
        count = lengths.to(pooled.dtype)
        if leave_out is not None:
            pooled = pooled - self.history(leave_out)
            count = count - 1
        return self.user_mlp(pooled / count[:, None])


@torch.no_grad()
def evaluate(score_users, data: Interactions, device: torch.device,
             popular: torch.Tensor) -> dict:
    """Recall@10/50 of the held-out item, ranked among the items each user has not seen, and the
    share of top-10 recommendations in ``popular``. ``score_users(history, lengths)`` gives
    ``[B, items]`` scores."""
    ranks, popular_hits = [], []
    for users in torch.arange(len(data.held_out)).split(1024):
        history = data.history[users].to(device)
        scores = unseen(score_users(history, data.lengths[users].to(device)), history)
        target = scores.gather(1, data.held_out[users].to(device)[:, None])
        ranks.append((scores > target).sum(1))
        popular_hits.append(popular[scores.topk(10, dim=1).indices].float().mean(1))
    ranks = torch.cat(ranks)
    return {"recall@10": float((ranks < 10).float().mean()),
            "recall@50": float((ranks < 50).float().mean()),
            "popular_share@10": float(torch.cat(popular_hits).mean())}


def unseen(scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """``scores`` with the user's training items at -inf (the padding index, ``items``, lands in
    an extra column that is dropped)."""
    num_items = scores.shape[1]
    seen = torch.zeros(len(scores), num_items + 1, dtype=torch.bool, device=scores.device)
    seen.scatter_(1, history, True)
    return scores.masked_fill(seen[:, :num_items], -math.inf)


def train(name: str, data: Interactions, args: argparse.Namespace, device: torch.device,
          popular: torch.Tensor) -> List[dict]:
    """Train one two-tower model; returns one row per evaluation."""
    torch.manual_seed(args.seed)  # same initial model and negatives stream for every model
    model = TwoTower(data.num_items, args.dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    popularity = fused_nce.AliasSampler(fused_nce.unigram_weights(data.counts, power=1.0),
                                        device=device)
    # The same q for every item: log q cancels in the softmax, i.e. no logQ correction.
    uniform = fused_nce.AliasSampler(torch.ones(data.num_items), device=device)
    history, lengths = data.history.to(device), data.lengths.to(device)
    batches = torch.Generator().manual_seed(args.seed)  # same data order for every model
    # In-batch logQ: the streaming estimate, or the true log expected count log(B f_i).
    estimator = fused_nce.FrequencyEstimator(2 ** 16, alpha=0.01).to(device)
    true_log_q = torch.log(args.batch_size * data.counts / data.counts.sum()).float().to(device)
    extras = torch.Generator(device).manual_seed(args.seed)
    extra_log_q = torch.full((args.num_negatives,), math.log(args.num_negatives / data.num_items),
                             device=device)

    def score_users(h: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return model.users(h, n) @ model.items.weight.T

    rows, log = [], StepLog()

    def record(step: int) -> None:
        model.eval()
        rows.append({"model": name, "step": step, "train_s": log.train_s,
                     "examples_per_s": log.rate(args.batch_size), "train_loss": log.mean_loss(),
                     **evaluate(score_users, data, device, popular)})
        model.train()

    record(0)
    bar = progress(range(1, args.steps + 1), desc=name, unit="step", leave=False)
    for step in bar:
        start = time.perf_counter()
        pick = torch.randint(len(data.train_pairs), (args.batch_size,), generator=batches)
        users, target = data.train_pairs[pick].to(device).unbind(1)
        query = model.users(history[users], lengths[users], leave_out=target)
        items = model.items.weight
        if name == "full_softmax":
            loss = F.cross_entropy(query @ items.T, target)
        elif name == "sampled_softmax":
            loss = fused_nce.sampled_softmax_loss(query, items, None, target, popularity,
                                                  num_negatives=args.num_negatives,
                                                  shared_negatives=True)
        elif name == "sampled_softmax_hard":
            # Mined hard negatives: the highest-scoring of a uniform pool, by the current model.
            with torch.no_grad():
                pool = torch.randint(data.num_items, (len(target), 64), generator=extras,
                                     device=device)
                pool_scores = torch.einsum("nd,npd->np", query, items[pool])
                hard = pool.gather(1, pool_scores.topk(args.hard_negatives, dim=1).indices)
            loss = fused_nce.sampled_softmax_loss(query, items, None, target, popularity,
                                                  num_negatives=args.num_negatives,
                                                  shared_negatives=True, hard_negatives=hard)
        elif name == "gbce":
            loss = fused_nce.gbce_loss(query, items, None, target,
                                       num_negatives=args.num_negatives, t=args.gbce_t)
        elif name == "sampled_softmax_no_logq":  # popularity-drawn negatives, q taken as uniform
            loss = fused_nce.sampled_softmax_loss(query, items, None, target, uniform,
                                                  negatives=popularity.sample(args.num_negatives))
        else:  # in-batch softmax; "mixed" adds uniformly drawn extra negatives
            estimator.update(target)
            log_q = {"in_batch_true_logq": true_log_q[target],
                     "in_batch_no_logq": None}.get(name, estimator.log_expected_count(target))
            mixed = {}
            if name == "mixed":
                extra_ids = torch.randint(data.num_items, (args.num_negatives,), generator=extras,
                                          device=device)
                mixed = dict(extra_candidates=items[extra_ids], extra_ids=extra_ids,
                             extra_log_q=extra_log_q)
            loss = fused_nce.in_batch_softmax_loss(query, items[target], target, log_q=log_q,
                                                   **mixed)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        log.add(loss.item(), time.perf_counter() - start)
        if step % args.eval_every == 0 or step == args.steps:
            record(step)
            set_postfix(bar, recall10=f"{rows[-1]['recall@10']:.3f}")
    return rows


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = example_parser(__doc__, "small data and model, fewer steps")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--users", type=int)
    p.add_argument("--items", type=int)
    p.add_argument("--num-negatives", type=int, help="k shared negatives per batch")
    p.add_argument("--dim", type=int)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hard-negatives", type=int, default=8,
                   help="mined hard negatives per example (sampled_softmax_hard)")
    p.add_argument("--gbce-t", type=float, default=0.75, help="gBCE's calibration t (gbce)")
    full = dict(users=10_000, items=20_000, steps=1500, batch_size=512, num_negatives=256, dim=64,
                eval_every=250, min_items=5, max_items=35)
    quick = dict(users=2_000, items=2_000, steps=300, batch_size=256, num_negatives=64, dim=32,
                 eval_every=50, min_items=5, max_items=25)
    return fill_defaults(p.parse_args(argv), quick, full)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    data = make_interactions(args.users, args.items, args.min_items, args.max_items,
                             seed=args.seed)
    print(f"{args.users:,} users, {args.items:,} items, {len(data.train_pairs):,} training "
          f"interactions; device: {device}")
    # The 1% most popular items, to see which models lean on popularity.
    popular = torch.zeros(args.items, dtype=torch.bool, device=device)
    popular[data.counts.argsort(descending=True)[:max(1, args.items // 100)].to(device)] = True
    log_counts = torch.log1p(data.counts).float().to(device)
    baseline = evaluate(lambda h, n: log_counts.expand(len(h), -1), data, device, popular)
    held_out_share = float(popular[data.held_out.to(device)].float().mean())
    curves = []
    for name in args.models.split(","):
        if name not in MODELS + MORE_MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {MODELS + MORE_MODELS}")
        curves += train(name, data, args, device, popular)
        print(f"{name}: recall@10 {curves[-1]['recall@10']:.3f}, "
              f"recall@50 {curves[-1]['recall@50']:.3f}, {curves[-1]['train_s']:.1f} s")
    last = {r["model"]: r for r in curves}
    # Time per epoch (one pass over the training interactions) at the median step time.
    summary = [{"model": r["model"], "recall@10": r["recall@10"], "recall@50": r["recall@50"],
                "popular_share@10": r["popular_share@10"], "train_s": r["train_s"],
                "examples_per_s": r["examples_per_s"],
                "epoch_s": len(data.train_pairs) / r["examples_per_s"]}
               for r in last.values()]
    summary.append({"model": "popularity", **baseline})
    print(f"held-out items among the 1% most popular: {held_out_share:.3f}")
    print_table(summary, ["model", "recall@10", "recall@50", "popular_share@10", "train_s",
                          "examples_per_s", "epoch_s"])
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "recsys_curves.csv", curves)
    write_csv(args.out / "recsys_summary.csv", summary)
    plot_against_time(curves, "model", "recall@10", "recall@10 (held-out item)",
                      args.out / "recsys_recall.png",
                      reference=(baseline["recall@10"], "popularity"))
    return curves


if __name__ == "__main__":
    main()
