"""The SQLite backend: one queue file in WAL mode (see engine.py).

engine.py commits (group commit, inline commits, disk reserve, checkpoints,
damage); schema.py migrates; queue.py, admin.py and mailboxes.py are the SQL
of the three parts of mta.store.api, each on the engine's public API only;
store.py puts them together. damage.py, repair.py and lock.py are this
backend's own tools: corruption errors and the start-up check, `mta queue
repair`, and the flock that keeps one daemon per queue file.
"""
