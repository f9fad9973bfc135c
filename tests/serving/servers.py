"""Start and stop server processes for the serving tests: free loopback ports, readiness by
polling a URL, SIGTERM with a deadline (then kill)."""

import signal
import socket
import subprocess
import time

import httpx


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n" + proc.stdout.read()[-4000:])
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{what} did not become ready in {timeout:.0f} s")


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM, then the exit status; killed (and the test sees a non-zero status) past `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
