"""Error types of the daemon. Messages name what was wrong; they never carry key bits."""


class QkdnodeError(Exception):
    """Base of every error the daemon raises on purpose."""


class ConfigError(QkdnodeError):
    """A config file is wrong: names the file, the key, what was expected and what was found."""

    def __init__(self, file, key: str, expected: str, found: object = None, *, missing: bool = False,
                 shown: str | None = None):
        self.file, self.key, self.expected, self.found = str(file), key, expected, found
        # `shown` replaces the value where it must not be echoed (it could be a misplaced secret).
        what = shown if shown is not None else "nothing" if missing else repr(found)
        super().__init__(f"{self.file}: {key}: expected {expected}, found {what}")


class VaultError(QkdnodeError):
    """The vault cannot be opened or used (wrong master key, bad permissions, corrupt file)."""


class SealBroken(VaultError):
    """A sealed row failed authentication: it was altered, swapped or moved. Never served."""


class PoolExhausted(QkdnodeError):
    """Not enough ready key on a link for the request; nothing was taken."""


class CarveConflict(QkdnodeError):
    """The peer named key bits this node has already used or does not hold: the two ends disagree."""


class PeerUnavailable(QkdnodeError):
    """The peer node did not answer or refused the request."""


class PeerRejected(QkdnodeError):
    """The peer node answered, and said no (its message is carried, and its JSON answer)."""

    def __init__(self, message: str, answer: dict | None = None):
        super().__init__(message)
        self.answer = answer or {}


class DriverError(QkdnodeError):
    """A device driver failed; subclasses say how."""


class DeviceUnavailable(DriverError):
    """The device did not answer in time, refused the connection, or said it is out of service (503)."""


class DeviceRejected(DriverError):
    """The device refused the request as malformed or out of its limits (400)."""


class BlocksUnavailable(DeviceRejected):
    """The device does not hold these blocks (`block_ids`) of those asked for by ID; the others
    may be asked for again without them."""

    def __init__(self, message: str, block_ids: list[str]):
        super().__init__(message)
        self.block_ids = list(block_ids)


class DeviceUnauthorized(DriverError):
    """The device does not accept our identity (401, or a vendor's 400 for a certificate problem)."""


class DeviceUntrusted(DriverError):
    """The device's TLS certificate failed our verification (wrong CA or host name). Not retried:
    waiting does not fix it, the config or the device's certificate must change."""


class DeviceProtocolError(DriverError):
    """The device answered something that does not follow its protocol."""


class UnknownKey(QkdnodeError):
    """No key with this ID waits for the caller (never issued here, or already fetched)."""

    def __init__(self, key_id: str, was_known: bool):
        self.key_id, self.was_known = key_id, was_known
        state = "was already fetched" if was_known else "is not known at this node"
        super().__init__(f"key_ID {key_id} {state}")


class NotYourKey(QkdnodeError):
    """The key exists but was not issued to this slave SAE by this master SAE."""

    def __init__(self, key_id: str):
        self.key_id = key_id
        super().__init__(f"key_ID {key_id} was not issued to this SAE by that master SAE")


class NotAuthorized(QkdnodeError):
    """A key API call whose TLS client certificate names no SAE of this node (401)."""


class NoRoute(QkdnodeError):
    """No path of links with enough key joins this node to the node of the slave SAEs."""


class RelayRejected(QkdnodeError):
    """A relay message that fails its Wegman-Carter tag, names a consumed pad, or is malformed."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason  # a metric label: malformed, pad, tag, replay


class RelayFailed(QkdnodeError):
    """A relay hop could not pass keys on; `link` is the (from, to) pair of nodes that failed."""

    def __init__(self, message: str, link: tuple[str, str], exhausted: bool = False):
        super().__init__(message)
        self.link, self.exhausted = link, exhausted


class SdnRefused(QkdnodeError):
    """The SDN agent refuses a request (docs/sdn.md) and has changed nothing. `tag` is the RESTCONF
    error-tag (invalid-value, data-exists, data-missing, resource-denied, access-denied,
    operation-failed) and `status` the HTTP status that goes with it."""

    def __init__(self, message: str, tag: str = "operation-failed", status: int = 409):
        super().__init__(message)
        self.tag, self.status = tag, status
