"""A real one-node Slurm cluster for the tests: Debian's munged, slurmctld and slurmd, started in a temporary directory.

The cluster is private to the test session: its own munge key and socket, its own ports, state, spool and log
directories and slurm.conf (the client commands find it through ``$SLURM_CONF``, which :attr:`SlurmCluster.env`
carries). Nothing under /etc is read or changed, and a system Slurm or munge, if one runs, is left alone. The
``slurm_cluster`` fixture skips when the packages are missing or the tests do not run as root, saying which.

Settings that matter for the tests (measured on Slurm 22.05.8, Debian 12):
- ``AuthInfo=cred_expire=5``: a requeued job may not start again before the job credential lifetime has passed
  (120 s by default); 5 s keeps the requeue test short.
- ``SchedulerParameters=sched_interval=1``: a requeued job becoming eligible is no scheduling event, so it waits for
  the periodic pass (60 s by default).
- ``KillWait=5``: a cancelled job's processes get SIGKILL 5 s after SIGTERM (30 s by default), so teardown is quick.
- ``MinJobAge=300``: a finished job's record stays that long, for the tests and ``sbatch --wait`` to read its state.
- ``FirstJobId`` random: slurm/biggan.sh derives its rendezvous port from the job id, and two test sessions on one
  machine should not both start at job 1.
- ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``: no cgroups needed (containers, CI machines).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = "slurmctld slurmd slurm-client munge"
INSTALL = f"`.ci/run` installs them as root: apt-get install -y --no-install-recommends {PACKAGES}"
BINARIES = {
    "munged": "munge",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "sbatch": "slurm-client",
    "scontrol": "slurm-client",
    "scancel": "slurm-client",
    "sinfo": "slurm-client",
}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
FINAL_STATES |= {"PREEMPTED", "SPECIAL_EXIT"}


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def unavailable() -> str | None:
    """Why a cluster cannot be started here (a skip reason), or None."""
    missing = sorted({f"{name} ({package})" for name, package in BINARIES.items() if _which(name) is None})
    if missing:
        return f"Slurm is not installed: {', '.join(missing)} not found; {INSTALL}"
    if os.geteuid() != 0:
        return "a Slurm test cluster needs root (slurmd; munged as the munge user): `.ci/run` runs the tests as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"no munge user: the munge package is not installed properly; {INSTALL}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SlurmCluster:
    """A running one-node cluster: ``run("sbatch", ...)`` runs a client command against it."""

    root: Path
    conf: Path
    env: dict[str, str]  # the caller's environment for client commands and jobs: SLURM_CONF, no outer SLURM_*
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        env = {**self.env, **kwargs.pop("env", {})}
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr}\n{self.logs()}")
        return result

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(re.findall(r"(\w[\w:/]*)=(\S*)", out))

    def wait_job(self, job_id: int | str, timeout: float) -> dict[str, str]:
        """Polls until the job reaches a final state (not a requeue: that goes back to PENDING); fails at the
        deadline after cancelling the job, so a hung job fails its test instead of hanging the suite."""
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in FINAL_STATES:
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), check=False)
                raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout} s\n{self.logs()}")
            time.sleep(0.5)
        return info

    def logs(self, lines: int = 30) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancels the jobs, stops the daemons and kills whatever this cluster started that is still running."""
        if "slurmctld" in self.daemons and self.daemons["slurmctld"].poll() is None:
            self.run("scancel", "--user", pwd.getpwuid(os.getuid()).pw_name, check=False, timeout=30)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                queue = self.run("squeue", "--noheader", check=False, timeout=30)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.daemons.get(name)
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
        # slurmstepd and the job's processes are detached from slurmd; all of them carry this cluster's SLURM_CONF.
        for pid in _processes_with_env(f"SLURM_CONF={self.conf}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _processes_with_env(entry: str) -> list[int]:
    found, marker = [], entry.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def _conf(root: Path, socket_path: Path) -> str:
    cpus = os.cpu_count() or 1
    return f"""\
ClusterName=sgtrain-test
FirstJobId={random.randrange(1000, 19000)}
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=1
MpiDefault=none
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _wait(condition, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for name, process in cluster.daemons.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited {process.returncode} while waiting for {what}\n{cluster.logs()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} after {timeout} s\n{cluster.logs()}")
        time.sleep(0.2)


def start_cluster(root: Path) -> SlurmCluster:
    """Starts munged, slurmctld and slurmd under ``root`` (which every user must be able to traverse: munged runs
    as the munge user) and returns once the node is idle. Call :meth:`SlurmCluster.stop` afterwards."""
    munge = pwd.getpwnam("munge")
    munge_dir = root / "munge"  # munged wants its directories owned by it and not writable by others
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o755)
    os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
    key = munge_dir / "munge.key"  # this cluster's own key: /etc/munge is not touched
    key.write_bytes(os.urandom(128))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    key.chmod(0o600)
    socket_path = munge_dir / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, socket_path))

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a job's, if run inside one
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root=root, conf=conf, env=env)
    try:
        munged = [_which("munged"), "--foreground", f"--socket={socket_path}", f"--key-file={key}"]
        munged += [f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed"]
        with open(root / "log" / "munged.log", "w") as log:  # in the foreground munged logs to stderr
            cluster.daemons["munged"] = subprocess.Popen(
                munged,
                stdout=log,
                stderr=subprocess.STDOUT,
                user=munge.pw_uid,
                group=munge.pw_gid,
                extra_groups=[],
                env=env,
            )
        _wait(socket_path.exists, 15, "munge socket", cluster)
        for name, args in {"slurmctld": ["-D", "-i"], "slurmd": ["-D", "-N", "localhost"]}.items():
            with open(root / "log" / f"{name}.stdout", "w") as out:
                cluster.daemons[name] = subprocess.Popen(
                    [_which(name), *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root
                )

        def idle() -> bool:
            result = cluster.run("sinfo", "--noheader", "--format=%T", "--nodes=localhost", check=False, timeout=30)
            return result.returncode == 0 and result.stdout.strip() == "idle"

        _wait(idle, 60, "idle node", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running one-node Slurm cluster for the session; skipped, with the reason, where one cannot run."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="sgtrain-slurm-"))  # not under pytest's tmp: that is root-only (0700)
    root.chmod(0o755)
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
