"Tests for `multilora.builtin_data`: determinism, executable gold SQL, held-out splits, sizes."
import hashlib, json, os, re, sqlite3, subprocess, sys
from pathlib import Path

import pytest

import multilora.builtin_data as bd
from multilora.builtin_data import (create_sql_database, load_builtin, make_dialogue_summarization, make_text_to_sql,
                                    sql_database_path, sql_schema)

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    "Point the multilora cache at a fresh temporary directory for this module"
    old = os.environ.get("MULTILORA_CACHE")
    d = tmp_path_factory.mktemp("cache")
    os.environ["MULTILORA_CACHE"] = str(d)
    yield d
    if old is None: del os.environ["MULTILORA_CACHE"]
    else: os.environ["MULTILORA_CACHE"] = old


@pytest.fixture(scope="module")
def summ(): return make_dialogue_summarization()


@pytest.fixture(scope="module")
def sql(): return make_text_to_sql()


def rows(dd): return {k: dd[k].to_list() for k in SPLITS}


# ---------------------------------------------------------------- sizes and columns

def test_default_sizes(summ, sql):
    assert {k: len(summ[k]) for k in SPLITS} == dict(train=4000, validation=200, test=200)
    assert {k: len(sql[k]) for k in SPLITS} == dict(train=1000, validation=100, test=100)


@pytest.mark.parametrize("sizes", [(7, 3, 2), (25, 0, 5), (1, 1, 0)])
def test_requested_sizes(sizes):
    for make in (make_dialogue_summarization, make_text_to_sql):
        dd = make(*sizes, seed=3)
        assert tuple(len(dd[k]) for k in SPLITS) == sizes
        assert all(dd[k].features == dd["train"].features for k in SPLITS)


def test_columns(summ, sql):
    for k in SPLITS:
        assert summ[k].column_names == ["id", "dialogue", "summary"]
        assert sql[k].column_names[:3] == ["question", "context", "answer"]


def test_non_empty_fields(summ, sql):
    for k in SPLITS:
        for r in summ[k]:
            assert r["id"] and r["dialogue"].strip() and r["summary"].strip()
        for r in sql[k]:
            assert r["question"].strip() and r["answer"].strip() and r["context"].startswith("CREATE TABLE")


def test_ids_unique(summ):
    ids = [i for k in SPLITS for i in summ[k]["id"]]
    assert len(set(ids)) == len(ids)


# ---------------------------------------------------------------- determinism

def test_summarization_deterministic():
    a, b = make_dialogue_summarization(50, 10, 10, seed=0), make_dialogue_summarization(50, 10, 10, seed=0)
    assert rows(a) == rows(b)
    c = make_dialogue_summarization(50, 10, 10, seed=1)
    for k in SPLITS: assert list(a[k]["dialogue"]) != list(c[k]["dialogue"])


def test_sql_deterministic():
    a, b = make_text_to_sql(50, 10, 10, seed=0), make_text_to_sql(50, 10, 10, seed=0)
    assert rows(a) == rows(b)
    c = make_text_to_sql(50, 10, 10, seed=1)
    for k in SPLITS: assert list(a[k]["question"]) != list(c[k]["question"])


def test_test_split_independent_of_train_size():
    assert make_dialogue_summarization(10, 5, 20)["test"].to_list() == make_dialogue_summarization(100, 5, 20)["test"].to_list()
    assert make_text_to_sql(10, 5, 20)["test"].to_list() == make_text_to_sql(100, 5, 20)["test"].to_list()


_FINGERPRINT = """
import hashlib, json
from multilora.builtin_data import make_dialogue_summarization, make_text_to_sql
d = {n: {k: v.to_list() for k, v in dd.items()} for n, dd in
     [("s", make_dialogue_summarization(40, 5, 5)), ("q", make_text_to_sql(40, 5, 5))]}
print(hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest())
"""


def test_deterministic_across_processes(tmp_path):
    "Fresh interpreters with different hash seeds (and fresh caches) produce byte-identical data"
    out = []
    for hs in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hs, MULTILORA_CACHE=str(tmp_path/hs))
        out.append(subprocess.run([sys.executable, "-c", _FINGERPRINT], env=env, capture_output=True, text=True, check=True).stdout)
    assert out[0] == out[1] and len(out[0].strip()) == 64


def _dump(path):
    con = sqlite3.connect(path)
    try: return list(con.iterdump())
    finally: con.close()


def test_database_deterministic(tmp_path):
    a, b, c = (create_sql_database(tmp_path/n, seed=s) for n, s in [("a.sqlite", 0), ("b.sqlite", 0), ("c.sqlite", 1)])
    assert _dump(a) == _dump(b)
    assert _dump(a) != _dump(c)


# ---------------------------------------------------------------- the database

def test_create_database_atomic_and_schema(tmp_path):
    p = create_sql_database(tmp_path/"sub"/"db.sqlite", seed=0)
    assert p == tmp_path/"sub"/"db.sqlite" and p.exists()
    assert [f.name for f in p.parent.iterdir()] == ["db.sqlite"]
    schema = sql_schema(p)
    assert set(schema) == {"departments", "employees", "projects", "assignments", "customers", "products", "orders"}
    assert all(v.startswith(f"CREATE TABLE {k} (") for k, v in schema.items())
    con = sqlite3.connect(p)
    try:
        for t in schema: assert con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] > 0
        bad = con.execute("SELECT COUNT(*) FROM employees WHERE department_id NOT IN (SELECT id FROM departments)").fetchone()[0]
        assert bad == 0
    finally: con.close()


