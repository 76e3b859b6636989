"""The n-gram MLP language model of ``train_lm.py`` with a vocab-parallel output layer, and
optionally data parallelism on top (a 2-D device mesh: ``dp`` x ``tp``).

The P = dp * tp ranks form a mesh. Along ``tp``, each rank holds rows
``fused_nce.distributed.shard_range(V, tp_group)`` of the output embedding and bias (``1/tp`` of
them) and sees the same batch: the loss all-reduces ``[N]`` partial losses forward and the hidden
states' gradient backward. Along ``dp``, ranks take different slices of the global batch and
``DistributedDataParallel`` over the dp group averages every gradient (the body's and the
shard's). Validation perplexity is the exact vocab-parallel cross-entropy
(``fused_nce.distributed.full_softmax_loss``).

    torchrun --standalone --nproc-per-node 2 examples/train_lm_vocab_parallel.py --quick
    torchrun --standalone --nproc-per-node 4 examples/train_lm_vocab_parallel.py --quick \
        --data-parallel 2 --check

``--check`` also trains the single-process model (``fused_nce.nce_loss`` on the whole layer and
the whole global batch) on rank 0 with the same seed, batches and negatives, and prints both
validation losses, which agree to float rounding. The negatives of the global batch are drawn on
every rank from the same generator and each dp rank takes its slice, so the runs draw alike.
"""

from __future__ import annotations

import math
import os
import sys
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

import fused_nce
import fused_nce.distributed as fd
from _corpus import load_corpus, pick_device
from train_lm import NGramMLP, parse_args, windows


class Step(nn.Module):
    """The body and this rank's output rows as one module, so that DDP averages all of them."""

    def __init__(self, model: nn.Module, weight: nn.Parameter, bias: nn.Parameter) -> None:
        super().__init__()
        self.model, self.weight, self.bias = model, weight, bias

    def forward(self, batch, negatives, noise, tp_group) -> torch.Tensor:
        hidden = self.model(batch[:, :-1])
        if tp_group is None:
            return fused_nce.nce_loss(hidden, self.weight, self.bias, batch[:, -1], noise,
                                      negatives=negatives)
        return fd.nce_loss(hidden, self.weight, self.bias, batch[:, -1], noise,
                           negatives=negatives, group=tp_group)


def train(args, corpus, device, parallel: bool) -> Tuple[float, float]:
    """Trains one model; returns (first, last) validation cross-entropy."""
    v = len(corpus.counts)
    dp = args.data_parallel
    torch.manual_seed(args.seed)  # same model and negatives stream on every rank and run
    model = NGramMLP(v, args.context, args.embed_dim, args.hidden_dim, args.out_dim).to(device)
    noise = fused_nce.AliasSampler(fused_nce.unigram_weights(corpus.counts,
                                                            power=args.noise_power), device=device)
    tp_group = dp_group = None
    dp_rank = 0
    if parallel:
        mesh = init_device_mesh(device.type, (dp, dist.get_world_size() // dp),
                                mesh_dim_names=("dp", "tp"))
        tp_group, dp_group = mesh.get_group("tp"), mesh.get_group("dp")
        dp_rank = mesh.get_local_rank("dp")
        start, end = fd.shard_range(v, tp_group)
        # This rank's rows of the output layer become its parameters; the full layer goes away.
        weight = nn.Parameter(model.decoder.weight.detach()[start:end].clone())
        bias = nn.Parameter(model.decoder.bias.detach()[start:end].clone())
    else:
        weight = nn.Parameter(model.decoder.weight.detach().clone())
        bias = nn.Parameter(model.decoder.bias.detach().clone())
    del model.decoder
    step = Step(model, weight, bias)
    optimizer = torch.optim.Adam(step.parameters(), lr=args.lr)
    if parallel and dp > 1:
        step = nn.parallel.DistributedDataParallel(step, process_group=dp_group)
    train_windows = windows(corpus.train, args.context)
    valid_windows = windows(corpus.valid, args.context)
    batches = torch.Generator().manual_seed(args.seed)
    draws = torch.Generator(device).manual_seed(args.seed + 1)

    @torch.no_grad()
    def evaluate() -> float:
        total = 0.0
        for chunk in valid_windows.split(4096):
            chunk = chunk.to(device)
            h = model(chunk[:, :-1])
            if parallel:
                total += float(fd.full_softmax_loss(h, weight, bias, chunk[:, -1], num_classes=v,
                                                    group=tp_group, reduction="sum",
                                                    chunk_size=8192))
            else:
                total += float(fused_nce.full_softmax_loss(h, weight, bias, chunk[:, -1],
                                                           reduction="sum", chunk_size=8192))
        return total / len(valid_windows)

    first = evaluate()
    # Every step draws the global batch (dp slices of batch_size) and its negatives alike on
    # every rank and in the single-process run; a dp rank trains on its slice.
    share = slice(dp_rank * args.batch_size, (dp_rank + 1) * args.batch_size) if parallel \
        else slice(None)
    for _ in range(args.steps):
        batch = train_windows[torch.randint(len(train_windows), (dp * args.batch_size,),
                                            generator=batches)].to(device)
        negatives = noise.sample((dp * args.batch_size, args.num_negatives), generator=draws)
        loss = step(batch[share], negatives[share], noise, tp_group)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return first, evaluate()


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # This script's own flags; the rest are train_lm's options.
    check = "--check" in argv
    argv = [a for a in argv if a != "--check"]
    data_parallel = 1
    if "--data-parallel" in argv:
        at = argv.index("--data-parallel")
        data_parallel = int(argv[at + 1])
        del argv[at:at + 2]
    p_args = parse_args(argv)
    p_args.check, p_args.data_parallel = check, data_parallel
    device = pick_device(p_args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        rank, size = dist.get_rank(), dist.get_world_size()
        if data_parallel < 1 or size % data_parallel:
            raise ValueError(f"--data-parallel {data_parallel} must divide the {size} ranks")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        corpus = load_corpus(p_args.text, p_args.vocab_size, p_args.train_tokens,
                             p_args.valid_tokens, p_args.clusters, seed=p_args.seed)
        first, last = train(p_args, corpus, device, parallel=True)
        if rank == 0:
            print(f"vocab-parallel over {size // data_parallel} ranks x data-parallel "
                  f"{data_parallel}: V = {len(corpus.counts)}, "
                  f"{p_args.steps} steps, validation loss {first:.4f} -> {last:.4f} "
                  f"(perplexity {math.exp(last):.1f})")
            if p_args.check:
                _, single = train(p_args, corpus, device, parallel=False)
                print(f"single process: validation loss {single:.4f}; "
                      f"difference {abs(single - last):.2e}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
