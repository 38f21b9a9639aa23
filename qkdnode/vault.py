"""The node's key vault: SQLite (WAL, synchronous=FULL, secure_delete=ON), every key row sealed.

Sealing: each row that holds key bits is sealed with AES-256-GCM under a random data key. The
associated data binds the ciphertext to its table, link, IDs and bookkeeping columns, so a
row cannot be swapped with another, moved to another link, or have its bookkeeping reset
(which would re-serve used bits) without failing authentication. The data key is stored
wrapped by the master key, which never lives in the database or the config.

Concurrency: one writer thread owns the connection. Callers submit operations; the thread
runs every operation waiting at that moment inside one transaction (each under its own
savepoint, so one failure does not spoil the others) and one COMMIT, which is one fsync for
the whole group. A caller's future resolves only after its COMMIT returned: the event loop
never blocks on SQLite, and nothing is answered before it is durable.

Lifecycle, all transitions in this module:
  block  (link key from a driver):  pending (master only, until the peer confirmed the digest)
                                     -> ready -> carved piece by piece -> row deleted
  key    (handed to SAEs):          at the master SAE's node, an audit record only;
                                     at the slaves' node, sealed bits until every slave has
                                     fetched it -> row deleted, audit kept.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import json
import logging
import os
import queue
import secrets
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import sqlite_utils
from json.encoder import encode_basestring_ascii as _jstr  # json.dumps' own string encoder (C)
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qkdnode.config import VaultConfig
from qkdnode.errors import (CarveConflict, NotYourKey, PoolExhausted, QkdnodeError, SealBroken, UnknownKey,
                            VaultError)

log = logging.getLogger("qkdnode.vault")

SCHEMA_VERSION = 1
MASTER_KEY_BYTES = 32
_NONCE = 12
_MAX_GROUP = 512
PURGE_USED_AT = 8192  # rows of used-up blocks deleted together

_GEN_PREFIX = [g.to_bytes(4, "big") for g in range(256)]  # a sealed value's first 4 bytes, by generation
Range = tuple[str, int, int]  # (block_ID, start byte, end byte) of one piece of a key
STOCK = "stock"  # `store` of a cut that goes into this node's stock (not to an SAE yet), at either end
StockKey = tuple[str, int, str]  # (chunk ID, index in the chunk, key_ID) of a stock key


# ---------------------------------------------------------------- master key


def load_master_key(cfg: VaultConfig) -> bytes:
    """Read the master key from a systemd credential or a file only its owner can read."""
    if cfg.master_key_credential:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise VaultError(
                f"vault.master_key_credential = {cfg.master_key_credential!r} needs $CREDENTIALS_DIRECTORY "
                "(set by systemd's LoadCredential=); it is not set"
            )
        return read_master_key(Path(directory) / cfg.master_key_credential, check_mode=False)
    return read_master_key(cfg.master_key_file, check_mode=True)


def read_master_key(path: Path, check_mode: bool = True) -> bytes:
    """The master key in a file: 32 raw bytes or 64 hex digits; with `check_mode`, owner-only."""
    try:
        st = path.stat()
        raw = path.read_bytes()
    except OSError as exc:
        raise VaultError(f"master key file {path}: {exc.strerror}") from None
    if check_mode and st.st_mode & 0o077:
        raise VaultError(
            f"master key file {path}: expected permissions 0600 (owner only), found "
            f"{stat.S_IMODE(st.st_mode):04o}; run: chmod 600 {path}"
        )
    text = raw.strip()
    if len(raw) == MASTER_KEY_BYTES:
        return raw
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != MASTER_KEY_BYTES:
        raise VaultError(
            f"master key file {path}: expected {MASTER_KEY_BYTES} raw bytes or {2 * MASTER_KEY_BYTES} hex digits, "
            f"found {len(raw)} bytes of another form"
        )
    return key


def create_master_key_file(path: Path) -> None:
    """Write a fresh random master key as hex, mode 0600; refuses to overwrite an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise VaultError(f"master key file {path} exists already; refusing to overwrite it") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_bytes(MASTER_KEY_BYTES).hex() + "\n")


# ---------------------------------------------------------------- helpers


def _resolve(outcomes: list) -> None:
    """On the event loop: hand each waiting caller its result (a caller may have given up)."""
    for fut, result, exc in outcomes:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)


