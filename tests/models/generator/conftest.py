import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # The generator tests run tiny models, where extra intra-op threads only add synchronisation; on a shared
    # 2-core machine they also oversubscribe the cores (a 0.3 s test measured 14 s with 2 threads under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
