"""emberfl on torch.distributed (gloo over loopback), launched by torchrun: the final model
has the bytes of the run without torchrun for world sizes 1, 2 and 4, with FedAvg and with
SCAFFOLD (client state), on one node and on two "nodes"; a killed or hung rank stops the
others with a message within the timeout, and the run then resumes to the uninterrupted
bytes; ranks started with different configurations are refused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emberfl.executors.distributed import split_by_size

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "distributed_script.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
EMBERFL = [sys.executable, "-m", "emberfl"]
RUN = ["--rounds", "6", "--num-clients", "6", "--epochs", "2", "--checkpoint-every", "1",
       "--quiet"]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(nproc: int, *argv: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    command = [*TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())


def test_split_by_size_is_contiguous_ordered_and_balanced() -> None:
    assert split_by_size([5] * 8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert split_by_size([100, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert split_by_size([3, 3], 4) == [1, 3]
    assert split_by_size([], 3) == []
    owners = split_by_size(list(range(1, 41)), 3)
    assert owners == sorted(owners) and set(owners) == {0, 1, 2}
    loads = [sum(s for s, o in zip(range(1, 41), owners, strict=True) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= 40  # within one client of balance


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_every_world_size_gives_the_bytes_of_one_process(tmp_path: Path, algorithm: str) -> None:
    alone = tmp_path / "alone.st"
    subprocess.run(
        [sys.executable, str(SCRIPT), algorithm, "serial", "3", str(alone)],
        check=True,
        env=_env(),
        timeout=120,
    )
    for world in (1, 2, 4):
        out = tmp_path / f"world{world}.st"
        done = _torchrun(world, str(SCRIPT), algorithm, "serial", "3", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        assert out.read_bytes() == alone.read_bytes(), f"world size {world} differs"
    # A rank's local executor may be another mode: the same bits.
    out = tmp_path / "process.st"
    done = _torchrun(2, str(SCRIPT), algorithm, "process", "3", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == alone.read_bytes()


def test_a_failing_client_fails_every_rank_with_its_name(tmp_path: Path) -> None:
    done = _torchrun(2, str(SCRIPT), "fedavg", "serial", "2", str(tmp_path / "x.st"), "--broken")
    assert done.returncode != 0
    # Every rank raises the same error (torchrun may stop one before it prints it).
    errors = [line for line in done.stderr.splitlines() if "ClientError: client 3" in line]
    assert errors, done.stderr[-3000:]
    assert all("disk on fire (trained on rank" in line for line in errors)


def test_emberfl_run_under_torchrun_writes_the_same_run_on_one_or_two_nodes(
    tmp_path: Path,
) -> None:
    alone, one, two = tmp_path / "alone", tmp_path / "one", tmp_path / "two"
    subprocess.run([*EMBERFL, "run", *RUN, "--output-dir", str(alone)], check=True, env=_env())
    done = _torchrun(2, "-m", "emberfl", "run", *RUN, "--output-dir", str(one))
    assert done.returncode == 0, done.stderr[-3000:]
    final = (alone / "final_model.safetensors").read_bytes()
    assert (one / "final_model.safetensors").read_bytes() == final
    rows = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (alone / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in want]
    # Two "nodes" on this machine: two torchrun agents meeting at one rendezvous.
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nnodes=2",
                f"--node-rank={rank}",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=emberfl",
                "-m",
                "emberfl",
                "run",
                *RUN,
                "--output-dir",
                str(two),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=240)
        assert node.returncode == 0, err[-3000:]
    assert (two / "final_model.safetensors").read_bytes() == final


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of the process with ``RANK=rank`` among ``parent``'s descendants."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            ppid = int(stat[3])
            if ppid == parent:
                return int(proc.name)
    return None


def _round_of(run: Path) -> int:
    try:
        return int(json.loads((run / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_a_lost_rank_stops_the_others_and_the_run_resumes(tmp_path: Path, how: str) -> None:
    alone, run = tmp_path / "alone", tmp_path / "run"
    argv = [*RUN, "--rounds", "12", "--rank-timeout", "5"]
    subprocess.run([*EMBERFL, "run", *argv, "--output-dir", str(alone)], check=True, env=_env())
    command = [*TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "emberfl", "run", *argv,
               "--output-dir", str(run)]  # fmt: skip
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=_env()) as job:
        victim = None
        try:
            deadline = time.monotonic() + 120
            while _round_of(run) < 2:
                assert job.poll() is None, "the run ended before a rank could be lost"
                assert time.monotonic() < deadline, "no checkpoint after 120 s"
                time.sleep(0.02)
            victim, survivor = _rank_pid(job.pid, 1), _rank_pid(job.pid, 0)
            assert victim is not None and survivor is not None, "ranks not found"
            os.kill(victim, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            lost_at = time.monotonic()
            while _alive(survivor) and time.monotonic() - lost_at < 120:
                time.sleep(0.05)
            elapsed = time.monotonic() - lost_at  # until rank 0 has stopped
            with_suppressed_kill(victim)  # torchrun would wait for a stopped process
            _, err = job.communicate(timeout=120)
        finally:
            if victim is not None:
                with_suppressed_kill(victim)
            job.kill()
    assert job.returncode != 0
    said = [line for line in err.splitlines() if line.startswith("emberfl: error:")]
    if how == "hang":
        # The watchdog names the silent rank after --rank-timeout (5 s), not the collective's
        # timeout.
        assert any("rank 1 stopped responding" in line for line in said), err[-3000:]
    else:
        # Rank 0 sees the connection drop (or torchrun stops it first, naming rank 1).
        assert said or "rank      : 1" in err, err[-3000:]
    assert elapsed < 30, f"rank 0 took {elapsed:.0f} s to stop"
    assert not (run / "final_model.safetensors").exists()
    resumed = subprocess.run(
        [
            *TORCHRUN,
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "emberfl",
            "run",
            "--resume",
            str(run),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "final_model.safetensors").read_bytes() == (
        alone / "final_model.safetensors"
    ).read_bytes()


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except OSError:
        return False


def with_suppressed_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def test_ranks_with_different_configurations_are_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = " ".join(RUN)
    shell = f'exec "{sys.executable}" -m emberfl run {args} --seed "$RANK" --output-dir "{run}"'
    command = [*TORCHRUN, "--standalone", "--nproc-per-node=2", "--no-python", "sh", "-c", shell]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=_env())
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("emberfl: error:")]
    assert said and all("different configurations: rank(s) 1 differ" in s for s in said), said
    assert not run.exists()


def test_a_run_directory_rank_0_cannot_use_stops_every_rank_with_its_reason(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    first = subprocess.run([*EMBERFL, "run", *RUN, "--rounds", "1", "--output-dir", str(run)],
                           env=_env(), capture_output=True, text=True)  # fmt: skip
    assert first.returncode == 0, first.stderr
    done = _torchrun(2, "-m", "emberfl", "run", *RUN, "--output-dir", str(run))
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if line.startswith("emberfl: error:")]
    # Every rank that gets to say something gives rank 0's reason (torchrun may stop rank 0
    # before it prints, once rank 1 has exited).
    assert said and all("already holds a run" in line for line in said), said
    assert (run / "final_model.safetensors").stat().st_size > 0  # the first run untouched
