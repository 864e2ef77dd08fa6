"""A real single-node Slurm cluster on localhost, for tests: Debian's slurm-wlm (slurmctld,
slurmd) and munge, started with a minimal slurm.conf in a temp dir (own state, spool, logs,
munge socket and key; no cgroups, no accounting database) and torn down afterwards.

    with LocalSlurm(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

Without slurmdbd, `sacct` has nothing to read, so the cluster keeps finished jobs in
slurmctld for `MinJobAge` (squeue still lists them, which is how snakemake-executor-plugin-
slurm's `status_command: squeue` sees them complete) and records every finished job in a
`jobcomp/filetxt` file (`completed_jobs()`), next to slurmctld's own log.

`SlurmUnavailable` says exactly what failed (package install, a daemon that did not start,
a node that did not come up), for the test to skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DEBIAN_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SLURM_TOOLS = ["slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "munged", "mungekey"]
# client commands that get a wrapper in the cluster's bin/ (on PATH in `env`)
CLIENT_TOOLS = ["srun", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "sacct"]
# finished jobs stay visible to squeue this long (the executor's status checks need them)
MIN_JOB_AGE_S = 900


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says which step failed and why."""


def missing_tools() -> list[str]:
    return [t for t in SLURM_TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def install_slurm(log: Path) -> None:
    """apt-get install Debian's Slurm and munge when a tool is missing (needs root)."""
    if not missing_tools():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm tools missing ({', '.join(missing_tools())}) and not root to apt-get install them")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm tools missing ({', '.join(missing_tools())}) and no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with open(log, "a") as out:
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES]):
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
            if rc != 0:
                raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (exit {rc}); see {log}")
    if missing_tools():
        raise SlurmUnavailable(f"still missing after apt-get install: {', '.join(missing_tools())}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def node_resources() -> tuple[int, int]:
    """(CPUs, memory in MB) to declare for this machine's node: `slurmd -C`'s view, memory
    with 5% held back (slurmd drains a node whose RealMemory is above what it finds)."""
    out = subprocess.run([_tool("slurmd"), "-C"], capture_output=True, text=True).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    cpus = int(fields.get("CPUs", os.cpu_count() or 1))
    mem = int(fields.get("RealMemory", 1024))
    return cpus, int(mem * 0.95)


class LocalSlurm:
    """A single-node cluster in `root` (created). `env` is what clients (sbatch, squeue, a
    Snakemake run with the slurm executor) need: SLURM_CONF pointing at this cluster."""

    partition = "debug"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.hostname = socket.gethostname()
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        self.ctld_log = self.root / "log" / "slurmctld.log"
        self.slurmd_log = self.root / "log" / "slurmd.log"
        self.jobcomp = self.root / "log" / "jobcomp.txt"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.bin_dir = self.root / "bin"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf),
                    "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 60) -> None:
        install_slurm(self.root.parent / f"{self.root.name}-apt.log")
        for d in ("state", "spool", "log", "munge", "run"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._start_munge()
        self.conf.write_text(self.slurm_conf())
        self._write_client_wrappers()
        self._spawn("slurmctld", [_tool("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]),
                   timeout_s, "slurmctld", self.ctld_log)
        self._spawn("slurmd", [_tool("slurmd"), "-D", "-f", str(self.conf), "-N", self.hostname])
        self._wait(self._node_idle, timeout_s, "slurmd (node idle)", self.slurmd_log)

    def stop(self) -> None:
        """Stop the daemons this object started (by pid), then anything left of their jobs."""
        if self.conf.exists() and "slurmctld" in self.procs:
            # cancel what is still queued or running, so no job outlives the cluster
            subprocess.run(["scancel", "--full", "--partition", self.partition], env=self.env,
                           capture_output=True, timeout=20)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    # -- configuration --------------------------------------------------------------------

    def slurm_conf(self) -> str:
        cpus, mem = node_resources()
        r = self.root
        return "\n".join([
            "# written by tests/slurm_cluster.py: one node, no cgroups, no accounting database",
            "ClusterName=loraforge-test",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={self.slurmd_log}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # no cgroups: processes are tracked by parent pid, tasks are not confined
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            f"MinJobAge={MIN_JOB_AGE_S}",
            "SchedulerParameters=sched_interval=2",
            f"NodeName={self.hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    # -- what happened --------------------------------------------------------------------

    def completed_jobs(self) -> list[dict[str, str]]:
        """The jobcomp/filetxt records of finished jobs: {"JobId", "JobName", "JobState", ...}."""
        if not self.jobcomp.exists():
            return []
        jobs = []
        for line in self.jobcomp.read_text().splitlines():
            fields = {}
            for kv in line.split():
                if "=" in kv:
                    k, v = kv.split("=", 1)
                    fields[k] = v
            if fields:
                jobs.append(fields)
        return jobs

    def submitted_job_ids(self) -> list[str]:
        """Job ids slurmctld's log shows as submitted through sbatch."""
        import re

        text = self.ctld_log.read_text() if self.ctld_log.exists() else ""
        return re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", text)

    # -- helpers --------------------------------------------------------------------------

    def _write_client_wrappers(self) -> None:
        """Client commands that find this cluster's slurm.conf without SLURM_CONF: the
        slurm-jobstep executor drops every SLURM_* variable before it calls srun inside a job
        (a real cluster's clients read /etc/slurm/slurm.conf, which these tests leave alone)."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for tool in CLIENT_TOOLS:
            real = shutil.which(tool, path=os.defpath + os.pathsep + "/usr/bin:/usr/sbin")
            if real is None:
                continue
            wrapper = self.bin_dir / tool
            wrapper.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec "{real}" "$@"\n')
            wrapper.chmod(0o755)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            rc = subprocess.run([_tool("mungekey"), "--create", f"--keyfile={key}"], capture_output=True, text=True)
            if rc.returncode != 0:
                raise SlurmUnavailable(f"mungekey --create failed: {rc.stderr.strip()}")
        log = self.root / "log" / "munged.log"
        self._spawn("munged", [_tool("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--log-file={log}",
                               f"--pid-file={self.root / 'run' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait(self.munge_socket.exists, 20, "munged", log)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def _wait(self, ready, timeout_s: float, what: str, log: Path) -> None:
        deadline = time.monotonic() + timeout_s
        name = what.split()[0]
        while time.monotonic() < deadline:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise SlurmUnavailable(f"{what} exited with {proc.returncode}: {self._tail(name, log)}")
            if ready():
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"{what} not ready after {timeout_s:.0f} s: {self._tail(name, log)}")

    def _tail(self, name: str, log: Path) -> str:
        lines = []
        for p in (log, self.root / "log" / f"{name}.stdout"):
            if p.exists():
                lines += p.read_text(errors="replace").splitlines()[-6:]
        return " | ".join(lines) or "(no log)"

    def _out(self, cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=15).stdout
        except subprocess.TimeoutExpired:
            return ""

    def _ok(self, cmd: list[str]) -> bool:
        try:
            return subprocess.run(cmd, env=self.env, capture_output=True, timeout=15).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _node_idle(self) -> bool:
        state = self._out(["sinfo", "-h", "-N", "-o", "%t", "-n", self.hostname]).strip()
        return state.startswith("idle")
