import os

import pytest

# the checkout and tests/ are on sys.path through pytest.ini's pythonpath
os.environ.setdefault("SSA_ATTENTION_BACKEND", "reference")


def pytest_collection_finish(session):
    """The Triton interpreter checks start in the background now (niced), not when their files
    come: tests/interpreter_utils.py."""
    from interpreter_utils import start_interpreter_queue
    start_interpreter_queue(session)


def pytest_sessionfinish(session):
    from interpreter_utils import stop_interpreter_queue
    stop_interpreter_queue(session)


@pytest.fixture(scope="session")
def single_process_parallel_state():
    """torch.distributed (gloo, world 1) + megatron parallel_state for in-process model tests."""
    from ssa_megatron.training.distributed import init_distributed
    init_distributed(1, 1, seed=1234)  # a lone process picks a free rendezvous port itself
    yield


@pytest.fixture(scope="session")
def random_dataset(tmp_path_factory):
    from data_utils import write_random_dataset
    return write_random_dataset(str(tmp_path_factory.mktemp("data") / "rand"), num_docs=300)
