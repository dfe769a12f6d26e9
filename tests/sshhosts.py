"""Test hosts for the fleet: real OpenSSH servers on this machine, each on a loopback
address of its own (127.0.0.2, 127.0.0.3...), each in a PID and mount namespace of its own
so that killing a host ends every process of it at once, like a machine going away.

Each host's server has its own host key, listed in a known_hosts file the tests made
(host keys stay checked: StrictHostKeyChecking=yes); the client key is made for the test.
A host may hide /dev/kvm (its /dev is a tmpfs with only null, zero, random, urandom, tty
and the ptys), hide QEMU (its binaries covered by /dev/null), or accept another key than
the client's (its login fails). Traffic goes to
loopback addresses only; every wait is bounded."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

SSHD = "/usr/sbin/sshd"
PORT = 2222


def available() -> str | None:
    """Why the test hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "test SSH hosts need root (namespaces, sshd)"
    for tool in (SSHD, shutil.which("ssh"), shutil.which("ssh-keygen"),
                 shutil.which("unshare")):
        if not tool or not os.path.exists(tool):
            return "needs openssh-server, openssh-client and unshare (sh scripts/fleet-tools.sh)"
    return None


def _keygen(path: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)


class Host:
    def __init__(self, name: str, addr: str, work: str, hide_kvm: bool = False,
                 wrong_key: bool = False, serve: bool = True, hide_qemu: bool = False):
        self.name, self.addr, self.work = name, addr, work
        self.hide_kvm, self.wrong_key, self.serve = hide_kvm, wrong_key, serve
        self.hide_qemu = hide_qemu
        self.dir = os.path.join(work, name)
        self.root = os.path.join(self.dir, "install")      # pyvmm_fleet_root
        self.proc: subprocess.Popen | None = None

    def start(self, client_pub: str) -> None:
        os.makedirs(self.dir, exist_ok=True)
        hk = os.path.join(self.dir, "hostkey")
        if not os.path.exists(hk):
            _keygen(hk)
        auth = os.path.join(self.dir, "authorized_keys")
        if self.wrong_key:
            other = os.path.join(self.dir, "otherkey")
            if not os.path.exists(other):
                _keygen(other)
            shutil.copy(other + ".pub", auth)
        else:
            shutil.copy(client_pub, auth)
        cfg = os.path.join(self.dir, "sshd_config")
        with open(cfg, "w") as f:
            f.write(f"ListenAddress {self.addr}:{PORT}\nHostKey {hk}\n"
                    f"PidFile {self.dir}/sshd.pid\nAuthorizedKeysFile {auth}\n"
                    "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                    "MaxStartups 50\nLogLevel ERROR\n"
                    "Subsystem sftp /usr/lib/openssh/sftp-server\n")
        setup = ""
        if self.hide_kvm:
            nodev = os.path.join(self.dir, "dev")
            os.makedirs(nodev, exist_ok=True)
            binds = " ".join(["null", "zero", "random", "urandom", "tty", "ptmx", "full"])
            setup = (f"mount -t tmpfs -o mode=0755 none {nodev} && "
                     f"for d in {binds}; do touch {nodev}/$d && "
                     f"mount --bind /dev/$d {nodev}/$d; done && mkdir {nodev}/pts && "
                     f"mount --bind /dev/pts {nodev}/pts && mount --move {nodev} /dev && ")
        try:            # the address must be ours alone (a stray server would answer)
            with socket.create_connection((self.addr, PORT), timeout=0.5):
                raise RuntimeError(f"{self.addr}:{PORT} is already served by something else")
        except OSError:
            pass
        if self.hide_qemu:
            # QEMU is not installed here: its binaries are a device nobody may execute
            for q in ("/usr/bin/qemu-system-x86_64", "/usr/bin/qemu-system-aarch64"):
                if os.path.exists(q):
                    setup += f"mount --bind /dev/null {q} && "
        os.makedirs("/run/sshd", exist_ok=True)
        script = f"{setup}exec {SSHD} -D -f {cfg} -E {self.dir}/sshd.log"
        self.proc = subprocess.Popen(
            ["unshare", "--fork", "--pid", "--mount", "--propagation", "private",
             "--mount-proc", "--kill-child", "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd for {self.name} exited: "
                                   + open(f"{self.dir}/sshd.log").read()[-500:])
            try:
                with socket.create_connection((self.addr, PORT), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"sshd for {self.name} did not listen on {self.addr}:{PORT}")

    def kill(self) -> None:
        """The host goes away: its namespace's init dies, and with it every process."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def known_hosts_line(self) -> str | None:
        pub = os.path.join(self.dir, "hostkey.pub")
        if not os.path.exists(pub):
            return None
        with open(pub) as f:
            kind, key = f.read().split()[:2]
        return f"[{self.addr}]:{PORT} {kind} {key}"


class Fleet:
    """Several test hosts, their known_hosts, the client key and an inventory."""

    def __init__(self, work: str, specs: list[dict]):
        self.work = work
        os.makedirs(work, exist_ok=True)
        self.key = os.path.join(work, "clientkey")
        _keygen(self.key)
        self.hosts = [Host(s["name"], s["addr"], work, s.get("hide_kvm", False),
                           s.get("wrong_key", False), s.get("serve", True),
                           s.get("hide_qemu", False)) for s in specs]
        self.known_hosts = os.path.join(work, "known_hosts")

    def start(self) -> "Fleet":
        for h in self.hosts:
            if h.serve:
                h.start(self.key + ".pub")
        with open(self.known_hosts, "w") as f:
            for h in self.hosts:
                line = h.known_hosts_line()
                if line:
                    f.write(line + "\n")
        return self

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def inventory(self, path: str | None = None, extra: str = "") -> str:
        path = path or os.path.join(self.work, "inventory.ini")
        common = (f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes "
                  "-o ConnectTimeout=5")
        with open(path, "w") as f:
            f.write("[testhosts]\n")
            for h in self.hosts:
                f.write(f"{h.name} ansible_host={h.addr} ansible_port={PORT} "
                        f"ansible_user=root ansible_ssh_private_key_file={self.key} "
                        f"pyvmm_fleet_root={h.root} {extra}\n")
            f.write(f"\n[testhosts:vars]\nansible_ssh_common_args='{common}'\n")
        return path

    def stop(self) -> None:
        for h in self.hosts:
            h.kill()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