def _merge(ranges: Iterable[tuple[int, int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def _free(size: int, carved: list[list[int]]) -> list[tuple[int, int]]:
    free, at = [], 0
    for s, e in carved:
        if s > at:
            free.append((at, s))
        at = max(at, e)
    if at < size:
        free.append((at, size))
    return free


def new_key_ids(n: int) -> list[str]:
    """Fresh key_IDs: UUIDs of version 7 (RFC 9562), 48 bits of Unix time in ms and 74 random
    bits. Time-ordered IDs land next to each other in the vault's indexes, so a group commit
    writes a few index pages rather than one random page per key (key_IDs are not secret)."""
    ms = (time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | 0b10 << 62  # version 7, variant 10
    rnd = os.urandom(10 * n)  # 80 bits each: 12 for rand_a (bits 68..79), 62 for rand_b
    out = []
    for i in range(0, 10 * n, 10):
        r = int.from_bytes(rnd[i:i + 10], "big")
        h = "%032x" % (ms | (r >> 68) << 64 | (r & 0x3FFF_FFFF_FFFF_FFFF))
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def new_key_id() -> str:
    """One fresh key_ID (`new_key_ids`)."""
    return new_key_ids(1)[0]


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def _stock_left(key_ids: str, issued: str) -> int:
    """Keys of a stock chunk not yet issued, from its row (`issued`: merged [start, end) index ranges)."""
    return len(json.loads(key_ids)) - sum(e - s for s, e in json.loads(issued))


def _stock_bits(conn: sqlite3.Connection) -> dict[str, int]:
    """Bits of stock not yet issued, per link (a few rows of up to 256 keys each)."""
    out: dict[str, int] = {}
    for link, size_bits, key_ids, issued in conn.execute("SELECT link, size_bits, key_ids, issued FROM stock"):
        out[link] = out.get(link, 0) + _stock_left(key_ids, issued) * size_bits
    return out


def _zero(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


class _Rows:
    """Rows of several `_record` calls, written together (one executemany per table)."""

    __slots__ = ("keys", "audit", "outbox", "stock")

    def __init__(self) -> None:
        self.keys: list[tuple] = []
        self.stock: list[tuple] = []
        self.audit: list[tuple] = []
        self.outbox: list[tuple] = []


@dataclass
class _Chunk:
    """A stock chunk opened in the writer thread (see Vault.issue_stock)."""

    chunk_id: str
    master: str
    slaves: str             # JSON, as stored
    size_bits: int
    key_ids: list[str]
    key_ids_json: str
    ranges_json: str
    ranges: list
    taken: set[int]
    state: str
    bits: bytearray
    rowid: int

    def __post_init__(self) -> None:
        self.taken_before = frozenset(self.taken)

    def __repr__(self) -> str:  # keep bits out of any repr that reaches a log
        return f"_Chunk({self.chunk_id!r}, {len(self.key_ids)} keys, {len(self.taken)} issued)"


_SLAVES_JSON: dict[tuple[str, ...], str] = {}


def _slaves_json(slaves: list[str]) -> str:
    """json.dumps(sorted(slaves)), remembered for the few distinct lists a node sees."""
    key = tuple(slaves)
    text = _SLAVES_JSON.get(key)
    if text is None:
        text = json.dumps(sorted(slaves))
        if len(_SLAVES_JSON) < 4096:
            _SLAVES_JSON[key] = text
    return text


class _Redo(Exception):
    """An operation of a group failed without savepoints: run the group again, the careful way."""


# Operations that read or write only the database (and their arguments): safe to undo and run
# again when a group is re-run. Any other operation (key rotation, export) runs in a group of
# its own, under a savepoint, exactly once.
_RERUNNABLE = frozenset({
    "add_blocks", "pending_blocks", "pending_offers", "ready_block_ids", "settle_blocks", "free_bytes", "held_bytes", "carve",
    "carve_batch", "apply_carve", "apply_carve_batch", "store_relayed", "record_issued", "discard_key", "deliver", "outbox_items", "outbox_done",
    "outbox_to_discard", "pool_bits", "counts", "prune_audit", "stock_ready", "issue_stock", "stock_discard",
    "stock_rows",
})


def _rerunnable(op: Callable) -> bool:
    return isinstance(getattr(op, "__self__", None), Vault) and op.__name__ in _RERUNNABLE


@dataclass(frozen=True)
class HandOut:
    """One key as carved: its ID, the block pieces it is made of, and its bits (never logged)."""

    key_ID: str
    ranges: list[Range]
    bits: bytes

    def __repr__(self) -> str:  # keep bits out of any repr that reaches a log
        return f"HandOut(key_ID={self.key_ID!r}, {len(self.bits)} bytes)"


# ---------------------------------------------------------------- the vault


class Vault:
    """The vault of one node. `max_group` caps how many operations share one commit (1 turns
    group commit off: one fsync per operation, for comparison); `on_commit(n_ops, seconds)` is
    called from the writer thread after each commit (metrics)."""

    def __init__(self, path: Path, master_key: bytes, *, max_group: int = _MAX_GROUP,
                 on_commit: Callable[[int, float], None] | None = None):
        if len(master_key) != MASTER_KEY_BYTES:
            raise VaultError(f"master key: expected {MASTER_KEY_BYTES} bytes, found {len(master_key)}")
        self.path = Path(path)
        self._master = AESGCM(master_key)
        self._keys: dict[int, AESGCM] = {}   # data key generation -> cipher
        self._active = 0                     # generation that seals new rows
        self._conn: sqlite3.Connection | None = None
        # Lists of (op, args, future), None to stop. SimpleQueue (C): a put costs the event loop
        # ~0.04 us against Queue's ~0.6 us and its Condition's wake-up of the writer.
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._submitted: dict[asyncio.AbstractEventLoop, list] = {}  # per event loop, not yet queued
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self.max_group = max_group
        # Bytes of key per (link, block state): committed, and the change the open transaction made.
        # Kept here because summing `free` over every block of a large pool costs milliseconds.
        self._totals: dict[tuple[str, str], int] = {}
        self._delta: dict[tuple[str, str], int] = {}
        self._used = 0  # rows of used-up blocks not yet deleted
        self._used_links: set[str] = set()  # links that may have such rows
        self.on_commit = on_commit
        self.vault_id = ""

    # -- opening

    def open(self, create: bool = False, exclusive: bool = True) -> "Vault":
        """Open (or create) the database and unwrap the data keys. Blocking; call before serving.

        `exclusive` takes the vault's lock file: one daemon or one maintenance command at a time
        (a read-only `vault check` may run beside the daemon without it)."""
        exists = self.path.exists()
        if not exists and not create:
            raise VaultError(f"vault {self.path} does not exist (create it with: qkdnode vault init --config FILE)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if exclusive:
            self._take_lock()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute("PRAGMA foreign_keys=ON")
            db = sqlite_utils.Database(conn)
            if "meta" not in db.table_names():
                if exists and db.table_names():
                    raise VaultError(f"{self.path} is an SQLite file but not a qkdnode vault")
                self._create_schema(db)
            self._unlock(conn)
            columns = {c for _, c, *_ in conn.execute("PRAGMA table_info(blocks)")}
            if exclusive and "parts" not in columns:
                # Added after the first release: the device blocks a joined block is made of (IDs only).
                conn.execute("ALTER TABLE blocks ADD COLUMN parts TEXT")
            if exclusive and "pa" not in columns:
                # Added later: the privacy amplification of a pending block (public seed, output size).
                conn.execute("ALTER TABLE blocks ADD COLUMN pa TEXT")
            if exclusive:  # added later still: the stock of keys agreed ahead of demand
                self._create_stock(conn)
            self._totals = {(link, state): free for link, state, free in
                            conn.execute("SELECT link, state, SUM(free) FROM blocks GROUP BY link, state")}
            if _has_table(conn, "stock"):
                self._totals.update({(link, STOCK): bits // 8 for link, bits in _stock_bits(conn).items()})
            used = conn.execute("SELECT link, COUNT(*) FROM blocks WHERE state='used' GROUP BY link").fetchall()
            self._used = sum(n for _, n in used)
            self._used_links = {link for link, _ in used}
        except sqlite3.DatabaseError as exc:
            conn.close()
            self._release_lock()
            raise VaultError(f"vault {self.path}: {exc}") from None
        except Exception:
            conn.close()
            self._release_lock()
            raise
        os.chmod(self.path, 0o600)
        self._conn = conn
        self._thread = threading.Thread(target=self._writer, name="vault-writer", daemon=True)
        self._thread.start()
        return self

    def _take_lock(self) -> None:
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise VaultError(f"vault {self.path} is in use by another process (a running qkdnode?); "
                             "stop it first") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _create_schema(self, db: sqlite_utils.Database) -> None:
        conn = db.conn
        conn.execute("BEGIN IMMEDIATE")
        db["meta"].create({"name": str, "value": bytes}, pk="name")
        db["blocks"].create(
            {"link": str, "block_id": str, "state": str, "size": int, "free": int, "carved": str,
             "sealed": bytes, "created": float, "parts": str, "pa": str},
            pk=("link", "block_id"),
        )
        db["blocks"].create_index(["link", "state", "created"])
        db["keys"].create(
            {"key_id": str, "link": str, "master_sae": str, "slaves": str, "pending": str,
             "size_bits": int, "sealed": bytes, "created": float},
            pk="key_id",
        )
        db["audit"].create(
            {"id": int, "ts": float, "event": str, "key_id": str, "sae": str, "link": str,
             "size_bits": int, "detail": str},
            pk="id",
        )
        db["audit"].create_index(["key_id"])
        db["audit"].create_index(["ts"])
        db["outbox"].create({"key_id": str, "link": str, "kind": str, "message": str, "created": float},
                            pk="key_id")
        self._create_stock(conn)
        self.vault_id = secrets.token_hex(16)
        db["meta"].insert_all([
            {"name": "schema_version", "value": str(SCHEMA_VERSION).encode()},
            {"name": "vault_id", "value": self.vault_id.encode()},
            {"name": "active_data_key", "value": b"1"},
            {"name": "data_key/1", "value": self._wrap(self._master, 1, AESGCM.generate_key(256))},
        ])
        conn.execute("COMMIT")
        log.warning("created a new vault at %s", self.path)

    @staticmethod
    def _create_stock(conn: sqlite3.Connection) -> None:
        """Keys a link's master node agreed with the peer ahead of demand (docs/vault.md, Stock): one
        row per chunk of keys cut together, named by its first key_ID; `issued` lists the indices
        handed out (their bits zeroed in `sealed`)."""
        conn.execute("CREATE TABLE IF NOT EXISTS stock (chunk_id TEXT PRIMARY KEY, link TEXT, master_sae TEXT, "
                     "slaves TEXT, size_bits INTEGER, key_ids TEXT, ranges TEXT, issued TEXT, state TEXT, "
                     "sealed BLOB, created FLOAT)")

    def _wrap(self, master: AESGCM, gen: int, data_key: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return nonce + master.encrypt(nonce, data_key, self._wrap_aad(gen))

    def _wrap_aad(self, gen: int) -> bytes:
        return f"qkdnode-vault|data-key|{self.vault_id}|{gen}".encode()

    def _unlock(self, conn: sqlite3.Connection) -> None:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        missing = [n for n in ("schema_version", "vault_id", "active_data_key") if n not in meta]
        if missing:
            raise VaultError(f"vault {self.path}: its meta table lacks {', '.join(missing)} (damaged?)")
        version = int(meta.get("schema_version", b"0"))
        if version != SCHEMA_VERSION:
            raise VaultError(f"vault {self.path}: schema version {version}, this qkdnode reads {SCHEMA_VERSION}")
        if "exported" in meta:
            raise VaultError(f"vault {self.path} was exported to move the node ({meta['exported'].decode()}); "
                             "it serves no keys here any more, so none can be served twice")
        self.vault_id = meta["vault_id"].decode()
        self._keys = {}
        for name, wrapped in meta.items():
            if name.startswith("data_key/"):
                gen = int(name.split("/", 1)[1])
                try:
                    data_key = self._master.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], self._wrap_aad(gen))
                except InvalidTag:
                    raise VaultError(f"vault {self.path}: the master key does not open this vault "
                                     "(wrong key file or credential?)") from None
                self._keys[gen] = AESGCM(data_key)
        self._active = int(meta["active_data_key"])

    @property
    def writer_alive(self) -> bool:
        """False once the writer thread has died: the node can no longer commit anything."""
        return self._thread is None or self._thread.is_alive()

    def close(self) -> None:
        if self._thread:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._conn:
            self._conn.close()
            self._conn = None
        self._release_lock()

    # -- sealing

    # A sealed value is: data key generation (4 bytes) | nonce (12) | AES-256-GCM ciphertext and tag.

    def _seal(self, aad: bytes, data: bytes | bytearray) -> bytes:
        nonce = os.urandom(_NONCE)
        gen = self._active
        prefix = _GEN_PREFIX[gen] if gen < 256 else gen.to_bytes(4, "big")
        return prefix + nonce + self._keys[gen].encrypt(nonce, data, aad)

    def _open(self, aad: bytes, blob: bytes, what: str, ident: str | None = None) -> bytearray:
        cipher = self._keys.get(int.from_bytes(blob[:4], "big"))
        try:
            if cipher is None:
                raise InvalidTag
            return bytearray(cipher.decrypt(blob[4:4 + _NONCE], blob[4 + _NONCE:], aad))
        except InvalidTag:
            if ident is not None:
                what = f"{what} {ident}"
            raise SealBroken(f"{what} failed authentication: the row was altered, swapped or moved") from None

    # The AAD is the JSON array json.dumps() makes of these fields (rows sealed by earlier versions
    # must still open); written out by hand because json.dumps costs several microseconds a call.
    @staticmethod
    def _block_aad(link: str, block_id: str, state: str, size: int, carved: str) -> bytes:
        return (f'["blocks", {_jstr(link)}, {_jstr(block_id)}, {_jstr(state)}, {int(size)}, '
                f'{_jstr(carved)}]').encode()

    @staticmethod
    def _key_aad(key_id: str, link: str, master: str, slaves: str, pending: str, size_bits: int) -> bytes:
        return (f'["keys", {_jstr(key_id)}, {_jstr(link)}, {_jstr(master)}, {_jstr(slaves)}, {_jstr(pending)}, '
                f'{int(size_bits)}]').encode()

    @staticmethod
    def _stock_aad(chunk_id: str, link: str, master: str, slaves: str, size_bits: int, issued: str, key_ids: str,
                   ranges: str) -> bytes:
        """`issued`, `key_ids` and `ranges` are the JSON arrays of the row, embedded as they are."""
        return (f'["stock", {_jstr(chunk_id)}, {_jstr(link)}, {_jstr(master)}, {_jstr(slaves)}, {int(size_bits)}, '
                f'{issued}, {key_ids}, {ranges}]').encode()

    @staticmethod
    def _key_aad_tail(link: str, master: str, slaves: str, pending: str, size_bits: int) -> str:
        """What follows the key_ID in `_key_aad` (the same for every key of one hand-out)."""
        return f'{_jstr(link)}, {_jstr(master)}, {_jstr(slaves)}, {_jstr(pending)}, {int(size_bits)}]'

    # -- the writer thread (group commit)

    async def run(self, op: Callable[..., Any], *args: Any) -> Any:
        """Run op(*args) in the writer thread inside a group transaction; return after COMMIT."""
        if self._thread is None:
            raise VaultError("vault is not open")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        # Operations submitted in one turn of the event loop reach the writer together (one queue
        # item, one wake-up): tasks resumed by one commit then share the next one, instead of the
        # writer waking on the first of them and committing it alone.
        pending = self._submitted.get(loop)
        if pending is None:
            pending = self._submitted[loop] = []
            loop.call_soon(self._submit, loop)
        pending.append((op, args, fut))
        return await fut

    def _submit(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue.put(self._submitted.pop(loop))

    def _writer(self) -> None:
        conn = self._conn
        backlog: collections.deque = collections.deque()  # operations taken from the queue, not yet run
        stop = False
        while True:
            if not backlog and not stop:
                item = self._queue.get()
                if item is None:
                    stop = True
                else:
                    backlog.extend(item)
            while not stop:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    backlog.extend(item)
            if not backlog:
                if self._used:  # a clean stop leaves no row of a used-up block behind
                    self._purge_used()
                return
            batch = [backlog.popleft()]
            if _rerunnable(batch[0][0]):
                while backlog and len(batch) < self.max_group and _rerunnable(backlog[0][0]):
                    batch.append(backlog.popleft())
            started = time.perf_counter()
            try:
                # Deferred: a read-only group (`vault check` beside the daemon) takes no write lock.
                # Writers never race: the vault's lock file admits one writing process.
                self._delta = {}
                conn.execute("BEGIN")
                if len(batch) > 1:
                    try:
                        outcomes = self._run_group(batch)
                    except _Redo:  # an operation failed half-way: undo the lot, then one savepoint each
                        conn.execute("ROLLBACK")
                        self._delta = {}
                        conn.execute("BEGIN")
                        outcomes = self._run_each(batch)
                else:
                    outcomes = self._run_each(batch)
                conn.execute("COMMIT")
                for k, n in self._delta.items():
                    self._totals[k] = self._totals.get(k, 0) + n
                if self._used >= PURGE_USED_AT:
                    self._purge_used()
                if self.on_commit:
                    self.on_commit(len(batch), time.perf_counter() - started)
            except Exception as exc:  # the commit itself failed: nothing of the group is durable
                log.error("vault commit failed: %s", exc)
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                outcomes = [(fut, None, VaultError(f"vault commit failed: {exc}")) for _, _, fut in batch]
            # One wake-up of each event loop per group, not one per operation.
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for outcome in outcomes:
                by_loop.setdefault(outcome[0].get_loop(), []).append(outcome)
            for loop, group in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_resolve, group)
                except RuntimeError:  # that loop is closed: nobody waits for these answers any more
                    pass

    def _purge_used(self) -> None:
        """In the writer thread, between groups: delete the rows of used-up blocks in one go."""
        try:
            self._conn.execute("BEGIN")
            for link in sorted(self._used_links):  # through the (link, state, created) index, not a scan
                self._conn.execute("DELETE FROM blocks WHERE link=? AND state='used'", (link,))
            self._conn.execute("COMMIT")
            self._used = 0
            self._used_links.clear()
        except sqlite3.DatabaseError as exc:  # tried again after the next group
            log.warning("vault: deleting used-up blocks failed: %s", exc)
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    def _run_each(self, batch: list) -> list:
        """Each operation under its own savepoint, so that one failure undoes only its own writes."""
        conn, outcomes = self._conn, []
        for op, args, fut in batch:
            conn.execute("SAVEPOINT op")
            delta = dict(self._delta)
            try:
                result = op(*args)
                conn.execute("RELEASE op")
                outcomes.append((fut, result, None))
            except Exception as exc:  # the op's own failure: undo just its writes
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                self._delta = delta
                outcomes.append((fut, None, exc))
        return outcomes

    def _run_group(self, batch: list) -> list:
        """The fast way: no savepoints, and runs of hand-outs from one link cut in one pass. Any
        operation that raises (it may have written part of its changes) makes the writer undo the
        whole group and run it again the careful way (`_run_each`); a hand-out refused for lack of
        key is not such a failure: it is refused before it writes anything."""
        outcomes, i = [], 0
        while i < len(batch):
            op, args, fut = batch[i]
            if getattr(op, "__func__", None) is Vault.carve and getattr(op, "__self__", None) is self:
                j = i + 1
                while j < len(batch) and getattr(batch[j][0], "__func__", None) is Vault.carve and \
                        batch[j][0].__self__ is self and batch[j][1][0] == args[0]:
                    j += 1
                try:
                    results = self._carve_many(args[0], [(*a[1:], None)[:6] for _, a, _ in batch[i:j]])
                except Exception:
                    raise _Redo from None
                outcomes.extend((f, *r) for (_, _, f), r in zip(batch[i:j], results))
                i = j
                continue
            try:
                outcomes.append((fut, op(*args), None))
            except Exception:
                raise _Redo from None
            i += 1
        return outcomes

    def _audit(self, event: str, key_id: str | None, sae: str | None, link: str | None,
               size_bits: int | None, detail: str = "") -> None:
        self._conn.execute(
            "INSERT INTO audit (ts, event, key_id, sae, link, size_bits, detail) VALUES (?,?,?,?,?,?,?)",
            (time.time(), event, key_id, sae, link, size_bits, detail),
        )

    # ------------------------------------------------------------ block transitions
    # Each method below runs in the writer thread (call it through `run`).

    def add_blocks(self, link: str, blocks: list[tuple[str, bytes]], state: str,
                   parts: dict[str, list[str]] | None = None, pa: dict[str, dict] | None = None) -> list[str]:
        """Store link key blocks as `pending` (master, before the peer confirmed) or `ready`.
        Kept so that a pending block can be offered again (after an outage or a restart): `parts`,
        the device blocks a block joins, and `pa`, the privacy amplification that made a block
        (its public Toeplitz seed and output size), which the peer applies to its copy. Blocks
        already held are left as they are; returns the IDs newly stored."""
        added, audit, total, now = [], [], 0, time.time()
        parts, pa = parts or {}, pa or {}
        insert = "INSERT OR IGNORE INTO blocks (link, block_id, state, size, free, carved, sealed, created, parts, " \
                 "pa) VALUES (?,?,?,?,?,?,?,?,?,?)"
        for block_id, bits in blocks:
            size = len(bits)
            sealed = self._seal(self._block_aad(link, block_id, state, size, "[]"), bits)
            joined = json.dumps(parts[block_id]) if block_id in parts else None
            amplified = json.dumps(pa[block_id]) if block_id in pa else None
            if not self._conn.execute(insert, (link, block_id, state, size, size, "[]", sealed, now, joined,
                                               amplified)).rowcount:
                continue  # held already
            added.append(block_id)
            total += size
            if state == "ready":
                audit.append((now, "block_ready", None, None, link, size * 8, block_id))
        if audit:
            self._conn.executemany(
                "INSERT INTO audit (ts, event, key_id, sae, link, size_bits, detail) VALUES (?,?,?,?,?,?,?)", audit)
        self._count(link, state, total)
        return added

    def _count(self, link: str, state: str, nbytes: int) -> None:
        self._delta[link, state] = self._delta.get((link, state), 0) + nbytes

    def pending_blocks(self, link: str) -> list[tuple[str, bytearray]]:
        rows = self._conn.execute(
            "SELECT block_id, size, carved, sealed FROM blocks WHERE link=? AND state='pending' ORDER BY created, rowid",
            (link,),
        ).fetchall()
        return [(bid, self._open(self._block_aad(link, bid, "pending", size, carved), sealed, f"block {bid}"))
                for bid, size, carved, sealed in rows]

    def pending_offers(self, link: str) -> tuple[dict[str, list[str]], dict[str, dict]]:
        """What offering a link's pending blocks again takes besides their bits (`add_blocks`):
        the device blocks each joined block is made of, and each amplified block's `pa`."""
        parts, pa = {}, {}
        for bid, joined, amplified in self._conn.execute(
                "SELECT block_id, parts, pa FROM blocks WHERE link=? AND state='pending' "
                "AND (parts IS NOT NULL OR pa IS NOT NULL)", (link,)):
            if joined is not None:
                parts[bid] = json.loads(joined)
            if amplified is not None:
                pa[bid] = json.loads(amplified)
        return parts, pa

    def ready_block_ids(self, link: str, block_ids: list[str]) -> set[str]:
        found = set()
        for bid in block_ids:
            if self._conn.execute("SELECT 1 FROM blocks WHERE link=? AND block_id=? AND state='ready'",
                                  (link, bid)).fetchone():
                found.add(bid)
        return found

    def settle_blocks(self, link: str, ready: list[str], discard: dict[str, str]) -> None:
        """Master side, after the peer answered: pending -> ready, or discarded with a reason."""
        for bid in ready:
            row = self._conn.execute(
                "SELECT size, carved, sealed FROM blocks WHERE link=? AND block_id=? AND state='pending'",
                (link, bid)).fetchone()
            if row is None:
                continue
            size, carved, sealed = row
            bits = self._open(self._block_aad(link, bid, "pending", size, carved), sealed, f"block {bid}")
            self._conn.execute(
                "UPDATE blocks SET state='ready', sealed=? WHERE link=? AND block_id=?",
                (self._seal(self._block_aad(link, bid, "ready", size, carved), bits), link, bid))
            _zero(bits)
            self._count(link, "pending", -size)
            self._count(link, "ready", size)
            self._audit("block_ready", None, None, link, size * 8, bid)
        for bid, reason in discard.items():
            row = self._conn.execute("SELECT free FROM blocks WHERE link=? AND block_id=? AND state='pending'",
                                     (link, bid)).fetchone()
            if row is None:
                continue
            self._conn.execute("DELETE FROM blocks WHERE link=? AND block_id=? AND state='pending'", (link, bid))
            self._count(link, "pending", -row[0])
            self._audit("block_discarded", None, None, link, None, f"{bid}: {reason}")

    def _bytes(self, link: str, state: str) -> int:
        """In the writer thread: as this transaction sees it so far."""
        return self._totals.get((link, state), 0) + self._delta.get((link, state), 0)

    def drop_link_blocks(self, link: str) -> int:
        """A link removed for good (a switched link deleted): its blocks, pending or ready, are
        deleted (secure_delete zeroes them). Keys already cut from them are not touched."""
        cur = self._conn.execute("DELETE FROM blocks WHERE link=?", (link,))
        stocked = self._bytes(link, STOCK)
        self._conn.execute("DELETE FROM stock WHERE link=?", (link,))
        if cur.rowcount or stocked:
            self._audit("link_removed", None, None, link, None,
                        f"{cur.rowcount} unused block(s) and {stocked * 8} bits of stock deleted")
        self._count(link, STOCK, -stocked)
        return cur.rowcount

    def free_bytes(self, link: str) -> int:
        return self._bytes(link, "ready")

    def held_bytes(self, link: str) -> int:
        """Ready and pending key of a link: what the master counts against its pool target."""
        return self._bytes(link, "ready") + self._bytes(link, "pending")

    # ------------------------------------------------------------ carving keys out of blocks

    def _take(self, link: str, pieces: dict[str, list[tuple[int, int]]],
              rows: dict[str, tuple[int, str, bytes, int]] | None = None) -> dict[tuple[str, int, int], bytes]:
        """Cut the given byte ranges out of ready blocks: return their bits, zero them in the
        stored block (re-sealed, bound to the new bookkeeping), delete blocks used up. `rows`:
        (size, carved, sealed, rowid) of ready blocks the caller has just read."""
        out: dict[tuple[str, int, int], bytes] = {}
        gone: list[tuple[int]] = []
        taken_total = 0
        conn = self._conn
        for bid, ranges in pieces.items():
            row = rows.get(bid) if rows is not None else None
            if row is None:
                row = conn.execute(
                    "SELECT size, carved, sealed, rowid FROM blocks WHERE link=? AND block_id=? AND state='ready'",
                    (link, bid)).fetchone()
            if row is None:
                raise CarveConflict(f"link {link}: block {bid} is not a ready block of this node")
            size, carved_json, sealed, rowid = row
            carved = json.loads(carved_json) if carved_json != "[]" else []
            for s, e in ranges:
                if not (0 <= s < e <= size) or (carved and any(s < ce and cs < e for cs, ce in carved)):
                    raise CarveConflict(f"link {link}: bytes {s}..{e} of block {bid} are used or out of range")
            if len(ranges) > 1:
                ordered = sorted(ranges)
                for (_, e1), (s2, e2) in zip(ordered, ordered[1:]):
                    if s2 < e1:  # two keys of this cut would share bytes
                        raise CarveConflict(f"link {link}: bytes {s2}..{e2} of block {bid} are named twice")
            bits = self._open(self._block_aad(link, bid, "ready", size, carved_json), sealed, "block", bid)
            n = 0
            for s, e in ranges:
                out[(bid, s, e)] = bytes(bits[s:e])
                bits[s:e] = bytes(e - s)
                n += e - s
            taken_total += n
            if carved:
                new_carved = _merge([tuple(c) for c in carved] + list(ranges))
                free = size - sum(e - s for s, e in new_carved)
            else:  # the ranges are checked apart from each other: they add up
                free = size - n
                new_carved = None
            if free == 0:
                gone.append((rowid,))
            else:
                cj = json.dumps(new_carved if new_carved is not None else _merge(ranges))
                conn.execute(
                    "UPDATE blocks SET carved=?, free=?, sealed=? WHERE rowid=?",
                    (cj, free, self._seal(self._block_aad(link, bid, "ready", size, cj), bits), rowid))
            _zero(bits)
        if taken_total:
            self._count(link, "ready", -taken_total)
        if gone:
            # A used-up block keeps its row, without its sealed bits (secure_delete zeroes them),
            # until `_purge_used` deletes such rows many at a time: deleting each at once would
            # touch a random page of the block ID index per block, a page per block per commit.
            conn.executemany("UPDATE blocks SET state='used', free=0, sealed=x'' WHERE rowid=?", gone)
            self._used += len(gone)
            self._used_links.add(link)
        return out

    def _record(self, link: str, key_ids: list[str], ranges: list[list[Range]], nbytes: int, master: str,
                slaves: list[str], store: bool | str, outbox_message: dict | None,
                taken: dict[tuple[str, int, int], bytes] | None = None,
                rows: _Rows | None = None) -> list[HandOut]:
        """Record cut keys: sealed key rows (`store` True), sealed stock rows (`store` STOCK, in
        state `pushing`; their HandOuts carry no bits), audit rows, outbox rows. With `rows`, the
        rows are added to it and the caller writes them (`_write_rows`: one statement per table for
        a whole group of calls); otherwise they are written here."""
        if taken is None:
            pieces: dict[str, list[tuple[int, int]]] = {}
            for key_ranges in ranges:
                for bid, s, e in key_ranges:
                    pieces.setdefault(bid, []).append((s, e))
            taken = self._take(link, pieces)
        slaves_json = _slaves_json(slaves)
        now = time.time()
        size_bits = nbytes * 8
        sink = rows if rows is not None else _Rows()
        key_rows, audit_rows, outbox_rows = sink.keys, sink.audit, sink.outbox
        result = []
        stock = store == STOCK
        chunk: list[bytes] = []
        event = "key_stocked" if stock else "key_stored" if store else "key_issued"
        seal = self._seal
        if store and not stock:  # the AAD of every key of this call but its ID, as `_key_aad` writes it
            aad_tail = self._key_aad_tail(link, master, slaves_json, slaves_json, size_bits)
        for key_id, key_ranges in zip(key_ids, ranges):
            bits = taken[key_ranges[0]] if len(key_ranges) == 1 else b"".join([taken[r] for r in key_ranges])
            if len(bits) != nbytes:
                raise CarveConflict(f"key {key_id}: pieces add up to {len(bits)} bytes, expected {nbytes}")
            if stock:  # kept here, sealed, for the master SAE's later requests (`issue_stock`)
                chunk.append(bits)
                bits = b""
            elif store:  # this node serves the slaves: keep the bits, sealed, until each has fetched them
                aad = f'["keys", {_jstr(key_id)}, {aad_tail}'.encode()
                key_rows.append((key_id, link, master, slaves_json, slaves_json, size_bits, seal(aad, bits), now))
            # else this node serves the master SAE, which gets the bits in the answer: audit only
            audit_rows.append((now, event, key_id, master, link, size_bits, slaves_json))
            if outbox_message is not None:
                msg = dict(outbox_message, key_ID=key_id, ranges=key_ranges)
                outbox_rows.append((key_id, link, "keys", json.dumps(msg), now))
            result.append(HandOut(key_id, key_ranges, bits))
        if stock and result:  # one sealed row for the whole chunk
            bits = bytearray(b"".join(chunk))
            kj, rj = json.dumps(key_ids), json.dumps(ranges)
            sink.stock.append((key_ids[0], link, master, slaves_json, size_bits, kj, rj, "[]", "pushing",
                               seal(self._stock_aad(key_ids[0], link, master, slaves_json, size_bits, "[]", kj, rj),
                                    bits), now))
            _zero(bits)
            self._count(link, STOCK, nbytes * len(result))
        if rows is None:
            self._write_rows(sink)
        return result

    def _write_rows(self, rows: _Rows) -> None:
        c = self._conn
        if rows.keys:
            c.executemany("INSERT INTO keys (key_id, link, master_sae, slaves, pending, size_bits, sealed, created) "
                          "VALUES (?,?,?,?,?,?,?,?)", rows.keys)
        if rows.audit:
            c.executemany("INSERT INTO audit (ts, event, key_id, sae, link, size_bits, detail) VALUES (?,?,?,?,?,?,?)",
                          rows.audit)
        if rows.outbox:
            c.executemany("INSERT INTO outbox (key_id, link, kind, message, created) VALUES (?,?,?,?,?)", rows.outbox)
        if rows.stock:
            c.executemany("INSERT INTO stock (chunk_id, link, master_sae, slaves, size_bits, key_ids, ranges, issued, "
                          "state, sealed, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows.stock)

    def carve(self, link: str, key_ids: list[str], nbytes: int, master: str, slaves: list[str], store: bool,
              outbox: dict | None = None) -> list[HandOut]:
        """Allocate fresh keys from the oldest ready key of a link (the link's master node does
        this, and only it, so the two ends never hand out the same bits). All or nothing: with
        too little ready key, raises PoolExhausted and changes nothing."""
        ((result, exc),) = self._carve_many(link, [(key_ids, nbytes, master, slaves, store, outbox)])
        if exc is not None:
            raise exc
        return result

    def _carve_many(self, link: str, calls: list[tuple]) -> list[tuple[list[HandOut] | None, Exception | None]]:
        """Several `carve` calls on one link in one pass, as if run one after the other: one scan
        of the ready blocks, each block opened and re-sealed (or deleted) once. A call that finds
        too little key left gets PoolExhausted and takes nothing; the others are unaffected."""
        cur = self._conn.execute(
            "SELECT block_id, size, carved, sealed, rowid FROM blocks WHERE link=? AND state='ready' "
            "ORDER BY created, rowid", (link,))
        rows: dict[str, tuple[int, str, bytes, int]] = {}
        free: list[tuple[str, int, int]] = []   # free byte ranges of the blocks read so far, oldest first
        at, offset = 0, 0                       # the first free byte not yet allocated: free[at], offset into it
        exhausted = False
        planned: list[list[list[Range]] | None] = []
        allocated = 0
        refused_at: list[int] = []              # bytes allocated before each refused call
        for key_ids, nbytes, *_ in calls:
            need = nbytes * len(key_ids)
            keys: list[list[Range]] = []
            a, o = at, offset
            while len(keys) < len(key_ids):
                current: list[Range] = []
                want = nbytes
                while want:
                    while a == len(free) and not exhausted:  # read the next ready block
                        row = cur.fetchone()
                        if row is None:
                            exhausted = True
                            break
                        bid, size, carved, sealed, rowid = row
                        rows[bid] = (size, carved, sealed, rowid)
                        free.extend((bid, s, e) for s, e in _free(size, json.loads(carved) if carved != "[]" else []))
                    if a == len(free):
                        break
                    bid, s, e = free[a]
                    n = min(want, e - s - o)
                    current.append((bid, s + o, s + o + n))
                    want -= n
                    o += n
                    if s + o == e:
                        a, o = a + 1, 0
                if want:
                    break
                keys.append(current)
            if len(keys) < len(key_ids):
                planned.append(None)
                refused_at.append(allocated)
                continue
            at, offset = a, o
            allocated += need
            planned.append(keys)
        cur.close()
        pieces: dict[str, list[tuple[int, int]]] = {}
        for keys in planned:
            for key_ranges in keys or ():
                for bid, s, e in key_ranges:
                    pieces.setdefault(bid, []).append((s, e))
        taken = self._take(link, pieces, rows) if pieces else {}
        out: list[tuple[list[HandOut] | None, Exception | None]] = []
        ready_before = self.free_bytes(link) + allocated if refused_at else 0
        refused = iter(refused_at)
        rows = _Rows()
        for (key_ids, nbytes, master, slaves, store, outbox), keys in zip(calls, planned):
            if keys is None:
                out.append((None, PoolExhausted(f"link {link}: {nbytes * len(key_ids) * 8} bits asked, "
                                                f"{(ready_before - next(refused)) * 8} ready")))
                continue
            out.append((self._record(link, key_ids, keys, nbytes, master, slaves, store, outbox, taken, rows), None))
        self._write_rows(rows)
        return out

    def carve_batch(self, link: str, calls: list[tuple],
                    confirmed: list[str] | tuple = ()) -> list[tuple[list[HandOut] | None, Exception | None]]:
        """Several hand-outs of one link at once (the link pool batches concurrent requests):
        `calls` are the arguments of `carve` after the link; each gets its hand-outs or its
        exception (PoolExhausted), as if each had been a `carve` of its own, one after the other.
        `confirmed`: outbox entries of earlier hand-outs the peer has taken, removed in the same
        transaction (`outbox_done`), a batch's worth at a time."""
        if confirmed:
            self.outbox_done(confirmed)
        return self._carve_many(link, [(*c, None)[:6] for c in calls])

    def apply_carve_batch(self, link: str, calls: list[tuple]) -> list[tuple[list[HandOut] | None, Exception | None]]:
        """`apply_carve` for several messages in one operation: `calls` are its arguments after
        the link; each gets what `apply_carve` returns (the keys recorded here, none for a message
        seen before), or the exception that refused it (that message alone then changes nothing)."""
        self._conn.execute("SAVEPOINT batch")
        delta = dict(self._delta)
        try:  # the common case, every message good: their keys cut in one pass over their blocks
            out = self._apply_carves(link, calls)
            self._conn.execute("RELEASE batch")
            return out
        except QkdnodeError:
            self._conn.execute("ROLLBACK TO batch")
            self._conn.execute("RELEASE batch")
            self._delta = delta
        out = []
        for args in calls:
            self._conn.execute("SAVEPOINT message")
            delta = dict(self._delta)
            try:
                out.append((self.apply_carve(link, *args), None))
                self._conn.execute("RELEASE message")
            except QkdnodeError as exc:
                self._conn.execute("ROLLBACK TO message")
                self._conn.execute("RELEASE message")
                self._delta = delta
                out.append((None, exc))
        return out

    def _apply_carves(self, link: str, calls: list[tuple]) -> list[tuple[list[HandOut] | None, Exception | None]]:
        ids = [k for key_ids, *_ in calls for k in key_ids]
        known: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            known.update(k for (k,) in self._conn.execute(
                f"SELECT DISTINCT key_id FROM audit WHERE key_id IN ({','.join('?' * len(chunk))})", chunk))
        todo = []
        pieces: dict[str, list[tuple[int, int]]] = {}
        for key_ids, ranges, nbytes, master, slaves, store in calls:
            keep = [(k, [tuple(p) for p in r]) for k, r in zip(key_ids, ranges) if k not in known]
            todo.append((keep, nbytes, master, slaves, store))
            for _, key_ranges in keep:
                for bid, s, e in key_ranges:
                    pieces.setdefault(bid, []).append((s, e))
        taken = self._take(link, pieces) if pieces else {}
        rows = _Rows()
        out = [(self._record(link, [k for k, _ in keep], [r for _, r in keep], nbytes, master, slaves, store,
                             None, taken, rows) if keep else [], None)
               for keep, nbytes, master, slaves, store in todo]
        self._write_rows(rows)
        return out

    # ------------------------------------------------------------ the stock (the master SAE's node)
    # Keys cut ahead of demand for one (master SAE, slave SAEs, size), agreed with the peer like
    # any hand-out: at the link's master end `carve_batch` with `store` STOCK writes them as one
    # chunk row, `pushing`, and they are pushed; at the other end `apply_carve` with STOCK writes
    # the chunk of the keys the master node allocated. They need no outbox rows: a chunk still
    # `pushing` (its push failed, or a crash) is discarded with `stock_discard`, whose outbox
    # entries ask the peer to delete what it may have stored.
    # A chunk is sealed like a block: the indices issued are bound to it and their bits zeroed.

    def stock_ready(self, link: str, chunk_ids: list[str]) -> int:
        """The peer stored these chunks: their keys may now be issued."""
        return self._conn.executemany("UPDATE stock SET state='ready' WHERE chunk_id=? AND link=? AND state='pushing'",
                                      [(c, link) for c in chunk_ids]).rowcount

    def _stock_chunk(self, link: str, chunk_id: str) -> "_Chunk":
        row = self._conn.execute("SELECT link, master_sae, slaves, size_bits, key_ids, ranges, issued, state, sealed, "
                                 "rowid FROM stock WHERE chunk_id=?", (chunk_id,)).fetchone()
        if row is None or row[0] != link:
            raise CarveConflict(f"link {link}: no stock chunk {chunk_id}")
        _, master, slaves, size_bits, key_ids, ranges, issued, state, sealed, rowid = row
        bits = self._open(self._stock_aad(chunk_id, link, master, slaves, size_bits, issued, key_ids, ranges), sealed,
                          "stock chunk", chunk_id)
        taken = {i for s, e in json.loads(issued) for i in range(s, e)}
        return _Chunk(chunk_id, master, slaves, size_bits, json.loads(key_ids), key_ids, ranges, json.loads(ranges),
                      taken, state, bits, rowid)

    def issue_stock(self, link: str, calls: list[tuple[list[StockKey], str, list[str], int]]
                    ) -> list[tuple[list[HandOut] | None, Exception | None]]:
        """Hand ready stock keys to their master SAE: each call is (keys, master, slaves, size in
        bits) and gets its HandOuts, or CarveConflict (SealBroken for an altered chunk) if any of
        its keys is not an unissued key of a ready chunk of that master, slaves and size; that
        call then takes nothing. The audit says `key_issued`, as for a key cut on demand; a
        chunk whose every key is issued is deleted (secure_delete)."""
        chunks: dict[str, _Chunk | Exception] = {}
        out: list[tuple[list[HandOut] | None, Exception | None]] = []
        audit, now = [], time.time()
        for keys, master, slaves, size_bits in calls:
            slaves_json = _slaves_json(slaves)
            picked: list[tuple[_Chunk, int, str]] = []
            refused: Exception | None = None
            for chunk_id, index, key_id in keys:
                c = chunks.get(chunk_id)
                if c is None:
                    try:
                        c = chunks[chunk_id] = self._stock_chunk(link, chunk_id)
                    except (CarveConflict, SealBroken) as exc:
                        c = chunks[chunk_id] = exc
                if isinstance(c, Exception):
                    refused = c
                    break
                if (c.master, c.slaves, c.size_bits, c.state) != (master, slaves_json, size_bits, "ready") or \
                        not 0 <= index < len(c.key_ids) or c.key_ids[index] != key_id or index in c.taken or \
                        any(p is c and i == index for p, i, _ in picked):
                    refused = CarveConflict(f"link {link}: stock key {key_id} is not an unissued key of a ready chunk "
                                            f"for {master} -> {slaves} ({size_bits} bits)")
                    break
                picked.append((c, index, key_id))
            if refused is not None:
                out.append((None, refused))
                continue
            handouts = []
            n = size_bits // 8
            for c, index, key_id in picked:
                c.taken.add(index)
                handouts.append(HandOut(key_id, [tuple(r) for r in c.ranges[index]],
                                        bytes(c.bits[index * n:(index + 1) * n])))
                c.bits[index * n:(index + 1) * n] = bytes(n)
                audit.append((now, "key_issued", key_id, master, link, size_bits, slaves_json))
            self._count(link, STOCK, -n * len(picked))
            out.append((handouts, None))
        for c in chunks.values():
            if isinstance(c, _Chunk):
                self._store_chunk(link, c)
        if audit:
            self._conn.executemany("INSERT INTO audit (ts, event, key_id, sae, link, size_bits, detail) "
                                   "VALUES (?,?,?,?,?,?,?)", audit)
        return out

    def _store_chunk(self, link: str, c: "_Chunk") -> None:
        """Write back a chunk some keys were issued from (its bits zeroed after)."""
        left = len(c.key_ids) - len(c.taken)
        if left == 0:
            self._conn.execute("DELETE FROM stock WHERE rowid=?", (c.rowid,))
        elif c.taken != c.taken_before:
            issued = json.dumps(_merge((i, i + 1) for i in c.taken))
            aad = self._stock_aad(c.chunk_id, link, c.master, c.slaves, c.size_bits, issued, c.key_ids_json,
                                  c.ranges_json)
            self._conn.execute("UPDATE stock SET issued=?, sealed=? WHERE rowid=?",
                               (issued, self._seal(aad, c.bits), c.rowid))
        _zero(c.bits)

    def stock_discard(self, link: str, chunk_ids: list[str], reason: str) -> int:
        """Chunks whose keys will not be issued (too old, pushed without an answer, a restart found
        them unconfirmed): deleted here, and for each key not issued an outbox entry asks the peer
        to delete its copy. A chunk that fails authentication is left for `vault check`. Returns
        the number of keys discarded."""
        now, n, outbox, audit = time.time(), 0, [], []
        for chunk_id in chunk_ids:
            try:
                c = self._stock_chunk(link, chunk_id)
            except CarveConflict:
                continue  # gone already
            except SealBroken as exc:
                log.error("link %s: %s; not discarded", link, exc)
                continue
            _zero(c.bits)
            for index, key_id in enumerate(c.key_ids):
                if index not in c.taken:
                    outbox.append((key_id, link, "discard", json.dumps({"ranges": c.ranges[index], "reason": reason}),
                                   now))
                    audit.append((now, "key_discarded", key_id, None, link, c.size_bits, reason))
            self._conn.execute("DELETE FROM stock WHERE rowid=?", (c.rowid,))
            left = len(c.key_ids) - len(c.taken)
            self._count(link, STOCK, -left * c.size_bits // 8)
            n += left
        self._conn.executemany("INSERT OR REPLACE INTO outbox (key_id, link, kind, message, created) "
                               "VALUES (?,?,?,?,?)", outbox)
        self._conn.executemany("INSERT INTO audit (ts, event, key_id, sae, link, size_bits, detail) "
                               "VALUES (?,?,?,?,?,?,?)", audit)
        return n

    def stock_rows(self, link: str) -> list[tuple[str, str, list[str], int, str, float, list[tuple[int, str]]]]:
        """The stock of a link, chunk by chunk, oldest first: (chunk ID, master SAE, slave SAEs,
        size in bits, state, created, [(index, key_ID) of each key not yet issued])."""
        out = []
        for chunk_id, master, slaves, size, state, created, key_ids, issued in self._conn.execute(
                "SELECT chunk_id, master_sae, slaves, size_bits, state, created, key_ids, issued FROM stock "
                "WHERE link=? ORDER BY created, rowid", (link,)):
            taken = {i for s, e in json.loads(issued) for i in range(s, e)}
            out.append((chunk_id, master, json.loads(slaves), size, state, created,
                        [(i, k) for i, k in enumerate(json.loads(key_ids)) if i not in taken]))
        return out

    def apply_carve(self, link: str, key_ids: list[str], ranges: list[list[Range]], nbytes: int, master: str,
                    slaves: list[str], store: bool | str) -> list[HandOut]:
        """The other end of a link: cut exactly the pieces the link's master node named (`store`
        as for `carve`: True for slave SAEs here, False for a master SAE here, STOCK for this
        node's stock). A key already recorded here (a repeated message) is not cut again."""
        todo = [(k, r) for k, r in zip(key_ids, ranges) if not self._known_key(k)]
        if not todo:
            return []
        return self._record(link, [k for k, _ in todo], [[tuple(p) for p in r] for _, r in todo], nbytes,
                            master, slaves, store, None)

    def store_relayed(self, label: str, key_ids: list[str], bits: list[bytes], master: str,
                      slaves: list[str]) -> int:
        """Keys that reached this node through trusted-node relay (no link block behind them):
        keep them sealed for the slave SAEs, as a hand-out from a direct link would be. `label`
        names the way they came (`relay:A>B>C`) and takes the place of the link in the audit and
        the AAD. A key ID already known here (a replayed message) is refused whole."""
        known = [k for k in key_ids if self._known_key(k)]
        if known:
            raise CarveConflict(f"{len(known)} relayed key ID(s) are already known at this node (a replay?)")
        slaves_json = json.dumps(sorted(slaves))
        now = time.time()
        for key_id, b in zip(key_ids, bits, strict=True):
            aad = self._key_aad(key_id, label, master, slaves_json, slaves_json, len(b) * 8)
            self._conn.execute(
                "INSERT INTO keys (key_id, link, master_sae, slaves, pending, size_bits, sealed, created) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (key_id, label, master, slaves_json, slaves_json, len(b) * 8, self._seal(aad, b), now))
            self._audit("key_stored", key_id, master, label, len(b) * 8, slaves_json)
        return len(key_ids)

    def record_issued(self, key_ids: list[str], master: str, slaves: list[str], size_bits: int, label: str) -> None:
        """Audit keys this node hands to its master SAE that came from relay, not from a link's carve."""
        slaves_json = json.dumps(sorted(slaves))
        for key_id in key_ids:
            self._audit("key_issued", key_id, master, label, size_bits, slaves_json)

    def _known_key(self, key_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM audit WHERE key_id=? LIMIT 1", (key_id,)).fetchone() is not None

    def discard_key(self, link: str, key_id: str, ranges: list[Range], reason: str) -> None:
        """A hand-out that never reached its master SAE: delete the key, or zero its pieces."""
        cur = self._conn.execute("DELETE FROM keys WHERE key_id=? AND link=?", (key_id, link))
        if cur.rowcount:
            self._audit("key_discarded", key_id, None, link, None, reason)
            return
        if self._known_key(key_id):
            return
        pieces: dict[str, list[tuple[int, int]]] = {}
        for bid, s, e in ranges:
            pieces.setdefault(bid, []).append((s, e))
        try:
            self._take(link, pieces)
        except CarveConflict:
            return  # already gone at this end: nothing left to zero
        self._audit("key_discarded", key_id, None, link, None, reason)

    # ------------------------------------------------------------ keys for slave SAEs

    def deliver(self, slave: str, master: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
        """dec_keys: hand each named key to a slave SAE, once. All or nothing: any unknown ID
        or any key not meant for this slave raises and changes nothing."""
        out = []
        for key_id in key_ids:
            row = self._conn.execute(
                "SELECT link, master_sae, slaves, pending, size_bits, sealed FROM keys WHERE key_id=?",
                (key_id,)).fetchone()
            if row is None:
                raise UnknownKey(key_id, self._known_key(key_id))
            link, key_master, slaves_json, pending_json, size_bits, sealed = row
            pending = json.loads(pending_json)
            if slave not in json.loads(slaves_json) or key_master != master:
                raise NotYourKey(key_id)
            if slave not in pending:
                raise UnknownKey(key_id, True)
            aad = self._key_aad(key_id, link, key_master, slaves_json, pending_json, size_bits)
            bits = self._open(aad, sealed, f"key {key_id}")
            pending.remove(slave)
            self._audit("key_delivered", key_id, slave, link, size_bits, "")
            if pending:
                pj = json.dumps(pending)
                self._conn.execute(
                    "UPDATE keys SET pending=?, sealed=? WHERE key_id=?",
                    (pj, self._seal(self._key_aad(key_id, link, key_master, slaves_json, pj, size_bits), bits),
                     key_id))
            else:
                self._conn.execute("DELETE FROM keys WHERE key_id=?", (key_id,))
                self._audit("key_consumed", key_id, None, link, size_bits, "")
            out.append((key_id, bytes(bits)))
            _zero(bits)
        return out

    # ------------------------------------------------------------ outbox (messages the peer must get)

    def outbox_items(self, link: str) -> list[tuple[str, str, dict, float]]:
        rows = self._conn.execute("SELECT key_id, kind, message, created FROM outbox WHERE link=? ORDER BY created",
                                  (link,)).fetchall()
        return [(k, kind, json.loads(m), created) for k, kind, m, created in rows]

    def outbox_done(self, key_ids: list[str] | tuple) -> None:
        self._conn.executemany("DELETE FROM outbox WHERE key_id=?", [(k,) for k in key_ids])

    def outbox_to_discard(self, key_ids: list[str]) -> None:
        self._conn.executemany("UPDATE outbox SET kind='discard' WHERE key_id=?", [(k,) for k in key_ids])

    # ------------------------------------------------------------ maintenance (operator commands)

    def rotate_master_key(self, new_master_key: bytes) -> int:
        """Re-wrap every data key under a new master key, in one transaction. No key row is
        rewritten. Returns the number of data keys re-wrapped."""
        new = AESGCM(new_master_key)
        rows = self._conn.execute("SELECT name FROM meta WHERE name LIKE 'data_key/%'").fetchall()
        for (name,) in rows:
            gen = int(name.split("/", 1)[1])
            key = self._unwrap_gen(gen)
            self._conn.execute("UPDATE meta SET value=? WHERE name=?", (self._wrap(new, gen, key), name))
        self._master = new
        return len(rows)

    def _unwrap_gen(self, gen: int) -> bytes:
        wrapped = self._conn.execute("SELECT value FROM meta WHERE name=?", (f"data_key/{gen}",)).fetchone()[0]
        return self._master.decrypt(wrapped[:_NONCE], wrapped[_NONCE:], self._wrap_aad(gen))

    def begin_data_key_rotation(self) -> tuple[int, bool]:
        """Start sealing new rows under a fresh data key, unless a rotation is already under
        way (then it is resumed). Returns (generation, resumed)."""
        if len(self._keys) > 1:
            return self._active, True
        gen = max(self._keys) + 1
        key = AESGCM.generate_key(256)
        self._conn.execute("INSERT INTO meta (name, value) VALUES (?, ?)",
                           (f"data_key/{gen}", self._wrap(self._master, gen, key)))
        self._conn.execute("UPDATE meta SET value=? WHERE name='active_data_key'", (str(gen).encode(),))
        self._keys[gen] = AESGCM(key)
        self._active = gen
        return gen, False

    def reseal_batch(self, limit: int = 500) -> int:
        """Re-seal up to `limit` rows still under an older data key; when none is left, drop the
        older keys. Returns how many rows were re-sealed (0: the rotation is complete)."""
        prefix = self._active.to_bytes(4, "big")
        done = 0
        for table, key_cols, aad_of in (("blocks", ("link", "block_id"), self._row_aad_block),
                                        ("keys", ("key_id",), self._row_aad_key),
                                        ("stock", ("chunk_id",), self._row_aad_stock)):
            rows = self._conn.execute(f"SELECT * FROM {table} WHERE substr(sealed, 1, 4) != ? AND sealed != x'' LIMIT ?",
                                      (prefix, limit - done)).fetchall()
            cols = [d[0] for d in self._conn.execute(f"SELECT * FROM {table} LIMIT 0").description]
            for values in rows:
                row = dict(zip(cols, values))
                aad = aad_of(row)
                bits = self._open(aad, row["sealed"], f"{table} row {[row[c] for c in key_cols]}")
                where = " AND ".join(f"{c}=?" for c in key_cols)
                self._conn.execute(f"UPDATE {table} SET sealed=? WHERE {where}",
                                   (self._seal(aad, bits), *[row[c] for c in key_cols]))
                _zero(bits)
                done += 1
        if done == 0:
            for gen in [g for g in self._keys if g != self._active]:
                self._conn.execute("DELETE FROM meta WHERE name=?", (f"data_key/{gen}",))
                del self._keys[gen]
        return done

    def _row_aad_block(self, r: dict) -> bytes:
        return self._block_aad(r["link"], r["block_id"], r["state"], r["size"], r["carved"])

    def _row_aad_key(self, r: dict) -> bytes:
        return self._key_aad(r["key_id"], r["link"], r["master_sae"], r["slaves"], r["pending"], r["size_bits"])

    def _row_aad_stock(self, r: dict) -> bytes:
        return self._stock_aad(r["chunk_id"], r["link"], r["master_sae"], r["slaves"], r["size_bits"], r["issued"],
                               r["key_ids"], r["ranges"])

    def check(self) -> dict[str, Any]:
        """Open every sealed row; count rows per state and list every row that fails."""
        failures, blocks, keys, stock = [], {}, {"waiting": 0, "bits": 0}, {}
        for r in self._rows("blocks"):
            if r["state"] == "used":  # used up, bits gone; the row awaits deletion
                continue
            try:
                _zero(self._open(self._row_aad_block(r), r["sealed"], "block"))
                entry = blocks.setdefault(f"{r['link']}/{r['state']}", {"blocks": 0, "bits": 0})
                entry["blocks"] += 1
                entry["bits"] += r["free"] * 8
            except SealBroken:
                failures.append(f"blocks: link {r['link']} block {r['block_id']}")
        for r in self._rows("keys"):
            try:
                _zero(self._open(self._row_aad_key(r), r["sealed"], "key"))
                keys["waiting"] += 1
                keys["bits"] += r["size_bits"]
            except SealBroken:
                failures.append(f"keys: key_ID {r['key_id']}")
        for r in self._rows("stock") if self._has_stock() else ():
            try:
                _zero(self._open(self._row_aad_stock(r), r["sealed"], "stock chunk"))
                entry = stock.setdefault(f"{r['link']}/{r['state']}", {"keys": 0, "bits": 0})
                left = _stock_left(r["key_ids"], r["issued"])
                entry["keys"] += left
                entry["bits"] += left * r["size_bits"]
            except SealBroken:
                failures.append(f"stock: chunk {r['chunk_id']}")
        audit = dict(self._conn.execute("SELECT event, COUNT(*) FROM audit GROUP BY event").fetchall())
        outbox = dict(self._conn.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
        return {"blocks": blocks, "keys": keys, "stock": stock, "outbox": outbox, "audit": audit,
                "data_keys": sorted(self._keys), "failures": failures}

    def _has_stock(self) -> bool:
        """A vault last opened by an older qkdnode has no stock table until the daemon opens it."""
        return _has_table(self._conn, "stock")

    def _rows(self, table: str):
        cur = self._conn.execute(f"SELECT * FROM {table}")
        cols = [d[0] for d in cur.description]
        for values in cur:
            yield dict(zip(cols, values))

    def expire_keys(self, older_than: float) -> int:
        """Delete keys stored for slave SAEs before a time stamp that not every slave fetched
        (a stream closed early, a relay attempt whose answer was lost, an SAE that went away).
        Their bits go (secure_delete); the audit says `key_expired`. Returns how many."""
        rows = self._conn.execute("SELECT key_id, link, size_bits, pending FROM keys WHERE created < ?",
                                  (older_than,)).fetchall()
        for key_id, link, size_bits, pending in rows:
            self._conn.execute("DELETE FROM keys WHERE key_id=?", (key_id,))
            self._audit("key_expired", key_id, None, link, size_bits, f"never fetched by {pending}")
        return len(rows)

    def prune_audit(self, older_than: float) -> int:
        """Drop audit records older than a time stamp (retention), keeping those of keys still
        waiting or still in the outbox: they prove a repeated message was seen."""
        cur = self._conn.execute(
            "DELETE FROM audit WHERE ts < ? AND (key_id IS NULL OR (key_id NOT IN (SELECT key_id FROM keys) "
            "AND key_id NOT IN (SELECT key_id FROM outbox)))", (older_than,))
        return cur.rowcount

    def export_to(self, dest: Path, target_master_key: bytes) -> None:
        """Copy the whole vault to `dest`, its data keys wrapped for another node's master key,
        and retire this vault: it will not open again, so no key can be served at two sites."""
        if dest.exists():
            raise VaultError(f"{dest} exists already; refusing to overwrite it")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        target = AESGCM(target_master_key)
        out = sqlite3.connect(dest, isolation_level=None)
        try:
            self._conn.backup(out)
            out.execute("PRAGMA journal_mode=DELETE")
            out.execute("BEGIN IMMEDIATE")
            for gen in self._keys:
                out.execute("UPDATE meta SET value=? WHERE name=?",
                            (self._wrap(target, gen, self._unwrap_gen(gen)), f"data_key/{gen}"))
            out.execute("COMMIT")
        finally:
            out.close()
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('exported', ?)",
                           (f"to {dest.name} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}".encode(),))

    # ------------------------------------------------------------ reading

    def pool_bits(self, link: str) -> dict[str, int]:
        """Bits of a link's key at this node, by block state (for the metrics)."""
        return {state: self._bytes(link, state) * 8 for state in ("pending", "ready")}

    def committed_pool_bits(self, link: str) -> dict[str, int]:
        """As `pool_bits`, as of the last commit; cheap, and safe to call from the event loop."""
        return {state: self._totals.get((link, state), 0) * 8 for state in ("pending", "ready")}

    def committed_stock_bits(self, link: str) -> int:
        """Bits of the link's stock (pushing and ready), as of the last commit."""
        return self._totals.get((link, STOCK), 0) * 8

    def counts(self) -> dict[str, Any]:
        c = self._conn
        return {
            "blocks": {f"{link}/{state}": n for link, state, n in
                       c.execute("SELECT link, state, COUNT(*) FROM blocks WHERE state != 'used' GROUP BY link, state")},
            "ready_bits": {link: free * 8 for link, free in
                           c.execute("SELECT link, SUM(free) FROM blocks WHERE state='ready' GROUP BY link")},
            "keys_waiting": c.execute("SELECT COUNT(*) FROM keys").fetchone()[0],
            "stock_bits": _stock_bits(c) if self._has_stock() else {},
            "outbox": c.execute("SELECT COUNT(*) FROM outbox").fetchone()[0],
        }