def test_sql_database_path_cached(cache):
    p = sql_database_path(5)
    assert p == cache/"sql"/"company-5.sqlite"
    mtime = p.stat().st_mtime_ns
    assert sql_database_path(5).stat().st_mtime_ns == mtime


# ---------------------------------------------------------------- gold SQL

def test_all_gold_sql_executes_on_fresh_db(sql, tmp_path):
    db = create_sql_database(tmp_path/"fresh.sqlite", seed=0)
    con = sqlite3.connect(db)
    try:
        for k in SPLITS:
            for q in sql[k]["answer"]:
                res = con.execute(q).fetchall()
                assert res and res != [(None,)] and res != [(0,)], q
    finally: con.close()


def test_context_has_exactly_the_tables_used(sql):
    for k in SPLITS:
        for ctx, ans in zip(sql[k]["context"], sql[k]["answer"]):
            in_ctx = set(re.findall(r"CREATE TABLE (\w+)", ctx))
            used = set(re.findall(r"(?:FROM|JOIN) (\w+)", ans))
            assert in_ctx == used, (ctx, ans)


def test_sql_families_cover_the_clauses(sql):
    text = "\n".join(sql["train"]["answer"])
    for kw in ["COUNT(", "AVG(", "MAX(", "MIN(", "SUM(", "GROUP BY", "HAVING", "ORDER BY", "LIMIT", " JOIN ", "BETWEEN", "LIKE", "DISTINCT"]:
        assert kw in text, kw


# ---------------------------------------------------------------- held-out scheme and duplicates

def test_no_duplicate_questions_across_splits(sql):
    qs = [q for k in SPLITS for q in sql[k]["question"]]
    assert len(set(qs)) == len(qs)


def test_no_duplicate_dialogues_across_splits(summ):
    ds = [d for k in SPLITS for d in summ[k]["dialogue"]]
    assert len(set(ds)) == len(ds)


def _held_out_names():
    names = [n for v in bd._HELD_OUT.values() for n in v]
    return re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b")


def _held_out_phrasings():
    return [re.compile(re.sub(r"\\\{\w+\\\}", "(.+?)", re.escape(t)) + "$") for f in bd._FAMILIES for t in f["test"]]


def test_held_out_entities_absent_from_train(sql):
    pat = _held_out_names()
    for k in ("train", "validation"):
        for q, a in zip(sql[k]["question"], sql[k]["answer"]):
            assert not pat.search(q) and not pat.search(a), (k, q)
    assert sum(bool(pat.search(q)) for q in sql["test"]["question"]) >= 20


def test_held_out_phrasings_absent_from_train(sql):
    pats = _held_out_phrasings()
    for k in ("train", "validation"):
        for q in sql[k]["question"]:
            assert not any(p.match(q) for p in pats), (k, q)
    assert sum(any(p.match(q) for p in pats) for q in sql["test"]["question"]) >= 30


def test_held_out_lists_are_disjoint():
    for kind, (tr, ho) in bd._ENTITIES.items():
        assert ho and not set(tr) & set(ho), kind
    for f in bd._FAMILIES:
        assert f["test"] and len(f["train"]) >= 3 and not set(f["train"]) & set(f["test"]), f["name"]


def test_novelty_column(sql):
    assert set(sql["train"]["novelty"]) == set(sql["validation"]["novelty"]) == {"none"}
    assert {"entity", "phrasing", "entity+phrasing"} <= set(sql["test"]["novelty"])


# ---------------------------------------------------------------- summaries

def test_dialogue_shape(summ):
    line = re.compile(r"[A-Z][a-z]+: \S.*")
    for d in summ["train"]["dialogue"]:
        turns = d.split("\n")
        assert 3 <= len(turns) <= 12
        assert all(line.fullmatch(t) for t in turns), d
        assert 2 <= len({t.split(":")[0] for t in turns}) <= 4


def test_summary_names_come_from_dialogue(summ):
    people = {p.name for p in bd._PEOPLE}
    for d, s in zip(summ["train"]["dialogue"], summ["train"]["summary"]):
        for w in re.findall(r"[A-Z][a-z]+", s):
            if w in people: assert w in d, (w, d, s)


def test_summaries_varied(summ):
    assert len(set(summ["train"]["summary"])) > 0.9*len(summ["train"])


# ---------------------------------------------------------------- load_builtin

def test_load_builtin():
    dd = load_builtin("summarization", n_train=4, n_validation=1, n_test=1)
    assert dd["train"].to_list() == make_dialogue_summarization(4, 1, 1)["train"].to_list()
    assert len(load_builtin("sql_generation", n_train=4, n_validation=1, n_test=1)["train"]) == 4
    with pytest.raises(ValueError, match="summarization, sql_generation"): load_builtin("samsum")
