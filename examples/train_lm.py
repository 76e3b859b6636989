"""A word-level n-gram MLP language model trained with each objective, judged by exact perplexity.

The same model, data order and optimizer are trained with NCE, negative sampling, sampled softmax
(logQ-corrected) and full softmax. Every ``--eval-every`` steps it measures the exact validation
perplexity (``fused_nce.full_softmax_loss`` over all V words) and the spread of the exact log
partition ``log Z`` (``fused_nce.log_partition``): an NCE model at ``log_z = 0`` should keep
``log Z`` near 0 (self-normalized), the others need not.

    python examples/train_lm.py --quick              # small setting, about a minute on a CPU
    python examples/train_lm.py                      # the setting of docs/recipe.md
    python examples/train_lm.py --ablations          # + NCE with larger k, unigram^1.0,
                                                     #   learned log Z and 3x the steps
    python examples/train_lm.py --text book.txt      # any text file instead of the embedded corpus

Writes ``lm_curves.csv`` (every evaluation), ``lm_summary.csv`` (one row per run) and
``lm_perplexity.png`` (validation perplexity against training wall time) to ``--out``.
``train_s`` is the time spent in training steps (evaluations excluded); ``tokens_per_s`` comes
from the median step time.
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
from _corpus import (StepLog, add_optimizer_args, example_parser, fill_defaults, load_corpus,
                     make_optimizers, pick_device, plot_against_time, print_table, progress,
                     set_postfix, write_csv)

OBJECTIVES = ("nce", "negative_sampling", "sampled_softmax", "full_softmax")


@dataclass
class Run:
    """One training run: an objective and its settings."""

    name: str
    objective: str
    steps: int
    num_negatives: int
    noise_power: float
    learn_log_z: bool = False


class NGramMLP(nn.Module):
    """Predicts word t from words t-n .. t-1 (Bengio et al., 2003): concatenated embeddings, an
    MLP, and an output layer ``decoder`` (weight ``[V, D]``, bias ``[V]``) that the loss reads."""

    def __init__(self, vocab_size: int, context: int, embed_dim: int, hidden_dim: int,
                 out_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(context * embed_dim, hidden_dim), nn.Tanh(),
                                 nn.Linear(hidden_dim, out_dim))
        self.decoder = nn.Linear(out_dim, vocab_size)
        # Start self-normalized (log Z near 0): what NCE at log_z = 0 assumes from step one.
        fused_nce.init_output_bias_(self.decoder.bias)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """``[N, n]`` previous word ids -> ``[N, D]`` hidden states."""
        return self.mlp(self.embed(context).flatten(1))


def windows(streams: torch.Tensor, context: int) -> torch.Tensor:
    """``[num_examples, context + 1]``: each row is ``context`` words and the word that follows."""
    return streams.unfold(1, context + 1, 1).reshape(-1, context + 1)


@torch.no_grad()
def evaluate(model: NGramMLP, valid: torch.Tensor, device: torch.device,
             logz_rows: int = 2000) -> dict:
    """Exact validation cross-entropy over all V words, and log Z on a fixed sample of rows."""
    model.eval()
    total, hidden = 0.0, []
    for chunk in valid.split(4096):
        chunk = chunk.to(device)
        h = model(chunk[:, :-1])
        total += float(fused_nce.full_softmax_loss(h, model.decoder.weight, model.decoder.bias,
                                                   chunk[:, -1], reduction="sum",
                                                   chunk_size=8192))
        hidden.append(h)
    sample = torch.Generator(device).manual_seed(0)
    log_z = fused_nce.log_partition(torch.cat(hidden), model.decoder.weight, model.decoder.bias,
                                    num_rows=logz_rows, chunk_size=8192, generator=sample)
    model.train()
    loss = total / len(valid)
    return {"val_loss": loss, "val_ppl": math.exp(loss), "log_z_mean": float(log_z.mean()),
            "log_z_std": float(log_z.std())}


def train(run: Run, train_windows: torch.Tensor, valid_windows: torch.Tensor,
          counts: torch.Tensor, args: argparse.Namespace, device: torch.device) -> List[dict]:
    """Train one model; returns one row per evaluation."""
    torch.manual_seed(args.seed)  # same initial model and same negatives stream for every run
    model = NGramMLP(len(counts), args.context, args.embed_dim, args.hidden_dim,
                     args.out_dim).to(device)
    criterion: Optional[fused_nce.NCELoss] = None
    output = list(model.decoder.parameters())
    params = [p for name, p in model.named_parameters() if not name.startswith("decoder.")]
    optimizer, sparse_grad = make_optimizers(args, params, output)
    if run.objective != "full_softmax":
        noise = fused_nce.unigram_weights(counts, power=run.noise_power)
        criterion = fused_nce.NCELoss(len(counts), noise, run.num_negatives,
                                      objective=run.objective, learn_log_z=run.learn_log_z,
                                      sparse_grad=sparse_grad).to(device)
        if run.learn_log_z:
            log_z_optimizer = torch.optim.Adam(criterion.parameters(), lr=args.lr)
            optimizer.optimizers.append(log_z_optimizer)
    batches = torch.Generator().manual_seed(args.seed)  # same data order for every run

    rows, log = [], StepLog()

    def record(step: int) -> None:
        row = {"run": run.name, "objective": run.objective, "optimizer": args.optimizer,
               "step": step,
               "tokens": step * args.batch_size, "train_s": log.train_s,
               "tokens_per_s": log.rate(args.batch_size), "train_loss": log.mean_loss(),
               **evaluate(model, valid_windows, device)}
        if criterion is not None and criterion.log_z is not None:
            row["learned_log_z"] = float(criterion.log_z)
        rows.append(row)

    record(0)
    bar = progress(range(1, run.steps + 1), desc=run.name, unit="step", leave=False)
    for step in bar:
        start = time.perf_counter()
        batch = train_windows[torch.randint(len(train_windows), (args.batch_size,),
                                            generator=batches)].to(device)
        hidden, target = model(batch[:, :-1]), batch[:, -1]
        if criterion is None:
            loss = F.cross_entropy(model.decoder(hidden), target)
        else:
            loss = criterion(hidden, model.decoder.weight, model.decoder.bias, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # loss.item() also waits for the device, so the timing is honest.
        log.add(loss.item(), time.perf_counter() - start)
        if step % args.eval_every == 0 or step == run.steps:
            record(step)
            set_postfix(bar, ppl=f"{rows[-1]['val_ppl']:.1f}", logZ=f"{rows[-1]['log_z_mean']:.2f}")
    return rows


def make_runs(args: argparse.Namespace) -> List[Run]:
    k, power = args.num_negatives, args.noise_power
    runs = [Run(o, o, args.steps, k, power) for o in args.objectives.split(",")]
    if args.ablations:  # what closes NCE's gap to full softmax
        runs += [Run(f"nce_k{4 * k}", "nce", args.steps, 4 * k, power),
                 Run("nce_unigram1.0", "nce", args.steps, k, 1.0),
                 Run("nce_learned_logz", "nce", args.steps, k, power, learn_log_z=True),
                 Run(f"nce_{3 * args.steps}steps", "nce", 3 * args.steps, k, power)]
    for run in runs:
        if run.objective not in OBJECTIVES:
            raise SystemExit(f"unknown objective {run.objective!r}; choose from {OBJECTIVES}")
    return runs


def summarize(curves: List[dict]) -> List[dict]:
    """One row per run: the final evaluation, speed and time."""
    last = {}
    for row in curves:
        last[row["run"]] = row
    return [{"run": r["run"], "objective": r["objective"], "optimizer": r["optimizer"],
             "steps": r["step"],
             "val_ppl": r["val_ppl"], "log_z_mean": r["log_z_mean"], "log_z_std": r["log_z_std"],
             "learned_log_z": r.get("learned_log_z", ""),
             "tokens_per_s": r["tokens_per_s"], "train_s": r["train_s"]}
            for r in last.values()]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = example_parser(__doc__, "small corpus and model, fewer steps")
    p.add_argument("--text", help="train on this text file instead of the embedded corpus")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--ablations", action="store_true",
                   help="also train NCE with 4x k, unigram^1.0, a learned log Z and 3x the steps")
    p.add_argument("--num-negatives", type=int, help="k")
    p.add_argument("--noise-power", type=float, default=0.75, help="noise = unigram ** power")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--context", type=int, default=3, help="previous words the model sees")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--train-tokens", type=int, help="embedded corpus size")
    p.add_argument("--clusters", type=int, help="planted word clusters of the embedded corpus")
    p.add_argument("--valid-tokens", type=int)
    add_optimizer_args(p)
    full = dict(steps=1500, batch_size=512, num_negatives=64, eval_every=150, vocab_size=20_000,
                train_tokens=2_000_000, valid_tokens=20_000, clusters=64, embed_dim=64,
                hidden_dim=256, out_dim=128)
    quick = dict(steps=300, batch_size=256, num_negatives=32, eval_every=50, vocab_size=2_000,
                 train_tokens=200_000, valid_tokens=4_000, clusters=16, embed_dim=32,
                 hidden_dim=128, out_dim=64)
    return fill_defaults(p.parse_args(argv), quick, full)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    corpus = load_corpus(args.text, args.vocab_size, args.train_tokens, args.valid_tokens,
                         args.clusters, seed=args.seed)
    print(f"corpus: {corpus.describe()}; device: {device}")
    train_windows = windows(corpus.train, args.context)
    valid_windows = windows(corpus.valid, args.context)
    curves = []
    for run in make_runs(args):
        curves += train(run, train_windows, valid_windows, corpus.counts, args, device)
        print(f"{run.name}: perplexity {curves[-1]['val_ppl']:.1f}, "
              f"log Z {curves[-1]['log_z_mean']:+.2f} +- {curves[-1]['log_z_std']:.2f}, "
              f"{curves[-1]['train_s']:.1f} s")
    summary = summarize(curves)
    true_ppl = math.exp(corpus.entropy) if corpus.entropy is not None else None
    if true_ppl is not None:
        print(f"true perplexity of the embedded language: {true_ppl:.1f}")
    print_table(summary, ["run", "steps", "val_ppl", "log_z_mean", "log_z_std", "learned_log_z",
                          "tokens_per_s", "train_s"])
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "lm_curves.csv", curves)
    write_csv(args.out / "lm_summary.csv", summary)
    plot_against_time(curves, "run", "val_ppl", "validation perplexity (exact)",
                      args.out / "lm_perplexity.png", log_y=True,
                      reference=None if true_ppl is None else
                      (true_ppl, f"true perplexity {true_ppl:.0f}"))
    return curves


if __name__ == "__main__":
    main()
