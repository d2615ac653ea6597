# mta, the store-and-forward relay, as a container.
#
#   docker build -t mta .
#   docker run -d --name mta -p 25:2525 -p 9101:9101 -v mta-queue:/var/lib/mta \
#       --stop-timeout 30 [-v $PWD/mta.yaml:/etc/mta/mta.yaml:ro] mta
#
# The daemon runs as the unprivileged user mta (uid 10025), so it listens on 2525
# (and 2587 for submission) and the host maps the standard ports (-p 25:2525
# -p 587:2587). The queue (SQLite) lives on the /var/lib/mta volume; a bind mount
# there must be writable by uid 10025 (chown 10025:10025 DIR). The built-in
# config is config/docker.yaml; mount your own over /etc/mta/mta.yaml. The image
# has the PostgreSQL driver (the postgresql extra, asyncpg: a wheel, no libpq), so
# a container can be one of several nodes on a shared database (README "Several
# nodes"; give each its own hostname, the password in PGPASSWORD).
# SIGTERM drains running SMTP sessions and deliveries for up to 20 s: give
# `docker stop` more than its default 10 s (--stop-timeout 30, or
# stop_grace_period: 30s in compose).

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mta ./mta
COPY man ./man
RUN pip install --no-cache-dir --root-user-action=ignore '.[postgresql]' \
    && rm -rf /src

RUN groupadd --system --gid 10025 mta \
    && useradd --system --uid 10025 --gid mta --no-create-home --home-dir /var/lib/mta \
        --shell /usr/sbin/nologin mta \
    && install -d -o mta -g mta -m 0700 /var/lib/mta \
    && install -d -m 0755 /etc/mta

COPY config/docker.yaml /etc/mta/mta.yaml

# `mta serve` (and `docker exec mta mta queue list`) read this config; with no
# queue.path in it the queue is $STATE_DIRECTORY/queue.db.
ENV MTA_CONFIG=/etc/mta/mta.yaml \
    STATE_DIRECTORY=/var/lib/mta \
    MTA_HEALTHCHECK_URL=http://127.0.0.1:9101/healthz
VOLUME /var/lib/mta
WORKDIR /var/lib/mta
USER mta

# 2525: SMTP relay (map to 25), 2587: submission if configured (map to 587), 9101: /metrics,
# 8025: the lab inbox's web UI and Mailpit API if configured (config/docker.yaml)
EXPOSE 2525 2587 8025 9101

# The metrics listener answers /healthz (no curl in slim: Python's urllib, proxies
# ignored). Change MTA_HEALTHCHECK_URL if your config moves metrics.address.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u; r = u.build_opener(u.ProxyHandler({})).open(os.environ['MTA_HEALTHCHECK_URL'], timeout=4); sys.exit(0 if r.status == 200 else 1)"]

STOPSIGNAL SIGTERM
CMD ["mta", "serve"]
