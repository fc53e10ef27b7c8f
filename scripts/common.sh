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

# A random secret with a readable prefix, for a throwaway cluster's passwords.
random_secret() {
  echo "$1-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
}

# A self-signed certificate for localhost in DIR (server.crt, server.key), readable by
# Postgres when running as root.
make_certificate() {
  local dir=$1
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost \
    -keyout "$dir/server.key" -out "$dir/server.crt" 2>/dev/null
  chmod 600 "$dir/server.key"
  if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir/server.key" "$dir/server.crt"; fi
}

# Starts a throwaway Postgres (binaries in PGBIN) in DIR/pg on loopback PORT, superuser
# `postgres` with PASSWORD over SCRAM, log in DIR/postgres.log; further arguments are
# postgresql.conf lines. Stop it with `as_db_user "$PGBIN/pg_ctl" -D DIR/pg stop`.
start_postgres() {
  local pgbin=$1 dir=$2 port=$3 password=$4
  shift 4
  echo "$password" >"$dir/pwfile"
  if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir" "$dir/pwfile"; fi
  as_db_user "$pgbin/initdb" -D "$dir/pg" -U postgres --auth=scram-sha-256 --pwfile="$dir/pwfile" >/dev/null
  {
    echo "port = $port"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$dir'"
    # Throwaway data: commits need not wait for the disk.
    echo "synchronous_commit = off"
    printf '%s\n' "$@"
  } >>"$dir/pg/postgresql.conf"
  as_db_user "$pgbin/pg_ctl" -D "$dir/pg" -l "$dir/postgres.log" -w start >/dev/null
}

# Waits up to 10 s for a server (Postgres or a proxy) to accept connections on loopback PORT.
wait_for_port() {
  local pgbin=$1 port=$2
  for _ in $(seq 50); do
    "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$port" && return
    sleep 0.2
  done
}
