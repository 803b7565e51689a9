#!/usr/bin/env python3
"""Rewrites sql/sluice--0.1.0--0.2.0.sql: its header (everything before the first copy marker)
followed by exact copies of the SQL sources, each after its marker line (checked by
tests/tests/upgrade.rs). Run from the repository root after editing any of them."""
SOURCES = ["api", "workflows", "cron", "events", "durable", "conditions"]
path = "sql/sluice--0.1.0--0.2.0.sql"
header = open(path).read().split("-- ---- copy of sql/api.sql ----\n")[0]
out = header + "".join(
    "-- ---- copy of sql/%s.sql ----\n" % name + open("sql/%s.sql" % name).read()
    for name in SOURCES
)
open(path, "w").write(out)
