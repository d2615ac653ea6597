"""Postfix's smtp-sink as the receiving end, counting what arrives.

smtp-sink -c prints running counters ("sess=.. quit=.. mesg=N\\r") to stdout
whenever a message ("." of DATA) is received; we send stdout to a file and
read the last counter from its tail. mesg counts SMTP transactions, not
recipients.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

SMTP_SINK = "/usr/sbin/smtp-sink"
_COUNTER = re.compile(rb"mesg=(\d+)")


def free_port(host: str = "0.0.0.0") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Sink:
    """smtp-sink on every local address (so 127.0.0.3, 127.0.0.10, ... all reach it)."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.out_path = workdir / f"sink-{self.port}.out"
        self._out = open(self.out_path, "wb")
        self.proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-c", "-m", "512", f":{self.port}", "1024"],
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._read_fd = os.open(self.out_path, os.O_RDONLY)
        self._base = 0
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtp-sink exited: {self.out_path.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.recv(100)
                    s.sendall(b"QUIT\r\n")
                    s.recv(100)
                self.mark()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("smtp-sink did not start listening")

    def total(self) -> int:
        """Transactions received since the sink started."""
        fd = self._read_fd
        size = os.fstat(fd).st_size
        tail = os.pread(fd, 200, max(0, size - 200))
        found = _COUNTER.findall(tail)
        return int(found[-1]) if found else 0

    def mark(self) -> None:
        """Count from here: count() returns what arrived after the latest mark()."""
        self._base = self.total()

    def count(self) -> int:
        return self.total() - self._base

    def stop(self) -> None:
        if self._out.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        os.close(self._read_fd)
