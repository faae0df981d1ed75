"""Run Debian's nginx with deploy/nginx/fasb.conf in front of server processes on loopback ports.

The configuration is the one docker-compose.yml mounts, with two lines swapped: the upstream
`server fasb-replica:8000 ...` for one line per replica port, and `listen 8000` for a loopback port.
Everything else (buffering, timeouts, retries) is the file as committed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "fasb.conf"
UPSTREAM_LINE = "server fasb-replica:8000 "
LISTEN_LINE = "listen 8000;"


def find_nginx() -> str | None:
    """Debian's nginx (apt-get install nginx); FASB_NGINX overrides."""
    candidates = [os.environ.get("FASB_NGINX"), "/usr/sbin/nginx", shutil.which("nginx")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def loopback_conf(replica_ports: list[int], listen_port: int) -> str:
    """deploy/nginx/fasb.conf with its upstream servers and listen port on loopback."""
    conf = NGINX_CONF.read_text()
    lines = conf.splitlines(keepends=True)
    upstream = [i for i, line in enumerate(lines) if line.strip().startswith(UPSTREAM_LINE)]
    listen = [i for i, line in enumerate(lines) if line.strip() == LISTEN_LINE]
    assert len(upstream) == 1 and len(listen) == 1, f"{NGINX_CONF} no longer has one upstream and one listen line"
    indent, params = lines[upstream[0]].split("server", 1)[0], lines[upstream[0]].strip().removeprefix(UPSTREAM_LINE)
    lines[upstream[0]] = "".join(f"{indent}server 127.0.0.1:{port} {params}\n" for port in replica_ports)
    lines[listen[0]] = lines[listen[0]].replace(LISTEN_LINE, f"listen 127.0.0.1:{listen_port};")
    return "".join(lines)


def main_conf(prefix: Path, http_include: Path) -> str:
    """A main nginx.conf for an unprivileged, foreground nginx whose files all live in `prefix`."""
    temp = {name: prefix / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for folder in temp.values():
        folder.mkdir(exist_ok=True)
    # As root, nginx's workers would run as `nobody`, who cannot enter pytest's private temp folders.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        user
        + f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        "worker_processes 1;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        # Which replicas each request tried: "127.0.0.1:A, 127.0.0.1:B" is a retry on B.
        "    log_format upstreams '$status $request_method $uri [$upstream_addr] [$upstream_status]';\n"
        f"    access_log {prefix / 'access.log'} upstreams;\n"
        + "".join(f"    {name}_temp_path {path};\n" for name, path in temp.items())
        + f"    include {http_include};\n"
        "}\n"
    )


def access_log(prefix: Path) -> list[str]:
    """The proxy's access log: `status method uri [upstream addresses] [upstream statuses]` per request."""
    path = prefix / "access.log"
    return path.read_text().splitlines() if path.exists() else []


def write_config(prefix: Path, replica_ports: list[int], listen_port: int) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "fasb.conf").write_text(loopback_conf(replica_ports, listen_port))
    main = prefix / "nginx.conf"
    main.write_text(main_conf(prefix, prefix / "fasb.conf"))
    return main


def check_config(nginx: str, main: Path) -> subprocess.CompletedProcess:
    """`nginx -t`: parse and check the configuration without serving."""
    return subprocess.run([nginx, "-t", "-p", str(main.parent), "-c", str(main)], capture_output=True, text=True)


@contextlib.contextmanager
def running_nginx(nginx: str, prefix: Path, replica_ports: list[int], listen_port: int,
                  timeout_s: float = 15.0) -> Iterator[str]:
    """nginx in the foreground, proxying to `replica_ports`; yields its base URL."""
    main = write_config(prefix, replica_ports, listen_port)
    checked = check_config(nginx, main)
    if checked.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{checked.stderr}")
    process = subprocess.Popen([nginx, "-p", str(prefix), "-c", str(main), "-g", "daemon off;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(listen_port, process, prefix, timeout_s)
        yield f"http://127.0.0.1:{listen_port}"
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_port(port: int, process: subprocess.Popen, prefix: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}:\n{(prefix / 'error.log').read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nginx did not listen on {port} within {timeout_s:.0f}s")
