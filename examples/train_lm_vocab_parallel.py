"""The n-gram MLP language model of ``train_lm.py`` with a vocab-parallel output layer.

Each rank holds rows ``fused_nce.distributed.shard_range(V)`` of the output embedding and bias
(``1/P`` of them) and the whole, small, body (embedding + MLP). Every rank sees the same batch:
the loss all-reduces ``[N]`` partial losses forward and the hidden states' gradient backward, so
the body gets the same full gradient on every rank and stays replicated without DDP (wrap it in
DDP over another group to also split the batch). Validation perplexity is the exact
vocab-parallel cross-entropy (``fused_nce.distributed.full_softmax_loss``).

    torchrun --standalone --nproc-per-node 2 examples/train_lm_vocab_parallel.py --quick
    torchrun --standalone --nproc-per-node 2 examples/train_lm_vocab_parallel.py --quick --check

``--check`` also trains the single-process model (``fused_nce.NCELoss`` on the whole layer) on
rank 0 with the same seed and steps and prints both validation losses, which agree to float
rounding: the same negatives are drawn on every rank and in the single-process run.
"""

from __future__ import annotations

import math
import os
import sys
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

import fused_nce
import fused_nce.distributed as fd
from _corpus import load_corpus, pick_device
from train_lm import NGramMLP, parse_args, windows


def train(args, corpus, device, parallel: bool) -> Tuple[float, float]:
    """Trains one model; returns (first, last) validation cross-entropy."""
    v = len(corpus.counts)
    torch.manual_seed(args.seed)  # same model and negatives stream on every rank and run
    model = NGramMLP(v, args.context, args.embed_dim, args.hidden_dim, args.out_dim).to(device)
    noise = fused_nce.unigram_weights(corpus.counts, power=args.noise_power)
    if parallel:
        start, end = fd.shard_range(v)
        # This rank's rows of the output layer become its parameters; the full layer goes away.
        weight = nn.Parameter(model.decoder.weight.detach()[start:end].clone())
        bias = nn.Parameter(model.decoder.bias.detach()[start:end].clone())
        del model.decoder
        criterion: nn.Module = fd.VocabParallelNCELoss(v, noise, args.num_negatives).to(device)
    else:
        weight, bias = model.decoder.weight, model.decoder.bias
        criterion = fused_nce.NCELoss(v, noise, args.num_negatives).to(device)
    body = [p for name, p in model.named_parameters() if not name.startswith("decoder.")]
    optimizer = torch.optim.Adam(body + [weight, bias], lr=args.lr)
    train_windows = windows(corpus.train, args.context)
    valid_windows = windows(corpus.valid, args.context)
    batches = torch.Generator().manual_seed(args.seed)

    @torch.no_grad()
    def evaluate() -> float:
        total = 0.0
        for chunk in valid_windows.split(4096):
            chunk = chunk.to(device)
            h = model(chunk[:, :-1])
            if parallel:
                total += float(fd.full_softmax_loss(h, weight, bias, chunk[:, -1], num_classes=v,
                                                    reduction="sum", chunk_size=8192))
            else:
                total += float(fused_nce.full_softmax_loss(h, weight, bias, chunk[:, -1],
                                                           reduction="sum", chunk_size=8192))
        return total / len(valid_windows)

    first = evaluate()
    for step in range(1, args.steps + 1):
        batch = train_windows[torch.randint(len(train_windows), (args.batch_size,),
                                            generator=batches)].to(device)
        loss = criterion(model(batch[:, :-1]), weight, bias, batch[:, -1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return first, evaluate()


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in argv  # this script's own flag; the rest are train_lm's options
    p_args = parse_args([a for a in argv if a != "--check"])
    p_args.check = check
    device = pick_device(p_args.device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        rank, size = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        corpus = load_corpus(p_args.text, p_args.vocab_size, p_args.train_tokens,
                             p_args.valid_tokens, p_args.clusters, seed=p_args.seed)
        first, last = train(p_args, corpus, device, parallel=True)
        if rank == 0:
            print(f"vocab-parallel over {size} ranks: V = {len(corpus.counts)}, "
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
