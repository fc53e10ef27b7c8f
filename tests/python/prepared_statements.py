"""Drives pgwarden with psycopg the way applications do: every query prepared
(prepare_threshold=0), a small statement cache that makes psycopg DEALLOCATE, and
JDBC-style statement names prepared through the low-level API. Exits non-zero on any
error; prints a summary line."""

import sys
import threading

import psycopg

dsn, threads, iterations = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
errors = []
done = [0]
lock = threading.Lock()


def worker(n):
    try:
        with psycopg.connect(dsn, prepare_threshold=0, autocommit=True) as conn:
            conn.prepared_max = 5  # evictions make psycopg send DEALLOCATE
            for i in range(iterations):
                with conn.cursor() as cur:
                    # More distinct statements than the cache holds.
                    cur.execute(f"select %s::int + {i % 8}", (n,))
                    assert cur.fetchone()[0] == n + i % 8
                    with conn.transaction():
                        cur.execute("select %s::text || 'x'", (str(i),))
                        assert cur.fetchone()[0] == f"{i}x"
                # JDBC names its server-side statements S_1, S_2, ...
                name = f"S_{i % 3 + 1}".encode()
                pg = conn.pgconn
                res = pg.prepare(name, b"select $1::int * 2")
                if res.status != psycopg.pq.ExecStatus.COMMAND_OK:
                    raise RuntimeError(res.error_message.decode())
                res = pg.exec_prepared(name, [str(i).encode()])
                if res.get_value(0, 0) != str(i * 2).encode():
                    raise RuntimeError(f"bad result {res.get_value(0, 0)!r}")
                pg.exec_(b"DEALLOCATE " + name)
                with lock:
                    done[0] += 1
    except Exception as e:  # noqa: BLE001 - every failure is reported
        with lock:
            errors.append(f"client {n}: {e!r}")


workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(f"psycopg: {done[0]} iterations, {len(errors)} errors")
for e in errors[:10]:
    print(e)
sys.exit(1 if errors else 0)
