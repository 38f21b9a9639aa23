"""A node's config, as an operator meets it: the example files, the mistakes people make, the
paths they write, and `qkdnode check-config` before a restart.

Every broken config here is the valid BASE with one small edit, so each case reads as the
one mistake it is, and every error must name the file, the dotted key and what was found.
"""

from __future__ import annotations

import builtins
import dataclasses
import ipaddress
import logging
import os
import re
import ssl
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from drivers.etsi014 import _SETTINGS as DRIVER_SETTINGS
from drivers.etsi014 import PROFILES, Etsi014KeySource
from qkdnode import config
from qkdnode.cli import main
from qkdnode.errors import ConfigError
from qkdnode.limits import SaeLimit

EXAMPLES = Path(__file__).resolve().parent.parent / "config"
NODE_A = EXAMPLES / "node-a.example.toml"
NODE_B = EXAMPLES / "node-b.example.toml"

# A small valid config with relative paths. Mutations below replace one exact snippet of it.
BASE = """\
node_id = "A"

[api]
listen = "127.0.0.1:8443"

[peer]
listen = "127.0.0.1:8444"

[tls]
ca = "pki/ca.pem"
cert = "pki/node.pem"
key = "pki/node.key"

[vault]
path = "vault.db"
master_key_file = "master.key"

[keys]
key_size = 256
min_key_size = 64
max_key_size = 8192
max_key_per_request = 128

[peers.B]
url = "https://127.0.0.1:9444"

[[links]]
id = "A-B"
peer = "B"
role = "master"
driver = "etsi014"

[links.settings]
url = "https://127.0.0.1:9000"
peer_sae_id = "node-B"
ca = "kme/ca.pem"
cert = "../shared/kme-client.pem"
key = "/srv/pki/kme-client.key"

[saes]
"sae-1" = "A"
"sae-2" = "B"
"""


def sub(old: str, new: str):
    """An edit of BASE that must hit exactly one place, so a stale case cannot pass by accident."""
    def edit(text: str) -> str:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in BASE"
        return text.replace(old, new)
    return edit


def append(extra: str):
    return lambda text: text + extra


