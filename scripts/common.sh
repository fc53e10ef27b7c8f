# Shell helpers shared by scripts/setup, scripts/test, scripts/bench and scripts/build-pgo (sourced, not run).

# The directory with the Postgres server binaries (initdb, pg_ctl, pgbench, psql), or
# nothing if there is none: Debian's Postgres 15 first, then whatever pg_config names.
pg_bindir() {
  local dir
  for dir in /usr/lib/postgresql/15/bin "$(pg_config --bindir 2>/dev/null || true)"; do
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] &&
      [ -x "$dir/pgbench" ] && [ -x "$dir/psql" ]; then
      echo "$dir"
      return
    fi
  done
}

# Postgres and PgBouncer refuse to run as root: run them as the postgres user then.
as_db_user() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# A loopback port free right now (the kernel picks it).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
