import pytest
import torch

# One thread: the tiny models here gain little from two, and several tests run servers or torchrun workers
# beside the test process, where two spinning OpenMP threads each would oversubscribe the cores badly.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
