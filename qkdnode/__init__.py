"""qkdnode: the daemon of a trusted node in a QKD network."""

__version__ = "0.1.0"
