"""Skip-gram word vectors with negative sampling (word2vec), on a text file or the embedded corpus.

As in Mikolov et al. (2013): each word predicts the words around it (a random window of 1 to
``--window`` on each side), against ``k`` negatives from the unigram^0.75 distribution, and
frequent words are randomly dropped (subsampling with threshold ``--subsample``).

Quality is shown two ways: nearest neighbours (cosine) of a few words, and, on the embedded
corpus, a planted-structure score: how many of the 10 nearest neighbours of each of the most
frequent words belong to the same planted cluster (precision@10; chance is about 1 / clusters).

    python examples/word2vec.py --quick
    python examples/word2vec.py
    python examples/word2vec.py --text book.txt --query "king,queen,paris"

Writes ``w2v_curve.csv`` (loss and score during training), ``w2v_neighbours.txt`` and
``w2v_quality.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

import fused_nce
from _corpus import (Corpus, StepLog, add_optimizer_args, example_parser, fill_defaults,
                     load_corpus, make_optimizers, pick_device, progress, pyplot, save_figure,
                     set_postfix, write_csv)


class SkipGram(nn.Module):
    """Word vectors ``center`` (the ones to keep) and context vectors ``context`` (the output
    embedding the loss reads), initialized as word2vec does."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.center = nn.Parameter(torch.empty(vocab_size, dim).uniform_(-0.5 / dim, 0.5 / dim))
        self.context = nn.Parameter(torch.zeros(vocab_size, dim))


def keep_probability(counts: torch.Tensor, threshold: float) -> torch.Tensor:
    """word2vec's subsampling: a word of frequency f is kept with ``(sqrt(f / t) + 1) * t / f``."""
    freq = counts / counts.sum()
    return (((freq / threshold).sqrt() + 1.0) * threshold / freq.clamp_min(1e-30)).clamp(max=1.0)


def skipgram_pairs(streams: torch.Tensor, keep_prob: torch.Tensor, window: int,
                   generator: torch.Generator) -> torch.Tensor:
    """One epoch of shuffled ``[P, 2]`` (center, context) pairs, after subsampling, with a random
    window size per center word (so nearer words count more, as in word2vec)."""
    tokens = streams.flatten()
    stream = torch.arange(streams.shape[0]).repeat_interleave(streams.shape[1])
    kept = torch.rand(len(tokens), generator=generator, dtype=torch.float64) < keep_prob[tokens]
    tokens, stream = tokens[kept], stream[kept]
    reach = torch.randint(1, window + 1, (len(tokens),), generator=generator)
    pairs = []
    for offset in range(1, window + 1):
        same_stream = stream[:-offset] == stream[offset:]
        left, right = tokens[:-offset], tokens[offset:]
        forward = same_stream & (reach[:-offset] >= offset)  # center on the left
        backward = same_stream & (reach[offset:] >= offset)  # center on the right
        pairs += [torch.stack([left[forward], right[forward]], 1),
                  torch.stack([right[backward], left[backward]], 1)]
    pairs = torch.cat(pairs)
    return pairs[torch.randperm(len(pairs), generator=generator)]


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def planted_score(vectors: torch.Tensor, cluster: torch.Tensor, num_words: int,
                  k: int = 10) -> float:
    """Precision@k of same-cluster neighbours among the ``num_words`` most frequent words."""
    unit = unit_rows(vectors[:num_words].float())
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    neighbours = similarity.topk(k, dim=1).indices
    own = cluster[:num_words].to(vectors.device)
    return float((own[neighbours] == own[:, None]).float().mean())


def chance_score(cluster: torch.Tensor, num_words: int) -> float:
    """Expected precision@k of random neighbours among the same words."""
    sizes = torch.bincount(cluster[:num_words]).double()
    return float(((sizes * (sizes - 1)).sum() / (num_words * (num_words - 1))))


@torch.no_grad()
def neighbours_report(vectors: torch.Tensor, corpus: Corpus, queries: List[int],
                      searchable: int, k: int = 8) -> str:
    """Nearest neighbours (cosine) of each query among the ``searchable`` most frequent words."""
    def name(i: int) -> str:
        tag = f" [c{int(corpus.cluster[i])}]" if corpus.cluster is not None else ""
        return corpus.words[i] + tag
    unit = unit_rows(vectors[:searchable].float())
    lines = []
    for q in queries:
        similarity = unit @ unit_rows(vectors[q:q + 1].float())[0]
        similarity[q] = -float("inf")
        top = similarity.topk(k)
        near = ", ".join(f"{name(int(i))} {float(s):.2f}" for s, i in zip(top.values, top.indices))
        lines.append(f"{name(q)} (#{q + 1} by frequency): {near}")
    return "\n".join(lines)


