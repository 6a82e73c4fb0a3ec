"""imagefs agent: `imagefs run` through a resident launcher, end to end (real cgroups, namespaces,
FUSE and overlayfs), and the wire between the two without root.

Each test's agent is started by the fixture on the test's own store and work dir, ended by its
PID, and checked gone with its socket and standby server; the launcher fixture of
test_launcher.py recovers and removes the test's cgroup root whatever happened.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from launcher.agent_client import Messages, send_message
from tests.mounts import needs_fuse
from tests.support.images import wait_until
from tests.test_launcher import Launcher, image, launcher  # noqa: F401  (fixtures: cleanup included)


def test_messages_carry_descriptors_and_split_lines():
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        send_message(a, {"run": ["x"]}, [w])
        send_message(a, {"signal": 15})
        a.close()
        messages = Messages(b)
        got = list(messages)
        assert got == [{"run": ["x"]}, {"signal": 15}]
        assert len(messages.fds) == 1
        os.write(messages.fds[0], b"through the passed descriptor")
        assert os.read(r, 100) == b"through the passed descriptor"
        os.close(messages.fds[0])
    finally:
        b.close()
        os.close(r)
        os.close(w)


def test_messages_refuse_a_non_object():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"[1, 2]\n")
        with pytest.raises(ValueError):
            list(Messages(b))


class Agent:
    """`imagefs agent` on a Launcher's store and work dir, logging to a file."""

    def __init__(self, launcher: Launcher, *extra: str) -> None:
        self.launcher = launcher
        self.log = launcher.tmp / "agent.log"
        cli = launcher.cli
        cmd = [sys.executable, "-m", "imagefs", "--store", str(cli.store), "--work-dir", str(cli.work),
               "--cgroup-root", launcher.cgroup_root, "-v", *extra, "agent"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        self.ready = self.proc.stdout.readline().decode()   # written once it accepts connections
        self.socket = cli.work / "run" / "agent.sock"

    def log_text(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        children = []
        if self.proc.poll() is None:
            try:
                children = psutil.Process(self.proc.pid).children()
            except psutil.NoSuchProcess:
                pass
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        # Its standby server exits on EOF of its job pipe; one with a job (a mount) is the
        # launcher fixture's to clean up.
        for child in children:
            try:
                child.wait(timeout=30)
            except psutil.NoSuchProcess:
                pass
            except psutil.TimeoutExpired:
                if "--standby-fd" in " ".join(child.cmdline()):
                    child.kill()
                    raise AssertionError(f"the agent's standby server {child.pid} outlived it")


@pytest.fixture
def agent(launcher):
    a = Agent(launcher)
    try:
        assert a.ready.startswith("imagefs agent: serving"), a.log_text()
        yield a
    finally:
        a.stop()
    assert a.proc.returncode == 0, a.log_text()
    assert not a.socket.exists()


@needs_fuse
def test_run_through_the_agent(launcher, agent, image):
    r = launcher.run("run", "--name", "a1", image, "--", "sh", "-c",
                     "echo pid=$$; echo to-stderr >&2; echo $FROM_IMAGE; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout.splitlines() == ["pid=2", "yes"]
    assert r.stderr == "to-stderr\n"
    assert "agent: a run for pid" in agent.log_text()
    # The agent started a new standby mount server for the next run; that one mounts at once.
    r = launcher.run("run", image, "--", "cat", "/app/hello")
    assert r.returncode == 0 and r.stdout == "hello from the image\n", r.stderr
    assert agent.log_text().count("agent: a run for pid") == 2
    # Failures the launcher reports reach the client as one line, with their status.
    r = launcher.run("run", image, "--", "/no/such/binary")
    assert r.returncode == 127 and "not found" in r.stderr.lower()
    r = launcher.run("run", "--memory", "lots", image, "--", "true")
    assert r.returncode == 125 and r.stderr.count("\n") == 1 and "--memory" in r.stderr
    r = launcher.run("run", "-d", "--name", "bg", image, "--", "sh", "-c", "exit 7")
    assert r.returncode == 0 and r.stdout.strip() == "bg"
    assert launcher.run("wait", "bg").returncode == 7


@needs_fuse
def test_agent_runs_tasks_at_once_and_relays_signals(launcher, agent, image, tmp_path):
    sandbox = launcher.cli.work / "containers"
    cmd = [sys.executable, "-m", "imagefs", "--store", str(launcher.cli.store), "--work-dir", str(launcher.cli.work),
           "--cgroup-root", launcher.cgroup_root, "run"]
    script = "trap 'echo got-term; exit 42' TERM; touch /mnt/mesos/sandbox/up; while :; do sleep 1; done"
    clients = [subprocess.Popen([*cmd, "--name", f"s{i}", image, "--", "sh", "-c", script], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for i in range(2):
            wait_until(lambda: (sandbox / f"s{i}" / "sandbox" / "up").exists(), 120, f"task s{i} up")
        for c in clients:
            c.send_signal(signal.SIGTERM)   # relayed by the client, delivered by the agent
        for c in clients:
            out, err = c.communicate(timeout=60)
            assert c.returncode == 42, err
            assert out == "got-term\n"
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
    assert agent.log_text().count("agent: a run for pid") == 2


@needs_fuse
def test_agent_refuses_what_it_cannot_run_as_the_client_would(launcher, agent, image, tmp_path):
    auth = tmp_path / "auth.json"
    auth.write_text("{}")
    launcher.cli.env["IMAGEFS_AUTH_FILE"] = str(auth)   # the client's sources differ from the agent's
    r = launcher.run("run", image, "--", "echo", "ran-here")
    assert r.returncode == 0 and r.stdout == "ran-here\n", r.stderr
    assert "refused a run" in agent.log_text() and "agent: a run for pid" not in agent.log_text()
    del launcher.cli.env["IMAGEFS_AUTH_FILE"]
    r = launcher.run("run", "--no-agent", image, "--", "echo", "not-through-the-agent")
    assert r.returncode == 0 and r.stdout == "not-through-the-agent\n"
    assert "agent: a run for pid" not in agent.log_text()


@needs_fuse
def test_one_agent_a_work_dir_and_none_left_behind(launcher, agent, image):
    second = Agent(launcher)
    try:
        assert second.proc.wait(timeout=60) == 2
        assert second.ready == ""
        lines = second.log_text().strip().splitlines()
        assert lines[-1] == f"imagefs: agent: another agent serves {os.path.realpath(launcher.cli.work)} already"
    finally:
        second.stop()
    assert agent.socket.exists()   # the second one left the first one's socket alone
    # The first still serves.
    r = launcher.run("run", image, "--", "true")
    assert r.returncode == 0, r.stderr
    assert "agent: a run for pid" in agent.log_text()


@needs_fuse
def test_a_run_after_the_agent_stopped_runs_in_the_client(launcher, image):
    a = Agent(launcher)
    a.stop()
    assert a.proc.returncode == 0 and not a.socket.exists()
    r = launcher.run("run", image, "--", "echo", "alone")
    assert r.returncode == 0 and r.stdout == "alone\n", r.stderr


@needs_fuse
def test_an_agent_recovers_the_work_dir_before_it_serves(launcher, image):
    """A detached container whose task ended while nobody watched is destroyed by the recovery an
    agent runs when it starts (as a Mesos agent does), before it accepts a run."""
    r = launcher.run("run", "--no-agent", "-d", "--name", "r1", image, "--", "sh", "-c", "exit 4")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: "ended" in launcher.run("ps").stdout, 60, "the detached task to end")
    a = Agent(launcher)
    try:
        assert a.ready.startswith("imagefs agent: serving"), a.log_text()
        row = next(line for line in launcher.run("ps").stdout.splitlines() if line.startswith("r1 "))
        assert "exited 4" in row
    finally:
        a.stop()
    assert a.proc.returncode == 0
