"""Data and small utilities shared by the examples.

The embedded corpus is a synthetic language drawn from a fixed random model, so it needs no
download and its true entropy is known:

* ``V`` words, each in one of ``C`` clusters (a random, balanced assignment: the planted structure
  that word2vec should recover);
* the cluster of the next word depends on the clusters of the two previous words (a second-order
  Markov chain with peaked random transitions: mostly a bigram effect, plus the word before);
* the word is then drawn from its cluster with Zipfian weights ``(rank + 1) ** -zipf``, so word
  frequencies are Zipfian overall, like a natural language.

Because a word determines its cluster, the entropy rate is exact:
``H = H(c_t | c_{t-2}, c_{t-1}) + H(w_t | c_t)`` under the chain's stationary distribution, and
``exp(H)`` is the best perplexity any model can reach.
"""

from __future__ import annotations

import argparse
import collections
import csv
import itertools
import math
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = EXAMPLES_DIR / "out"
UNK = "<unk>"


@dataclass
class Corpus:
    """A tokenized corpus. Ids are sorted by training frequency (0 = most frequent)."""

    words: List[str]
    train: torch.Tensor  # int64 [S, L]: S independent streams (a text file is one stream)
    valid: torch.Tensor  # int64 [S', L']
    counts: torch.Tensor  # float64 [V]: training counts, for the noise distribution
    cluster: Optional[torch.Tensor] = None  # int64 [V]: planted cluster (embedded corpus only)
    entropy: Optional[float] = None  # true entropy rate in nats per token (embedded corpus only)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def describe(self) -> str:
        text = (f"{self.train.numel():,} training / {self.valid.numel():,} validation tokens, "
                f"V = {self.vocab_size:,}")
        if self.entropy is not None:
            text += (f"; true entropy {self.entropy:.3f} nats/token "
                     f"(perplexity {math.exp(self.entropy):.1f})")
        return text


