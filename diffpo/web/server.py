"""Run an ASGI app on a local port: print the URL, stop cleanly on Ctrl-C.

The socket is bound before the URL is printed, so the printed URL is one that answers (and
``--port 0`` prints the free port the system chose, which the tests use).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys

logger = logging.getLogger(__name__)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # connections made before uvicorn's loop runs wait in the backlog
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror} (try another --port)") from None
    return sock


def serve(app, host: str, port: int, name: str) -> int:
    """Serve ``app`` until Ctrl-C (or SIGTERM); return the exit status (0)."""
    import uvicorn

    sock = bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if not _is_loopback(host):
        logger.warning("listening on %s: anyone who can reach this machine can open the page and its images", host)
    print(f"diffpo {name}: open http://{shown}:{actual}/  (Ctrl-C stops)", flush=True)
    if host in ("127.0.0.1", "localhost"):
        # Answer only requests addressed to this machine by name: a DNS-rebinding page (evil.example
        # resolving to 127.0.0.1) sends its own host name and is refused.
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app = TrustedHostMiddleware(app, allowed_hosts=["127.0.0.1", "localhost"])
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on SIGINT, then re-raises the signal it captured.
        pass
    finally:
        sock.close()
    print(f"diffpo {name}: stopped", file=sys.stderr, flush=True)
    return 0
