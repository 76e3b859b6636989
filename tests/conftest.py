import os

import pytest
import torch

# cuBLAS needs a fixed workspace for deterministic GEMMs (shared negatives under
# torch.use_deterministic_algorithms); it must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OBJECTIVES = ["nce", "negative_sampling", "sampled_softmax"]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
