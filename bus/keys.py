"""CURVE keys for a bus that leaves loopback: ``python -m bus.keys DIR`` makes them.

The broker encrypts and authenticates every connection with ZeroMQ CURVE once ``--bus-keys DIR``
is given. DIR holds the broker's key pair and one client key pair; the broker admits the public
keys found in ``DIR/authorized``. Copy DIR (it holds the client secret) to each host that runs
actors, and pass the same ``--bus-keys`` there. A bus bound or reached beyond loopback without
keys is refused, so nobody exposes an open bus by accident.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from core.net import is_loopback_host

BROKER = "broker"
CLIENT = "client"
AUTHORIZED = "authorized"


class BusSecurityError(RuntimeError):
    """The bus configuration would be unsafe or the keys are unusable."""


def is_loopback(endpoint: str) -> bool:
    """True for tcp endpoints on 127.0.0.0/8, ::1 or localhost, and for ipc/inproc."""
    if not endpoint.startswith("tcp://"):
        return True
    return is_loopback_host(urlparse(endpoint).hostname or "")


def check(endpoints: list[str], keys_dir: str) -> Path | None:
    """Return the key folder to use, or ``None`` on an all-loopback bus; refuse an open exposed bus."""
    if keys_dir:
        path = Path(keys_dir)
        for name in (f"{BROKER}.key", f"{CLIENT}.key_secret"):
            if not (path / name).exists():
                raise BusSecurityError(
                    f"--bus-keys {keys_dir}: {name} is missing; make keys with "
                    f"'python -m bus.keys {keys_dir}'")
        return path
    exposed = [e for e in endpoints if not is_loopback(e)]
    if exposed:
        raise BusSecurityError(
            f"bus endpoint {exposed[0]} is not on loopback: an exposed bus must be authenticated. "
            f"Make keys with 'python -m bus.keys DIR' and pass --bus-keys DIR (PARLEY_BUS_KEYS)")
    return None


def secure_client(sock: zmq.Socket, keys: Path | None) -> None:
    """Make ``sock`` a CURVE client of the broker when keys are in use."""
    if keys is None:
        return
    public, secret = zmq.auth.load_certificate(keys / f"{CLIENT}.key_secret")
    server_public, _ = zmq.auth.load_certificate(keys / f"{BROKER}.key")
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public


def secure_server(ctx: zmq.Context, socks: list[zmq.Socket], keys: Path | None) -> ThreadAuthenticator | None:
    """Make the broker's sockets CURVE servers admitting the keys in ``keys/authorized``."""
    if keys is None:
        return None
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys / AUTHORIZED))
    public, secret = zmq.auth.load_certificate(keys / f"{BROKER}.key_secret")
    for sock in socks:
        sock.curve_server = True
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    return auth


def generate(keys_dir: str) -> Path:
    """Create a broker and a client key pair in ``keys_dir`` and authorise the client."""
    path = Path(keys_dir)
    (path / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    zmq.auth.create_certificates(str(path), BROKER)
    client_public, _ = zmq.auth.create_certificates(str(path), CLIENT)
    shutil.copy(client_public, path / AUTHORIZED / f"{CLIENT}.key")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bus.keys", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="folder to create the keys in")
    args = parser.parse_args(argv)
    path = generate(args.dir)
    print(f"keys written to {path}; run every process with --bus-keys {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
