"""A negmine-server process on loopback, for tests, examples and notebooks.

```python
with negmine.LocalServer("build/server/negmine-server",
                         ["--default_dim=64", "--generate_targets=100000"]) as server:
    client = negmine.Client(server.address)
    client.wait_ready()
    ...
```

The server gets a temporary data dir (removed on stop), no metrics port, and
writes its bound port to a file that `wait_port` reads. Production servers
are started by their deployment (deploy/), not by this class.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from typing import IO, Optional, Sequence


class LocalServer:
    """One negmine-server process on 127.0.0.1 with a temporary data dir.

    Not thread-safe: one owner starts and stops it.
    """

    def __init__(self, binary: str, flags: Sequence[str] = (), port: int = 0,
                 log_path: Optional[str] = None) -> None:
        """Prepares (does not start) a server.

        binary: the negmine-server executable.
        flags: more server flags, e.g. ["--default_dim=64"].
        port: the port to listen on; 0 picks a free one.
        log_path: where the server's stdout and stderr go (default: inherited).
        """
        if not os.access(binary, os.X_OK):
            raise FileNotFoundError(f"negmine-server binary {binary!r} is not an executable file")
        self.binary = binary
        self.flags = list(flags)
        self.requested_port = port
        self.log_path = log_path
        self.dir = tempfile.mkdtemp(prefix="negmine-local-")
        self.port_file = os.path.join(self.dir, "port")
        self.proc: Optional[subprocess.Popen] = None
        self._log: Optional[IO[str]] = None
        self._port: Optional[int] = None

    def start(self) -> "LocalServer":
        """Starts the process; returns at once (see wait_port)."""
        if self.log_path is not None:
            self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [self.binary, f"--listen=127.0.0.1:{self.requested_port}",
             f"--port_file={self.port_file}", f"--data_dir={os.path.join(self.dir, 'data')}",
             "--metrics_listen=", "--log_level=warning"] + self.flags,
            stdout=self._log, stderr=subprocess.STDOUT if self._log else None)
        return self

    def wait_port(self, timeout: float = 60.0) -> int:
        """Blocks until the server wrote its bound port (it is then SERVING);
        RuntimeError if it exits or takes longer than `timeout` seconds."""
        if self.proc is None:
            raise RuntimeError("LocalServer.wait_port before start")
        deadline = time.monotonic() + timeout
        while not (os.path.exists(self.port_file) and os.path.getsize(self.port_file) > 0):
            if self.proc.poll() is not None:
                where = f"; see {self.log_path}" if self.log_path else ""
                raise RuntimeError(f"negmine-server exited with {self.proc.returncode}{where}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"negmine-server did not write its port in {timeout:g} s")
            time.sleep(0.02)
        with open(self.port_file) as f:
            self._port = int(f.read().strip())
        return self._port

    @property
    def address(self) -> str:
        """"127.0.0.1:PORT", once wait_port has returned."""
        if self._port is None:
            raise RuntimeError("LocalServer.address before wait_port")
        return f"127.0.0.1:{self._port}"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (SIGKILL after `timeout` seconds), then removes the data dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalServer":
        self.start()
        try:
            self.wait_port()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
