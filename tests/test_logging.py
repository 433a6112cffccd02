"""Tests for hierarchy/logging.py: the tracker never reaches for the network."""

import subprocess
import sys
import textwrap


def test_offline_tracker_resolves_no_host(tmp_path) -> None:
    """An offline wandb run, start to exit, makes no DNS lookup or inet connect."""
    script = textwrap.dedent(
        f"""
        import atexit, socket, sys
        calls = []
        resolve, connect = socket.getaddrinfo, socket.socket.connect
        def logged_resolve(host, *args, **kwargs):
            calls.append(("resolve", host))
            return resolve(host, *args, **kwargs)
        def logged_connect(sock, address):
            if sock.family != socket.AF_UNIX:
                calls.append(("connect", address))
            return connect(sock, address)
        socket.getaddrinfo, socket.socket.connect = logged_resolve, logged_connect
        atexit.register(lambda: print("NETWORK", calls, file=sys.stderr))

        from pathlib import Path
        from hierarchy.logging import Tracker
        tracker = Tracker("offline", "test", Path({str(tmp_path)!r}), {{"a": 1}})
        tracker.log({{"loss": 1.0}}, step=1)
        tracker.finish()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "NETWORK []" in done.stderr, done.stderr
    assert (tmp_path / "wandb").is_dir()
