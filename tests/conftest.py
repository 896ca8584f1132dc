import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402  (after the environment, which imports may read)


@pytest.fixture
def counted_cayley(monkeypatch) -> list[int]:
    """`counted_cayley[0]`: how many Cayley inversions ran (each layer's transform does one)."""
    from conftrl.oft import rotation

    calls = [0]
    inner = rotation.cayley

    def counting(skew):
        calls[0] += 1
        return inner(skew)

    monkeypatch.setattr(rotation, "cayley", counting)
    return calls
