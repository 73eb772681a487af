"Tests for `multilora.evaluate`: ROUGE on hand-made cases, SQL execution match, and that generated SQL can never change or hang the database."
import hashlib, time
from pathlib import Path

import pytest

from multilora.builtin_data import create_sql_database
from multilora.evaluate import (ROUGE_TYPES, SQLExecutionError, clean_generation, execute_sql, execution_match, format_results,
                                has_order_by, normalize_sql, results_match, rouge_scores, sql_metrics)

ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
GOLD = "SELECT name FROM employees WHERE salary > 50000"


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    "A fresh copy of the built-in company database"
    return create_sql_database(tmp_path_factory.mktemp("sql")/"db.sqlite")


def sha(path): return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ROUGE
def test_rouge_identical_is_one():
    s = "Amanda baked cookies. She will bring Jerry some tomorrow."
    assert rouge_scores([s, "Hi there"], [s, "Hi there"]) == {k: 1.0 for k in ROUGE_TYPES}


def test_rouge_disjoint_and_empty_are_zero():
    assert rouge_scores(["completely different words", ""], ["Anna will call Tom.", "Anna will call Tom."]) == {k: 0.0 for k in ROUGE_TYPES}


def test_rouge_partial_and_stemming():
    r = rouge_scores(["Anna will call Tom"], ["Anna will call Tom tomorrow"])
    assert 0 < r["rouge1"] < 1 and r["rouge2"] < r["rouge1"]
    assert rouge_scores(["the books"], ["the book"])["rouge1"] == pytest.approx(1.0)
    assert rouge_scores(["the books"], ["the book"], use_stemmer=False)["rouge1"] == pytest.approx(0.5)


def test_rougelsum_splits_sentences():
    # sentence order swapped: ROUGE-L (one LCS over the whole text) drops, ROUGE-Lsum (per-sentence LCS) does not
    ref, pred = "Anna will call Tom. Ben buys milk.", "Ben buys milk. Anna will call Tom."
    r = rouge_scores([pred], [ref])
    assert r["rougeLsum"] == pytest.approx(1.0) and r["rougeL"] < 1.0


def test_rouge_length_mismatch():
    with pytest.raises(ValueError): rouge_scores(["a"], ["a", "b"])


# clean-up of generations
def test_clean_generation():
    assert clean_generation("SELECT 1\n\n### Instruction:\nmore") == "SELECT 1"
    assert clean_generation("```sql\nSELECT 1;\n```\nexplanation") == "SELECT 1;"
    assert clean_generation("Anna will come.###") == "Anna will come."


# SQL execution match
def test_equivalent_sql_matches(db):
    assert execution_match("select e.name from employees e where 50000 < e.salary", GOLD, db)
    assert execution_match("SELECT name FROM employees WHERE NOT salary <= 50000;", GOLD, db)


def test_different_sql_does_not_match(db):
    assert not execution_match("SELECT name FROM employees", GOLD, db)
    assert not execution_match("SELECT name, salary FROM employees WHERE salary > 50000", GOLD, db)
    assert not execution_match("SELECT DISTINCT city FROM employees", "SELECT city FROM employees", db)


def test_order_by_sensitivity(db):
    top = "SELECT name FROM employees ORDER BY salary DESC LIMIT 3"
    assert execution_match("SELECT name FROM employees ORDER BY salary DESC LIMIT 3", top, db)
    reversed_ = "SELECT name FROM (SELECT name, salary FROM employees ORDER BY salary DESC LIMIT 3) ORDER BY salary"
    assert not execution_match(reversed_, top, db)  # same rows, wrong order: wrong when the gold orders
    unordered = "SELECT name FROM employees WHERE salary > 100000"
    assert execution_match(unordered + " ORDER BY name DESC", unordered, db)  # gold has no ORDER BY: order ignored
    assert has_order_by(top) and not has_order_by("SELECT 'order by' FROM t")


def test_results_match():
    assert results_match([(1, 2.0)], [(1, 2)])
    assert results_match([(0.1 + 0.2,)], [(0.3,)])
    assert results_match([(1,), (2,)], [(2,), (1,)]) and not results_match([(1,), (2,)], [(2,), (1,)], ordered=True)
    assert not results_match([(1,), (1,)], [(1,)])


@pytest.mark.parametrize("sql", ["DROP TABLE employees", "DELETE FROM employees", "INSERT INTO departments VALUES (99, 'x', 'y', 1)",
                                 "UPDATE employees SET salary = 0", "SELECT 1; DROP TABLE employees", "SELECT 1; SELECT 2",
                                 "ATTACH DATABASE 'other.db' AS o", "PRAGMA user_version = 9", "CREATE TABLE t (x)",
                                 "CREATE TEMP TABLE t AS SELECT 1"])
def test_writes_are_wrong_and_db_unchanged(db, sql):
    before = sha(db)
    with pytest.raises(SQLExecutionError): execute_sql(db, sql)
    assert not execution_match(sql, GOLD, db)
    assert sha(db) == before
    assert execute_sql(db, "SELECT count(*) FROM employees") == [(120,)]


def test_endless_query_times_out(db):
    before, t0 = sha(db), time.monotonic()
    assert not execution_match(ENDLESS, "SELECT 1", db, timeout=0.5)
    assert time.monotonic() - t0 < 5
    with pytest.raises(SQLExecutionError, match="timed out"): execute_sql(db, ENDLESS, timeout=0.2)
    assert sha(db) == before


@pytest.mark.parametrize("sql", ["SELEC name FROM employees", "SELECT nme FROM employees", "SELECT * FROM missing_table",
                                 "", "   ", "Here is the query: SELECT", "SELECT name FROM employees WHERE (", "'unterminated"])
def test_malformed_sql_is_wrong_without_exception(db, sql):
    assert execution_match(sql, GOLD, db) is False


def test_gold_errors_raise(db):
    with pytest.raises(SQLExecutionError): execution_match("SELECT 1", "SELEC 1", db)


def test_normalized_exact_match():
    assert normalize_sql("SELECT  name FROM Employees WHERE city='Rome' ;") == normalize_sql("select name from employees where city = 'Rome'")
    assert normalize_sql("WHERE city = 'Rome'") != normalize_sql("WHERE city = 'rome'")
    assert normalize_sql(GOLD) != normalize_sql("select e.name from employees e where 50000 < e.salary")


def test_sql_metrics(db):
    preds = [GOLD, "select e.name from employees e where 50000 < e.salary", "SELECT name FROM employees", "DROP TABLE employees"]
    assert sql_metrics(preds, [GOLD] * 4, db) == {"execution_accuracy": 0.5, "exact_match": 0.25, "error_rate": 0.25}


def test_format_results():
    res = {"sql_generation": {"own": {"execution_accuracy": 0.75, "exact_match": 0.5, "error_rate": 0.0, "n": 4, "predictions": ["x"]},
                              "base": {"execution_accuracy": 0.0, "exact_match": 0.0, "error_rate": 1.0, "n": 4}}}
    lines = format_results(res).splitlines()
    assert lines[0].split() == ["task", "metric", "own", "base"]
    assert lines[2].split() == ["sql_generation", "execution_accuracy", "0.750", "0.000"]
