"""A private Postfix instance configured as a relay, for benchmarking.

Everything lives under one temporary directory: main.cf, master.cf, the
queue, the data directory and the log (maillog_file). It is started with
``postfix -c DIR start`` and never reads or writes /etc/postfix, apart from
reading the package's meta files (postfix-files, dynamicmaps.cf) there
through meta_directory. It does not listen on port 25: its one smtpd listens
on the loopback address and port given.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import procfs

POSTFIX = "/usr/sbin/postfix"

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       {smtpd_limit}       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       {smtp_limit}      smtp
relay     unix  -       -       n       -       {smtp_limit}      smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
# Mail for the backlog domain is routed here; defer_transports keeps it deferred.
backlog   unix  -       -       n       -       -       smtp
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C
maillog_file = {root}/maillog
maillog_file_prefixes = {root}

myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = {listen_host}
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtputf8_enable = no
biff = no

relayhost = {relayhost}
transport_maps = texthash:{root}/transport
defer_transports = backlog
smtp_tls_security_level = none
smtp_connection_cache_on_demand = yes
default_process_limit = 100
default_destination_concurrency_limit = {dest_limit}
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
minimal_backoff_time = 3600s
maximal_backoff_time = 3600s
"""


class PostfixRelay:
    """One Postfix relay instance. ``transport`` maps domain -> "host:port"."""

    def __init__(self, root: Path, listen: tuple[str, int], relayhost: tuple[str, int], *,
                 transport: dict[str, tuple[str, int]] | None = None,
                 backlog_domain: str | None = None, concurrency: int = 20, dest_limit: int = 20):
        self.root = root
        self.listen = listen
        self.config_dir = root / "etc"
        self.started = False
        self.config_dir.mkdir(parents=True)
        (root / "queue").mkdir()
        (root / "data").mkdir()
        shutil.chown(root / "data", "postfix", "postfix")
        # Postfix daemons run as user postfix and must reach the queue directory.
        for p in (root, *root.parents):
            if str(p) in ("/", "/tmp", "/var/tmp"):
                break
            os.chmod(p, 0o755)
        host, port = listen
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(
            listen=f"{host}:{port}", smtpd_limit=100, smtp_limit=concurrency))
        (self.config_dir / "main.cf").write_text(MAIN_CF.format(
            root=root, listen_host=host, relayhost=f"[{relayhost[0]}]:{relayhost[1]}",
            dest_limit=dest_limit))
        lines = [f"{domain} smtp:[{h}]:{p}" for domain, (h, p) in (transport or {}).items()]
        if backlog_domain:
            lines.append(f"{backlog_domain} backlog:[127.0.0.254]:9")
        (root / "transport").write_text("\n".join(lines) + "\n")

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), *args], capture_output=True,
                              text=True, check=check, timeout=60)

    def start(self) -> None:
        self.started = True
        try:
            self._postfix("start")
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"postfix start failed: {exc.stderr.strip()}\n{self.log_tail()}") from None

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pids(self) -> list[int]:
        pid = self.master_pid()
        return procfs.tree(pid) if pid else []

    def queue_count(self, *queues: str) -> int:
        """Files in the named queue directories (e.g. "deferred", "active", "incoming")."""
        n = 0
        for q in queues or ("incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.root / "queue" / q):
                n += len(files)
        return n

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.root / "maillog").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no maillog)"

    def stop(self) -> None:
        """Stop the instance; whatever is left of its process tree is killed."""
        if not self.started:
            return
        self.started = False
        pids = self.pids()
        try:
            self._postfix("abort", check=False)  # no grace: the bench is over
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.05)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
