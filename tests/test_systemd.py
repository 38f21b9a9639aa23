"""qkdnode under systemd, as an operator installs it (docs/operations.md):

- the unit files say what the design asks (Type=notify with a watchdog, a dedicated user, the
  vault in StateDirectory, the master key as a credential, a hardened sandbox), and agree with
  the example config, the sysusers and tmpfiles files: checked by reading the files, always;
- `systemd-analyze verify` accepts them as installed (ExecStart where the recipe puts it) and
  `systemd-analyze security --offline=true` scores them 2.0 or lower: run wherever systemd's
  tools are installed (Debian package `systemd`; .ci/run installs it), skipped with that
  reason elsewhere;
- the sd_notify client speaks the protocol on real datagram sockets (a path and an abstract
  name), and the daemon itself says READY=1, WATCHDOG=1 and STOPPING=1 from its main process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from hil.pki import ThrowawayPKI, write_private
from hil.testbed import free_port
from qkdnode.sdnotify import SystemdNotifier

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
SERVICE = SYSTEMD / "qkdnode.service"
TEMPLATE = SYSTEMD / "qkdnode@.service"
SERIAL_DROPIN = SYSTEMD / "serial-devices.conf.example"
EXEC = "/opt/qkdnode/.venv/bin/qkdnode"

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package `systemd`, which .ci/run installs); "
           "the unit files are still checked by reading them")


# ---------------------------------------------------------------- reading unit files


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """[section] -> key -> every value in order (an empty assignment resets, as systemd does)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: assignment before any section: {line!r}"
        assert not line.endswith("\\"), f"{path}: keep one directive per line: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        key, value = key.strip(), value.strip()
        values = current.setdefault(key, [])
        if value == "":
            values.clear()
        values.append(value)
    return sections


def one(unit: dict, key: str, section: str = "Service") -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times: {values}"
    return values[0]


# What the design and the issue ask of both units' sandbox, directive by directive.
SANDBOX = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30s",
    "Restart": "on-failure",
    "User": "qkdnode",
    "Group": "qkdnode",
    "StateDirectoryMode": "0700",
    "ConfigurationDirectory": "qkdnode",
    "UMask": "0077",
    "LimitCORE": "0",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "PrivateMounts": "yes",
    "PrivateIPC": "yes",
    "ProtectHostname": "yes",
    "ProtectClock": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictSUIDSGID": "yes",
    "RemoveIPC": "yes",
    "KeyringMode": "private",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "RestrictNamespaces": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
}


@pytest.mark.parametrize("path", [SERVICE, TEMPLATE], ids=lambda p: p.name)
def test_unit_runs_the_daemon_as_a_notify_service_in_a_hardened_sandbox(path):
    unit = parse_unit(path)
    for key, expected in SANDBOX.items():
        assert one(unit, key) == expected, f"{path.name}: {key}="
    assert "DynamicUser" not in unit["Service"], "the vault's owner must stay the same across boots"
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert "AF_NETLINK" not in one(unit, "RestrictAddressFamilies")
    assert one(unit, "ExecStart").startswith(EXEC + " run --config /etc/qkdnode/")
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID", "systemctl reload sends the SIGHUP the daemon handles"
    assert "network-online.target" in one(unit, "After", "Unit")
    assert one(unit, "WantedBy", "Install") == "multi-user.target"


def test_single_node_unit_reads_node_toml_and_keeps_the_vault_in_var_lib_qkdnode():
    unit = parse_unit(SERVICE)
    assert one(unit, "ExecStart") == f"{EXEC} run --config /etc/qkdnode/node.toml"
    assert one(unit, "StateDirectory") == "qkdnode"
    assert one(unit, "LoadCredential") == "vault-master-key:/etc/credstore/qkdnode-vault-master-key"


def test_template_gives_every_instance_its_config_vault_and_master_key():
    unit = parse_unit(TEMPLATE)
    assert one(unit, "ExecStart") == f"{EXEC} run --config /etc/qkdnode/%i.toml"
    assert one(unit, "StateDirectory") == "qkdnode/%i"
    assert one(unit, "LoadCredential") == "vault-master-key:/etc/credstore/qkdnode-%i-vault-master-key"
    assert "%i" in one(unit, "Description", "Unit")


def test_template_differs_from_the_single_node_unit_only_where_it_names_the_node():
    single, template = parse_unit(SERVICE), parse_unit(TEMPLATE)
    naming = {"Description", "ExecStart", "StateDirectory", "LoadCredential"}
    for section in ("Unit", "Service", "Install"):
        a = {k: v for k, v in single[section].items() if k not in naming}
        b = {k: v for k, v in template[section].items() if k not in naming}
        assert a == b, f"[{section}] of the two units drifted apart"


