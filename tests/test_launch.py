"""`bionemo-scale launch`: the torchrun command, the generated sbatch script, and its errors.

The sbatch script is checked as text, parsed with the real CLI parser, syntax-checked by bash,
and *executed* against stub `scontrol`/`srun`/`bionemo-scale` programs, so quoting and the
per-task environment are proven, not just eyeballed.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from bionemo_scale.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
SLURM_EXAMPLE = REPO / "recipes" / "slurm" / "tahoe_100m_pretrain.sbatch"
LOCAL_EXAMPLE = REPO / "recipes" / "local" / "tiny_cpu_tp2.sh"
DEMO_SPLIT = REPO / "src" / "bionemo_scale" / "data" / "resources" / "norman_demo_split.toml"

TAHOE_ARGS = [
    "launch",
    "--recipe",
    "tahoe_100m_pretrain",
    "--nodes",
    "16",
    "--gpus-per-node",
    "8",
    "--executor",
    "slurm",
    "--data",
    "/lustre/data/tahoe100m_scdl",
    "--split",
    "/lustre/data/tahoe100m_split.toml",
    "--output",
    "/lustre/runs/tahoe_pretrain",
    "--image",
    "nvcr.io/your-org/bionemo-scale:0.1.0",
    "--dry-run",
]


def run_cli(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def launch_args(recipe: str, nodes: int, gpus: int, executor: str, *extra: str, **paths: str) -> list[str]:
    """`launch` argv; data/split/output default to placeholders (dry runs never read them)."""
    where = {"data": "d", "split": "s", "output": "o", **paths}
    if executor == "slurm" and "--image" not in extra:
        extra = ("--image", "registry.example/bionemo-scale:dev", *extra)
    return [
        *["launch", "--recipe", recipe, "--nodes", str(nodes), "--gpus-per-node", str(gpus), "--executor", executor],
        *["--data", where["data"], "--split", where["split"], "--output", where["output"]],
        *extra,
    ]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("bionemo-scale launch: error: "), lines[0]
    return lines[0]


def srun_command(script: str) -> list[str]:
    """The srun invocation (continuation lines joined), as argv."""
    logical = script.replace("\\\n", " ").splitlines()
    (line,) = [ln for ln in logical if ln.lstrip().startswith("srun ")]
    return shlex.split(line)


def task_argv(script: str) -> list[str]:
    """What each Slurm task execs: the argv after `exec` inside `bash -c '...'`."""
    argv = srun_command(script)
    assert argv[-3:-1] == ["bash", "-c"]
    inner = argv[-1]
    assert inner.startswith("export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec ")
    return shlex.split(inner.split("; exec ", 1)[1])


def mounts_of(script: str) -> list[tuple[str, str]]:
    (flag,) = [a for a in srun_command(script) if a.startswith("--container-mounts=")]
    return [tuple(m.split(":", 1)) for m in flag.split("=", 1)[1].split(",")]


def covered(path: str, mounts: list[tuple[str, str]]) -> bool:
    """A host path is visible at the same path in the container."""
    return any(src == dst and (path == src or path.startswith(src.rstrip("/") + "/")) for src, dst in mounts)


# -- Slurm ---------------------------------------------------------------------------------------
def test_slurm_dry_run_script(capsys) -> None:
    code, script, err = run_cli(capsys, TAHOE_ARGS)
    assert code == 0 and err == ""
    assert script.startswith("#!/bin/bash\n")
    header = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    for want in ("--nodes=16", "--ntasks-per-node=8", "--gpus-per-node=8", "--exclusive", "--time=04:00:00"):
        assert f"#SBATCH {want}" in header
    assert "#SBATCH --output=/lustre/runs/tahoe_pretrain/slurm-%j.out" in header

    # Rendezvous and the NCCL environment.
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "export MASTER_PORT=29500" in script
    exported = {ln.split("=")[0].removeprefix("export ") for ln in script.splitlines() if ln.startswith("export ")}
    assert {"NCCL_IB_DISABLE", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"} <= exported
    assert "NCCL_ASYNC_ERROR_HANDLING" not in exported  # torch's deprecated name
    assert "--cpu-bind=none" in script  # a rank bound to one core would starve its data workers
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script

    # srun in the container, with data, split and output visible at the same paths.
    argv = srun_command(script)
    assert "--container-image=nvcr.io/your-org/bionemo-scale:0.1.0" in argv
    assert "--kill-on-bad-exit=1" in argv
    mounts = mounts_of(script)
    for path in ("/lustre/data/tahoe100m_scdl", "/lustre/data/tahoe100m_split.toml", "/lustre/runs/tahoe_pretrain"):
        assert covered(path, mounts), (path, mounts)

    # Each task runs `bionemo-scale train` with the layout as overrides, and the real CLI accepts it.
    task = task_argv(script)
    assert task[:2] == ["bionemo-scale", "train"]
    args = build_parser().parse_args(task[1:])
    assert (args.command, args.recipe, args.data) == ("train", "tahoe_100m_pretrain", "/lustre/data/tahoe100m_scdl")
    assert (args.split, args.output) == ("/lustre/data/tahoe100m_split.toml", "/lustre/runs/tahoe_pretrain")
    assert args.overrides == ["trainer.devices=8", "trainer.num_nodes=16"]


def test_slurm_script_is_valid_bash(capsys, tmp_path: Path) -> None:
    _, script, _ = run_cli(capsys, TAHOE_ARGS)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_script_runs_each_task_with_its_rank(capsys, tmp_path: Path) -> None:
    """Execute the script: stub srun runs two tasks; stub bionemo-scale records argv and env."""
    data, out = tmp_path / "data dir" / "ds", tmp_path / "runs" / "r1"
    data.mkdir(parents=True)
    split = tmp_path / "split.toml"
    split.write_text("")
    _, script, _ = run_cli(
        capsys,
        launch_args(
            "tiny_cpu",
            1,
            2,
            "slurm",
            *["--dry-run", "trainer.tensor_model_parallel_size=2", "name=it's a run"],
            data=str(data),
            split=str(split),
            output=str(out),
        ),
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.txt"
    _stub(bin_dir / "scontrol", "echo node-a; echo node-b\n")
    # srun: drop its own options, then run the command once per task, as Slurm would.
    _stub(
        bin_dir / "srun",
        'while [[ "$1" == --* ]]; do shift; done\n'
        'for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" || exit $?; done\n',
    )
    _stub(
        bin_dir / "bionemo-scale",
        f'{{ echo "RANK=$RANK LOCAL_RANK=$LOCAL_RANK WORLD_SIZE=$WORLD_SIZE MASTER=$MASTER_ADDR:$MASTER_PORT"; '
        f'printf "[%s]" "$@"; echo; }} >> {shlex.quote(str(log))}\n',
    )
    job = tmp_path / "job.sbatch"
    job.write_text(script)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS_PER_NODE": "2",
        "HOME": str(tmp_path),
    }
    proc = subprocess.run(["bash", str(job)], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert out.is_dir()  # the script creates the run directory
    lines = log.read_text().splitlines()
    assert lines[0] == "RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 MASTER=node-a:29500"
    assert lines[2] == "RANK=1 LOCAL_RANK=1 WORLD_SIZE=2 MASTER=node-a:29500"
    expected = (
        f"[train][--recipe][tiny_cpu][--data][{data}][--split][{split}][--output][{out}]"
        "[trainer.devices=2][trainer.num_nodes=1][trainer.tensor_model_parallel_size=2][name=it's a run]"
    )
    assert lines[1] == lines[3] == expected  # an override with a space and a quote arrives intact


def test_slurm_paths_become_absolute_and_split_col_is_not_mounted(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    code, script, _ = run_cli(
        capsys,
        launch_args(
            "tiny_cpu",
            1,
            1,
            "slurm",
            *["--dry-run", "--mount", "/scratch:/scratch", "--image", "registry.example/bionemo-scale:dev"],
            data="data",
            split="split-col",
            output="runs/x",
        ),
    )
    assert code == 0
    args = build_parser().parse_args(task_argv(script)[1:])
    assert args.data == str(tmp_path / "data")
    assert args.output == str(tmp_path / "runs" / "x")
    assert args.split == "split-col"
    mounts = mounts_of(script)
    assert ("/scratch", "/scratch") in mounts
    assert covered(str(tmp_path / "data"), mounts) and covered(str(tmp_path / "runs" / "x"), mounts)
    assert len(mounts) == 3  # /scratch, tmp_path (data's parent), tmp_path/runs: nothing for split-col
    assert "--container-image=registry.example/bionemo-scale:dev" in srun_command(script)


def test_slurm_needs_an_image_with_the_package(capsys) -> None:
    """No public image contains bionemo-scale, so a default image would fail on the cluster."""
    args = TAHOE_ARGS[:]
    del args[args.index("--image") : args.index("--image") + 2]
    code, stdout, err = run_cli(capsys, args)
    assert code == 2 and stdout == ""
    line = one_error_line(err)
    assert "--image is required" in line and "Dockerfile" in line


def test_slurm_partition_and_account(capsys) -> None:
    code, script, _ = run_cli(capsys, [*TAHOE_ARGS, "--partition", "batch", "--account", "bio", "--time", "1:00:00"])
    assert code == 0
    assert "#SBATCH --partition=batch" in script and "#SBATCH --account=bio" in script
    assert "#SBATCH --time=1:00:00" in script


def test_slurm_without_sbatch_is_a_clear_error(capsys, tmp_path: Path, monkeypatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    out = tmp_path / "run"
    args = [a for a in TAHOE_ARGS if a != "--dry-run"]
    args[args.index("/lustre/runs/tahoe_pretrain")] = str(out)
    code, stdout, err = run_cli(capsys, args)
    assert code == 2 and stdout == ""
    line = one_error_line(err)
    assert "sbatch is not on PATH" in line and "--dry-run" in line
    assert not out.exists()  # nothing written when nothing can be submitted


def test_slurm_submits_the_written_script(capsys, tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "sbatch-args"
    _stub(bin_dir / "sbatch", f'echo "$@" > {shlex.quote(str(record))}\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "run"
    args = [a for a in TAHOE_ARGS if a != "--dry-run"]
    args[args.index("/lustre/runs/tahoe_pretrain")] = str(out)
    code, _, err = run_cli(capsys, args)
    assert code == 0, err
    written = out / "launch.sbatch"
    assert record.read_text().strip() == str(written)
    assert "#SBATCH --nodes=16" in written.read_text()


def test_slurm_example_in_recipes_is_in_sync(capsys) -> None:
    _, script, _ = run_cli(capsys, TAHOE_ARGS)
    assert SLURM_EXAMPLE.read_text() == script, (
        "recipes/slurm/tahoe_100m_pretrain.sbatch is stale: regenerate it with\n"
        f"bionemo-scale {' '.join(TAHOE_ARGS)} > {SLURM_EXAMPLE.relative_to(REPO)}"
    )


# -- local ---------------------------------------------------------------------------------------
def test_local_dry_run_prints_torchrun(capsys) -> None:
    code, out, err = run_cli(
        capsys,
        launch_args("tiny_cpu", 1, 2, "local", "--dry-run", "trainer.tensor_model_parallel_size=2", split="s.toml"),
    )
    assert code == 0 and err == ""
    argv = shlex.split(out.strip())
    assert argv[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[5:8] == ["-m", "bionemo_scale.cli", "train"]
    args = build_parser().parse_args(argv[7:])
    assert (args.recipe, args.data, args.split, args.output) == ("tiny_cpu", "d", "s.toml", "o")
    assert args.overrides == ["trainer.devices=2", "trainer.num_nodes=1", "trainer.tensor_model_parallel_size=2"]


def test_local_executor_refuses_several_nodes(capsys) -> None:
    code, out, err = run_cli(
        capsys,
        launch_args("tiny_cpu", 2, 1, "local", "--dry-run"),
    )
    assert code == 2 and out == ""
    assert "one node" in one_error_line(err)


# -- layout errors -------------------------------------------------------------------------------
LAYOUT_ERRORS = [
    ("tahoe_100m_pretrain", 1, 4, [], "1 nodes × 4 GPUs = 4 is not a multiple of the recipe's TP×PP = 4×2"),
    ("tiny_cpu", 1, 3, ["trainer.tensor_model_parallel_size=2"], "TP×PP = 2×1"),
    ("tiny_cpu", 1, 2, ["trainer.pipeline_model_parallel_size=4"], "TP×PP = 1×4"),
]


@pytest.mark.parametrize(
    ("executor", "recipe", "nodes", "gpus", "overrides", "needle"),
    [("local", *case) for case in LAYOUT_ERRORS]
    + [("slurm", *case) for case in LAYOUT_ERRORS]
    + [("slurm", "tahoe_100m_pretrain", 3, 2, [], "3 nodes × 2 GPUs = 6 is not a multiple")],
)
def test_bad_layout_is_one_line_and_exit_2(capsys, executor, recipe, nodes, gpus, overrides, needle) -> None:
    code, out, err = run_cli(
        capsys,
        launch_args(recipe, nodes, gpus, executor, "--dry-run", *overrides),
    )
    assert code == 2 and out == ""
    assert needle in one_error_line(err)


def test_override_that_fixes_the_layout_is_accepted(capsys) -> None:
    """TP comes from the override, not only from the recipe: TP=1×PP=1 recipe, 8 GPUs, TP=8."""
    code, _, err = run_cli(
        capsys,
        launch_args("norman_demo", 1, 8, "slurm", "--dry-run", "trainer.tensor_model_parallel_size=8"),
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.max_stepz=5", "unknown config key 'trainer.max_stepz'"),
        ("trainer.tensor_model_parallel_size=two", "trainer.tensor_model_parallel_size"),
        ("model.num_attention_heads=3", "not divisible"),
    ],
)
def test_bad_override_fails_before_anything_runs(capsys, override: str, needle: str) -> None:
    code, out, err = run_cli(
        capsys,
        launch_args("tiny_cpu", 1, 1, "slurm", "--dry-run", override),
    )
    assert code == 2 and out == ""
    assert needle in one_error_line(err)


def test_unknown_recipe_and_bad_counts(capsys) -> None:
    base = ["--data", "d", "--split", "s", "--output", "o", "--dry-run"]
    code, _, err = run_cli(capsys, ["launch", "--recipe", "nope", *base])
    assert code == 2 and "unknown recipe 'nope'" in one_error_line(err)
    code, _, err = run_cli(capsys, ["launch", "--recipe", "tiny_cpu", "--gpus-per-node", "0", *base])
    assert code == 2 and ">= 1" in one_error_line(err)


@pytest.mark.parametrize(
    "extra,needle", [(["--time", "4h"], "not a Slurm time limit"), (["--mount", "/refs"], "is not SRC:DST")]
)
def test_bad_time_or_mount_fails_before_the_cluster(capsys, extra: list[str], needle: str) -> None:
    code, _, err = run_cli(capsys, launch_args("tahoe_100m_pretrain", 2, 8, "slurm", "--dry-run", *extra))
    assert code == 2 and needle in one_error_line(err)


# -- the local example script --------------------------------------------------------------------
def test_local_tp2_example_is_executable_valid_bash_and_runs_torchrun(tmp_path: Path) -> None:
    assert LOCAL_EXAMPLE.stat().st_mode & stat.S_IXUSR, "recipes/local/tiny_cpu_tp2.sh must be executable"
    assert subprocess.run(["bash", "-n", str(LOCAL_EXAMPLE)]).returncode == 0
    # Run it with a stub python that prints its argv: it must launch 2 torchrun processes, TP=2.
    fake_py = tmp_path / "python"
    _stub(fake_py, 'printf "%s\\n" "$@"\n')
    data = tmp_path / "data"
    data.mkdir()
    env = {**os.environ, "PYTHON": str(fake_py), "DATA": str(data), "OUT": str(tmp_path / "run")}
    proc = subprocess.run(["bash", str(LOCAL_EXAMPLE), "trainer.max_steps=3"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.splitlines()
    assert argv[:4] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert argv[4:6] == ["-m", "bionemo_scale.cli"]
    args = build_parser().parse_args(argv[6:])
    assert (args.command, args.recipe, args.data) == ("train", "tiny_cpu", str(data))
    assert Path(args.split).resolve() == DEMO_SPLIT
    assert {"trainer.devices=2", "trainer.tensor_model_parallel_size=2", "trainer.accelerator=cpu"} <= set(
        args.overrides
    )
    assert args.overrides[-1] == "trainer.max_steps=3"  # extra arguments are passed through, last wins


def test_local_tp2_example_without_data_says_make_demo(tmp_path: Path) -> None:
    env = {**os.environ, "DATA": str(tmp_path / "absent")}
    proc = subprocess.run(["bash", str(LOCAL_EXAMPLE)], env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "make demo" in proc.stderr


def test_paths_with_spaces_survive_in_mounts_and_command(capsys, tmp_path: Path) -> None:
    spaced = tmp_path / "my data"
    code, script, _ = run_cli(
        capsys,
        launch_args(
            "tiny_cpu",
            1,
            1,
            "slurm",
            "--dry-run",
            data=str(spaced / "ds"),
            split="split-col",
            output=str(spaced / "run"),
        ),
    )
    assert code == 0
    assert covered(str(spaced / "ds"), mounts_of(script))
    assert build_parser().parse_args(task_argv(script)[1:]).data == str(spaced / "ds")
