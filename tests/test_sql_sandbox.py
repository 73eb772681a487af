"Hostile SQL against `execute_sql`'s worker: each attack is a quick, clear error; caller and database stay unchanged."
import hashlib, os, signal, sqlite3, threading, time
import pytest
from multilora.builtin_data import create_sql_database
from multilora.evaluate import SQLExecutionError, execute_sql, _worker, _KILL_AFTER

@pytest.fixture(scope="module")
def db(tmp_path_factory): return create_sql_database(tmp_path_factory.mktemp("sandbox")/"company.sqlite")

def sha(p): return hashlib.sha256(open(p, "rb").read()).hexdigest()

def rss_mb() -> float:
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

def peak_rss_during(fn) -> float:
    "The highest resident size of this process, sampled every 5 ms while `fn()` runs."
    peak, done = [rss_mb()], threading.Event()
    def sample():
        while not done.wait(0.005): peak.append(rss_mb())
    t = threading.Thread(target=sample)
    t.start()
    try: fn()
    finally:
        done.set()
        t.join()
    return max(peak)

def a_s(n): return f"replace(hex(zeroblob({n // 2})), '0', 'a')"            # a string of n a's, built in SQL
def rows(n, value):
    "`value` on each of `n` rows."
    return f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT {n}) SELECT {value} FROM c"

# (attack, sql, extra arguments, timeout, the words of the error). The first two raise max_value_bytes so that only the
# process limits stand in their way; the last two stay under SQLite's own limits, which therefore cannot stop them. The
# memory attacks get a long timeout, so that the memory limit, not the clock, is what must stop them, and quickly.
ATTACKS = [
    ("one huge function call (~600 MB)", "SELECT length(replace(hex(zeroblob(150000000)), '0', 'ab'))",
     {"max_value_bytes": 2_000_000_000}, 30.0, "out of memory"),
    ("40 rows of 100 MB blobs", rows(40, "zeroblob(100000000)"), {"max_value_bytes": 200_000_000}, 30.0,
     "out of memory"),
    ("3000 rows of 1 MB blobs", rows(3000, "zeroblob(999000)"), {}, 30.0, "out of memory"),
    ("one quadratic call (~2.5e11 byte comparisons)", f"SELECT instr({a_s(998_000)}, {a_s(498_000)} || 'b')", {}, 2.0,
     "timed out"),
]

@pytest.mark.parametrize("attack,sql,kw,timeout,words", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_is_contained(db, attack, sql, kw, timeout, words):
    before = sha(db)
    execute_sql(db, "SELECT 1")                                               # the worker is up: time the query alone
    base = rss_mb()
    t0 = time.monotonic()
    def run():
        with pytest.raises(SQLExecutionError, match=words): execute_sql(db, sql, timeout=timeout, **kw)
    peak = peak_rss_during(run)
    assert time.monotonic() - t0 < min(timeout + _KILL_AFTER + 1.0, 10), attack
    assert peak - base < 200, f"{attack}: this process grew by {peak - base:.0f} MB"
    assert sha(db) == before
    assert execute_sql(db, "SELECT count(*) FROM employees") == [(120,)]       # and the next query just works

def test_normal_results_are_exact(db):
    assert execute_sql(db, "SELECT 1, -2, 2.5, 1e300, 'x', '', NULL, x'00ff', x''") == \
        [(1, -2, 2.5, 1e300, "x", "", None, b"\x00\xff", b"")]
    sql = "SELECT id, name, salary, salary / 7.0, CAST(name AS BLOB), NULLIF(city, city) FROM employees ORDER BY id"
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    direct = con.execute(sql).fetchall()
    con.close()
    got = execute_sql(db, sql)
    assert got == direct and len(got) == 120
    assert [type(v) for v in got[0]] == [int, str, int, float, bytes, type(None)]

def test_one_worker_for_many_queries_and_a_fresh_one_after_a_kill(db):
    execute_sql(db, "SELECT 1")
    pid, t0 = _worker.proc.pid, time.monotonic()
    for _ in range(300): execute_sql(db, "SELECT name FROM employees WHERE id = 7")
    assert _worker.proc.pid == pid and time.monotonic() - t0 < 10       # a pipe round trip per query, not a process
    os.kill(pid, signal.SIGKILL)                                        # killed from outside between two queries
    while open(f"/proc/{pid}/stat").read().split()[2] != "Z": time.sleep(0.01)
    assert execute_sql(db, "SELECT count(*) FROM departments")[0][0] > 0
    assert _worker.proc.pid != pid

def test_a_worker_that_dies_mid_query_is_a_clear_error(db):
    execute_sql(db, "SELECT 1")
    pid = _worker.proc.pid
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    with pytest.raises(SQLExecutionError, match="worker died"): execute_sql(db, ATTACKS[3][1], timeout=5.0)
    assert execute_sql(db, "SELECT 1") == [(1,)]

def test_result_size_is_bounded(db):
    with pytest.raises(SQLExecutionError, match="more than 10,000,000 bytes"):
        execute_sql(db, "SELECT zeroblob(900000) FROM employees", max_result_bytes=10_000_000)
    assert len(execute_sql(db, "SELECT zeroblob(900000) FROM employees LIMIT 5")) == 5

def test_without_posix_the_query_runs_here_with_a_warning(db, monkeypatch):
    import multilora.evaluate as evaluate
    sql = "SELECT id, name, salary / 7.0 FROM employees ORDER BY id"
    expected = execute_sql(db, sql)
    monkeypatch.setattr(evaluate, "_worker", None)                    # what a platform without `resource` gets
    with pytest.warns(UserWarning, match="in this process"): assert execute_sql(db, sql) == expected
    with pytest.warns(UserWarning), pytest.raises(SQLExecutionError, match="not authorized"):
        execute_sql(db, "DROP TABLE employees")