def write(folder: Path, text: str, name: str = "node.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_base_is_valid(tmp_path):
    cfg = config.load(write(tmp_path, BASE))
    assert (cfg.node_id, [link.id for link in cfg.links], cfg.saes) == ("A", ["A-B"], {"sae-1": "A", "sae-2": "B"})


def test_etsi004_and_skip_listeners_are_optional(tmp_path):
    cfg = config.load(write(tmp_path, BASE))
    assert (cfg.etsi004, cfg.skip) == (None, None)  # served only where the operator asks
    both = BASE + '\n[etsi004]\nlisten = "127.0.0.1:8445"\n\n[skip]\nlisten = "[::1]:8446"\n'
    cfg = config.load(write(tmp_path, both))
    assert (str(cfg.etsi004), str(cfg.skip)) == ("127.0.0.1:8445", "::1:8446")


# ------------------------------------------------------------------ the example files


def test_examples_parse_as_the_two_ends_of_one_idq_link():
    a, b = config.load(NODE_A), config.load(NODE_B)

    assert (a.node_id, b.node_id) == ("node-a", "node-b")
    assert list(a.peers) == ["node-b"] and list(b.peers) == ["node-a"]
    (la,), (lb,) = a.links, b.links
    assert (la.id, la.peer, la.role, la.driver) == ("a-b", "node-b", "master", "etsi014")
    assert (lb.id, lb.peer, lb.role, lb.driver) == ("a-b", "node-a", "slave", "etsi014")
    assert la.is_master and not lb.is_master
    assert la.settings["profile"] == lb.settings["profile"] == "idq"
    # Each end names itself and the other end at the KMS pair the same way round.
    assert (la.settings["sae_id"], la.settings["peer_sae_id"]) == (lb.settings["peer_sae_id"], lb.settings["sae_id"])
    assert la.settings["url"].startswith("https://") and la.settings["server_hostname"]

    # Both nodes agree on where every SAE sits, and each has a couple of its own.
    assert a.saes == b.saes
    assert sorted(s for s, n in a.saes.items() if n == "node-a") == ["sae-a-hsm", "sae-a-vpn"]
    assert sorted(s for s, n in a.saes.items() if n == "node-b") == ["sae-b-backup", "sae-b-vpn"]
    assert a.keys == b.keys  # an SAE pair sees the same limits at both ends

    # Each node dials the other's peer listener, verifying the certificate by host name.
    assert a.peers["node-b"].url == f"https://{b.peer_listen}"
    assert b.peers["node-a"].url == f"https://{a.peer_listen}"
    assert a.peers["node-b"].server_hostname == "node-b.qkd.example"
    assert b.peers["node-a"].server_hostname == "node-a.qkd.example"


def test_examples_are_laid_out_for_systemd():
    a, b = config.load(NODE_A), config.load(NODE_B)
    for cfg in (a, b):
        kms_pki = [Path(cfg.links[0].settings[k]) for k in ("ca", "cert", "key")]
        for p in (cfg.tls.ca, cfg.tls.cert, cfg.tls.key, *kms_pki):
            assert p.is_absolute() and p.is_relative_to("/etc/qkdnode"), p
        assert cfg.vault.path == Path("/var/lib/qkdnode/vault.db")
        assert ipaddress.ip_address(cfg.api.host).is_private and ipaddress.ip_address(cfg.peer_listen.host).is_private
        assert cfg.metrics is not None and cfg.metrics.host == "127.0.0.1"  # plain HTTP stays on loopback
    # Both ways of handing over the master key are shown.
    assert (a.vault.master_key_credential, a.vault.master_key_file) == ("vault-master-key", None)
    assert b.vault.master_key_credential is None and b.vault.master_key_file.is_relative_to("/etc/qkdnode")


def test_examples_parse_without_touching_the_files_they_name(monkeypatch):
    """The PEM files, vault and master key are not on this machine; reading a config must not
    need them (the node opens them later, and `check-config` runs on a staging host too)."""
    texts = {p: p.read_text(encoding="utf-8") for p in (NODE_A, NODE_B)}

    def refuse(*args, **kwargs):
        raise AssertionError(f"parsing touched the file system: {args!r}")

    with monkeypatch.context() as m:
        for name in ("stat", "lstat", "exists", "is_file", "open", "read_text", "read_bytes"):
            m.setattr(Path, name, refuse)
        m.setattr(builtins, "open", refuse)
        m.setattr(os, "stat", refuse)
        m.setattr(os, "access", refuse)
        parsed = {p: config.parse(p, tomllib.loads(t)) for p, t in texts.items()}
    assert parsed[NODE_A] == config.load(NODE_A) and parsed[NODE_B] == config.load(NODE_B)


def test_example_link_settings_are_accepted_by_the_etsi014_driver(monkeypatch):
    """The node builds the driver later, from the same settings; the examples must pass it too
    (all but opening the PEM files, which live on the real host)."""
    monkeypatch.setattr("drivers.etsi014.checked", lambda *a, **kw: ssl.create_default_context())
    for path in (NODE_A, NODE_B):
        link = config.load(path).links[0]
        source = Etsi014KeySource.from_settings(link.settings, file=path, key="links[0].settings")
        assert source.name == "etsi014/idq"
        assert source.server_hostname == link.settings["server_hostname"]
        assert source.peer_sae_id == link.settings["peer_sae_id"]


def _shown_keys(text: str) -> set[str]:
    """Dotted keys written in a config, set or as a `# key = value` comment, with tables of
    user-chosen names ([peers.NAME], [saes]) shown as `*`."""
    shown, table = set(), ""
    for line in text.splitlines():
        if m := re.match(r"^\[\[?\s*([^\]]+?)\s*\]\]?\s*$", line):
            table = re.sub(r"^(peers|limits\.saes)\..+$", r"\1.*", m.group(1))
            shown.add(table)
        elif m := re.match(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*\S", line):
            shown.add(f"{table}.{m.group(1)}" if table else m.group(1))
    return shown


def test_examples_show_every_key_the_loader_and_driver_accept():
    """The examples are the reference an operator copies from: a key added to the loader must
    appear in them, and a key in them (even commented out) must be one the loader knows."""
    names = lambda cls, *skip: {f.name for f in dataclasses.fields(cls)} - set(skip)  # noqa: E731
    expected = {
        "node_id", "api", "api.listen", "peer", "peer.listen", "metrics", "metrics.listen",
        "etsi004", "etsi004.listen", "skip", "skip.listen",
        "tls", *(f"tls.{k}" for k in names(config.TlsConfig)),
        "vault", *(f"vault.{k}" for k in names(config.VaultConfig)),
        "keys", *(f"keys.{k}" for k in names(config.KeyLimits)),
        "peers.*", *(f"peers.*.{k}" for k in names(config.PeerConfig, "node_id")),
        "links", *(f"links.{k}" for k in names(config.LinkConfig, "settings")),
        "links.settings", *(f"links.settings.{k}" for k in DRIVER_SETTINGS),
        "saes", "limits", "limits.saes.*",
        *(f"{t}.{k}" for t in ("limits", "limits.saes.*") for k in names(SaeLimit)),
    }
    shown = _shown_keys(NODE_A.read_text()) | _shown_keys(NODE_B.read_text())
    assert expected - shown == set(), "keys the examples do not show"
    assert shown - expected == set(), "keys in the examples the loader does not know"


@pytest.mark.parametrize("path", [NODE_A, NODE_B], ids=["node-a", "node-b"])
def test_commented_out_keys_show_their_defaults(path):
    """`# key = value` promises the operator what leaving the key out means: uncommenting every
    such line must change nothing."""
    text = path.read_text()
    uncommented, n = re.subn(r"(?m)^#\s*([A-Za-z_][A-Za-z0-9_]*\s*=)", r"\1", text)
    assert n >= 5

    def effective(cfg: config.NodeConfig) -> config.NodeConfig:
        # The driver fills settings left out from its profile; compare what it will use.
        links = tuple(dataclasses.replace(link, settings={**PROFILES[link.settings.get("profile", "idq")],
                                                          **link.settings}) for link in cfg.links)
        return dataclasses.replace(cfg, links=links)

    assert effective(config.parse(path, tomllib.loads(uncommented))) == effective(config.load(path))


# ------------------------------------------------------------------ mistakes people make

# (case, edit of BASE, dotted key the error must name, what it must say it found)
MISTAKES = [
    ("toml-syntax", sub('node_id = "A"', 'node_id = "A'), "(syntax)", "line 1"),
    ("node_id-missing", sub('node_id = "A"\n', ""), "node_id", "nothing"),
    ("node_id-space", sub('node_id = "A"', 'node_id = "node A"'), "node_id", "'node A'"),
    ("listen-port-as-int", sub('listen = "127.0.0.1:8443"', "listen = 8443"), "api.listen", "8443"),
    ("listen-no-port", sub('listen = "127.0.0.1:8443"', 'listen = "localhost"'), "api.listen", "'localhost'"),
    ("listen-port-70000", sub('listen = "127.0.0.1:8444"', 'listen = "127.0.0.1:70000"'), "peer.listen",
     "'127.0.0.1:70000'"),
    ("listen-hostname", sub('listen = "127.0.0.1:8444"', 'listen = "node-a.lab:8444"'), "peer.listen",
     "'node-a.lab:8444'"),
    ("unknown-top-level-table", append('\n[vualt]\npath = "other.db"\n'), "vualt", "its value is not shown"),
    ("vault-table-misspelt", sub("[vault]", "[vualt]"), "vault", "nothing"),
    ("unknown-key-in-vault", sub('path = "vault.db"', 'path = "vault.db"\npaht = "x.db"'), "vault.paht", "its value is not shown"),
    ("master-key-both-ways", sub('master_key_file = "master.key"',
                                 'master_key_file = "master.key"\nmaster_key_credential = "vault-master-key"'),
     "vault.master_key_file", "'both'"),
    ("master-key-neither-way", sub('master_key_file = "master.key"\n', ""), "vault.master_key_file", "nothing"),
    ("key_size-not-bytes", sub("key_size = 256", "key_size = 260"), "keys.key_size", "260"),
    ("key_size-below-min", sub("key_size = 256", "key_size = 32"), "keys.key_size", "32"),
    ("key_size-above-max", sub("key_size = 256", "key_size = 16384"), "keys.key_size", "16384"),
    ("key_size-quoted", sub("key_size = 256", 'key_size = "256"'), "keys.key_size", "'256'"),
    ("bool-for-int", sub("max_key_per_request = 128", "max_key_per_request = true"), "keys.max_key_per_request",
     "True"),
    ("link-role-primary", sub('role = "master"', 'role = "primary"'), "links[0].role", "'primary'"),
    ("link-peer-not-listed", sub('peer = "B"', 'peer = "C"'), "links[0].peer", "'C'"),
    ("link-id-twice", append('\n[[links]]\nid = "A-B"\npeer = "B"\nrole = "slave"\ndriver = "etsi014"\n'),
     "links[1].id", "'A-B'"),
    ("links-single-brackets", sub("[[links]]", "[links]"), "links", "{'id': 'A-B'"),
    ("peer-url-http", sub('url = "https://127.0.0.1:9444"', 'url = "http://127.0.0.1:9444"'), "peers.B.url",
     "'http://127.0.0.1:9444'"),
    ("sae-on-no-node-name", sub('"sae-2" = "B"', '"sae-2" = "B C"'), "saes.sae-2", "'B C'"),
    ("route-not-via-a-link", lambda t: t + '\n[routes]\nD = ["C", "D"]\n', "routes.D", "['C', 'D']"),
    ("route-not-ending-at-dest", lambda t: t + '\n[routes]\nD = ["B", "C"]\n', "routes.D", "['B', 'C']"),
    ("etsi004-listen-no-port", append('\n[etsi004]\nlisten = "127.0.0.1"\n'), "etsi004.listen", "'127.0.0.1'"),
    ("skip-listen-misspelt", append('\n[skip]\nlisen = "127.0.0.1:8446"\n'), "skip.lisen", "its value is not shown"),
]


@pytest.mark.parametrize("edit, key, found", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_named_by_file_key_and_what_was_found(tmp_path, edit, key, found):
    path = write(tmp_path, edit(BASE))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert (info.value.file, info.value.key) == (str(path), key), message
    assert message.startswith(f"{path}: {key}: expected "), message
    assert found in message.split(", found ", 1)[1], message


def test_a_file_that_is_not_there_or_not_utf8_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"node\.toml: \(file\): .*No such file"):
        config.load(tmp_path / "node.toml")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(BASE.replace('node_id = "A"', 'node_id = "A"  # Z\xfcrich').encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: \(file\): expected UTF-8 text, found 'byte 0xfc on line 1'"):
        config.load(latin1)


# ------------------------------------------------------------------ relative paths


def test_relative_paths_are_taken_from_the_config_files_folder(tmp_path, monkeypatch):
    root = tmp_path.resolve()
    etc = root / "etc" / "qkdnode"
    write(etc, BASE)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the daemon's working directory is not the config's folder

    cfg = config.load(Path("..") / "etc" / "qkdnode" / "node.toml")

    assert cfg.file == etc / "node.toml"
    assert (cfg.tls.ca, cfg.tls.cert, cfg.tls.key) == (etc / "pki/ca.pem", etc / "pki/node.pem", etc / "pki/node.key")
    assert (cfg.vault.path, cfg.vault.master_key_file) == (etc / "vault.db", etc / "master.key")
    settings = cfg.links[0].settings
    assert settings["ca"] == str(etc / "kme" / "ca.pem")
    assert settings["cert"] == str(root / "etc" / "shared" / "kme-client.pem")  # "../" is resolved, not kept
    assert settings["key"] == "/srv/pki/kme-client.key"  # absolute paths are left alone
    assert settings["url"] == "https://127.0.0.1:9000"  # and only the path settings are touched


# ------------------------------------------------------------------ qkdnode check-config


@pytest.fixture
def cli(capsys, monkeypatch):
    """`qkdnode ...` in-process; restores the root logger the CLI reconfigures."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(*argv: str):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)


def test_check_config_accepts_a_valid_file(tmp_path, cli):
    path = write(tmp_path, BASE)
    code, out, err = cli("check-config", "--no-files", "--config", str(path))
    assert code == 0
    assert out.strip() == f"{path}: node A, 1 link(s), 0 device(s), 2 SAE(s): OK"
    assert err == ""


def test_check_config_names_file_and_key_of_the_first_error(tmp_path, cli):
    path = write(tmp_path, sub('role = "master"', 'role = "primary"')(BASE))
    code, out, err = cli("check-config", "--config", str(path))
    assert code == 2
    assert out == ""
    assert f"{path}: links[0].role: expected one of \"master\" or \"slave\", found 'primary'" in err


def _qkdnode() -> list[str]:
    script = Path(sys.executable).with_name("qkdnode")  # the console script an operator runs
    return [str(script)] if script.exists() else [sys.executable, "-m", "qkdnode"]


@pytest.mark.parametrize("path", [NODE_A, NODE_B], ids=["node-a", "node-b"])
def test_check_config_command_on_the_examples(path):
    done = subprocess.run([*_qkdnode(), "check-config", "--no-files", "--config", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(": OK\n") and str(path) in done.stdout


def test_check_config_command_on_a_broken_file(tmp_path):
    path = write(tmp_path, sub("[[links]]", "[[links]]\nrloe = \"master\"")(BASE))
    done = subprocess.run([*_qkdnode(), "check-config", "--config", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"{path}: links[0].rloe: expected no such key here (check the spelling), found a key" in done.stderr
    assert "master" not in done.stderr  # the value of an unknown key is never echoed: it could be a secret
    assert "Traceback" not in done.stderr


def test_check_config_catches_driver_settings_and_missing_files(tmp_path, cli):
    path = write(tmp_path, sub('peer_sae_id = "node-B"', 'peer_sae_id = "node-B"\nprofile = "idqq"')(BASE))
    code, _, err = cli("check-config", "--no-files", "--config", str(path))
    assert code == 2 and f"{path}: links[0].settings.profile: expected one of idq, toshiba, found 'idqq'" in err

    path = write(tmp_path, BASE)
    (tmp_path / "master.key").write_bytes(os.urandom(32))
    (tmp_path / "master.key").chmod(0o600)
    code, _, err = cli("check-config", "--config", str(path))  # as `run` would: the PEM files are not there
    assert code == 2 and f"{path}: tls.ca: expected a readable PEM file, found 'no file at {tmp_path}/pki/ca.pem'" \
        in err
