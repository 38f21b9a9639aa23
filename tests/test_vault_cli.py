"""The operator's vault commands, as run on a node: init, check, key rotation, export and import."""

import asyncio
import logging
import os
import sqlite3
import uuid

import pytest

from qkdnode.cli import main
from qkdnode.config import load
from qkdnode.vault import Vault, load_master_key

LINK = "A-B"

CONFIG = """node_id = "A"
[api]
listen = "127.0.0.1:18443"
[peer]
listen = "127.0.0.1:18444"
[tls]
ca = "ca.pem"
cert = "node.pem"
key = "node-key.pem"
[vault]
path = "{vault}"
master_key_file = "{key}"
"""


@pytest.fixture
def qkdnode(capsys):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out + err

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)


def node(folder, vault="vault.db", key="master.key"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "node.toml"
    path.write_text(CONFIG.format(vault=vault, key=key))
    return path


def open_vault(cfg_path):
    cfg = load(cfg_path)
    return Vault(cfg.vault.path, load_master_key(cfg.vault)).open()


def seed(cfg_path, blocks=4, waiting=3):
    """Ready key and keys waiting for a slave, as a running node would leave them."""
    v = open_vault(cfg_path)
    try:
        async def go():
            await v.run(v.add_blocks, LINK, [(str(uuid.uuid4()), os.urandom(64)) for _ in range(blocks)], "ready")
            return await v.run(v.carve, LINK, [str(uuid.uuid4()) for _ in range(waiting)], 32, "sae-a",
                               ["sae-b"], True)
        return {h.key_ID: h.bits for h in asyncio.run(go())}
    finally:
        v.close()


def deliver(cfg_path, key_ids):
    v = open_vault(cfg_path)
    try:
        return dict(asyncio.run(v.run(v.deliver, "sae-b", "sae-a", key_ids)))
    finally:
        v.close()


def sealed_rows(db):
    with sqlite3.connect(db) as c:
        return sorted(c.execute("SELECT sealed FROM blocks UNION ALL SELECT sealed FROM keys").fetchall())


def test_init_check_and_a_tampered_row(tmp_path, qkdnode):
    cfg = node(tmp_path)
    code, out = qkdnode("vault", "init", "--config", cfg, "--create-master-key")
    assert code == 0 and oct((tmp_path / "master.key").stat().st_mode)[-3:] == "600"
    assert qkdnode("vault", "init", "--config", cfg)[0] == 2           # never over an existing vault
    keys = seed(cfg)
    code, out = qkdnode("vault", "check", "--config", cfg)
    assert code == 0 and "keys waiting for slave SAEs: 3 (768 bits)" in out and "link A-B/ready: 3 block(s)" in out
    victim = next(iter(keys))
    with sqlite3.connect(tmp_path / "vault.db") as c:
        blob = bytearray(c.execute("SELECT sealed FROM keys WHERE key_id=?", (victim,)).fetchone()[0])
        blob[-1] ^= 0x80
        c.execute("UPDATE keys SET sealed=? WHERE key_id=?", (bytes(blob), victim))
    code, out = qkdnode("vault", "check", "--config", cfg)
    assert code == 1 and f"FAILED AUTHENTICATION (never served): keys: key_ID {victim}" in out
    for bits in keys.values():
        assert bits.hex() not in out


def test_rotating_the_master_key_rewrites_no_key_row(tmp_path, qkdnode):
    cfg = node(tmp_path)
    qkdnode("vault", "init", "--config", cfg, "--create-master-key")
    keys = seed(cfg)
    rows = sealed_rows(tmp_path / "vault.db")
    code, out = qkdnode("vault", "rotate-master-key", "--config", cfg, "--new-key-file", tmp_path / "new.key")
    assert code == 0 and "re-wrapped 1 data key(s)" in out
    assert sealed_rows(tmp_path / "vault.db") == rows
    code, out = qkdnode("vault", "check", "--config", cfg)               # the old key no longer opens it
    assert code == 2 and "does not open this vault" in out
    os.replace(tmp_path / "new.key", tmp_path / "master.key")
    assert deliver(cfg, list(keys)) == keys


def test_rotating_the_data_key_reseals_every_row(tmp_path, qkdnode):
    cfg = node(tmp_path)
    qkdnode("vault", "init", "--config", cfg, "--create-master-key")
    keys = seed(cfg)
    rows = sealed_rows(tmp_path / "vault.db")
    code, out = qkdnode("vault", "rotate-data-key", "--config", cfg, "--batch", "2")
    assert code == 0 and "re-sealed 6 row(s)" in out
    after = sealed_rows(tmp_path / "vault.db")
    assert len(after) == len(rows) and not set(after) & set(rows)
    assert all(blob[0][:4] == (2).to_bytes(4, "big") for blob in after)
    assert "generation(s) [2]" in qkdnode("vault", "check", "--config", cfg)[1]
    assert deliver(cfg, list(keys)) == keys


def test_moving_a_node_export_retires_the_old_vault_and_import_serves_the_same_keys(tmp_path, qkdnode):
    old, new = node(tmp_path / "almagro"), node(tmp_path / "distrito")
    qkdnode("vault", "init", "--config", old, "--create-master-key")
    keys = seed(old)
    (tmp_path / "distrito" / "master.key").write_text(os.urandom(32).hex())
    (tmp_path / "distrito" / "master.key").chmod(0o600)
    export = tmp_path / "move.qkdvault"
    code, out = qkdnode("vault", "export", "--config", old, "--to", export,
                        "--target-key-file", tmp_path / "distrito" / "master.key")
    assert code == 0, out
    # The old site's vault never serves again: the same keys must not exist at two sites.
    code, out = qkdnode("vault", "check", "--config", old)
    assert code == 2 and "was exported" in out
    # The export is useless without the new site's master key...
    elsewhere = node(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "master.key").write_bytes(os.urandom(32))
    (tmp_path / "elsewhere" / "master.key").chmod(0o600)
    code, out = qkdnode("vault", "import", "--config", elsewhere, "--from", export)
    assert code == 2 and "does not open this vault" in out
    assert not (tmp_path / "elsewhere" / "vault.db").exists()
    # ...and opens with it.
    code, out = qkdnode("vault", "import", "--config", new, "--from", export)
    assert code == 0, out
    assert deliver(new, list(keys)) == keys
    assert qkdnode("vault", "import", "--config", new, "--from", export)[0] == 2   # never over a vault


def test_maintenance_refuses_a_vault_the_daemon_holds(tmp_path, qkdnode):
    cfg = node(tmp_path)
    qkdnode("vault", "init", "--config", cfg, "--create-master-key")
    held = open_vault(cfg)
    try:
        code, out = qkdnode("vault", "rotate-data-key", "--config", cfg)
        assert code == 2 and "in use by another process" in out
        assert qkdnode("vault", "check", "--config", cfg)[0] == 0            # reading beside it is fine
    finally:
        held.close()
