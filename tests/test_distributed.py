"""Process discovery from torchrun, SLURM, or nothing."""

import pytest

from diffusion_dist.distributed import first_host, process_from_env


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("gpu07", "gpu07"),
        ("gpu[07-09,12]", "gpu07"),
        ("a[1,3],b2", "a1"),
        ("node-[001-004]", "node-001"),
        ("c1,c2", "c1"),
    ],
)
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400"}
    info = process_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.master_port, info.launcher) == (
        3,
        8,
        1,
        "10.1.2.3",
        29400,
        "torchrun",
    )


def test_srun_variables():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[03-06]",
        "SLURM_JOB_ID": "123456",
    }
    info = process_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.master_addr, info.launcher) == (
        5,
        16,
        1,
        "gpu03",
        "slurm",
    )
    assert info.master_port == process_from_env({**env, "SLURM_PROCID": "0"}).master_port  # all tasks agree
    assert process_from_env({**env, "SLURM_STEP_NUM_TASKS": "8"}).world_size == 8  # srun's step count wins


def test_single_process():
    info = process_from_env({})
    assert (info.rank, info.world_size, info.launcher) == (0, 1, "single")


def test_bad_variables_are_named():
    with pytest.raises(ValueError, match="RANK='x'"):
        process_from_env({"RANK": "x", "WORLD_SIZE": "2"})
