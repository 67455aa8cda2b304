"""GPU tests share one device: each test's engines (their KV pools take most of the free memory)
are collected and the allocator's cache emptied after it, so the next test sizes its pool afresh."""

import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def _free_device_memory():
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
