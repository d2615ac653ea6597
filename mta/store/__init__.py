"""Where mail is kept: the queue, its administration, and the lab mailboxes.

``api.py`` is what the rest of the program sees: typed ``Protocol``s (the
queue for the inbound handler and the queue manager, queue administration for
the CLI and the metrics, mailboxes for POP3 and the CLI) and the plain records
they exchange. ``sqlite/`` is today's one backend behind them: a commit engine
(connections, group commit, disk reserve, migrations, damage) with the queue,
admin and mailbox SQL each on top of the engine's public API. ``factory.py``
builds a backend from the configuration; it is the only place outside this
package that needs to know which backend it is (a PostgreSQL one plugs in there).
"""
