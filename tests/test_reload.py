"""SIGHUP (`systemctl reload qkdnode`): a renewed certificate and the settings that may change
while running take effect without a restart and without losing a key; anything structural is
refused, named in the log, and the config in force stays."""

import os
import shutil
import signal
import socket
import ssl
from pathlib import Path
from urllib.parse import urlparse

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from hil.pki import ThrowawayPKI
from qkdnode import config
from qkdnode.reload import compare
from tests.appnet import Client
from tests.conftest import ready_keys, wait_for
from tests.ops_support import config_of, first_node, samples, value
from tests.sae_client import SaeClient, bits

# ---------------------------------------------------------------- what counts as structural

BASE = {
    "node_id": "A",
    "api": {"listen": "127.0.0.1:8443"}, "peer": {"listen": "127.0.0.1:9443"},
    "metrics": {"listen": "127.0.0.1:9100"},
    "tls": {"ca": "/pki/ca.pem", "cert": "/pki/a.pem", "key": "/pki/a-key.pem"},
    "vault": {"path": "/var/lib/qkdnode/vault.db", "master_key_file": "/etc/qkdnode/master.key"},
    "keys": {"max_key_per_request": 128},
    "peers": {"B": {"url": "https://10.0.0.2:9443"}},
    "links": [{"id": "A-B", "peer": "B", "role": "master", "driver": "etsi014", "pool_target_bits": 1 << 20,
               "fetch_interval": 1.0, "settings": {"url": "https://kme", "password": "s3cret"}}],
    "saes": {"sae-a1": "A", "sae-b1": "B"},
}


def changed(edit) -> tuple[list[str], list[str]]:
    import copy

    new = copy.deepcopy(BASE)
    edit(new)
    return compare(config.parse(Path("/etc/qkdnode/node.toml"), copy.deepcopy(BASE)),
                   config.parse(Path("/etc/qkdnode/node.toml"), new))


@pytest.mark.parametrize("edit, live", [
    (lambda c: c["keys"].update(max_key_per_request=16), ["keys.max_key_per_request"]),
    (lambda c: c["links"][0].update(pool_target_bits=1 << 22, fetch_interval=0.5),
     ["links[0].pool_target_bits", "links[0].fetch_interval"]),
    (lambda c: c["saes"].update({"sae-a9": "A"}), ["saes.sae-a9"]),
    (lambda c: c["tls"].update(cert="/pki/a-2026.pem", key="/pki/a-2026-key.pem"), ["tls.cert", "tls.key"]),
    (lambda c: c["vault"].update(audit_retention_days=30), ["vault.audit_retention_days"]),
    (lambda c: c.update(routes={"E": ["B", "E"]}), ["routes.E"]),
    (lambda c: c.update(limits={"requests_per_second": 50, "saes": {"sae-a1": {"key_bits_per_day": 4096}}}),
     ["limits.requests_per_second", "limits.saes.sae-a1"]),
], ids=["key limits", "pool target and fetch interval", "an SAE added", "TLS files", "audit retention",
        "a static route", "per-SAE limits"])
def test_settings_that_may_change_while_running(edit, live):
    assert changed(edit) == (live, [])


@pytest.mark.parametrize("edit, refused", [
    (lambda c: c.update(node_id="Z", saes={"sae-a1": "Z", "sae-b1": "B"}), ["node_id", "saes.sae-a1"]),
    (lambda c: c["api"].update(listen="0.0.0.0:8443"), ["api.listen"]),
    (lambda c: c["peer"].update(listen="127.0.0.1:9444"), ["peer.listen"]),
    (lambda c: c["metrics"].update(listen="127.0.0.1:9101"), ["metrics.listen"]),
    (lambda c: c["vault"].update(path="/srv/vault.db"), ["vault.path"]),
    (lambda c: c["vault"].update(audit_retention_days=0), ["vault.audit_retention_days"]),
    (lambda c: c["peers"]["B"].update(url="https://10.9.9.9:9443"), ["peers.B"]),
    (lambda c: c["links"][0].update(role="slave"), ["links[0].role"]),
    (lambda c: c["links"][0]["settings"].update(password="other"), ["links[0].settings.password"]),
    (lambda c: c["links"].clear(), ["links (link A-B removed)"]),
    (lambda c: c["saes"].update({"sae-a1": "B"}), ["saes.sae-a1"]),
    (lambda c: c["saes"].pop("sae-b1"), ["saes.sae-b1"]),
], ids=["node_id", "api", "peer", "metrics", "vault path", "audit off", "peer url", "link role", "driver setting",
        "link removed", "SAE moved", "SAE removed"])
def test_structural_changes_are_named_in_the_files_terms(edit, refused):
    assert changed(edit)[1] == refused


def test_a_driver_setting_is_named_but_its_value_never_shown():
    live, refused = changed(lambda c: c["links"][0]["settings"].update(password="n3w-s3cret"))
    assert refused == ["links[0].settings.password"] and "s3cret" not in repr((live, refused))


# ---------------------------------------------------------------- on a running node


def node_log(node: dict) -> Path:
    """The running node's log: where its stderr goes."""
    return Path(os.readlink(f"/proc/{node['pid']}/fd/2"))


