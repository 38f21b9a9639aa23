"""The `qkdnode` command: run a node, start an emulated network, look after the vault."""

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
    from qkdnode.node import run_node

    cfg = config.load(args.config)
    asyncio.run(run_node(cfg))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from qkdnode import config
    from qkdnode.interfaces import check_driver

    cfg = config.load(args.config)
    for i, link in enumerate(cfg.links):
        check_driver(link.driver, link.settings, file=cfg.file, key=f"links[{i}].driver")
    if not args.no_files:
        from qkdnode.node import Node

        Node(cfg)  # reads the master key and TLS material and builds every driver; opens no socket
    print(f"{cfg.file}: node {cfg.node_id}, {len(cfg.links)} link(s), {len(cfg.saes)} SAE(s): OK")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # The demo is the one command that reaches into hil/: it starts emulated devices and nodes.
    from hil.testbed import run_demo

    return asyncio.run(run_demo(Path(args.workdir), duration=args.duration, rate_bps=args.key_rate))


def _cmd_vault_init(args: argparse.Namespace) -> int:
    from qkdnode import config
    from qkdnode.vault import Vault, create_master_key_file, load_master_key

    cfg = config.load(args.config)
    if args.create_master_key:
        if cfg.vault.master_key_file is None:
            raise QkdnodeError("--create-master-key needs vault.master_key_file in the config")
        create_master_key_file(cfg.vault.master_key_file)
        print(f"wrote a new master key to {cfg.vault.master_key_file} (mode 0600); keep a copy off this host")
    if cfg.vault.path.exists():
        raise QkdnodeError(f"vault {cfg.vault.path} exists already; nothing changed")
    Vault(cfg.vault.path, load_master_key(cfg.vault)).open(create=True).close()
    print(f"created vault {cfg.vault.path}")
    return 0


def _cmd_vault_check(args: argparse.Namespace) -> int:
    from qkdnode import config
    from qkdnode.vault import Vault, load_master_key

    cfg = config.load(args.config)
    vault = Vault(cfg.vault.path, load_master_key(cfg.vault)).open(create=False)
    try:
        counts = asyncio.run(vault.run(vault.counts))
    finally:
        vault.close()
    print(f"vault {cfg.vault.path}: opens with this master key")
    for name, value in counts.items():
        print(f"  {name}: {value}")
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

    demo = sub.add_parser(
        "demo", help="start an emulated network (KME pair, nodes A and B) on loopback and write testbed.json")
    demo.add_argument("--workdir", default="demo-work",
                      help="folder for the throwaway PKI, configs, vaults, logs and testbed.json (default: demo-work)")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--key-rate", type=float, default=50_000.0,
                      help="secret key rate of the emulated QKD link in bit/s (default: 50000)")
    demo.set_defaults(func=_cmd_demo)

    vault = sub.add_parser("vault", help="look after the node's key vault")
    vsub = vault.add_subparsers(dest="vault_command", required=True)
    init = vsub.add_parser("init", help="create an empty vault (and, with --create-master-key, its master key file)")
    init.add_argument("--config", required=True)
    init.add_argument("--create-master-key", action="store_true",
                      help="write a fresh random master key to vault.master_key_file first (never overwrites)")
    init.set_defaults(func=_cmd_vault_init)
    vcheck = vsub.add_parser("check", help="open the vault with its master key and print counts (no key bits)")
    vcheck.add_argument("--config", required=True)
    vcheck.set_defaults(func=_cmd_vault_check)
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
