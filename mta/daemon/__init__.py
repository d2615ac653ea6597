"""The daemon's processes and how they are wired.

- main_process.py: `mta serve` -- listeners, POP3, metrics, signals, and the
  composition root (config -> store -> listeners, delivery side, metrics);
- delivery_process.py: the delivery side in a child process (`mta deliver`) and
  the main process's handle on it (start, restart with backoff, wake, reload, stop);
- delivery_side.py: the delivery side itself -- the queue manager (mta/queue/manager.py)
  with its couriers (SMTP router and connection cache, local mailboxes);
- runtime.py: the event loop (uvloop when installed) and the shutdown grace;
- sd_notify.py: the systemd notify protocol.
"""