def plot(curve: List[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    points = [r for r in curve if r["step"] > 0]
    ax.plot([r["pairs"] for r in points], [r["train_loss"] for r in points], "C0.-")
    ax.set_xlabel("training pairs")
    ax.set_ylabel("negative-sampling loss", color="C0")
    if curve and "planted_p10" in curve[0]:
        right = ax.twinx()
        right.plot([r["pairs"] for r in curve], [r["planted_p10"] for r in curve], "C1.-")
        right.axhline(curve[0]["chance_p10"], color="C1", linestyle=":", linewidth=1)
        right.set_ylabel("planted-cluster precision@10 (dotted: chance)", color="C1")
        right.set_ylim(0, 1)
    save_figure(plt, fig, path)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = example_parser(__doc__, "small corpus and model")
    p.add_argument("--text", help="train on this text file instead of the embedded corpus")
    p.add_argument("--query", help="comma-separated words to show neighbours of")
    p.add_argument("--dim", type=int)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--num-negatives", type=int, default=5, help="k")
    p.add_argument("--noise-power", type=float, default=0.75, help="noise = unigram ** power")
    p.add_argument("--subsample", type=float, help="subsampling threshold t")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--eval-words", type=int, help="most frequent words in the planted score")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--train-tokens", type=int, help="embedded corpus size")
    add_optimizer_args(p)
    full = dict(dim=100, batch_size=4096, eval_every=200, eval_words=2000, vocab_size=20_000,
                train_tokens=2_000_000, clusters=64, subsample=1e-4)
    # A small vocabulary has no rare words: subsample less, or little text is left.
    quick = dict(dim=32, batch_size=1024, eval_every=50, eval_words=500, vocab_size=2_000,
                 train_tokens=200_000, clusters=16, subsample=1e-3)
    return fill_defaults(p.parse_args(argv), quick, full)


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    corpus = load_corpus(args.text, args.vocab_size, args.train_tokens, 0, args.clusters,
                         seed=args.seed)
    print(f"corpus: {corpus.describe()}; device: {device}")
    model = SkipGram(corpus.vocab_size, args.dim).to(device)
    noise = fused_nce.AliasSampler(fused_nce.unigram_weights(corpus.counts, args.noise_power),
                                   device=device)
    # The context vectors are the output layer: on a row optimizer with --optimizer row-*.
    optimizer, sparse_grad = make_optimizers(args, [model.center], [model.context])
    keep_prob = keep_probability(corpus.counts, args.subsample)
    shuffle = torch.Generator().manual_seed(args.seed)
    has_clusters = corpus.cluster is not None
    chance = chance_score(corpus.cluster, args.eval_words) if has_clusters else None

    curve, log, pairs_seen, step = [], StepLog(), 0, 0

    def record() -> None:
        row = {"optimizer": args.optimizer, "step": step, "pairs": pairs_seen,
               "train_s": log.train_s,
               "train_loss": log.mean_loss()}
        if has_clusters:
            row["planted_p10"] = planted_score(model.center.detach(), corpus.cluster,
                                               args.eval_words)
            row["chance_p10"] = chance
        curve.append(row)

    record()
    for epoch in range(args.epochs):
        pairs = skipgram_pairs(corpus.train, keep_prob, args.window, shuffle)
        num_batches = (len(pairs) + args.batch_size - 1) // args.batch_size
        if epoch == 0:  # word2vec's linear learning-rate decay to zero, over the whole run
            total = args.epochs * num_batches if args.steps is None else args.steps
            schedules = [torch.optim.lr_scheduler.LambdaLR(
                o, lambda s: max(0.0, 1.0 - s / (1.05 * total))) for o in optimizer.optimizers]
        if args.steps is not None:
            num_batches = min(num_batches, args.steps - step)
        bar = progress(range(num_batches), desc=f"epoch {epoch + 1}", unit="step", leave=False)
        for b in bar:
            start = time.perf_counter()
            batch = pairs[b * args.batch_size:(b + 1) * args.batch_size].to(device)
            loss = fused_nce.negative_sampling_loss(model.center[batch[:, 0]], model.context,
                                                    None, batch[:, 1], noise,
                                                    num_negatives=args.num_negatives,
                                                    sparse_grad=sparse_grad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for schedule in schedules:
                schedule.step()
            log.add(loss.item(), time.perf_counter() - start)
            step, pairs_seen = step + 1, pairs_seen + len(batch)
            if step % args.eval_every == 0:
                record()
                if has_clusters:
                    set_postfix(bar, loss=f"{curve[-1]['train_loss']:.3f}",
                                p10=f"{curve[-1]['planted_p10']:.3f}")
        if args.steps is not None and step >= args.steps:
            break
    if log.pending:
        record()

    final = curve[-1]
    print(f"{step} steps, {pairs_seen:,} pairs in {log.train_s:.1f} s "
          f"({pairs_seen / max(log.train_s, 1e-9):,.0f} pairs/s); loss "
          f"{curve[1]['train_loss']:.3f} -> {final['train_loss']:.3f}")
    if has_clusters:
        print(f"planted-cluster precision@10 over the {args.eval_words} most frequent words: "
              f"{final['planted_p10']:.3f} (chance {chance:.3f})")
    vectors = model.center.detach()
    searchable = int((corpus.counts >= 5).sum())  # words seen often enough to have a vector
    if args.query:
        index = {w: i for i, w in enumerate(corpus.words)}
        queries = [index[w] for w in args.query.split(",") if w in index]
    else:
        queries = [i for i in (0, 3, 30, 300, 1000) if i < searchable]
    report = neighbours_report(vectors, corpus, queries, searchable)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "w2v_neighbours.txt").write_text(report + "\n")
    write_csv(args.out / "w2v_curve.csv", curve)
    plot(curve, args.out / "w2v_quality.png")
    return curve


if __name__ == "__main__":
    main()
