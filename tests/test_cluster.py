"""Two hosts on one machine: network namespaces joined by a veth pair (deploy/)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import MPIEXEC, requires_mpiexec, requires_mpi4py

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _can_make_namespaces():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"pcmprobe{os.getpid()}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if created:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return created


requires_netns = pytest.mark.skipif(
    not _can_make_namespaces(), reason="needs root and 'ip netns' to create test hosts"
)


def _veth_bytes(prefix):
    shown = subprocess.run(
        ["ip", "-n", f"{prefix}-h1", "-s", "link", "show", f"{prefix}-v1"],
        capture_output=True, text=True, check=True,
    ).stdout
    # The line after "TX:" starts with the transmitted byte count.
    lines = shown.splitlines()
    tx_header = next(i for i, line in enumerate(lines) if line.strip().startswith("TX:"))
    return int(re.split(r"\s+", lines[tx_header + 1].strip())[0])


@pytest.fixture
def two_hosts():
    prefix = f"pcm{os.getpid() % 100000}"
    script = DEPLOY / "netns-hosts.sh"
    subprocess.run(["bash", str(script), "up", prefix], check=True, capture_output=True)
    try:
        yield prefix
    finally:
        subprocess.run(["bash", str(script), "down", prefix], capture_output=True)


@requires_netns
@requires_mpiexec
@requires_mpi4py
@pytest.mark.mpi
def test_two_hosts_match_single_process(two_hosts):
    env = dict(os.environ, PCM_NETNS_PREFIX=two_hosts, OMP_NUM_THREADS="1")
    before = _veth_bytes(two_hosts)
    command = [
        "ip", "netns", "exec", f"{two_hosts}-h1", "timeout", "--signal=KILL", "180",
        str(MPIEXEC), "-launcher-exec", str(DEPLOY / "netns-launcher.sh"),
        "-localhost", "10.231.0.1", "-f", str(DEPLOY / "hosts.netns"), "-n", "2",
        # Without this MPICH may move data through shared memory across the namespaces.
        "-genv", "UCX_TLS", "tcp",
        sys.executable, "-m", "mpi4py", str(ROOT / "tests" / "cluster_check.py"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("max error") == 4, result.stdout
    # Each strategy moves at least the 3x4x37x29 float64 input across the link.
    assert _veth_bytes(two_hosts) - before > 3 * 4 * 37 * 29 * 8, "no traffic crossed the veth"