def test_example_config_fits_the_unit():
    """node-a.example.toml is installed as /etc/qkdnode/node.toml: its credential is the one the
    unit loads, its vault is in the state directory, and every file it names is one the sandbox
    lets the daemon read."""
    unit = parse_unit(SERVICE)
    cfg = tomllib.loads((ROOT / "config" / "node-a.example.toml").read_text())
    credential_id = one(unit, "LoadCredential").split(":", 1)[0]
    assert cfg["vault"]["master_key_credential"] == credential_id
    state = Path("/var/lib") / one(unit, "StateDirectory")
    assert Path(cfg["vault"]["path"]).parent == state
    config_dir = Path("/etc") / one(unit, "ConfigurationDirectory")
    files = [cfg["tls"][k] for k in ("ca", "cert", "key")]
    files += [link["settings"][k] for link in cfg["links"] for k in ("ca", "cert", "key") if k in link["settings"]]
    for f in files:
        # ProtectHome hides /home and /root, PrivateTmp hides /tmp: files must live in the config dir.
        assert Path(f).is_relative_to(config_dir), f"{f} is outside {config_dir}"


def test_sysusers_creates_the_user_the_units_run_as():
    lines = [ln.split() for ln in (SYSTEMD / "qkdnode.sysusers").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    users = [ln for ln in lines if ln[0] == "u"]
    assert len(users) == 1 and users[0][1] == one(parse_unit(SERVICE), "User")
    assert users[0][-2:] == ["/var/lib/qkdnode", "-"], "home is the state directory, no login shell"


def test_tmpfiles_keeps_the_credential_store_root_only_and_pki_for_the_daemon_group():
    entries = {ln.split()[1]: ln.split() for ln in (SYSTEMD / "qkdnode.tmpfiles").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert entries["/etc/credstore"][:5] == ["d", "/etc/credstore", "0700", "root", "root"]
    assert entries["/etc/qkdnode/pki"][:5] == ["d", "/etc/qkdnode/pki", "0750", "root", "qkdnode"]
    assert not any(p.startswith("/var/lib/qkdnode") for p in entries), "StateDirectory= owns that"


def test_serial_drop_in_binds_and_allows_each_device_it_names():
    unit = parse_unit(SERIAL_DROPIN)
    binds = [b.lstrip("-") for b in unit["Service"]["BindPaths"]]
    allows = [a.split()[0] for a in unit["Service"]["DeviceAllow"]]
    assert binds and binds == allows
    assert all(a.split()[1] == "rw" for a in unit["Service"]["DeviceAllow"])


# ---------------------------------------------------------------- systemd's own tools


@pytest.fixture
def installed(tmp_path):
    """A root folder laid out as the install recipe leaves a host: the units in
    /etc/systemd/system, the console script at its place, and systemd's own units (for
    sysinit.target, network-online.target and the like) copied from this machine."""
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for f in (SERVICE, TEMPLATE):
        shutil.copy(f, units / f.name)
    system_units = Path("/usr/lib/systemd/system")
    if not system_units.is_dir():
        pytest.skip(f"{system_units} is missing: systemd-analyze is here but not systemd's units")
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    for program in (EXEC, "/bin/kill"):  # ours, and procps' kill that ExecReload= runs
        exe = root / program.lstrip("/")
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"})


def verify(root: Path, unit: str) -> str:
    """What `systemd-analyze verify` found wrong with an installed unit; "" if nothing. It exits 0
    on some findings (an unknown directive is a warning), so its output counts as much as its code."""
    r = analyze("verify", "--man=no", f"--root={root}", unit)
    found = (r.stdout + r.stderr).strip()
    return found or ("" if r.returncode == 0 else f"exit code {r.returncode}")


@needs_analyze
@pytest.mark.parametrize("unit", ["qkdnode.service", "qkdnode@node-a.service"])
def test_systemd_analyze_verify_accepts_the_installed_unit(installed, unit):
    assert verify(installed, unit) == ""


@needs_analyze
def test_systemd_analyze_verify_accepts_the_serial_device_drop_in(installed):
    dropins = installed / "etc/systemd/system/qkdnode.service.d"
    dropins.mkdir()
    shutil.copy(SERIAL_DROPIN, dropins / "serial-devices.conf")
    assert verify(installed, "qkdnode.service") == ""


@needs_analyze
def test_systemd_analyze_verify_would_catch_a_typo_or_a_missing_program(installed):
    """The two checks above mean something: verify fails on what an operator could get wrong."""
    unit = installed / "etc/systemd/system/qkdnode.service"
    unit.write_text(unit.read_text().replace("PrivateTmp=yes", "PrivateTmpp=yes"))
    assert "Unknown key 'PrivateTmpp'" in verify(installed, "qkdnode.service")
    (installed / EXEC.lstrip("/")).unlink()
    assert f"{EXEC} is not executable" in verify(installed, "qkdnode@node-a.service")


@needs_analyze
@pytest.mark.parametrize("unit", ["qkdnode.service", "qkdnode@node-a.service"])
def test_systemd_analyze_security_scores_the_unit_2_0_or_lower(installed, unit):
    r = analyze("security", "--offline=true", f"--root={installed}", "--threshold=20", "--no-pager", unit)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0 and r.returncode == 0, r.stdout
    # The open points are the ones a network daemon must keep, or the operator's to close.
    open_points = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("✗")}
    assert open_points <= {"RootDirectory=/RootImage=", "RestrictAddressFamilies=~AF_UNIX",
                           "RestrictAddressFamilies=~AF_(INET|INET6)", "PrivateNetwork=", "DeviceAllow=",
                           "IPAddressDeny="}, r.stdout


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers/systemd-tmpfiles are not installed (Debian package `systemd`)")
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must be root to give folders their owners")
def test_sysusers_and_tmpfiles_prepare_a_fresh_host(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for src, dest in ((SYSTEMD / "qkdnode.sysusers", "usr/lib/sysusers.d/qkdnode.conf"),
                      (SYSTEMD / "qkdnode.tmpfiles", "usr/lib/tmpfiles.d/qkdnode.conf")):
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / dest)
    subprocess.run(["systemd-sysusers", f"--root={root}"], check=True, capture_output=True, timeout=60)
    passwd = {ln.split(":")[0]: ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines()}
    assert passwd["qkdnode"][5:] == ["/var/lib/qkdnode", "/usr/sbin/nologin"]
    gid = int(passwd["qkdnode"][3])
    subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create"], check=True, capture_output=True, timeout=60)
    credstore, pki = (root / "etc/credstore").stat(), (root / "etc/qkdnode/pki").stat()
    assert (credstore.st_mode & 0o7777, credstore.st_uid, credstore.st_gid) == (0o700, 0, 0)
    assert (pki.st_mode & 0o7777, pki.st_uid, pki.st_gid) == (0o750, 0, gid)


# ---------------------------------------------------------------- the sd_notify protocol


class Listener:
    """The service manager's end: a datagram socket, bound to a path or an abstract name,
    that receives with the sender's credentials as systemd does (SO_PASSCRED)."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)

    def recv(self, timeout: float = 5.0) -> tuple[dict[str, str], int]:
        """One message as {KEY: VALUE}, and the PID of the process that sent it."""
        self.sock.settimeout(timeout)
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = next(struct.unpack("iII", d[:12])[0] for level, kind, d in ancdata
                   if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        return fields, pid

    def pending(self) -> list[dict[str, str]]:
        out = []
        self.sock.setblocking(False)
        while True:
            try:
                out.append(dict(ln.split("=", 1) for ln in self.sock.recv(4096).decode().split("\n")))
            except BlockingIOError:
                return out

    def close(self):
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    address = str(tmp_path / "notify") if request.param == "path" else f"@qkdnode-test-{uuid.uuid4().hex}"
    lst = Listener(address)
    yield lst
    lst.close()


def test_notifier_sends_ready_status_watchdog_and_stopping(listener):
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": listener.address})
    assert n.enabled
    assert n.ready("node A: serving")
    assert listener.recv() == ({"READY": "1", "STATUS": "node A: serving"}, os.getpid())
    assert n.status("2 links up\nthe second line")
    assert listener.recv()[0] == {"STATUS": "2 links up the second line"}  # one message, one line
    assert n.watchdog()
    assert listener.recv()[0] == {"WATCHDOG": "1"}
    assert n.stopping("node A: stopping")
    assert listener.recv()[0] == {"STOPPING": "1", "STATUS": "node A: stopping"}
    assert n.extend_timeout(2.5)
    assert listener.recv()[0] == {"EXTEND_TIMEOUT_USEC": "2500000"}
    assert n.reloading()
    fields = listener.recv()[0]
    assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0


def test_watchdog_interval_comes_from_systemd_and_belongs_to_the_main_process():
    sock = "/run/systemd/notify"
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "30000000"}).watchdog_interval() == 30
    own = {"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert SystemdNotifier.from_environ(own).watchdog_interval() == 30
    # A child that inherited its parent's variables must not keep the parent alive.
    assert SystemdNotifier.from_environ({**own, "WATCHDOG_PID": "1"}).watchdog_interval() is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": sock}).watchdog_interval() is None
    assert SystemdNotifier.from_environ({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": sock, "WATCHDOG_USEC": "soon"}).watchdog_interval() is None


def test_unset_removes_the_variables_so_children_do_not_speak_for_the_daemon():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    n = SystemdNotifier.from_environ(env, unset=True)
    assert n.watchdog_interval() == 1.0 and env == {"PATH": "/bin"}


def test_outside_systemd_every_call_is_a_quiet_no_op(caplog):
    n = SystemdNotifier.from_environ({})
    with caplog.at_level(logging.DEBUG, logger="qkdnode.sdnotify"):
        assert not n.enabled
        assert n.ready("x") is False and n.status("x") is False and n.watchdog() is False
        assert n.stopping() is False and n.watchdog_interval() is None
    assert caplog.records == []


@pytest.mark.parametrize("address", ["/nonexistent/qkdnode/notify", "vsock:2:1234"])
def test_a_failed_send_never_raises_and_is_logged_once(address, caplog):
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": address})
    with caplog.at_level(logging.DEBUG, logger="qkdnode.sdnotify"):
        assert n.ready("up") is False
        assert n.watchdog() is False
        assert n.status("still failing") is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and address in warnings[0].getMessage()
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 2


async def test_watchdog_task_pings_at_half_the_interval_while_healthy(listener, caplog):
    healthy = True
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000"})
    task = n.start_watchdog(lambda: healthy)
    assert task is not None
    await asyncio.sleep(0.55)  # pings at 0, 0.1, ..., 0.5 s
    pings = listener.pending()
    assert 3 <= len(pings) <= 8 and all(p == {"WATCHDOG": "1"} for p in pings)

    healthy = False  # e.g. the vault's writer thread died: let systemd restart the node
    with caplog.at_level(logging.INFO, logger="qkdnode.sdnotify"):
        await asyncio.sleep(0.15)
        listener.pending()
        await asyncio.sleep(0.35)
        assert listener.pending() == []
        healthy = True
        await asyncio.sleep(0.15)
        assert listener.pending()
    task.cancel()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("withholding" in m for m in messages) == 1 and any("resumed" in m for m in messages)


async def test_no_watchdog_task_when_systemd_expects_no_keep_alives():
    assert SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@x"}).start_watchdog() is None
    assert SystemdNotifier.from_environ({}).start_watchdog() is None


# ---------------------------------------------------------------- the daemon itself


def test_daemon_reports_ready_watchdog_and_stopping_to_systemd(tmp_path):
    """`qkdnode run` as systemd starts it: NOTIFY_SOCKET, WATCHDOG_USEC and the master key in
    $CREDENTIALS_DIRECTORY. The main process itself (NotifyAccess=main) says READY=1 once it
    serves, keeps the watchdog fed, and says STOPPING=1 on SIGTERM, then exits 0."""
    pki = ThrowawayPKI(tmp_path / "pki")
    cred = pki.issue("node-solo", "solo", hosts=("127.0.0.1", "localhost"), server=True, client=True)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    write_private(creds / "vault-master-key", os.urandom(32).hex().encode() + b"\n")
    api_port = free_port()
    config = tmp_path / "solo.toml"
    config.write_text(f"""node_id = "solo"
[api]
listen = "127.0.0.1:{api_port}"
[peer]
listen = "127.0.0.1:{free_port()}"
[tls]
ca = "{pki.ca}"
cert = "{cred.cert}"
key = "{cred.key}"
[vault]
path = "vault.db"
master_key_credential = "vault-master-key"
""")
    lst = Listener(f"@qkdnode-test-{uuid.uuid4().hex}")
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(NOTIFY_SOCKET=lst.address, WATCHDOG_USEC="1000000", CREDENTIALS_DIRECTORY=str(creds))
    log = open(tmp_path / "node.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "qkdnode", "run", "--config", str(config)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        ready = None
        while ready is None:
            assert proc.poll() is None, (tmp_path / "node.log").read_text()
            try:
                fields, pid = lst.recv(timeout=max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                pytest.fail("no READY=1 within 30 s; node log:\n" + (tmp_path / "node.log").read_text())
            assert pid == proc.pid, "only the main process may notify (NotifyAccess=main)"
            if fields.get("READY") == "1":
                ready = fields
        assert "solo" in ready.get("STATUS", "")
        with socket.create_connection(("127.0.0.1", api_port), timeout=5):
            pass  # READY=1 came after the listener was up

        # Keep-alives at half of WATCHDOG_USEC (1 s): at least two in 1.6 s.
        seen, until = [], time.monotonic() + 1.6
        while time.monotonic() < until:
            try:
                seen.append(lst.recv(timeout=until - time.monotonic())[0])
            except TimeoutError:
                break
        assert sum(f.get("WATCHDOG") == "1" for f in seen) >= 2, seen

        proc.send_signal(signal.SIGTERM)
        while True:
            fields, _ = lst.recv(timeout=30)
            if fields.get("STOPPING") == "1":
                break
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        lst.close()
