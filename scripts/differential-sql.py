#!/usr/bin/env python3
# Differential SQL: random rows written to Forestall over line protocol, the same rows (after
# Forestall's last-write-wins merge, field by field) loaded into DuckDB, then random queries
# over filters, aggregates, date_bin, gap filling (date_bin_gapfill, locf, interpolate),
# subqueries and joins, rendered once for each engine, and the answers compared.
#
# Forestall is asked the way users ask it (SQL over HTTP, timestamps as timestamps). DuckDB
# holds the reference model: time as nanoseconds since the epoch (BIGINT), date_bin as floor
# arithmetic on them, gap filling as a grid LEFT JOINed to the aggregate with window functions.
#
# Every difference is printed with both queries and both answers, and the exit status is 1.
# The semantics that deliberately differ from DuckDB's are listed in docs/BENCHMARKS.md
# ("Differential SQL"); the generator does not ask for them.
#
# Usage:
#   python3 scripts/differential-sql.py --url http://127.0.0.1:8181 --seed 1 --cases 300
#   python3 scripts/differential-sql.py --binary target/debug/forestall --seeds 1-20 --cases 1000
# (--binary starts a fresh server with a temporary data directory per seed.)
import argparse, datetime, json, math, os, random, re, subprocess, sys, tempfile, urllib.request

import duckdb

HOUR = 3_600_000_000_000
SECOND = 1_000_000_000
T0 = 1_699_999_200 * SECOND  # 2023-11-14T22:00:00Z
SPAN = 6 * HOUR
HOSTS = ["h%d" % i for i in range(8)]
REGIONS = [None, "eu", "us west", "ap,south", "eu=2"]  # spaces, commas, '=' need escaping
NOTES = ["ok", "slow", "o'clock", 'say "hi"', "a\\b", "ünïcode"]

# The tables: name -> (tags, fields with their types).
TABLES = {
    "dcpu": (["host", "region"], {"usage": "float", "count": "int", "ok": "bool", "note": "str"}),
    "dmem": (["host"], {"used": "float", "free": "int"}),
}


# --- data -----------------------------------------------------------------------------------

def lp_escape_tag(s):
    return s.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")


def lp_value(kind, v):
    if kind == "float":
        return repr(float(v))
    if kind == "int":
        return "%di" % v
    if kind == "bool":
        return "true" if v else "false"
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def random_value(rng, kind):
    if kind == "float":
        return rng.choice([round(rng.uniform(0, 100), 2), round(rng.uniform(-5, 5), 3), 0.0])
    if kind == "int":
        return rng.randint(-20, 200)
    if kind == "bool":
        return rng.random() < 0.6
    return rng.choice(NOTES)


