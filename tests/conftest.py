from local_hub import LocalHub, ensure_environment, shared_hub

# Before anything imports huggingface_hub, transformers, datasets or hf_aace: they read HF_ENDPOINT and HF_HOME once.
HUB_SETTINGS = ensure_environment()

import gc  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def local_hub() -> LocalHub:
    """The local Hub answering on HF_ENDPOINT, started once per test process."""
    return shared_hub()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_finish(session):
    # The Trainer calls gc.collect() in every train(); leave the imported libraries and test modules out of it.
    gc.collect()
    gc.freeze()
