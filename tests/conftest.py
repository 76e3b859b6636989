import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
OBJECTIVES = ["nce", "negative_sampling", "sampled_softmax"]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