def random_time(rng):
    # Mostly on a 10-second grid, so that joins on time and duplicates meet; some with
    # millisecond and nanosecond parts.
    t = T0 + rng.randrange(SPAN // (10 * SECOND)) * 10 * SECOND
    r = rng.random()
    if r < 0.1:
        t += rng.randrange(1000) * 1_000_000
    elif r < 0.15:
        t += rng.randrange(1, 1000)
    return t


def make_writes(rng):
    """Three batches of points: (table, tags dict, fields dict, time)."""
    batches = [[], [], []]
    written = []
    for table, (tags, fields) in TABLES.items():
        series = set()
        for _ in range(12 if table == "dcpu" else 6):
            key = {"host": rng.choice(HOSTS)}
            if "region" in tags:
                region = rng.choice(REGIONS)
                if region is not None:
                    key["region"] = region
            series.add(tuple(sorted(key.items())))
        for key in sorted(series):
            for _ in range(rng.randint(20, 160)):
                names = [f for f in fields if rng.random() < 0.8] or [rng.choice(list(fields))]
                point = (table, dict(key), {f: random_value(rng, fields[f]) for f in names},
                         random_time(rng))
                batches[rng.choices([0, 1, 2], [6, 3, 1])[0]].append(point)
                written.append(point)
    # Later batches overwrite some earlier points, a few fields at a time.
    for later in (1, 2):
        for _ in range(40):
            table, key, _, t = rng.choice(written)
            fields = TABLES[table][1]
            names = rng.sample(list(fields), rng.randint(1, len(fields)))
            batches[later].append((table, key, {f: random_value(rng, fields[f]) for f in names}, t))
    return batches


def line(point):
    table, tags, fields, t = point
    head = table + "".join(",%s=%s" % (k, lp_escape_tag(v)) for k, v in sorted(tags.items()))
    kinds = TABLES[table][1]
    return "%s %s %d" % (head, ",".join("%s=%s" % (f, lp_value(kinds[f], v))
                                        for f, v in fields.items()), t)


def merged_rows(batches):
    """Forestall's rows: (series, time) is unique and a later write wins field by field."""
    rows = {}
    for batch in batches:
        for table, tags, fields, t in batch:
            rows.setdefault((table, tuple(sorted(tags.items())), t), {}).update(fields)
    return rows


def load_duckdb(rows):
    con = duckdb.connect()
    for table, (tags, fields) in TABLES.items():
        types = {"float": "DOUBLE", "int": "BIGINT", "bool": "BOOLEAN", "str": "VARCHAR"}
        cols = ["t BIGINT"] + ["%s VARCHAR" % c for c in tags] + \
            ['"%s" %s' % (f, types[k]) for f, k in fields.items()]
        con.execute("CREATE TABLE %s (%s)" % (table, ", ".join(cols)))
        data = []
        for (tab, key, t), values in rows.items():
            if tab != table:
                continue
            key = dict(key)
            data.append([t] + [key.get(c) for c in tags] + [values.get(f) for f in fields])
        con.executemany("INSERT INTO %s VALUES (%s)" % (table, ", ".join("?" * (1 + len(tags) + len(fields)))), data)
    return con


# --- expressions, rendered for each engine ---------------------------------------------------

class Q:
    """A piece of SQL in two dialects: `f` for Forestall, `d` for the DuckDB model."""

    def __init__(self, f, d=None):
        self.f, self.d = f, (f if d is None else d)

    def __add__(self, other):
        other = other if isinstance(other, Q) else Q(other)
        return Q(self.f + other.f, self.d + other.d)

    def __radd__(self, other):
        return Q(other) + self


def join(sep, parts):
    parts = list(parts)
    return Q(sep.join(p.f for p in parts), sep.join(p.d for p in parts))


def sql_str(s):
    return "'" + s.replace("'", "''") + "'"


def time_literal(rng, t):
    iso = datetime.datetime.fromtimestamp(t // SECOND, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    frac = t % SECOND
    text = iso + ("." + ("%09d" % frac).rstrip("0") if frac else "") + "Z"
    forms = [sql_str(text), "TIMESTAMP " + sql_str(text.rstrip("Z")),
             "to_timestamp_nanos(%d)" % t]
    return Q(rng.choice(forms), str(t))


def col(name, alias=None):
    prefix = alias + "." if alias else ""
    if name == "time":
        return Q(prefix + "time", prefix + "t")
    return Q(prefix + '"%s"' % name)


STRIDES = {"30 seconds": 30 * SECOND, "1 minute": 60 * SECOND, "5 minutes": 300 * SECOND,
           "7 minutes": 420 * SECOND, "1 hour": HOUR, "90 minutes": 90 * 60 * SECOND}


def date_bin(rng, fn="date_bin", alias=None, stride=None, origin=None):
    name = stride or rng.choice(list(STRIDES))
    s = STRIDES[name]
    t = col("time", alias)
    if origin is None and rng.random() < 0.3:
        origin = T0 + rng.randrange(-2 * HOUR, SPAN) // SECOND * SECOND
    f = "%s(INTERVAL '%s', %s" % (fn, name, t.f)
    if origin is not None:
        f += ", " + time_literal(rng, origin).f
    o = origin or 0
    d = "(%d + ((%s - %d) - (((%s - %d) %% %d) + %d) %% %d))" % (o, t.d, o, t.d, o, s, s, s)
    return Q(f + ")", d), s, o


class Gen:
    def __init__(self, rng, rows):
        self.rng = rng
        self.times = sorted({t for (_, _, t) in rows})

    def some_time(self):
        rng = self.rng
        if rng.random() < 0.5:
            return rng.choice(self.times)
        return T0 + rng.randrange(-HOUR, SPAN + HOUR)

    def predicate(self, table, alias=None, depth=0, times=True):
        rng = self.rng
        r = rng.random()
        if depth < 2 and r < 0.25:
            a = self.predicate(table, alias, depth + 1, times)
            b = self.predicate(table, alias, depth + 1, times)
            op = rng.choice([" AND ", " OR "])
            return "(" + a + op + b + ")"
        if depth < 2 and r < 0.3:
            return "NOT (" + self.predicate(table, alias, depth + 1, times) + ")"
        tags, fields = TABLES[table]
        choice = rng.choice(["time", "time", "tag", "tag", "field", "field"][0 if times else 2:])
        if choice == "time":
            return self.time_predicate(alias)
        if choice == "tag":
            c = col(rng.choice(tags), alias)
            values = HOSTS if c.f.endswith('"host"') else [r for r in REGIONS if r]
            # (No subquery at depth 2, where aggregates' FILTER clauses draw from: DataFusion
            # 55 does not plan a subquery there.)
            kind = rng.choice(["=", "<>", "in", "null", "notnull", "like", ">"] +
                              (["subquery"] if depth < 2 else []))
            if kind == "subquery":
                # Hosts the other table saw with a large value.
                other, field = ("dmem", "used") if table == "dcpu" else ("dcpu", "usage")
                return col("host", alias) + rng.choice([" IN", " NOT IN"]) + \
                    " (SELECT host FROM %s WHERE %s > %d)" % (other, field, rng.randint(0, 99))
            if kind in ("=", "<>", ">"):
                return c + " %s %s" % (kind, sql_str(rng.choice(values)))
            if kind == "in":
                return c + " IN (%s)" % ", ".join(sql_str(v) for v in rng.sample(values, 2))
            if kind == "null":
                return c + " IS NULL"
            if kind == "notnull":
                return c + " IS NOT NULL"
            return c + " LIKE %s" % sql_str(rng.choice(["h1%", "%west", "e_", "%,%"]))
        name = rng.choice(list(fields))
        kind, c = fields[name], col(name, alias)
        if rng.random() < 0.15:
            return c + rng.choice([" IS NULL", " IS NOT NULL"])
        if kind == "float":
            v = round(rng.uniform(-5, 100), 2)
            if rng.random() < 0.2:
                return c + " BETWEEN %s AND %s" % (v, v + rng.uniform(0, 50))
            return c + " %s %s" % (rng.choice(["<", "<=", ">", ">=", "="]), v)
        if kind == "int":
            if rng.random() < 0.2:
                return c + " %% %d = %d" % (rng.randint(2, 5), rng.randint(0, 1))
            return c + " %s %d" % (rng.choice(["<", "<=", ">", ">=", "=", "<>"]), rng.randint(-20, 200))
        if kind == "bool":
            return rng.choice([c, "NOT " + c, c + " = false"])
        return c + rng.choice([" = ", " <> ", " < "]) + sql_str(rng.choice(NOTES))

    def time_predicate(self, alias=None):
        rng = self.rng
        t = col("time", alias)
        a = self.some_time()
        if rng.random() < 0.3:
            b = a + rng.randrange(HOUR * 2)
            return t + " BETWEEN " + time_literal(rng, a) + " AND " + time_literal(rng, b)
        return t + " %s " % rng.choice(["<", "<=", ">", ">=", "="]) + time_literal(rng, a)

    def where(self, table, alias=None, required=None):
        """A WHERE clause. With a `required` time range the others do not involve time: the
        range date_bin_gapfill fills is the tightest of the time bounds every row meets, and
        the model here takes it from `required` alone."""
        rng = self.rng
        parts = [required] if required is not None else []
        for _ in range(rng.choice([0, 1, 1, 2])):
            parts.append(self.predicate(table, alias, times=required is None))
        return (" WHERE " + join(" AND ", parts)) if parts else Q("")

    def aggregate(self, table, alias=None):
        """An aggregate and the kind of its answer."""
        rng = self.rng
        _, fields = TABLES[table]
        name = rng.choice(list(fields))
        kind, c = fields[name], col(name, alias)
        if rng.random() < 0.12:
            return Q("count(*)"), "int"
        choices = {"float": ["count", "sum", "avg", "min", "max", "stddev", "median"],
                   "int": ["count", "sum", "avg", "min", "max", "stddev"],
                   "bool": ["count", "bool_and", "bool_or", "min", "max"],
                   "str": ["count", "min", "max", "count_distinct"]}[kind]
        fn = rng.choice(choices)
        if fn in ("count", "sum") and rng.random() < 0.2:
            other = self.predicate(table, alias, depth=2)
            return fn + "(" + c + ") FILTER (WHERE " + other + ")", "int" if fn == "count" else kind
        if fn == "count_distinct":
            return "count(DISTINCT " + c + ")", "int"
        if fn == "stddev":
            return Q("stddev(") + c + ")", "float"
        answer = {"count": "int", "avg": "float"}.get(fn, kind)
        return fn + "(" + c + ")", answer


# --- queries --------------------------------------------------------------------------------

class Case:
    """A query in both dialects, its output columns' names and kinds, and whether its order
    is total (then the rows are compared in order, otherwise as multisets)."""

    def __init__(self, sql, names, kinds, ordered=False):
        self.sql, self.names, self.kinds, self.ordered = sql, names, kinds, ordered


def order_limit(rng, names, limit=True):
    """ORDER BY every output column (a total order), sometimes with a LIMIT."""
    if rng.random() < 0.5:
        return Q(""), False
    keys = names[:]
    rng.shuffle(keys)
    text = " ORDER BY " + ", ".join("%s %s" % (k, rng.choice(["ASC NULLS FIRST", "DESC NULLS LAST",
                                                             "ASC NULLS LAST"])) for k in keys)
    if limit and rng.random() < 0.6:
        text += " LIMIT %d" % rng.randint(0, 20)
        if rng.random() < 0.3:
            text += " OFFSET %d" % rng.randint(0, 10)
    return Q(text), True


def raw_select(g):
    rng = g.rng
    table = rng.choice(list(TABLES))
    tags, fields = TABLES[table]
    names = ["time"] + tags + list(fields)
    chosen = rng.sample(names, rng.randint(1, len(names)))
    outs, kinds = [], []
    for i, n in enumerate(chosen):
        kind = "time" if n == "time" else ("str" if n in tags else fields[n])
        expr = col(n)
        r = rng.random()
        if kind == "float" and r < 0.2:
            expr = "(" + expr + " * 2 + 1)"
        elif kind == "float" and r < 0.3:
            expr = "CASE WHEN " + expr + " > 50 THEN 'high' WHEN " + expr + " IS NULL THEN NULL ELSE 'low' END"
            kind = "str"
        elif kind == "int" and r < 0.2:
            expr = "abs(" + expr + ") % 7"
        elif kind == "str" and r < 0.2:
            expr = rng.choice(["COALESCE(" + expr + ", 'none')", "upper(" + expr + ")",
                               "length(" + expr + ")", expr + " || '-x'"])
            kind = "int" if expr.f.startswith("length") else "str"
        elif kind == "time" and r < 0.3:
            unit = rng.choice(["minute", "hour"])
            s = 60 * SECOND if unit == "minute" else HOUR
            if rng.random() < 0.5:
                expr = Q("date_trunc('%s', time)" % unit, "(t - t %% %d)" % s)
            else:
                expr = Q("date_part('%s', time)" % unit, "((t // %d) %% %d)" % (s, 60 if unit == "minute" else 24))
                kind = "int"
        outs.append(expr + " AS c%d" % i)
        kinds.append(kind)
    distinct = rng.random() < 0.1
    q = "SELECT " + ("DISTINCT " if distinct else "") + join(", ", outs) + " FROM " + table \
        + g.where(table)
    # A total order needs the series key and time among the outputs, or DISTINCT.
    total = distinct or set(tags + ["time"]) <= set(chosen)
    ordered = False
    if total:
        tail, ordered = order_limit(rng, ["c%d" % i for i in range(len(chosen))])
        q = q + tail
    return Case(q, ["c%d" % i for i in range(len(chosen))], kinds, ordered)


def grouped(g):
    rng = g.rng
    table = rng.choice(list(TABLES))
    tags, _ = TABLES[table]
    keys, kinds = [], []
    if rng.random() < 0.6:
        keys.append(date_bin(rng)[0])
        kinds.append("time")
    for tag in tags:
        if rng.random() < 0.5:
            keys.append(col(tag))
            kinds.append("str")
    aggs = [g.aggregate(table) for _ in range(rng.randint(1, 3))]
    outs = [k + " AS g%d" % i for i, k in enumerate(keys)] + \
        [a + " AS a%d" % i for i, (a, _) in enumerate(aggs)]
    kinds += [k for _, k in aggs]
    names = ["g%d" % i for i in range(len(keys))] + ["a%d" % i for i in range(len(aggs))]
    q = "SELECT " + join(", ", outs) + " FROM " + table + g.where(table)
    if keys:
        q = q + " GROUP BY " + ", ".join(str(i + 1) for i in range(len(keys)))
        if rng.random() < 0.2:
            q = q + " HAVING count(*) > %d" % rng.randint(0, 20)
        tail, ordered = order_limit(rng, names)
        return Case(q + tail, names, kinds, ordered)
    return Case(q, names, kinds)


def gapfill(g):
    rng = g.rng
    table = "dcpu" if rng.random() < 0.7 else "dmem"
    tags, fields = TABLES[table]
    stride = rng.choice(["1 minute", "5 minutes", "7 minutes", "1 hour"])
    s = STRIDES[stride]
    start = T0 + rng.randrange(-HOUR, SPAN) // (7 * SECOND) * (7 * SECOND)
    end = start + rng.randrange(1, 40) * s + rng.choice([0, 0, 13 * SECOND])
    lo_op, lo = rng.choice([(">=", start), (">", start - 1)])
    hi_op, hi = rng.choice([("<", end), ("<=", end - 1)])
    if rng.random() < 0.2:
        required = col("time") + " BETWEEN " + time_literal(rng, start) + " AND " + \
            time_literal(rng, end - 1)
    else:
        required = col("time") + " %s " % lo_op + time_literal(rng, lo) + " AND " + \
            col("time") + " %s " % hi_op + time_literal(rng, hi)
    binq, _, origin = date_bin(rng, "date_bin_gapfill", stride=stride)
    group_tags = [t for t in tags if rng.random() < 0.6]
    numeric = [f for f, k in fields.items() if k in ("float", "int")]
    measures = []
    for i in range(rng.randint(1, 3)):
        f = rng.choice(numeric)
        fn = rng.choice(["avg", "min", "max", "sum"] + (["count"] if rng.random() < 0.3 else []))
        answer = "int" if fn == "count" else "float" if fn == "avg" or fields[f] == "float" else "int"
        fill = rng.choice(["none", "locf", "interpolate"])
        measures.append(("%s(%s)" % (fn, col(f).f), fill, answer))
    # Forestall, as users write it.
    outs_f = [binq.f + " AS g0"] + ["%s AS g%d" % (col(t).f, i + 1) for i, t in enumerate(group_tags)]
    for i, (agg, fill, _) in enumerate(measures):
        outs_f.append((agg if fill == "none" else "%s(%s)" % (fill, agg)) + " AS a%d" % i)
    where = g.where(table, required=required)
    f = "SELECT %s FROM %s%s GROUP BY %s" % (", ".join(outs_f), table, where.f,
                                             ", ".join(str(i + 1) for i in range(1 + len(group_tags))))
    # DuckDB: the aggregate, a grid of buckets for every group it has, and the fills.
    keys = ["g%d" % (i + 1) for i in range(len(group_tags))]
    agg_outs = [binq.d + " AS g0"] + ["%s AS %s" % (col(t).d, k) for t, k in zip(group_tags, keys)] + \
        ["%s AS x%d" % (agg, i) for i, (agg, _, _) in enumerate(measures)]
    first = origin + (start - origin) // s * s
    d_parts = ["WITH agg AS (SELECT %s FROM %s%s GROUP BY %s)" % (
        ", ".join(agg_outs), table, where.d, ", ".join(str(i + 1) for i in range(1 + len(keys))))]
    d_parts.append(", grp AS (SELECT DISTINCT %s FROM agg)" % (", ".join(keys) if keys else "1 AS one"))
    on = " AND ".join(["agg.g0 = grid.g0"] + ["agg.%s IS NOT DISTINCT FROM grp.%s" % (k, k) for k in keys])
    d_parts.append(", full_ AS (SELECT grid.g0, %s FROM range(%d, %d, %d) AS grid(g0) CROSS JOIN grp "
                   "LEFT JOIN agg ON %s)" % (", ".join(["grp.%s" % k for k in keys] +
                                                       ["agg.x%d" % i for i in range(len(measures))]),
                                             first, end, s, on))
    part = "PARTITION BY %s " % ", ".join(keys) if keys else ""
    before = "OVER (%sORDER BY g0 ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)" % part
    after = "OVER (%sORDER BY g0 ROWS BETWEEN CURRENT ROW AND UNBOUNDED FOLLOWING)" % part
    outs_d = ["g0"] + keys
    for i, (_, fill, answer) in enumerate(measures):
        x = "x%d" % i
        if fill == "none":
            outs_d.append(x + " AS a%d" % i)
        elif fill == "locf":
            outs_d.append("last_value(%s IGNORE NULLS) %s AS a%d" % (x, before, i))
        else:
            pv = "last_value(%s IGNORE NULLS) %s" % (x, before)
            pt = "last_value(CASE WHEN %s IS NOT NULL THEN g0 END IGNORE NULLS) %s" % (x, before)
            nv = "first_value(%s IGNORE NULLS) %s" % (x, after)
            nt = "first_value(CASE WHEN %s IS NOT NULL THEN g0 END IGNORE NULLS) %s" % (x, after)
            line = ("CASE WHEN {x} IS NOT NULL THEN CAST({x} AS DOUBLE) "
                    "WHEN ({pt}) IS NULL OR ({nt}) IS NULL THEN NULL "
                    "ELSE ({pv}) + (({nv}) - ({pv})) * CAST((g0 - ({pt})) // {s} AS DOUBLE) "
                    "/ CAST((({nt}) - ({pt})) // {s} AS DOUBLE) END").format(
                        x=x, pt=pt, nt=nt, pv=pv, nv=nv, s=s)
            if answer == "int":
                line = "CAST(trunc(%s) AS BIGINT)" % line
            outs_d.append(line + " AS a%d" % i)
    d = " ".join(d_parts) + " SELECT %s FROM full_" % ", ".join(outs_d)
    kinds = ["time"] + ["str"] * len(group_tags) + [a for _, _, a in measures]
    names = ["g0"] + keys + ["a%d" % i for i in range(len(measures))]
    return Case(Q(f, d), names, kinds)


def joined(g):
    rng = g.rng
    if rng.random() < 0.5:
        # Rows joined on host and time.
        kind = rng.choice(["JOIN", "LEFT JOIN"])
        on = col("host", "c") + " = " + col("host", "m") + " AND " + col("time", "c") + " = " + \
            col("time", "m")
        aggs = [(Q("count(*)"), "int"), ("count(" + col("used", "m") + ")", "int"),
                ("sum(" + col("usage", "c") + " + " + col("used", "m") + ")", "float"),
                ("max(" + col("free", "m") + ")", "int"), ("min(" + col("count", "c") + ")", "int")]
        chosen = rng.sample(aggs, rng.randint(1, 3))
        group = rng.random() < 0.7
        outs = ([col("host", "c") + " AS g0"] if group else []) + \
            [a + " AS a%d" % i for i, (a, _) in enumerate(chosen)]
        q = "SELECT " + join(", ", outs) + " FROM dcpu c " + kind + " dmem m ON " + on + \
            g.where("dcpu", "c")
        if group:
            q = q + " GROUP BY 1"
        names = (["g0"] if group else []) + ["a%d" % i for i in range(len(chosen))]
        return Case(q, names, (["str"] if group else []) + [k for _, k in chosen])
    # Aggregates per bucket and host, joined on both.
    name = rng.choice(["5 minutes", "1 hour", "7 minutes"])
    b1, _, _ = date_bin(rng, stride=name, origin=0)
    b2, _, _ = date_bin(rng, stride=name, origin=0)
    left = "SELECT " + b1 + " AS b, host, avg(usage) AS u, count(*) AS n FROM dcpu" + \
        g.where("dcpu") + " GROUP BY 1, 2"
    right = "SELECT " + b2 + " AS b, host, max(used) AS v FROM dmem" + g.where("dmem") + \
        " GROUP BY 1, 2"
    kind = rng.choice(["JOIN", "LEFT JOIN", "FULL JOIN"])
    q = "SELECT x.b AS g0, x.host AS g1, y.host AS g2, x.u AS a0, x.n AS a1, y.v AS a2 FROM (" + \
        left + ") AS x " + kind + " (" + right + ") AS y ON x.b = y.b AND x.host = y.host"
    return Case(q, ["g0", "g1", "g2", "a0", "a1", "a2"],
                ["time", "str", "str", "float", "int", "float"])


FAMILIES = [(raw_select, 3), (grouped, 4), (gapfill, 2), (joined, 2)]


# --- comparing ------------------------------------------------------------------------------

def parse_time(v):
    if v is None:
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z?", v)
    if not m:
        raise ValueError("not a timestamp: %r" % v)
    dt = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
    return int(dt.timestamp()) * SECOND + int((m.group(2) or "").ljust(9, "0") or 0)


def normal(kind, v):
    if v is None:
        return None
    if kind == "time":
        return parse_time(v) if isinstance(v, str) else int(v)
    if kind == "float":
        return float(v)
    if kind == "int":
        return int(v)
    return v


def same(kind, a, b):
    if a is None or b is None:
        return a is None and b is None
    if kind == "float":
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


def rows_equal(kinds, ours, theirs, ordered):
    if len(ours) != len(theirs):
        return False
    if not ordered:
        key = lambda r: tuple((x is None, str(x) if not isinstance(x, float) else "%.6g" % x) for x in r)
        ours, theirs = sorted(ours, key=key), sorted(theirs, key=key)
    return all(same(k, a, b) for r, s in zip(ours, theirs) for k, a, b in zip(kinds, r, s))


def run_case(url, con, case):
    names = case.names
    body = json.dumps({"q": case.sql.f}).encode()
    req = urllib.request.Request(url + "/api/v3/query_sql?format=json", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            got = json.loads(r.read())
    except urllib.error.HTTPError as e:
        return "Forestall refused it: HTTP %d: %s" % (e.code, e.read().decode(errors="replace")[:500]), 0
    ours = [[normal(k, r.get(n)) for k, n in zip(case.kinds, names)] for r in got]
    try:
        theirs = con.execute(case.sql.d).fetchall()
    except duckdb.Error as e:
        return "the DuckDB model failed (a generator bug): %s" % e, 0
    theirs = [[normal(k, v) for k, v in zip(case.kinds, r)] for r in theirs]
    if not rows_equal(case.kinds, ours, theirs, case.ordered):
        return "answers differ\n  forestall (%d rows): %s\n  duckdb    (%d rows): %s" % (
            len(ours), ours[:8], len(theirs), theirs[:8]), len(ours)
    return None, len(ours)


def post(url, path, body=b""):
    req = urllib.request.Request(url + path, data=body, method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status


def one_seed(url, seed, cases, verbose, stats):
    rng = random.Random(seed)
    batches = make_writes(rng)
    # The first batch ends up in a compacted segment, the second in a flushed one beside it,
    # the third in the write buffer: duplicates meet across all three.
    for i, batch in enumerate(batches):
        post(url, "/api/v2/write?precision=ns", "\n".join(line(p) for p in batch).encode())
        if i == 0:
            post(url, "/api/v1/admin/compact")
        elif i == 1:
            post(url, "/api/v1/admin/flush")
    rows = merged_rows(batches)
    con = load_duckdb(rows)
    g = Gen(rng, rows)
    families = [f for f, w in FAMILIES for _ in range(w)]
    failures = []
    for i in range(cases):
        family = rng.choice(families)
        case = family(g)
        problem, rows = run_case(url, con, case)
        counts = stats.setdefault(family.__name__, [0, 0])
        counts[0] += 1
        counts[1] += rows > 0
        if verbose:
            print(case.sql.f)
        if problem:
            failures.append("seed %d case %d: %s\n  forestall: %s\n  duckdb:    %s" % (
                seed, i, problem, case.sql.f, case.sql.d))
    return failures


def start_server(binary):
    d = tempfile.mkdtemp()
    env = dict(os.environ, FORESTALL__COLLECTOR__ENABLED="false")
    p = subprocess.Popen([binary, "serve", "--http-addr", "127.0.0.1:0", "--pg-addr", "127.0.0.1:0",
                          "--data-dir", d], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         env=env, text=True)
    for out in p.stdout:
        if out.startswith("forestall listening on http://"):
            return p, "http://" + out.split("http://")[1].strip()
    raise SystemExit("the server did not start")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", help="a running Forestall with an empty store")
    ap.add_argument("--binary", help="start this forestall binary, one fresh store per seed")
    ap.add_argument("--seeds", default="1", help="a seed or a range, like 1-20")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--cases", type=int, default=300, help="queries per seed")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    lo, _, hi = (str(a.seed) if a.seed is not None else a.seeds).partition("-")
    seeds = range(int(lo), int(hi or lo) + 1)
    if bool(a.url) == bool(a.binary):
        raise SystemExit("give --url or --binary")
    if a.url and len(seeds) > 1:
        raise SystemExit("--url takes one seed (the store must start empty)")
    failures, total, stats = [], 0, {}
    for seed in seeds:
        server = None
        url = a.url
        if a.binary:
            server, url = start_server(a.binary)
        try:
            failures += one_seed(url.rstrip("/"), seed, a.cases, a.verbose, stats)
            total += a.cases
        finally:
            if server:
                server.terminate()
                server.wait()
    for f in failures:
        print(f + "\n")
    print("by kind (cases, with a non-empty answer): " + ", ".join(
        "%s %d/%d" % (name, n[0], n[1]) for name, n in sorted(stats.items())))
    print("%d cases over %d seeds, %d differences" % (total, len(seeds), len(failures)))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
