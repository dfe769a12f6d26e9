"""`pyvmm lab hosts`: a fleet of real kernels on one machine. Each lab variant boots under
QEMU (TCG, emulated SVM, KVM loaded) as a host that serves SSH: this machine's sshd and
python3 in its initramfs, an e1000 NIC on QEMU's user network, port 22 forwarded to a
port of 127.0.0.1. An Ansible inventory of them is written beside a client key and a
known_hosts file (each host's key made here), so `pyvmm fleet run -i INVENTORY bench`
reaches them through the same Ansible path a real fleet takes. The hosts run until
`pyvmm lab hosts --stop`; each host's kernel-check goes into the inventory
(pyvmm_kernel_check), which the fleet's rows compare with what they measure.

Nothing of pyvmm is put into the hosts: the fleet installs it as on any host."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

from ...errors import LabError
from ...results import envelope, new_run_dir, safe_name, write_json_atomic
from ..arch import X86_64
from ..boot import hostruntime, initramfs, qemu
from ..builds.variant import Variant
from ..sources import kits
from ..sources.cache import cache_dir
from .multi import check_variants
from .options import LabOptions, Ui, kernel_cmdline, module_args
from .ready import ready

SCHEMA = "pyvmm.lab-hosts/1"
DEFAULT_VARIANTS = ("6.1", "6.1+defer-free", "7.3", "7.3+srcu-kick@hz250")
NIC_MODULES = ("e1000",)
HOST_MEM_MB = 2048
FLEET_ROOT = "/root/pyvmm-fleet"


def current_file() -> str:
    return os.path.join(cache_dir(), "labhosts", "current")


def host_name(v: Variant) -> str:
    return "lab-" + safe_name(v.label.replace("+", "-").replace("@", "-").replace(":", "-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: str, comment: str) -> None:
    p = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                        path], capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"ssh-keygen failed: {p.stderr.strip()} (apt-get install "
                       "openssh-client)")


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(5)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def start(variants: list[Variant], base: LabOptions, ui: Ui, mem_mb: int = HOST_MEM_MB,
          wait_s: float = 900.0) -> tuple[dict, str]:
    other = [v.label for v in variants if v.arch != X86_64]
    if other:
        raise LabError(f"lab hosts are x86_64 lab kernels (the host runs this machine's sshd "
                       f"and python3): {', '.join(other)} cannot be one")
    check_variants(variants, base, ui)
    out = new_run_dir(base.out, "lab-hosts")
    key = os.path.join(out, "client_key")
    _keygen(key, "pyvmm lab hosts")
    with open(key + ".pub", "rb") as f:
        client_pub = f.read()
    runtime = hostruntime.build(ui.log)
    path = os.path.join(out, "hosts.json")
    doc = envelope(SCHEMA, None, status="starting", finished=None, hosts=[],
                   inventory=os.path.join(out, "inventory.ini"), client_key=key,
                   known_hosts=os.path.join(out, "known_hosts"))
    write_json_atomic(path, doc)
    os.makedirs(os.path.dirname(current_file()), exist_ok=True)
    with open(current_file(), "w") as f:
        f.write(os.path.abspath(out) + "\n")
    try:
        for i, v in enumerate(variants):
            ui.log(f"[{i + 1}/{len(variants)}] host {host_name(v)}: {v.label}")
            doc["hosts"].append(_boot(v, base.for_variant(v, out=out), ui, out, runtime,
                                      client_pub, mem_mb))
            write_json_atomic(path, doc)
        _wait(doc, ui, wait_s)
    except BaseException:
        stop(out, ui)
        raise
    _inventory(doc, out)
    doc["status"] = "running"
    write_json_atomic(path, doc)
    return doc, out


def _boot(v: Variant, opts: LabOptions, ui: Ui, out: str, runtime, client_pub: bytes,
          mem_mb: int) -> dict:
    r = ready(opts, ui)
    kit = r.kit
    modules = dict(r.modules)
    if not kit.builtin:
        if r.debs is None:
            raise LabError(f"{v.label}: the kit's packages are not known")
        modules.update(kits.extra_modules(kit, r.debs, NIC_MODULES, ui.log))
    name = host_name(v)
    hdir = os.path.join(out, name)
    os.makedirs(hdir)
    hk = os.path.join(hdir, "host_key")
    _keygen(hk, name)
    with open(hk, "rb") as f:
        host_key = f.read()
    config = None
    if kit.meta.get("config_source") and os.path.exists(os.path.join(kit.path, "config")):
        with open(os.path.join(kit.path, "config"), "rb") as f:
            config = f.read()
    mine = hostruntime.host_files(host_key, client_pub, runtime.python, config,
                                  kit.meta["kernel_release"])
    image = initramfs.build_host(r.busybox, modules, module_args(kit, opts.kvm_args),
                                 runtime.archive + mine, kit.arch.data_tty)
    initrd = os.path.join(hdir, "initramfs.cpio.gz")
    with open(initrd, "wb") as f:
        f.write(image)
    port = _free_port()
    cfg = qemu.QemuConfig(kernel=kit.vmlinuz, initrd=initrd, smp=opts.smp, mem_mb=mem_mb,
                          extra_args=kernel_cmdline(opts, kit), arch=kit.arch)
    cmd = qemu.command(cfg, os.path.join(hdir, "console.log"), os.path.join(hdir, "data.log"))
    cmd += ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "e1000,netdev=n0"]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(os.path.join(hdir, "qemu.err"), "wb"),
                         start_new_session=True)
    kc = r.kernel_check
    return {"name": name, "variant": v.label, "port": port, "pid": p.pid, "dir": hdir,
            "initrd": initrd, "kernel": kit.meta["kernel_release"],
            "initramfs_bytes": len(image), "command": cmd,
            "kernel_check": {"behaviour": kc.get("behaviour"),
                             "mechanism": kc.get("mechanism"),
                             "stall_expected": kc.get("stall_expected"),
                             "summary": kc.get("summary")},
            "host_key": hk + ".pub", "ready_s": None, "state": "booting"}


def _wait(doc: dict, ui: Ui, wait_s: float) -> None:
    """Until every host answers SSH (its banner on its port), or fails."""
    t0 = time.monotonic()
    todo = list(doc["hosts"])
    while todo:
        for h in list(todo):
            data = os.path.join(h["dir"], "data.log")
            text = open(data, errors="replace").read() if os.path.exists(data) else ""
            err = [ln for ln in text.splitlines() if ln.startswith(initramfs.ERROR)]
            alive = _alive(h)
            if err or not alive:
                why = err[-1][len(initramfs.ERROR):].strip() if err else "QEMU exited"
                raise LabError(f"lab host {h['name']} ({h['variant']}) did not come up: {why}; "
                               f"logs in {h['dir']}")
            if f"{initramfs.FACT} host_ready" in text and _banner(h["port"]):
                h["ready_s"] = round(time.monotonic() - t0, 1)
                h["state"] = "running"
                ui.log(f"{h['name']}: sshd answers on 127.0.0.1:{h['port']} "
                       f"({h['ready_s']} s)")
                todo.remove(h)
        if todo and time.monotonic() - t0 > wait_s:
            raise LabError(f"lab hosts {', '.join(h['name'] for h in todo)} did not answer "
                           f"SSH within {wait_s:g} s")
        if todo:
            time.sleep(1.0)


def _inventory(doc: dict, out: str) -> None:
    with open(doc["known_hosts"], "w") as f:
        for h in doc["hosts"]:
            with open(h["host_key"]) as k:
                kind, key = k.read().split()[:2]
            f.write(f"[127.0.0.1]:{h['port']} {kind} {key}\n")
    lines = ["# written by pyvmm lab hosts: lab kernels under QEMU that serve SSH",
             "[labhosts]"]
    for h in doc["hosts"]:
        kc = h["kernel_check"]
        lines.append(f"{h['name']} ansible_host=127.0.0.1 ansible_port={h['port']} "
                     f"pyvmm_variant='{h['variant']}' "
                     f"pyvmm_kernel_check={kc['behaviour'] or 'unknown'} "
                     f"pyvmm_kernel_check_stall={str(bool(kc['stall_expected'])).lower()} "
                     f"pyvmm_kernel_check_mechanism={safe_name(kc['mechanism'] or '-')}")
    lines += ["", "[labhosts:vars]", "ansible_user=root",
              f"ansible_ssh_private_key_file={doc['client_key']}",
              f"pyvmm_fleet_root={FLEET_ROOT}",
              f"ansible_ssh_common_args='-o UserKnownHostsFile={doc['known_hosts']} "
              "-o StrictHostKeyChecking=yes -o ConnectTimeout=30'", ""]
    with open(doc["inventory"], "w") as f:
        f.write("\n".join(lines))


def _alive(h: dict) -> bool:
    """Whether the host's QEMU still runs (and is that QEMU: its command line names the
    host's initramfs)."""
    try:
        with open(f"/proc/{h['pid']}/cmdline", "rb") as f:
            return h["initrd"].encode() in f.read()
    except OSError:
        return False


def stop(out: str | None, ui: Ui) -> list[dict]:
    """End the hosts of a `lab hosts` run (the last one when `out` is None)."""
    if out is None:
        try:
            with open(current_file()) as f:
                out = f.read().strip()
        except OSError:
            raise LabError("no lab hosts are known to be running (pyvmm lab hosts starts "
                           "them; give --stop DIR for an older run)") from None
    path = os.path.join(out, "hosts.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        raise LabError(f"{out}: no hosts.json (not a lab hosts run)") from None
    for h in doc["hosts"]:
        if _alive(h):
            os.kill(h["pid"], signal.SIGTERM)
            for _ in range(50):
                if not _alive(h):
                    break
                time.sleep(0.1)
            if _alive(h):
                os.kill(h["pid"], signal.SIGKILL)
            ui.log(f"{h['name']}: stopped")
        h["state"] = "stopped"
    doc["status"], doc["finished"] = "stopped", time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(path, doc)
    try:
        with open(current_file()) as f:
            if f.read().strip() == os.path.abspath(out):
                os.unlink(current_file())
    except OSError:
        pass
    return doc["hosts"]
