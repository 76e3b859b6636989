"""Calls every op on every path at tiny shapes, for compute-sanitizer (memcheck, racecheck):
per-example and shared negatives, each objective, each dtype, dense / sparse rows / frozen
weight, deterministic mode, odd D and misaligned views, the alias build and draws.

    compute-sanitizer --tool memcheck python bench/gpu/sanitize_driver.py [--device cuda]
"""

import argparse

import torch

import fused_nce

OBJECTIVES = ["nce", "negative_sampling", "sampled_softmax"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def run_all(device: torch.device) -> int:
    calls = 0
    g = torch.Generator().manual_seed(0)
    for dim in [8, 13]:
        for dtype in DTYPES:
            for shared in [False, True]:
                n, v, k = 37, 50, 9
                wide = torch.randn(v, dim + 1, generator=g).to(device, dtype)
                weight_view = wide[:, 1:]  # offset by one element: the scalar path
                hidden = torch.randn(n, dim, generator=g).to(device, dtype)
                bias = torch.randn(v, generator=g).to(device, dtype)
                target = torch.randint(v, (n,), generator=g).to(device)
                target[::5] = -100
                negatives = torch.randint(v, (k,) if shared else (n, k), generator=g).to(device)
                noise = torch.rand(v, generator=g, dtype=torch.float64) + 0.1
                sampler = fused_nce.AliasSampler(noise, device=device)
                for objective in OBJECTIVES:
                    fn = getattr(fused_nce, f"{objective}_loss")
                    for weight in [weight_view.contiguous(), weight_view]:
                        for grads in ["dense", "sparse", "frozen", "deterministic"]:
                            h = hidden.clone().requires_grad_()
                            w = weight.detach().clone() if grads != "frozen" else weight
                            b = bias.clone()
                            if grads != "frozen":
                                w.requires_grad_()
                                b.requires_grad_()
                            torch.use_deterministic_algorithms(grads == "deterministic")
                            try:
                                loss = fn(h, w, b, target, sampler, negatives=negatives,
                                          sparse_grad=grads == "sparse")
                                loss.backward()
                            finally:
                                torch.use_deterministic_algorithms(False)
                            calls += 1
    # Hot rows longer than a chunk, in bfloat16 (the sorted path).
    h = torch.randn(600, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(5, 16, device=device, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(5, (600,), device=device)
    negatives = torch.randint(5, (600, 8), device=device)
    fused_nce.negative_sampling_loss(h, w, None, t, negatives=negatives).backward()
    # Sampler: build and draws.
    sampler = fused_nce.AliasSampler(fused_nce.log_uniform_weights(1000), device=device)
    sampler.sample((64, 33))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return calls + 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    print(f"sanitize driver: {run_all(device)} loss calls on {device}, all finished")


if __name__ == "__main__":
    main()
