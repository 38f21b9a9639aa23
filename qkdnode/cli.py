"""The `qkdnode` command: run a node, report its status, start an emulated network, look after the vault."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from qkdnode import __version__
from qkdnode.errors import QkdnodeError

log = logging.getLogger("qkdnode")

# syslog priorities, which journald reads from a "<N>" prefix on each line of stdout/stderr
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):  # under systemd: journald adds the time itself
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _cmd_run(args: argparse.Namespace) -> int:
    from qkdnode import config
    from qkdnode import eventloop
    from qkdnode.node import run_node

    cfg = config.load(args.config)
    eventloop.run(run_node(cfg))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from qkdnode import config
    from qkdnode.interfaces import check_driver

    cfg = config.load(args.config)
    for i, link in enumerate(cfg.links):
        check_driver(link.driver, link.settings, file=cfg.file, key=f"links[{i}].driver")
    for i, dev in enumerate(cfg.devices):
        check_driver(dev.driver, dev.settings, file=cfg.file, key=f"devices[{i}].driver")
    if not args.no_files:
        from qkdnode.node import Node

        Node(cfg)  # reads the master key and TLS material and builds every driver; opens no socket
    print(f"{cfg.file}: node {cfg.node_id}, {len(cfg.links)} link(s), {len(cfg.devices)} device(s), "
          f"{len(cfg.saes)} SAE(s): OK")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from qkdnode import config
    from qkdnode.status import NodeNotRunning, status

    cfg = config.load(args.config)
    try:
        print(status(cfg, as_json=args.json))
    except NodeNotRunning as exc:
        log.error("%s", exc)
        return 3  # as `systemctl status` and LSB init scripts say "not running"
    return 0


def _cmd_spectrum(args: argparse.Namespace) -> int:
    from qkdnode import config
    from qkdnode.spectrum import spectrum_png

    if (args.config is None) == (args.node is None):
        log.error("name the node: --config FILE, or --node NAME for a node of `qkdnode demo` (with --workdir)")
        return 2
    path = Path(args.config) if args.config else Path(args.workdir) / args.node / "node.toml"
    cfg = config.load(path)
    return asyncio.run(spectrum_png(cfg, osa=args.osa, out=Path(args.out), sweep=args.sweep))


def _cmd_demo(args: argparse.Namespace) -> int:
    # The demo is the one command that reaches into hil/: it starts emulated devices and nodes.
    from hil.testbed import run_demo

    return asyncio.run(run_demo(Path(args.workdir), duration=args.duration, rate_bps=args.key_rate,
                                topology=Path(args.topology) if args.topology else None,
                                unlimited_key_rate=args.unlimited_key_rate))


def _vault_of(args: argparse.Namespace, *, exclusive: bool = True, create: bool = False):
    from qkdnode import config
    from qkdnode.vault import Vault, load_master_key

    cfg = config.load(args.config)
    return cfg, Vault(cfg.vault.path, load_master_key(cfg.vault)).open(create=create, exclusive=exclusive)


def _cmd_vault_init(args: argparse.Namespace) -> int:
    from qkdnode import config
    from qkdnode.vault import create_master_key_file

    cfg = config.load(args.config)
    if cfg.vault.path.exists():
        raise QkdnodeError(f"vault {cfg.vault.path} exists already; nothing changed")
    if args.create_master_key:
        if cfg.vault.master_key_file is None:
            raise QkdnodeError("--create-master-key needs vault.master_key_file in the config")
        create_master_key_file(cfg.vault.master_key_file)
        print(f"wrote a new master key to {cfg.vault.master_key_file} (mode 0600); keep a copy off this host")
    _, vault = _vault_of(args, create=True)
    vault.close()
    print(f"created vault {cfg.vault.path}")
    return 0


def _cmd_vault_check(args: argparse.Namespace) -> int:
    cfg, vault = _vault_of(args, exclusive=False)  # read-only: may run beside the daemon
    try:
        report = asyncio.run(vault.run(vault.check))
    finally:
        vault.close()
    print(f"vault {cfg.vault.path}: opens with this master key; data key generation(s) {report['data_keys']}")
    for name, entry in sorted(report["blocks"].items()):
        print(f"  link {name}: {entry['blocks']} block(s), {entry['bits']} bits")
    print(f"  keys waiting for slave SAEs: {report['keys']['waiting']} ({report['keys']['bits']} bits)")
    for name, entry in sorted(report["stock"].items()):
        print(f"  stock of link {name}: {entry['keys']} key(s), {entry['bits']} bits")
    print(f"  outbox: {report['outbox'] or 'empty'}")
    print(f"  audit records: {report['audit'] or 'none'}")
    for failure in report["failures"]:
        print(f"  FAILED AUTHENTICATION (never served): {failure}")
    return 1 if report["failures"] else 0


def _cmd_vault_rotate_master_key(args: argparse.Namespace) -> int:
    from qkdnode.vault import create_master_key_file, read_master_key

    new_path = Path(args.new_key_file)
    if not new_path.exists():
        create_master_key_file(new_path)
        print(f"wrote a new master key to {new_path} (mode 0600)")
    new_key = read_master_key(new_path)
    cfg, vault = _vault_of(args)
    try:
        n = asyncio.run(vault.run(vault.rotate_master_key, new_key))
    finally:
        vault.close()
    where = cfg.vault.master_key_file or f"the credential {cfg.vault.master_key_credential!r}"
    print(f"re-wrapped {n} data key(s) under the new master key; no key row was rewritten.\n"
          f"Now put {new_path} in place of {where}; the old master key no longer opens this vault.")
    return 0


def _cmd_vault_rotate_data_key(args: argparse.Namespace) -> int:
    cfg, vault = _vault_of(args)

    async def rotate() -> int:
        gen, resumed = await vault.run(vault.begin_data_key_rotation)
        print(f"{'resuming' if resumed else 'started'} rotation to data key generation {gen}", flush=True)
        total = 0
        while n := await vault.run(vault.reseal_batch, args.batch):
            total += n
        return total

    try:
        total = asyncio.run(rotate())
    finally:
        vault.close()
    print(f"re-sealed {total} row(s); every row is under the new data key, the old one is gone")
    return 0


def _cmd_vault_export(args: argparse.Namespace) -> int:
    from qkdnode.vault import read_master_key

    target = read_master_key(Path(args.target_key_file))
    cfg, vault = _vault_of(args)
    try:
        asyncio.run(vault.run(vault.export_to, Path(args.to).resolve(), target))
    finally:
        vault.close()
    print(f"exported {cfg.vault.path} to {args.to}, sealed for the master key in {args.target_key_file}.\n"
          "This vault is now retired: it will not open again, so no key is served at two sites.\n"
          f"At the new site: qkdnode vault import --config NODE.toml --from {Path(args.to).name}")
    return 0


def _cmd_vault_import(args: argparse.Namespace) -> int:
    import shutil

    from qkdnode import config
    from qkdnode.vault import Vault, load_master_key

    cfg = config.load(args.config)
    src = Path(args.from_file).resolve()
    if cfg.vault.path.exists():
        raise QkdnodeError(f"vault {cfg.vault.path} exists already; move it away before importing")
    incoming = Vault(src, load_master_key(cfg.vault)).open(exclusive=False)
    try:
        report = asyncio.run(incoming.run(incoming.check))
    finally:
        incoming.close()
    if report["failures"]:
        raise QkdnodeError(f"{src}: {len(report['failures'])} row(s) fail authentication; not imported")
    cfg.vault.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.vault.path.with_name(cfg.vault.path.name + ".importing")
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, cfg.vault.path)
    print(f"imported {src} as {cfg.vault.path}: every row opens with this node's master key")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qkdnode", description="Trusted-node daemon of a QKD network.")
    p.add_argument("--version", action="version", version=f"qkdnode {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one node from its TOML config (the daemon)")
    run.add_argument("--config", required=True, help="the node's TOML file")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser(
        "check-config", help="check a node's config as `run` would, and report the first error, if any")
    check.add_argument("--config", required=True)
    check.add_argument("--no-files", action="store_true",
                       help="check the file alone, not the TLS material and master key it names (on a staging host)")
    check.set_defaults(func=_cmd_check_config)

    status = sub.add_parser(
        "status", help="links, pools, devices, peers, SAEs and certificate expiry of a running node, read from its "
                       "metrics endpoint (exit 3 if it is not running)")
    status.add_argument("--config", required=True, help="the node's TOML file")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(func=_cmd_status)

    spectrum = sub.add_parser(
        "spectrum", help="draw a node's optical spectrum to a PNG: DWDM channels labelled, quantum channels marked, "
                         "their band power against the alarm level")
    spectrum.add_argument("--config", help="the node's TOML file")
    spectrum.add_argument("--node", help="a node of `qkdnode demo` (its config is WORKDIR/NODE/node.toml)")
    spectrum.add_argument("--workdir", default="demo-work", help="the demo's folder, with --node (default: demo-work)")
    spectrum.add_argument("--osa", help="the [[devices]] id of the spectrum analyser (default: the node's only one)")
    spectrum.add_argument("--out", required=True, help="the PNG file to write")
    spectrum.add_argument("--sweep", action="store_true",
                          help="sweep now through the instrument instead of drawing the running daemon's latest sweep")
    spectrum.set_defaults(func=_cmd_spectrum)

    demo = sub.add_parser(
        "demo", help="start an emulated network (five trusted nodes, relay, a combined link, a CV-QKD pair) on "
                     "loopback and write testbed.json")
    demo.add_argument("--workdir", default="demo-work",
                      help="folder for the throwaway PKI, configs, vaults, logs and testbed.json (default: demo-work)")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--key-rate", type=float, default=50_000.0,
                      help="secret key rate of each emulated ETSI 014 KME pair in bit/s (default: 50000)")
    demo.add_argument("--topology", default=None,
                      help="topology file of the emulated network (default: config/demo-topology.toml)")
    demo.add_argument("--unlimited-key-rate", action="store_true",
                      help="every emulated link makes key as fast as it is asked for (overrides --key-rate; for "
                           "benchmarks of the software rather than of the emulated links)")
    demo.set_defaults(func=_cmd_demo)

    vault = sub.add_parser("vault", help="look after the node's key vault (stop the daemon first, except for check)")
    vsub = vault.add_subparsers(dest="vault_command", required=True)
    init = vsub.add_parser("init", help="create an empty vault (and, with --create-master-key, its master key file)")
    init.add_argument("--config", required=True)
    init.add_argument("--create-master-key", action="store_true",
                      help="write a fresh random master key to vault.master_key_file first (never overwrites)")
    init.set_defaults(func=_cmd_vault_init)
    vcheck = vsub.add_parser(
        "check", help="open every sealed row; print counts per state and every row that fails authentication "
                      "(exit 1 if any); never key bits; may run beside the daemon")
    vcheck.add_argument("--config", required=True)
    vcheck.set_defaults(func=_cmd_vault_check)
    rmk = vsub.add_parser("rotate-master-key",
                          help="re-wrap the data key(s) under a new master key (no key row is rewritten)")
    rmk.add_argument("--config", required=True)
    rmk.add_argument("--new-key-file", required=True,
                     help="the new master key (0600); created with a fresh random key if it does not exist")
    rmk.set_defaults(func=_cmd_vault_rotate_master_key)
    rdk = vsub.add_parser("rotate-data-key",
                          help="re-seal every row under a fresh data key; resumes where an interrupted run stopped")
    rdk.add_argument("--config", required=True)
    rdk.add_argument("--batch", type=int, default=500, help="rows per transaction (default: 500)")
    rdk.set_defaults(func=_cmd_vault_rotate_data_key)
    exp = vsub.add_parser("export", help="copy the vault sealed for another node's master key, to move the node; "
                                         "retires this vault")
    exp.add_argument("--config", required=True)
    exp.add_argument("--to", required=True, help="the export file to write (must not exist)")
    exp.add_argument("--target-key-file", required=True, help="the master key of the node that will import it")
    exp.set_defaults(func=_cmd_vault_export)
    imp = vsub.add_parser("import", help="install an exported vault at this node's vault path (none may exist)")
    imp.add_argument("--config", required=True)
    imp.add_argument("--from", dest="from_file", required=True, help="the export file")
    imp.set_defaults(func=_cmd_vault_import)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return args.func(args)
    except QkdnodeError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
