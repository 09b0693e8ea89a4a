from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

# The public plugin: the session-wide `ranks` fixture, `ranks.run(fn, *args, world_size=2)`,
# and the --ranks-launcher option.
pytest_plugins = ["local_sgd_optim.testing"]


@pytest.fixture
def single_rank_group(tmp_path) -> Iterator[None]:
    """A real gloo process group of one rank in this process, torn down afterwards."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _no_leftover_group() -> Iterator[None]:
    yield
    assert not dist.is_initialized(), "a test left torch.distributed initialised"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