def served_certificate(url: str, ca: str, cert: str, key: str) -> x509.Certificate:
    """The certificate a TLS server presents on a fresh handshake."""
    u = urlparse(url)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False  # the chain is verified; which name it carries is not the point here
    ctx.load_cert_chain(cert, key)
    with socket.create_connection((u.hostname, u.port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def open_connection(url: str, ca: str, cert: str, key: str) -> ssl.SSLSocket:
    u = urlparse(url)
    ctx = ssl.create_default_context(cafile=ca)
    ctx.check_hostname = False
    ctx.load_cert_chain(cert, key)
    return ctx.wrap_socket(socket.create_connection((u.hostname, u.port), timeout=5))


def http_status(conn: ssl.SSLSocket, path: str) -> str:
    """One keep-alive HTTP/1.1 request on an open connection; its status line."""
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = conn.recv(4096)
        assert chunk, "the node closed the connection"
        head += chunk
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < length:
        body += conn.recv(4096)
    return head.split(b"\r\n")[0].decode()


def renew(pki: ThrowawayPKI, cert_file: Path, key_file: Path) -> x509.Certificate:
    """Issue a new certificate for the same identity and names, and put it in place of the old one
    (as certbot or an operator's PKI tooling does)."""
    old = x509.load_pem_x509_certificate(cert_file.read_bytes())
    cn = old.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    hosts = tuple(sans.get_values_for_type(x509.DNSName)) + tuple(str(ip) for ip in
                                                                  sans.get_values_for_type(x509.IPAddress))
    usage = old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    cred = pki.issue(f"renewed-{cn}", cn, hosts=hosts, server=ExtendedKeyUsageOID.SERVER_AUTH in usage,
                     client=ExtendedKeyUsageOID.CLIENT_AUTH in usage)
    shutil.copyfile(cred.key, key_file)
    shutil.copyfile(cred.cert, cert_file)
    return x509.load_pem_x509_certificate(cert_file.read_bytes())


async def settled_pool(node: dict, link: str) -> float:
    """Ready bits once the pool stops changing (full, nothing drawn)."""
    last = None

    async def steady():
        nonlocal last
        now = value(samples(node["metrics"]), "qkdnode_pool_ready_bits", link=link)
        done = now is not None and now > 0 and now == last
        last = now
        return done
    await wait_for(steady, timeout=60, interval=1.0)
    return last


async def test_a_renewed_certificate_is_served_after_sighup_and_no_key_is_lost(network):
    tb = await network()
    m = tb.manifest()
    seen = first_node(m)
    node, cfg, link, master, slave = seen.node, seen.cfg, seen.link, seen.master, seen.slave
    sae = m["saes"][master]
    pki = ThrowawayPKI.open(Path(m["ca"]).parent)
    before = served_certificate(node["etsi014"], m["ca"], sae["cert"], sae["key"])
    assert before.serial_number == x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes()).serial_number

    async with SaeClient(m, master) as a, SaeClient(m, slave) as b:
        await ready_keys(a, slave, 8)
        code, handed = await a.enc_keys(slave, number=3, size=512)    # waiting at the peer for the slave SAE
        assert code == 200, handed
        ready = await settled_pool(node, link.id)

        opened = open_connection(node["etsi014"], m["ca"], sae["cert"], sae["key"])  # an SAE's keep-alive
        assert http_status(opened, f"/api/v1/keys/{slave}/status") == "HTTP/1.1 200 OK"
        renewed = renew(pki, cfg.tls.cert, cfg.tls.key)
        assert renewed.serial_number != before.serial_number
        os.kill(node["pid"], signal.SIGHUP)

        async def new_certificate_served():
            cert = served_certificate(node["etsi014"], m["ca"], sae["cert"], sae["key"])
            return cert.serial_number == renewed.serial_number
        await wait_for(new_certificate_served, timeout=15, interval=0.2)

        p = samples(node["metrics"])
        assert value(p, "qkdnode_config_reloads_total", result="applied") == 1
        assert value(p, "qkdnode_pool_ready_bits", link=link.id) == ready          # every ready bit still there
        assert value(p, "qkdnode_certificate_expiry_timestamp_seconds", cert="tls") == \
            renewed.not_valid_after_utc.timestamp()
        assert os.kill(node["pid"], 0) is None                                       # the same process
        with opened:                                                                 # its connection stays up
            assert http_status(opened, f"/api/v1/keys/{slave}/status") == "HTTP/1.1 200 OK"

        code, got = await b.dec_keys(master, [k["key_ID"] for k in handed["keys"]])  # the key handed out before
        assert code == 200 and bits(got) == bits(handed)
        code, fresh = await a.enc_keys(slave, number=1, size=256)                    # and keys flow on
        assert code == 200, fresh
        code, got = await b.dec_keys(master, [k["key_ID"] for k in fresh["keys"]])
        assert code == 200 and bits(got) == bits(fresh)
    assert "reloaded" in node_log(node).read_text()


async def test_new_key_limits_and_a_new_sae_take_effect_on_sighup(network):
    tb = await network()
    m = tb.manifest()
    seen = first_node(m)
    name, node, path, cfg, link, master, slave = (seen.name, seen.node, seen.path, seen.cfg, seen.link, seen.master,
                                                  seen.slave)
    peer = m["nodes"][link.peer]
    pki = ThrowawayPKI.open(Path(m["ca"]).parent)

    async with SaeClient(m, master) as a:
        code, st = await a.status(slave)
        assert code == 200 and st["max_key_per_request"] == cfg.keys.max_key_per_request != 3
        limited = cfg.keys.max_key_per_request
        # Raise nothing and lower the limit; register a new application at this node, known at both ends.
        newcomer = pki.issue("sae-new", "sae-new")
        for p in (path, config_of(peer)):
            text = p.read_text().replace(f"max_key_per_request = {limited}", "max_key_per_request = 3")
            p.write_text(text.replace("[saes]\n", f'[saes]\n"sae-new" = "{name}"\n'))
        os.kill(node["pid"], signal.SIGHUP)
        os.kill(peer["pid"], signal.SIGHUP)

        async def applied():
            code, st = await a.status(slave)
            return code == 200 and st["max_key_per_request"] == 3
        await wait_for(applied, timeout=15)
        code, answer = await a.enc_keys(slave, number=4, size=256)
        assert code == 400 and "from 1 to 3" in answer["message"]

    manifest = {**m, "saes": {**m["saes"], "sae-new": {"node": name, "cert": str(newcomer.cert),
                                                        "key": str(newcomer.key)}}}
    async with SaeClient(manifest, "sae-new") as new, SaeClient(m, slave) as b:
        async def new_sae_served():
            code, answer = await new.enc_keys(slave, number=1, size=256)
            return code == 200 and answer
        handed = await wait_for(new_sae_served, timeout=15, interval=0.3)
        code, got = await b.dec_keys("sae-new", [k["key_ID"] for k in handed["keys"]])
        assert code == 200 and bits(got) == bits(handed)
    # Every key API of the node knows the newcomer, not only ETSI 014.
    async with Client(manifest, "sae-new") as new, Client(m, slave) as b:
        code, made = await new.skip("/key", remoteSystemID=slave)
        assert code == 200, made
        code, got = await b.skip(f"/key/{made['keyId']}", remoteSystemID="sae-new")
        assert code == 200 and got == made
        qos = {"key_chunk_size": 32, "max_bps": 2560, "min_bps": 256, "jitter": 0, "priority": 1, "timeout": 2000,
               "TTL": 60}
        code, opened = await new.open_connect("sae-new", slave, qos)
        assert code == 200 and opened["status"] in (0, 1), opened   # 1: waiting for the destination to open
        code, closed = await new.close(opened["key_stream_ID"])
        assert code == 200 and closed["status"] == 0, closed


async def test_a_structural_change_is_refused_whole_named_in_the_log_and_the_node_serves_on(network):
    tb = await network()
    m = tb.manifest()
    seen = first_node(m)
    node, path, cfg, master, slave = seen.node, seen.path, seen.cfg, seen.master, seen.slave
    original = path.read_text()
    moved = original.replace(f'listen = "{cfg.api}"', f'listen = "{cfg.api.host}:{cfg.api.port + 1}"')
    moved = moved.replace(f"max_key_per_request = {cfg.keys.max_key_per_request}", "max_key_per_request = 3")
    assert moved.count("max_key_per_request = 3") == 1 and moved != original
    path.write_text(moved)
    os.kill(node["pid"], signal.SIGHUP)

    async def refused():
        return value(samples(node["metrics"]), "qkdnode_config_reloads_total", result="refused") == 1
    await wait_for(refused, timeout=15)
    log = node_log(node).read_text()
    line = next(line for line in log.splitlines() if "reload refused" in line)
    assert "api.listen" in line and "restart" in line and "max_key_per_request" not in line
    async with SaeClient(m, master) as a:
        code, st = await a.status(slave)                    # still on the old address, with the old limits
        assert code == 200 and st["max_key_per_request"] == cfg.keys.max_key_per_request


async def test_tls_material_that_does_not_fit_together_is_refused_and_the_old_stays(network):
    tb = await network()
    m = tb.manifest()
    name, node = next(iter(m["nodes"].items()))
    cfg = config.load(config_of(node))
    master = next(s for s, e in m["saes"].items() if e["node"] == name)
    sae = m["saes"][master]
    before = served_certificate(node["etsi014"], m["ca"], sae["cert"], sae["key"])
    pki = ThrowawayPKI.open(Path(m["ca"]).parent)
    stray = pki.issue("stray", "stray")
    shutil.copyfile(stray.key, cfg.tls.key)                 # a new key, the old certificate: no pair
    os.kill(node["pid"], signal.SIGHUP)

    async def refused():
        return value(samples(node["metrics"]), "qkdnode_config_reloads_total", result="refused") == 1
    await wait_for(refused, timeout=15)
    assert "tls.cert" in next(line for line in node_log(node).read_text().splitlines() if "reload refused" in line)
    after = served_certificate(node["etsi014"], m["ca"], sae["cert"], sae["key"])
    assert after.serial_number == before.serial_number
