"""Shared by the test files: one intra-op thread for toy-sized work, and a folder of synthetic design images."""

import pytest
import torch

import data


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole session, module-scoped fixtures included: on two busy cores, torch's spinning
    OpenMP pool made toy-sized runs 4-20x slower (measured: 10 train.py steps 3.5 s with 1 thread, 37-71 s with 2,
    same load). bench.py's runs set their own and give the count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def design_images(tmp_path_factory):
    """Two synthetic designs, 64 x 48 px, flattened (`python data.py synthetic --images_only`)."""
    folder = tmp_path_factory.mktemp("designs")
    data.write_references(folder, 2, seed=0, size=(64, 48), images_only=True)
    return folder
