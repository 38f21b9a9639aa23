"""Hardware in the loop: device emulators on real sockets, and the testbed that starts a network."""
