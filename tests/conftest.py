import pytest
import torch

from backprop_ninja.data import Dataset, default_data_path


@pytest.fixture(scope="session")
def names() -> Dataset:
    """The bundled names with the lecture's block size and split seed (loaded once)."""
    return Dataset.load(default_data_path(), block_size=3, seed=42)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(1)
    yield