class SyntheticLanguage:
    """The fixed random model behind the embedded corpus (see the module docstring)."""

    def __init__(self, vocab_size: int = 20_000, num_clusters: int = 64, zipf: float = 1.0,
                 seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size, self.num_clusters = vocab_size, num_clusters
        # Random balanced clusters: every cluster mixes frequent and rare words.
        self.cluster = torch.randperm(vocab_size, generator=gen) % num_clusters
        zipf_weight = (torch.arange(vocab_size, dtype=torch.float64) + 1.0) ** -zipf
        self.word_given_cluster = torch.zeros(num_clusters, vocab_size, dtype=torch.float64)
        self.word_given_cluster[self.cluster, torch.arange(vocab_size)] = zipf_weight
        self.word_given_cluster /= self.word_given_cluster.sum(1, keepdim=True)
        # transition[a, b, c] = p(c_t = c | c_{t-2} = a, c_{t-1} = b): softmax of Gaussian logits,
        # mostly a bigram term (as in natural text), plus a skip-bigram and an interaction term.
        shape, dtype = (num_clusters,) * 3, torch.float64
        bigram, skip, interaction = (torch.randn(shape, generator=gen, dtype=dtype)
                                     for _ in range(3))
        logits = 2.5 * bigram[0, None] + 1.5 * skip[0, :, None] + 1.0 * interaction
        self.transition = torch.softmax(logits, dim=-1)
        self.stationary = self._stationary_pairs()
        self.seed = seed

    def _stationary_pairs(self) -> torch.Tensor:
        """Stationary distribution of (c_{t-2}, c_{t-1}) by power iteration."""
        c = self.num_clusters
        pairs = torch.full((c, c), 1.0 / (c * c), dtype=torch.float64)
        for _ in range(1000):
            updated = torch.einsum("ab,abc->bc", pairs, self.transition)
            if float((updated - pairs).abs().max()) < 1e-15:
                break
            pairs = updated
        return updated

    def entropy_rate(self) -> float:
        """Exact entropy rate in nats per token."""
        def entropy(p: torch.Tensor) -> torch.Tensor:
            return -(p * p.clamp_min(1e-300).log()).sum(-1)
        cluster_part = (self.stationary * entropy(self.transition)).sum()
        word_part = (self.stationary.sum(0) * entropy(self.word_given_cluster)).sum()
        return float(cluster_part + word_part)

    def sample(self, num_streams: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``[num_streams, length]`` word ids; each stream starts in the stationary distribution."""
        c = self.num_clusters
        start = torch.multinomial(self.stationary.flatten(), num_streams, replacement=True,
                                  generator=generator)
        prev2, prev1 = start // c, start % c
        # Inverse-CDF draws: much faster than one torch.multinomial call per time step.
        cdf = self.transition.cumsum(-1)
        uniform = torch.rand(length, num_streams, 1, generator=generator, dtype=torch.float64)
        clusters = torch.empty(num_streams, length, dtype=torch.long)
        for t in range(length):
            nxt = torch.searchsorted(cdf[prev2, prev1], uniform[t]).clamp_max_(c - 1)[:, 0]
            clusters[:, t] = nxt
            prev2, prev1 = prev1, nxt
        words = torch.empty_like(clusters)
        for k in range(c):  # within-cluster draws, one cluster at a time
            where = clusters == k
            n = int(where.sum())
            if n:
                words[where] = torch.multinomial(self.word_given_cluster[k], n, replacement=True,
                                                 generator=generator)
        return words


def pseudo_word(index: int) -> str:
    """A pronounceable name for word ``index``: short names for small indices, like real words."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    name, index = "", index + 1
    while index > 0:  # bijective base-len(syllables) numeral
        index, digit = divmod(index - 1, len(syllables))
        name = syllables[digit] + name
    return name


def embedded_corpus(vocab_size: int = 20_000, num_clusters: int = 64,
                    train_tokens: int = 2_000_000, valid_tokens: int = 20_000,
                    stream_length: int = 2_000, seed: int = 0) -> Corpus:
    """The synthetic corpus: deterministic for a given set of arguments."""
    language = SyntheticLanguage(vocab_size, num_clusters, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    train = language.sample(max(1, train_tokens // stream_length), stream_length, gen)
    valid = language.sample(max(1, valid_tokens // stream_length), min(stream_length, valid_tokens),
                            gen)
    # Renumber by training frequency, as a tokenizer of real text would.
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double()
    order = torch.argsort(counts, descending=True, stable=True)
    new_id = torch.empty_like(order)
    new_id[order] = torch.arange(vocab_size)
    return Corpus(words=[pseudo_word(i) for i in range(vocab_size)], train=new_id[train],
                  valid=new_id[valid], counts=counts[order], cluster=language.cluster[order],
                  entropy=language.entropy_rate())


def text_corpus(path: str, vocab_size: int = 20_000, valid_fraction: float = 0.1) -> Corpus:
    """A lower-cased word-level corpus from a text file; words beyond the ``vocab_size - 1`` most
    frequent become ``<unk>``. The last ``valid_fraction`` of the file is the validation set."""
    text = Path(path).read_text(encoding="utf-8", errors="replace").lower()
    tokens = re.findall(r"[\w']+|[.,!?;:]", text)
    split = int(len(tokens) * (1.0 - valid_fraction))
    if split < 10 or len(tokens) - split < 10:
        raise ValueError(f"{path} holds too few words ({len(tokens)}) for a train/validation split")
    frequent = collections.Counter(tokens[:split]).most_common(vocab_size - 1)
    words = [w for w, _ in frequent] + [UNK]
    index = {w: i for i, w in enumerate(words)}
    unk = index[UNK]
    ids = torch.tensor([index.get(w, unk) for w in tokens], dtype=torch.long)
    counts = torch.bincount(ids[:split], minlength=len(words)).double()
    return Corpus(words=words, train=ids[None, :split], valid=ids[None, split:], counts=counts)


def load_corpus(text: Optional[str], vocab_size: int, train_tokens: int, valid_tokens: int,
                num_clusters: int = 64, seed: int = 0) -> Corpus:
    """``text`` if given, else the embedded corpus."""
    if text:
        return text_corpus(text, vocab_size)
    return embedded_corpus(vocab_size, num_clusters, train_tokens, valid_tokens, seed=seed)


class StepLog:
    """Training-step bookkeeping shared by the examples: time spent in steps (evaluations
    excluded), the median step time, and the mean loss since the last ``mean_loss()``."""

    def __init__(self) -> None:
        self.train_s = 0.0
        self._step_s: List[float] = []
        self._losses: List[float] = []

    def add(self, loss: float, seconds: float) -> None:
        self._losses.append(loss)
        self._step_s.append(seconds)
        self.train_s += seconds

    @property
    def pending(self) -> bool:
        """Losses recorded since the last ``mean_loss()``."""
        return bool(self._losses)

    def mean_loss(self) -> float:
        """Mean loss since the last call (nan when none), then starts over."""
        mean = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        self._losses.clear()
        return mean

    def rate(self, items_per_step: int) -> float:
        """Items per second from the median step: robust to other work on a shared machine."""
        if not self._step_s:
            return float("nan")
        return items_per_step / statistics.median(self._step_s)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def progress(iterable: Iterable, **kwargs):
    """A tqdm progress bar, or the bare iterable when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)


def set_postfix(bar, **values) -> None:
    """Show values on a tqdm bar (no-op without tqdm)."""
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(**values, refresh=False)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(itertools.chain.from_iterable(rows)))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def append_csv(path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` to a CSV, writing the header when the file is new (the first row's keys
    are the columns: every row should have the same keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def pyplot():
    """matplotlib's pyplot on a file-only backend, or None (with a message) when not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot", file=sys.stderr)
        return None
    return plt


def example_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every example takes; a default of None is filled in by ``fill_defaults``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{quick_help} (explicit flags still win)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def fill_defaults(args: argparse.Namespace, quick: dict, full: dict) -> argparse.Namespace:
    """Settings that depend on ``--quick``; values given on the command line are kept."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def save_figure(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plot_against_time(curves: Sequence[dict], key: str, metric: str, ylabel: str, path: Path,
                      reference: Optional[Tuple[float, str]] = None, log_y: bool = False) -> None:
    """One line per value of ``row[key]``: ``row[metric]`` against training wall time, and an
    optional horizontal ``(value, label)`` reference line."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r[key] for r in curves):
        points = [r for r in curves if r[key] == name and r["step"] > 0]
        ax.plot([r["train_s"] for r in points], [r[metric] for r in points], marker=".",
                label=name)
    if reference is not None:
        ax.axhline(reference[0], color="k", linestyle="--", linewidth=1, label=reference[1])
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    save_figure(plt, fig, path)


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """A Markdown table of ``columns`` from ``rows`` (floats with 4 significant digits)."""
    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
        return str(value)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")


# --optimizer: torch.optim.Adam for every parameter, or the output layer (its weight [V, D] and
# bias [V], with sparse gradients) on one of fused_nce's row optimizers and the rest on Adam.
OPTIMIZERS = ("adam", "row-adam", "row-adagrad", "row-sgd")


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam",
                   help="row-*: the output layer on a fused_nce.optim row optimizer (sparse "
                        "gradients), everything else on Adam")
    p.add_argument("--row-lr", type=float,
                   help="the row optimizer's learning rate (default: --lr for row-adam, "
                        "50x --lr for row-adagrad, 500x --lr for row-sgd)")


class Optimizers:
    """Several optimizers stepped as one (``zero_grad`` / ``step``)."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def make_optimizers(args: argparse.Namespace, dense: Sequence[torch.nn.Parameter],
                    output: Sequence[torch.nn.Parameter]) -> Tuple[Optimizers, bool]:
    """The optimizers of ``--optimizer``, and whether the output layer wants sparse gradients."""
    import fused_nce.optim

    if args.optimizer == "adam":
        return Optimizers([torch.optim.Adam(list(dense) + list(output), lr=args.lr)]), False
    # SGD and Adagrad steps do not normalize the gradient's scale as Adam does: larger rates.
    scale = {"row-adam": 1.0, "row-adagrad": 50.0, "row-sgd": 500.0}[args.optimizer]
    row_lr = args.row_lr if args.row_lr is not None else scale * args.lr
    row = {"row-adam": lambda ps: fused_nce.optim.RowAdam(ps, lr=row_lr),
           "row-adagrad": lambda ps: fused_nce.optim.RowAdagrad(ps, lr=row_lr),
           "row-sgd": lambda ps: fused_nce.optim.RowSGD(ps, lr=row_lr)}[args.optimizer]
    optimizers = [row(list(output))]
    if dense:
        optimizers.insert(0, torch.optim.Adam(list(dense), lr=args.lr))
    return Optimizers(optimizers), True
