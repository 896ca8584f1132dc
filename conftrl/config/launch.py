"""What every process of a multi-process launch (torchrun, srun) must agree on before Lightning
starts: which process is rank 0, and the one run directory they share.

Each process of such a launch runs `hydra.main` itself, and Hydra names the run directory after
the time it started, which differs between processes (and machines) by seconds. Here the run's
time is rank 0's: under torchrun it is handed to the other ranks through the key-value store
that torchrun's agent serves at MASTER_ADDR:MASTER_PORT (where the agent serves none, the
rendezvous id names the run). Under SLURM no store exists before training starts, so the
job's id names the run unless the batch script sets CONFTRL_RUN_TIME for all its tasks.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from lightning.pytorch.utilities import rank_zero_only

RUN_TIME_VARIABLE = "CONFTRL_RUN_TIME"
_STORE_KEY = "conftrl/run_time"
_STORE_TIMEOUT = timedelta(minutes=5)  # how long other ranks wait for rank 0 to start


def launch_rank() -> int:
    """This process's global rank as its launcher set it (RANK, LOCAL_RANK, SLURM_PROCID), as
    Lightning reads it; 0 for a plain run."""
    return rank_zero_only.rank


def launch_time(pattern: str) -> str:
    """The time the run started, formatted by `pattern`, the same in every process of the launch."""
    if RUN_TIME_VARIABLE in os.environ:
        return os.environ[RUN_TIME_VARIABLE]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            return _shared_through_torchrun(datetime.now().strftime(pattern))
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"  # --rdzv-id, the same on every node
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    return datetime.now().strftime(pattern)


def _shared_through_torchrun(mine: str) -> str:
    from torch.distributed import TCPStore

    store = TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=_STORE_TIMEOUT
    )
    if launch_rank() == 0:  # the first attempt's time: workers torchrun restarts keep their run dir
        return store.compare_set(_STORE_KEY, "", mine).decode()
    return store.get(_STORE_KEY).decode()


def on_rank_zero(value):
    """`value` in the launch's rank 0, None (nothing written) in its other processes."""
    return value if launch_rank() == 0 else None


def rank_zero_file(path: str) -> str:
    """`path` in the launch's rank 0; the null device, which discards what is written, elsewhere."""
    return path if launch_rank() == 0 else os.devnull
