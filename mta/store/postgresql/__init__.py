"""The PostgreSQL backend (issue 16): several nodes share one database.

Only the queue so far (queue.py); the factory does not select it yet."""
