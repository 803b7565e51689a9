-- Upgrade 0.1.0 -> 0.2.0: the scheduler keeps the runnable queue in memory (see
-- extension/src/queue.rs) and posts assignments in shared memory, where a worker's fetch
-- claims them; the queue-head and timeout indexes go, arrivals are read by (run_at, id), and no
-- index mentions a column a claim changes (claims are HOT updates).
--
-- Everything after the first marker line below is a copy of sql/api.sql (its functions are
-- all CREATE OR REPLACE), then, each after its own marker line, of sql/workflows.sql,
-- sql/cron.sql, sql/events.sql and sql/durable.sql (new in 0.2.0: their tables are created
-- here); tests/tests/upgrade.rs checks that every copy is exact.

ALTER TABLE sluice.task_run SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0.02,
                                 autovacuum_vacuum_cost_delay = 0);

DROP INDEX sluice.task_run_queued_idx;
DROP INDEX sluice.task_run_timeout_idx;
-- Schedule deadlines come from the scheduler's memory (sluice._expire_queued).
DROP INDEX sluice.task_run_schedule_deadline_idx;
-- No index mentions the columns a claim changes, so claims are HOT updates (see
-- sql/schema.sql): unfinished tasks by (run_at, id), finished ones by age, no index by worker.
DROP INDEX sluice.task_run_run_at_idx;
DROP INDEX sluice.task_run_worker_idx;
DROP INDEX sluice.task_run_idempotency_idx;
ALTER TABLE sluice.task_run ADD CONSTRAINT task_run_finished_at_check
    CHECK ((finished_at IS NULL) = (status < 'succeeded'));
CREATE INDEX task_run_unfinished_idx ON sluice.task_run (run_at, id) WHERE finished_at IS NULL;
-- Retention: the scheduler deletes finished tasks past sluice.*_task_retention.
CREATE INDEX task_run_finished_idx ON sluice.task_run (finished_at)
    WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX task_run_idempotency_idx ON sluice.task_run (task_name, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND finished_at IS NULL;

-- Signatures that changed, and new functions of the library.
DROP FUNCTION sluice._maintain(interval);
DROP FUNCTION sluice._wake_scheduler();
CREATE FUNCTION sluice._wake_scheduler(runnable_from timestamptz DEFAULT NULL) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'wake_scheduler_sql_wrapper';
CREATE FUNCTION sluice._attempts_ended(task_ids bigint[], attempts int[]) RETURNS void
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'attempts_ended_sql_wrapper';
CREATE FUNCTION sluice.posted_assignments()
RETURNS TABLE (worker_id bigint, task_id bigint, attempt int)
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'posted_assignments_sql_wrapper';

CREATE FUNCTION sluice._config_changed() RETURNS void
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'config_changed_sql_wrapper';
CREATE FUNCTION sluice._outcome_recorded() RETURNS void
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'outcome_recorded_sql_wrapper';
CREATE FUNCTION sluice._definitions_changed() RETURNS void
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'definitions_changed_sql_wrapper';
CREATE FUNCTION sluice._tasks_deleted() RETURNS void
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'tasks_deleted_sql_wrapper';
CREATE FUNCTION sluice._cron_next(cron text, after timestamp) RETURNS timestamp
IMMUTABLE STRICT PARALLEL SAFE LANGUAGE c AS 'MODULE_PATHNAME', 'cron_next_sql_wrapper';
-- Claims held in memory (extension/src/claims.rs).
CREATE FUNCTION sluice._claims(task_ids bigint[] DEFAULT NULL)
RETURNS TABLE (task_id bigint, attempt int, worker_id bigint, picked_at timestamptz,
               timeout_at timestamptz)
LANGUAGE c AS 'MODULE_PATHNAME', 'claims_sql_wrapper';
CREATE FUNCTION sluice._claims_settled(task_ids bigint[], attempts int[]) RETURNS void
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'claims_settled_sql_wrapper';

-- Flow control: concurrency keys and rate limits.
ALTER TABLE sluice.task_definition
    ADD COLUMN concurrency_key jsonpath,
    ADD COLUMN max_runs int CHECK (max_runs > 0),
    ADD COLUMN concurrency_strategy text CHECK (concurrency_strategy IN
                             ('group_round_robin', 'cancel_in_progress', 'cancel_newest')),
    ADD COLUMN rate_limits jsonb NOT NULL DEFAULT '[]',
    ADD COLUMN desired_labels jsonb NOT NULL DEFAULT '[]',
    ADD CHECK ((concurrency_key IS NULL) = (max_runs IS NULL)
               AND (max_runs IS NULL) = (concurrency_strategy IS NULL));
CREATE TABLE sluice.rate_limit (
    key        text PRIMARY KEY CHECK (key <> ''),
    max_units  int NOT NULL CHECK (max_units > 0),
    per        interval NOT NULL CHECK (per > '0'),
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE sluice.task_run
    ADD COLUMN concurrency_key text,
    ADD COLUMN rate_limit_keys text[],
    ADD COLUMN rate_limit_units int[],
    ADD COLUMN run_id bigint,
    ADD COLUMN step text,
    ADD COLUMN parent_id bigint,
    ADD COLUMN child_key text,
    ADD COLUMN rate_limited_at timestamptz;
CREATE UNIQUE INDEX task_run_child_idx ON sluice.task_run (parent_id, child_key)
    WHERE parent_id IS NOT NULL;
-- sluice.tasks gains the workflow and parent columns (at the end: replaced in place).
CREATE OR REPLACE VIEW sluice.tasks AS
SELECT t.id,
       t.task_name,
       t.status,
       t.attempt,
       t.priority,
       t.input,
       t.output,
       t.last_error,
       t.worker_id,
       w.name AS worker_name,
       t.idempotency_key,
       t.enqueued_at,
       t.run_at,
       t.assigned_at AS started_at,
       t.finished_at,
       t.failures,
       t.lost_attempts,
       t.run_id,
       t.step,
       t.parent_id,
       t.child_key
FROM sluice.task_run t
LEFT JOIN sluice.worker w ON w.id = t.worker_id;
-- define_task and register_worker gained parameters: the old signatures would stay as
-- overloads.
DROP FUNCTION sluice.define_task(text, int, float8, interval, interval, interval, int);
DROP FUNCTION sluice.register_worker(text, text[], int);
ALTER TABLE sluice.worker ADD COLUMN labels jsonb NOT NULL DEFAULT '{}';
-- sluice.workers gains the labels column (not at the end: recreated).
DROP VIEW sluice.workers;
CREATE VIEW sluice.workers AS
SELECT w.id,
       w.name,
       w.task_names,
       w.slots,
       coalesce(r.running, 0) AS running,
       w.labels,
       w.backend_pid,
       w.registered_at,
       w.last_heartbeat,
       w.stopped_at,
       w.stop_reason
FROM sluice.worker w
-- one pass over the unfinished tasks for all workers (no index by worker: see task_run)
LEFT JOIN (SELECT t.worker_id, count(*) AS running FROM sluice.task_run t
            WHERE t.finished_at IS NULL AND t.status = 'running'
            GROUP BY t.worker_id) r ON r.worker_id = w.id;
-- Per concurrency key with unfinished tasks: how many run and how many wait.
CREATE VIEW sluice.concurrency AS
SELECT t.task_name,
       t.concurrency_key AS key,
       d.max_runs,
       d.concurrency_strategy AS strategy,
       count(*) FILTER (WHERE t.status = 'running') AS running,
       count(*) FILTER (WHERE t.status = 'queued')  AS waiting
FROM (-- through the unfinished tasks' index (no index of its own: it would cost every
      -- keyed task more index writes)
      SELECT r.task_name, r.concurrency_key, r.status FROM sluice.task_run r
       WHERE r.finished_at IS NULL AND r.concurrency_key IS NOT NULL) t
LEFT JOIN sluice.task_definition d ON d.name = t.task_name
GROUP BY t.task_name, t.concurrency_key, d.max_runs, d.concurrency_strategy;

-- Per rate-limit key: every declared key, and each dynamic key with starts in its window.
-- Usage counts the starts (claims) of the last `per`, as the scheduler does after a restart.
CREATE VIEW sluice.rate_limits AS
WITH dynamic_spec AS (
    SELECT d.name AS task_name, s.pos, (s.spec->>'limit')::int AS max_units,
           (s.spec->>'per')::interval AS per
      FROM sluice.task_definition d
     CROSS JOIN LATERAL jsonb_array_elements(d.rate_limits) WITH ORDINALITY AS s(spec, pos)
     WHERE s.spec ? 'key_path'
), horizon AS (
    SELECT now() - greatest((SELECT max(l.per) FROM sluice.rate_limit l),
                            (SELECT max(ds.per) FROM dynamic_spec ds),
                            interval '0') AS since
), started AS (
    -- A start since the horizon is an unfinished task's, or a task's that finished after it:
    -- read through those two indexes (rate_limited_at has none, see sluice.task_run). Like
    -- sluice.concurrency, this reads every unfinished task (134 ms with 300,000 queued).
    SELECT u.key, u.units, u.pos, t.task_name, t.rate_limited_at AS started_at
      FROM (SELECT r.task_name, r.rate_limit_keys, r.rate_limit_units, r.rate_limited_at
              FROM sluice.task_run r
             WHERE r.finished_at IS NULL AND r.rate_limited_at > (SELECT since FROM horizon)
            UNION ALL
            SELECT r.task_name, r.rate_limit_keys, r.rate_limit_units, r.rate_limited_at
              FROM sluice.task_run r
             WHERE r.finished_at > (SELECT since FROM horizon)
               AND r.rate_limited_at > (SELECT since FROM horizon)) t
     CROSS JOIN LATERAL unnest(t.rate_limit_keys, t.rate_limit_units)
           WITH ORDINALITY AS u(key, units, pos)
), per_key AS (
    SELECT l.key, 'static' AS kind, l.max_units, l.per, s.units, s.started_at
      FROM sluice.rate_limit l
      LEFT JOIN started s ON s.key = l.key
    UNION ALL
    SELECT s.key, 'dynamic', ds.max_units, ds.per, s.units, s.started_at
      FROM started s
      JOIN dynamic_spec ds ON ds.task_name = s.task_name AND ds.pos = s.pos
     WHERE NOT EXISTS (SELECT 1 FROM sluice.rate_limit l WHERE l.key = s.key)
)
SELECT p.key,
       p.kind,
       p.max_units,
       p.per,
       greatest(p.max_units - coalesce(sum(p.units) FILTER (WHERE p.started_at > now() - p.per), 0),
                0)::int AS units_left,
       min(p.started_at) FILTER (WHERE p.started_at > now() - p.per) + p.per AS refills_at
FROM per_key p
GROUP BY p.key, p.kind, p.max_units, p.per
HAVING p.kind = 'static' OR count(p.started_at) FILTER (WHERE p.started_at > now() - p.per) > 0;

-- ---- copy of sql/api.sql ----
-- Sluice SQL API: task definitions, enqueue, cancel, and the worker protocol.
--
-- Included last (finalize) by the extension, after the Rust functions it calls:
--   sluice._wake_scheduler(runnable_from)
--                              wake the scheduler once the current transaction commits
--                              (through shared memory, never NOTIFY); runnable_from is the
--                              earliest run_at of tasks this transaction made queued, so the
--                              scheduler rereads from there; errors with SQLSTATE 55000 when
--                              the library is not in shared_preload_libraries.
--   sluice._definitions_changed()
--                              definitions changed in this transaction: refresh the cached ones
--                              at commit (never an error)
--   sluice._attempts_ended(task_ids, attempts)
--                              tell the scheduler at commit that these attempts ended
--   sluice._tasks_deleted()
--                              task rows were deleted: the scheduler compares its memory with
--                              the table at commit (never an error)
--   and, declared below as LANGUAGE c: sluice.enqueue (its common case), sluice.fetch_tasks
--   (takes the worker's assignments from shared memory, put back if the transaction aborts,
--   and claims them, in memory: extension/src/claims.rs), sluice.complete_many,
--   sluice._array_position.
--
-- Error codes callers can branch on:
--   42704 unknown task name            22023 invalid parameter value
--   22004 null where a value is needed P0002 no task with that id
--   55000 sluice is not preloaded      SL001 worker is not registered (stopped or unknown)
-- Postgres' own codes pass through, e.g. 22P02 (malformed JSON) and 22P05 (\u0000 in jsonb).

-- Definitions ---------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sluice.define_task(
    name              text,
    retries           int      DEFAULT 0,
    backoff_factor    float8   DEFAULT 2,
    backoff_max       interval DEFAULT '1 hour',
    execution_timeout interval DEFAULT '60 seconds',
    schedule_timeout  interval DEFAULT '5 minutes',
    priority          int      DEFAULT 1,
    concurrency_key   text     DEFAULT NULL,
    max_runs          int      DEFAULT NULL,
    concurrency_strategy text  DEFAULT NULL,
    rate_limits       jsonb    DEFAULT '[]',
    desired_labels    jsonb    DEFAULT '[]'
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    key_path jsonpath;
    spec     jsonb;
    n        int := 0;
BEGIN
    PERFORM sluice._require_preloaded();
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'task name must be a non-empty string, got %', coalesce(quote_literal(name), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF retries IS NULL OR retries < 0 THEN
        RAISE EXCEPTION 'retries must be >= 0, got % (task "%")', coalesce(retries::text, 'NULL'), name
            USING ERRCODE = '22023';
    END IF;
    IF backoff_factor IS NULL OR NOT (backoff_factor > 0) OR backoff_factor = 'Infinity' THEN
        RAISE EXCEPTION 'backoff_factor must be a positive finite number, got % (task "%")',
            coalesce(backoff_factor::text, 'NULL'), name
            USING ERRCODE = '22023';
    END IF;
    IF backoff_max IS NULL OR backoff_max < interval '0' THEN
        RAISE EXCEPTION 'backoff_max must be >= 0, got % (task "%")', coalesce(backoff_max::text, 'NULL'), name
            USING ERRCODE = '22023';
    END IF;
    IF execution_timeout IS NULL OR execution_timeout <= interval '0' THEN
        RAISE EXCEPTION 'execution_timeout must be positive, got % (task "%")',
            coalesce(execution_timeout::text, 'NULL'), name
            USING ERRCODE = '22023';
    END IF;
    IF schedule_timeout IS NULL OR schedule_timeout <= interval '0' THEN
        RAISE EXCEPTION 'schedule_timeout must be positive, got % (task "%")',
            coalesce(schedule_timeout::text, 'NULL'), name
            USING ERRCODE = '22023';
    END IF;
    IF priority IS NULL THEN
        RAISE EXCEPTION 'priority must not be NULL (task "%")', name USING ERRCODE = '22004';
    END IF;

    -- Concurrency: a key path and max_runs together; the strategy defaults to round robin.
    IF concurrency_key IS NOT NULL THEN
        key_path := sluice._parse_jsonpath(concurrency_key, 'concurrency_key', name);
        IF max_runs IS NULL OR max_runs <= 0 THEN
            RAISE EXCEPTION 'max_runs must be a positive number with a concurrency_key, got % (task "%")',
                coalesce(max_runs::text, 'NULL'), name
                USING ERRCODE = '22023';
        END IF;
        concurrency_strategy := coalesce(concurrency_strategy, 'group_round_robin');
        IF concurrency_strategy NOT IN ('group_round_robin', 'cancel_in_progress', 'cancel_newest') THEN
            RAISE EXCEPTION 'unknown concurrency_strategy %, expected group_round_robin, cancel_in_progress or cancel_newest (task "%")',
                quote_literal(concurrency_strategy), name
                USING ERRCODE = '22023';
        END IF;
    ELSIF max_runs IS NOT NULL OR concurrency_strategy IS NOT NULL THEN
        RAISE EXCEPTION 'max_runs and concurrency_strategy need a concurrency_key (a jsonpath over the input, e.g. ''$.user_id''; ''$.none'' gives every run the same key) (task "%")',
            name
            USING ERRCODE = '22023';
    END IF;

    -- Rate limits: see sluice.task_definition.rate_limits for the shape.
    IF rate_limits IS NULL OR jsonb_typeof(rate_limits) <> 'array' THEN
        RAISE EXCEPTION 'rate_limits must be a JSON array, got % (task "%")',
            coalesce(rate_limits::text, 'NULL'), name
            USING ERRCODE = '22023';
    END IF;
    FOR spec IN SELECT e FROM jsonb_array_elements(rate_limits) AS e LOOP
        n := n + 1;
        IF jsonb_typeof(spec) <> 'object' THEN
            RAISE EXCEPTION 'rate_limits[%] must be an object, got % (task "%")', n, spec, name
                USING ERRCODE = '22023';
        END IF;
        IF EXISTS (SELECT 1 FROM jsonb_object_keys(spec) AS k
                    WHERE k NOT IN ('key', 'key_path', 'units', 'units_path', 'limit', 'per')) THEN
            RAISE EXCEPTION 'rate_limits[%] has unknown fields: % (task "%"); expected key or key_path, units or units_path, and limit and per with key_path',
                n, spec, name
                USING ERRCODE = '22023';
        END IF;
        IF (spec ? 'key') = (spec ? 'key_path') THEN
            RAISE EXCEPTION 'rate_limits[%] needs exactly one of key (a declared limit) or key_path (a jsonpath over the input), got % (task "%")',
                n, spec, name
                USING ERRCODE = '22023';
        END IF;
        IF spec ? 'key' THEN
            IF jsonb_typeof(spec->'key') <> 'string'
               OR NOT EXISTS (SELECT 1 FROM sluice.rate_limit l WHERE l.key = spec->>'key') THEN
                RAISE EXCEPTION 'rate_limits[%]: no rate limit %, declare it first with sluice.set_rate_limit (task "%")',
                    n, spec->'key', name
                    USING ERRCODE = '42704';
            END IF;
            IF spec ? 'limit' OR spec ? 'per' THEN
                RAISE EXCEPTION 'rate_limits[%]: a declared key takes its limit from sluice.set_rate_limit, not from limit/per (task "%")',
                    n, name
                    USING ERRCODE = '22023';
            END IF;
        ELSE
            PERFORM sluice._parse_jsonpath(spec->>'key_path', format('rate_limits[%s].key_path', n), name);
            PERFORM sluice._check_limit(spec->'limit', spec->'per', format('rate_limits[%s]', n), name);
        END IF;
        IF spec ? 'units' AND spec ? 'units_path' THEN
            RAISE EXCEPTION 'rate_limits[%] has both units and units_path (task "%")', n, name
                USING ERRCODE = '22023';
        ELSIF spec ? 'units_path' THEN
            PERFORM sluice._parse_jsonpath(spec->>'units_path', format('rate_limits[%s].units_path', n), name);
        ELSIF spec ? 'units' AND NOT sluice._is_whole_number(spec->'units', 1, 2147483647) THEN
            RAISE EXCEPTION 'rate_limits[%].units must be a positive whole number, got % (task "%")',
                n, spec->'units', name
                USING ERRCODE = '22023';
        END IF;
    END LOOP;

    -- Placement: see sluice.task_definition.desired_labels for the shape.
    IF desired_labels IS NULL OR jsonb_typeof(desired_labels) <> 'array' THEN
        RAISE EXCEPTION 'desired_labels must be a JSON array, got % (task "%")',
            coalesce(desired_labels::text, 'NULL'), name
            USING ERRCODE = '22023';
    END IF;
    n := 0;
    FOR spec IN SELECT e FROM jsonb_array_elements(desired_labels) AS e LOOP
        n := n + 1;
        IF jsonb_typeof(spec) <> 'object'
           OR EXISTS (SELECT 1 FROM jsonb_object_keys(spec) AS k
                       WHERE k NOT IN ('label', 'value', 'required', 'weight'))
           OR jsonb_typeof(spec->'label') IS DISTINCT FROM 'string' OR spec->>'label' = ''
           OR jsonb_typeof(spec->'value') NOT IN ('string', 'number')
           OR jsonb_typeof(spec->'value') IS NULL
           OR (spec ? 'required' AND jsonb_typeof(spec->'required') <> 'boolean') THEN
            RAISE EXCEPTION 'desired_labels[%] must be {"label": name, "value": text or number, "required": bool, "weight": positive number}, got % (task "%")',
                n, spec, name
                USING ERRCODE = '22023';
        END IF;
        IF spec ? 'weight' AND NOT sluice._is_whole_number(spec->'weight', 1, 1000000) THEN
            RAISE EXCEPTION 'desired_labels[%].weight must be a whole number from 1 to 1000000, got % (task "%")',
                n, spec->'weight', name
                USING ERRCODE = '22023';
        END IF;
    END LOOP;

    INSERT INTO sluice.task_definition AS d
        (name, retries, backoff_factor, backoff_max, execution_timeout, schedule_timeout, priority,
         concurrency_key, max_runs, concurrency_strategy, rate_limits, desired_labels)
    VALUES ($1, $2, $3, $4, $5, $6, $7, key_path, $9, concurrency_strategy, $11, $12)
    ON CONFLICT ON CONSTRAINT task_definition_pkey DO UPDATE
        SET retries = excluded.retries,
            backoff_factor = excluded.backoff_factor,
            backoff_max = excluded.backoff_max,
            execution_timeout = excluded.execution_timeout,
            schedule_timeout = excluded.schedule_timeout,
            priority = excluded.priority,
            concurrency_key = excluded.concurrency_key,
            max_runs = excluded.max_runs,
            concurrency_strategy = excluded.concurrency_strategy,
            rate_limits = excluded.rate_limits,
            desired_labels = excluded.desired_labels,
            updated_at = now();
    PERFORM sluice._config_changed();
END
$$;

CREATE OR REPLACE FUNCTION sluice._parse_jsonpath(path text, what text, task text) RETURNS jsonpath
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF path IS NULL OR path = '' THEN
        RAISE EXCEPTION '% must be a jsonpath over the input, e.g. ''$.user_id'', got % (task "%")',
            what, coalesce(quote_literal(path), 'NULL'), task
            USING ERRCODE = '22023';
    END IF;
    RETURN path::jsonpath;
EXCEPTION WHEN syntax_error OR invalid_text_representation OR invalid_parameter_value THEN
    RAISE EXCEPTION '% is not a valid jsonpath: % (task "%")', what, quote_literal(path), task
        USING ERRCODE = '22023', DETAIL = SQLERRM;
END
$$;

-- Whether a JSON value is a whole number from lo to hi (false for NULL, strings, fractions).
CREATE OR REPLACE FUNCTION sluice._is_whole_number(v jsonb, lo numeric, hi numeric) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(v) IS DISTINCT FROM 'number' THEN false
                ELSE (v #>> '{}')::numeric = trunc((v #>> '{}')::numeric)
                     AND (v #>> '{}')::numeric BETWEEN lo AND hi END
$$;

CREATE OR REPLACE FUNCTION sluice._check_limit(max_units jsonb, per jsonb, what text, task text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    window_length interval;
BEGIN
    IF NOT sluice._is_whole_number(max_units, 1, 2147483647) THEN
        RAISE EXCEPTION '%.limit must be a positive whole number, got % (task "%")',
            what, coalesce(max_units::text, 'nothing'), task
            USING ERRCODE = '22023';
    END IF;
    BEGIN
        window_length := (per #>> '{}')::interval;
    EXCEPTION WHEN others THEN
        window_length := NULL;
    END;
    IF per IS NULL OR jsonb_typeof(per) <> 'string' OR window_length IS NULL
       OR window_length <= interval '0' THEN
        RAISE EXCEPTION '%.per must be a positive interval such as "1 minute", got % (task "%")',
            what, coalesce(per::text, 'nothing'), task
            USING ERRCODE = '22023';
    END IF;
END
$$;

-- Declares or changes a fleet-wide limit: at most max_units units per `per`, over any interval
-- of that length. A change applies to the scheduler's next assignment.
CREATE OR REPLACE FUNCTION sluice.set_rate_limit(key text, max_units int, per interval)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sluice._require_preloaded();
    IF key IS NULL OR key = '' THEN
        RAISE EXCEPTION 'rate limit key must be a non-empty string, got %', coalesce(quote_literal(key), 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF max_units IS NULL OR max_units <= 0 THEN
        RAISE EXCEPTION 'max_units must be positive, got % (rate limit "%")', coalesce(max_units::text, 'NULL'), key
            USING ERRCODE = '22023';
    END IF;
    IF per IS NULL OR per <= interval '0' THEN
        RAISE EXCEPTION 'per must be a positive interval, got % (rate limit "%")', coalesce(per::text, 'NULL'), key
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO sluice.rate_limit AS l (key, max_units, per) VALUES ($1, $2, $3)
    ON CONFLICT ON CONSTRAINT rate_limit_pkey DO UPDATE
        SET max_units = excluded.max_units, per = excluded.per, updated_at = now();
    PERFORM sluice._config_changed();
END
$$;

-- The text of a path's first match in the input (a string's own text, any other value's JSON),
-- or NULL when it matches nothing or null.
CREATE OR REPLACE FUNCTION sluice._path_text(input jsonb, path jsonpath) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN v IS NULL OR v = 'null'::jsonb THEN NULL
                WHEN jsonb_typeof(v) = 'string' THEN v #>> '{}'
                ELSE v::text END
      FROM jsonb_path_query_first(input, path, silent => true) AS v
$$;

-- A task's flow-control facts, evaluated once at enqueue: its concurrency key ('' when the
-- path matches nothing: one shared default key) and the key and units of each rate limit.
CREATE OR REPLACE FUNCTION sluice._flow(def sluice.task_definition, input jsonb,
                                        OUT concurrency_key text, OUT rate_limit_keys text[],
                                        OUT rate_limit_units int[])
LANGUAGE plpgsql STABLE AS $$
DECLARE
    spec      jsonb;
    key       text;
    units     int;
    units_raw jsonb;
    max_units int;
BEGIN
    IF def.concurrency_key IS NOT NULL THEN
        concurrency_key := coalesce(sluice._path_text(input, def.concurrency_key), '');
    END IF;
    IF jsonb_array_length(def.rate_limits) = 0 THEN
        RETURN;
    END IF;
    rate_limit_keys := '{}';
    rate_limit_units := '{}';
    FOR spec IN SELECT e FROM jsonb_array_elements(def.rate_limits) AS e LOOP
        IF spec ? 'key' THEN
            key := spec->>'key';
            SELECT l.max_units INTO max_units FROM sluice.rate_limit l WHERE l.key = spec->>'key';
        ELSE
            key := coalesce(sluice._path_text(input, (spec->>'key_path')::jsonpath), '');
            max_units := (spec->>'limit')::int;
        END IF;
        IF spec ? 'units_path' THEN
            units_raw := jsonb_path_query_first(input, (spec->>'units_path')::jsonpath, silent => true);
            IF NOT sluice._is_whole_number(units_raw, 1, 2147483647) THEN
                RAISE EXCEPTION 'rate limit units at % must be a positive whole number, got % (task "%")',
                    spec->>'units_path', coalesce(units_raw::text, 'nothing'), def.name
                    USING ERRCODE = '22023';
            END IF;
            units := (units_raw #>> '{}')::int;
        ELSE
            units := coalesce((spec->>'units')::int, 1);
        END IF;
        IF units > max_units THEN
            RAISE EXCEPTION 'a run of task "%" needs % units of rate limit "%", more than its limit of % per window',
                def.name, units, key, max_units
                USING ERRCODE = '22023';
        END IF;
        rate_limit_keys := rate_limit_keys || key;
        rate_limit_units := rate_limit_units || units;
    END LOOP;
END
$$;

-- Seconds to wait before retry number `failures` (1-based): min(backoff_max, factor ^ failures),
-- computed in log space so a large exponent caps at backoff_max instead of overflowing.
CREATE OR REPLACE FUNCTION sluice.retry_delay(backoff_factor float8, backoff_max interval, failures int)
RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN extract(epoch FROM backoff_max) <= 0 THEN interval '0'
        WHEN ln(backoff_factor) * failures >= ln(extract(epoch FROM backoff_max)) THEN backoff_max
        ELSE make_interval(secs => power(backoff_factor, failures))
    END
$$;

CREATE OR REPLACE FUNCTION sluice._definition(task text) RETURNS sluice.task_definition
LANGUAGE plpgsql STABLE AS $$
DECLARE
    def sluice.task_definition;
BEGIN
    IF task IS NULL THEN
        RAISE EXCEPTION 'task name must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT * INTO def FROM sluice.task_definition d WHERE d.name = task;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown task "%"', task
            USING ERRCODE = '42704',
                  HINT = 'Define it first with sluice.define_task(name => ...).';
    END IF;
    RETURN def;
END
$$;

-- Enqueue -------------------------------------------------------------------------------------

-- Enqueues a task; returns its id (with an idempotency key, the id of the unfinished task that
-- already holds the key, if one does). Implemented in Rust (extension/src/enqueue.rs): a task
-- without an idempotency key whose definition has no flow control is inserted there, with the
-- definition's priority and schedule timeout cached per session; every other call, and every
-- error, is sluice._enqueue_general's.
CREATE OR REPLACE FUNCTION sluice.enqueue(
    task            text,
    input           jsonb       DEFAULT '{}',
    run_at          timestamptz DEFAULT NULL,
    priority        int         DEFAULT NULL,
    idempotency_key text        DEFAULT NULL
) RETURNS bigint
LANGUAGE c AS 'MODULE_PATHNAME', 'sluice_enqueue';

-- sluice.enqueue's general path: the definition read from the table, flow control evaluated,
-- and the idempotency key honoured.
CREATE OR REPLACE FUNCTION sluice._enqueue_general(task text, input jsonb, run_at timestamptz,
                                                    priority int, idempotency_key text)
RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    def      sluice.task_definition;
    start_at timestamptz := coalesce(run_at, now());
    new_id   bigint;
    flow     record;
BEGIN
    def := sluice._definition(task);  -- raises for a NULL or unknown name
    IF input IS NULL THEN
        RAISE EXCEPTION 'input must not be NULL (task "%"); use ''{}'' for no input', task
            USING ERRCODE = '22004';
    END IF;
    IF def.concurrency_key IS NOT NULL OR def.rate_limits <> '[]' THEN
        SELECT * INTO flow FROM sluice._flow(def, input);
    ELSE
        SELECT NULL::text AS concurrency_key, NULL::text[] AS rate_limit_keys,
               NULL::int[] AS rate_limit_units INTO flow;
    END IF;

    LOOP
        INSERT INTO sluice.task_run
            (task_name, priority, input, run_at, schedule_deadline, idempotency_key,
             concurrency_key, rate_limit_keys, rate_limit_units)
        VALUES (task, coalesce(_enqueue_general.priority, def.priority), input, start_at,
                start_at + def.schedule_timeout, idempotency_key,
                flow.concurrency_key, flow.rate_limit_keys, flow.rate_limit_units)
        ON CONFLICT (task_name, idempotency_key)
            WHERE idempotency_key IS NOT NULL AND finished_at IS NULL
            DO NOTHING
        RETURNING id INTO new_id;
        IF new_id IS NOT NULL THEN
            PERFORM sluice._wake_scheduler(start_at);
            RETURN new_id;
        END IF;
        -- An unfinished task holds this key: return it. If it finished between the conflict
        -- and this read, the key is free again and the insert is retried.
        SELECT t.id INTO new_id FROM sluice.task_run t
         WHERE t.task_name = task AND t.idempotency_key = _enqueue_general.idempotency_key
           AND t.finished_at IS NULL;
        IF new_id IS NOT NULL THEN
            RETURN new_id;
        END IF;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION sluice.enqueue_many(task text, inputs jsonb[]) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    def      sluice.task_definition := sluice._definition(task);
    null_at  bigint;
BEGIN
    IF inputs IS NULL THEN
        RAISE EXCEPTION 'inputs must not be NULL (task "%")', task USING ERRCODE = '22004';
    END IF;
    SELECT i.n INTO null_at FROM unnest(inputs) WITH ORDINALITY AS i(input, n)
     WHERE i.input IS NULL LIMIT 1;
    IF null_at IS NOT NULL THEN
        RAISE EXCEPTION 'inputs[%] is NULL (task "%"); use ''{}'' for no input', null_at, task
            USING ERRCODE = '22004';
    END IF;
    IF cardinality(inputs) = 0 THEN
        RETURN;
    END IF;

    IF def.concurrency_key IS NOT NULL OR def.rate_limits <> '[]' THEN
        RETURN QUERY
        WITH inserted AS (
            INSERT INTO sluice.task_run (task_name, priority, input, run_at, schedule_deadline,
                                         concurrency_key, rate_limit_keys, rate_limit_units)
            SELECT task, def.priority, i.input, now(), now() + def.schedule_timeout,
                   f.concurrency_key, f.rate_limit_keys, f.rate_limit_units
              FROM unnest(inputs) WITH ORDINALITY AS i(input, n)
             CROSS JOIN LATERAL sluice._flow(def, i.input) AS f
             ORDER BY i.n
            RETURNING id
        )
        SELECT id FROM inserted ORDER BY id;
    ELSE
        RETURN QUERY
        WITH inserted AS (
            INSERT INTO sluice.task_run (task_name, priority, input, run_at, schedule_deadline)
            SELECT task, def.priority, i.input, now(), now() + def.schedule_timeout
              FROM unnest(inputs) WITH ORDINALITY AS i(input, n)
             ORDER BY i.n
            RETURNING id
        )
        SELECT id FROM inserted ORDER BY id;
    END IF;
    PERFORM sluice._wake_scheduler(now());
END
$$;

-- Cancel --------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sluice.cancel(task_id bigint) RETURNS boolean
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $$
DECLARE
    t sluice.task_run;
BEGIN
    PERFORM sluice._require_preloaded();
    SELECT * INTO t FROM sluice.task_run r WHERE r.id = task_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no task with id %', coalesce(task_id::text, 'NULL') USING ERRCODE = 'P0002';
    END IF;
    RETURN sluice._cancel(t, 'cancelled by sluice.cancel()');
END
$$;

-- Cancels victims of a concurrency strategy (the scheduler): rows locked by someone else
-- are skipped this time, the scheduler picks them again. Returns the ids cancelled.
CREATE OR REPLACE FUNCTION sluice._cancel_for_concurrency(task_ids bigint[], reasons text[])
RETURNS SETOF bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $$
DECLARE
    t sluice.task_run;
BEGIN
    IF cardinality(task_ids) = 0 THEN  -- never `id = ANY('{}')`: see _maintain
        RETURN;
    END IF;
    FOR t IN SELECT * FROM sluice.task_run r WHERE r.id = ANY(task_ids) ORDER BY r.id
               FOR UPDATE SKIP LOCKED LOOP
        IF sluice._cancel(t, reasons[sluice._array_position(task_ids, t.id)]) THEN
            RETURN NEXT t.id;
        END IF;
    END LOOP;
END
$$;

-- Cancels a queued or running task whose row the caller has locked.
CREATE OR REPLACE FUNCTION sluice._cancel(t sluice.task_run, reason text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF t.status NOT IN ('queued', 'running') THEN
        RETURN false;
    END IF;
    -- A queued row may be running under a claim held in memory: write it first.
    IF t.status = 'queued' AND sluice._settle_claims(ARRAY[t.id]) > 0 THEN
        SELECT * INTO t FROM sluice.task_run r WHERE r.id = t.id;
    END IF;
    IF t.status = 'queued' THEN
        -- It may be posted to a worker (not claimed yet): its slot is free again.
        PERFORM sluice._attempts_ended(ARRAY[t.id], ARRAY[t.attempt + 1]);
    ELSE
        INSERT INTO sluice.task_attempt (task_id, attempt, worker_id, assigned_at, outcome, error)
        VALUES (t.id, t.attempt, t.worker_id, t.assigned_at, 'cancelled', reason)
        ON CONFLICT DO NOTHING;
        -- The scheduler tells the worker, which fires the handler's cancellation signal.
        INSERT INTO sluice.worker_signal (worker_id) VALUES (t.worker_id);
        PERFORM sluice._attempts_ended(ARRAY[t.id], ARRAY[t.attempt]);
    END IF;
    UPDATE sluice.task_run
       SET status = 'cancelled', finished_at = now(), timeout_at = NULL, last_error = reason
     WHERE id = t.id;
    PERFORM sluice._wake_scheduler();
    RETURN true;
END
$$;

-- Attempt endings shared by workers and the scheduler -------------------------------------------

-- Ends attempt `t.attempt` of a running task (the caller holds the row lock) with a failure,
-- a timeout, or a lost worker, and either requeues it (after backoff) or fails it for good.
-- Lost attempts do not consume retries; past sluice.max_lost_attempts they fail the task
-- (only attempts the worker had fetched count: an unfetched one never started).
CREATE OR REPLACE FUNCTION sluice._end_attempt(t sluice.task_run, outcome text, error text, retryable boolean)
RETURNS sluice.task_status
LANGUAGE plpgsql AS $$
DECLARE
    def        sluice.task_definition;
    n_failures int := t.failures;
    n_lost     int := t.lost_attempts;
    max_lost   int := coalesce(nullif(current_setting('sluice.max_lost_attempts', true), '')::int, 5);
    delay      interval;
BEGIN
    INSERT INTO sluice.task_attempt (task_id, attempt, worker_id, assigned_at, outcome, error)
    VALUES (t.id, t.attempt, t.worker_id, t.assigned_at, outcome, error)
    ON CONFLICT DO NOTHING;
    PERFORM sluice._attempts_ended(ARRAY[t.id], ARRAY[t.attempt]);
    SELECT * INTO def FROM sluice.task_definition d WHERE d.name = t.task_name;

    IF def.name IS NULL THEN
        -- Its definition was deleted: nothing may run it again.
        error := format('%s; task definition "%s" no longer exists', error, t.task_name);
    ELSIF outcome = 'lost' THEN
        -- An attempt the worker never fetched never ran: requeue it without counting it.
        IF t.picked_at IS NOT NULL THEN
            n_lost := n_lost + 1;
        END IF;
        IF n_lost <= max_lost THEN
            delay := interval '0';
        ELSE
            error := format('%s (lost %s times, more than sluice.max_lost_attempts = %s)',
                            error, n_lost, max_lost);
        END IF;
    ELSE
        n_failures := n_failures + 1;
        IF retryable AND n_failures <= def.retries THEN
            delay := sluice.retry_delay(def.backoff_factor, def.backoff_max, n_failures);
        END IF;
    END IF;

    IF delay IS NULL THEN
        UPDATE sluice.task_run
           SET status = 'failed', failures = n_failures, lost_attempts = n_lost,
               last_error = error, finished_at = now(), timeout_at = NULL
         WHERE id = t.id;
        RETURN 'failed';
    END IF;

    UPDATE sluice.task_run
       SET status = 'queued', failures = n_failures, lost_attempts = n_lost, last_error = error,
           worker_id = NULL, assigned_at = NULL, picked_at = NULL, timeout_at = NULL,
           run_at = now() + delay,
           schedule_deadline = now() + delay + coalesce(def.schedule_timeout, interval '5 minutes')
     WHERE id = t.id;
    PERFORM sluice._wake_scheduler(now() + delay);
    RETURN 'queued';
END
$$;

-- Worker protocol -----------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION sluice.register_worker(name text, task_names text[], slots int,
                                                  labels jsonb DEFAULT '{}')
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    unknown  text;
    started  timestamptz;
    new_id   bigint;
BEGIN
    PERFORM sluice._require_preloaded();
    PERFORM sluice._check_labels(labels, format('worker "%s"', name));
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'worker name must be a non-empty string' USING ERRCODE = '22023';
    END IF;
    IF slots IS NULL OR slots <= 0 THEN
        RAISE EXCEPTION 'slots must be a positive number, got % (worker "%")',
            coalesce(slots::text, 'NULL'), name
            USING ERRCODE = '22023';
    END IF;
    IF task_names IS NULL OR cardinality(task_names) = 0 THEN
        RAISE EXCEPTION 'worker "%" must serve at least one task name', name USING ERRCODE = '22023';
    END IF;
    SELECT n INTO unknown FROM unnest(task_names) n
     WHERE NOT EXISTS (SELECT 1 FROM sluice.task_definition d WHERE d.name = n) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'unknown task "%" (worker "%")', coalesce(unknown, 'NULL'), name
            USING ERRCODE = '42704',
                  HINT = 'Define it first with sluice.define_task(name => ...).';
    END IF;

    SELECT a.backend_start INTO started FROM pg_stat_activity a WHERE a.pid = pg_backend_pid();
    INSERT INTO sluice.worker (name, task_names, slots, labels, backend_pid, backend_start)
    VALUES (name, (SELECT array_agg(DISTINCT n ORDER BY n) FROM unnest(task_names) n), slots,
            labels, pg_backend_pid(), coalesce(started, now()))
    RETURNING id INTO new_id;
    -- Not just a wake-up: the scheduler skips wake-ups while no worker has a free slot, and a
    -- new worker brings some (a changed configuration always makes it tick).
    PERFORM sluice._config_changed();
    RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION sluice._check_labels(labels jsonb, owner text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF labels IS NULL OR jsonb_typeof(labels) <> 'object'
       OR EXISTS (SELECT 1 FROM jsonb_each(labels) AS l
                   WHERE l.key = '' OR jsonb_typeof(l.value) NOT IN ('string', 'number')) THEN
        RAISE EXCEPTION 'labels must be a JSON object of non-empty names to text or numbers, got % (%)',
            coalesce(labels::text, 'NULL'), owner
            USING ERRCODE = '22023';
    END IF;
END
$$;

-- Replaces a live worker's labels; the next assignment uses them.
CREATE OR REPLACE FUNCTION sluice.set_worker_labels(worker_id bigint, labels jsonb) RETURNS void
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $$
DECLARE
    w sluice.worker := sluice._live_worker(worker_id);
BEGIN
    PERFORM sluice._check_labels(labels, format('worker %s', worker_id));
    UPDATE sluice.worker SET labels = set_worker_labels.labels WHERE id = w.id;
    PERFORM sluice._config_changed();  -- may open slots to tasks (see register_worker)
END
$$;

CREATE OR REPLACE FUNCTION sluice._live_worker(worker_id bigint) RETURNS sluice.worker
LANGUAGE plpgsql AS $$
DECLARE
    w sluice.worker;
BEGIN
    SELECT * INTO w FROM sluice.worker x WHERE x.id = worker_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'worker % is not registered', coalesce(worker_id::text, 'NULL')
            USING ERRCODE = 'SL001', HINT = 'Register again with sluice.register_worker(...).';
    END IF;
    IF w.stopped_at IS NOT NULL THEN
        RAISE EXCEPTION 'worker % was stopped at %: %', worker_id, w.stopped_at, w.stop_reason
            USING ERRCODE = 'SL001', HINT = 'Register again with sluice.register_worker(...).';
    END IF;
    RETURN w;
END
$$;

-- Records liveness, and returns which of the attempts the worker says it is running it should
-- stop (cancelled, timed out, or no longer its own).
CREATE OR REPLACE FUNCTION sluice.heartbeat(worker_id bigint, task_ids bigint[] DEFAULT '{}',
                                 attempts int[] DEFAULT '{}')
RETURNS SETOF bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    held_ids      bigint[];
    held_attempts int[];
BEGIN
    PERFORM sluice._live_worker(worker_id);
    IF cardinality(task_ids) IS DISTINCT FROM cardinality(attempts) THEN
        RAISE EXCEPTION 'task_ids and attempts must have the same length (% vs %)',
            cardinality(task_ids), cardinality(attempts) USING ERRCODE = '22023';
    END IF;
    UPDATE sluice.worker w SET last_heartbeat = now() WHERE w.id = heartbeat.worker_id;
    -- Never `id = ANY('{}')`: see _maintain.
    IF cardinality(task_ids) = 0 THEN
        RETURN;
    END IF;
    -- Claims held in memory (crate::claims) are read before the rows: one that leaves
    -- meanwhile was settled into its row, or ended, by a commit the rows' snapshot sees.
    SELECT array_agg(c.task_id), array_agg(c.attempt) INTO held_ids, held_attempts
      FROM sluice._claims(task_ids) c WHERE c.worker_id = heartbeat.worker_id;
    RETURN QUERY
    SELECT a.task_id
      FROM (SELECT u.task_id, u.attempt FROM unnest(task_ids, attempts) AS u(task_id, attempt)
            EXCEPT
            -- id = ANY: primary-key lookups, never a scan of every running task
            SELECT t.id, t.attempt FROM sluice.task_run t
             WHERE t.id = ANY(task_ids) AND t.worker_id = heartbeat.worker_id
               AND t.status::text = 'running'
            EXCEPT
            SELECT h.task_id, h.attempt FROM unnest(held_ids, held_attempts) AS h(task_id, attempt)
           ) a;
END
$$;

-- array_position() for the claim's and the completion's batches: the subscript of the first
-- element equal to id, found by a binary search over the array sorted once per statement
-- instead of a search from its start for every row (extension/src/array_position.rs).
CREATE OR REPLACE FUNCTION sluice._array_position(ids bigint[], id bigint) RETURNS int
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'sluice_array_position';

-- Writes the claims held in memory (extension/src/claims.rs) of these tasks into their rows, as
-- a claim in the row would have been: running, at the claimed attempt, under its worker, with
-- its times. Everything that must see a running attempt in its row (a failure, a cancel, a
-- durable step, a spawn, a lost worker, a timeout) calls this first. The claims leave memory
-- when the transaction commits; a claim whose row moved on (the attempt ended) leaves too.
-- Returns how many rows it wrote.
CREATE OR REPLACE FUNCTION sluice._settle_claims(task_ids bigint[]) RETURNS int
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $$
DECLARE
    ids      bigint[];
    attempts int[];
    written  int;
BEGIN
    IF coalesce(cardinality(task_ids), 0) = 0 THEN  -- never `id = ANY('{}')`: see _maintain
        RETURN 0;
    END IF;
    SELECT array_agg(c.task_id), array_agg(c.attempt) INTO ids, attempts
      FROM sluice._claims(task_ids) c;
    IF ids IS NULL THEN
        RETURN 0;
    END IF;
    UPDATE sluice.task_run t
       SET status = 'running', attempt = c.attempt, worker_id = c.worker_id,
           assigned_at = c.picked_at, picked_at = c.picked_at, timeout_at = c.timeout_at
      FROM sluice._claims(ids) c
     WHERE t.id = ANY(ids) AND t.id = c.task_id
       AND t.status::text = 'queued' AND t.attempt = c.attempt - 1;
    GET DIAGNOSTICS written = ROW_COUNT;
    PERFORM sluice._claims_settled(ids, attempts);
    RETURN written;
END
$$;

-- Hands the worker the tasks the scheduler assigned to it, at most max_tasks, and claims them:
-- each becomes running under this worker as a new attempt, and its execution timeout starts.
-- The scheduler posts assignments in shared memory (see extension/src/wake.rs) instead of
-- writing each row itself; an assignment whose task is no longer queued at the expected
-- attempt (cancelled meanwhile, or assigned twice after a scheduler restart) claims nothing.
--
-- The claim is held in shared memory, not written to the row (extension/src/claims.rs): the
-- fetch only reads the rows, which stay queued at the attempt before until the attempt ends;
-- sluice.tasks and the other views show such a task as running. Tasks with rate limits, and
-- claims beyond sluice.claims_in_memory, are claimed in the row:
--
--   UPDATE sluice.task_run t
--      SET status = 'running', attempt = t.attempt + 1, worker_id = <worker_id>,
--          assigned_at = now(), picked_at = now(), rate_limited_at = <now() if rate limited>,
--          timeout_at = now() + <the posted execution timeout, or the definition's>
--    WHERE t.id = ANY(<ids>) AND t.attempt = <the posted attempt> - 1
--      AND t.status::text = 'queued'
--
-- One primary-key lookup per id (no join the planner could turn into a scan); each row's
-- expected attempt and execution timeout (posted by the scheduler, which holds the
-- definitions: a join with task_definition was a third of this statement's cost per row) are
-- found by its position in the arrays.
--
-- The fetch's own commit does not wait for the disk (synchronous_commit off for the calling
-- transaction, which in the worker protocol is just this call): a crash can only lose claims,
-- whose tasks are then queued again, and a handler that ran on a claim lost that way is at
-- worst run again, which at-least-once allows. Completions stay durable.
CREATE OR REPLACE FUNCTION sluice.fetch_tasks(worker_id bigint, max_tasks int DEFAULT 100)
RETURNS TABLE (task_id bigint, attempt int, task_name text, input jsonb, timeout_at timestamptz)
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'sluice_fetch_tasks';

-- sluice.fetch_tasks for a worker with nothing in flight: waits until the scheduler has posted
-- assignments for the worker, or timeout_ms passes (kept below statement_timeout), then claims up
-- to max_tasks of them as sluice.fetch_tasks does and returns them as arrays (empty after a
-- timeout). The scheduler sets this backend's latch when the tick that assigned to the worker
-- commits, instead of notifying the worker's channel: the tick sends no NOTIFY, and the worker
-- gets its tasks in the answer to one statement. In Rust (extension/src/await_tasks.rs).
--
-- A procedure: it commits the transaction its CALL started before it waits, so a waiting
-- worker holds no snapshot and never holds back vacuum. It must therefore be CALLed outside a
-- transaction block (SQLSTATE 2D000 otherwise):
--   CALL sluice.await_tasks(worker_id, max_tasks, timeout_ms, NULL, NULL, NULL, NULL, NULL)
CREATE OR REPLACE PROCEDURE sluice.await_tasks(worker_id bigint, max_tasks int, timeout_ms int,
                                               OUT task_ids bigint[], OUT attempts int[],
                                               OUT task_names text[], OUT inputs jsonb[],
                                               OUT timeouts_at timestamptz[])
LANGUAGE c AS 'MODULE_PATHNAME', 'sluice_await_tasks';

-- Ends the worker's sluice.await_tasks wait, if one waits: it returns at once without claiming
-- anything. For a worker shutting down (from a second connection: its own is busy in the wait),
-- instead of cancelling the wait, which logs an ERROR. Returns whether one was waiting.
CREATE OR REPLACE FUNCTION sluice.end_wait(worker_id bigint)
RETURNS boolean
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'sluice_end_wait';

-- Completes attempts. Only the current attempt of a task, held by this worker, can complete: a
-- late or duplicate completion changes nothing and is left out of the result. Returns the ids
-- it completed.
--
-- In Rust (extension/src/complete.rs). An attempt claimed in memory by this worker is
-- completed with one update that writes the claim and the ending together (the row must still
-- be queued at the attempt before); one running in its row is completed if the row is running
-- at that attempt under this worker. Both are primary-key lookups, each row's attempt and
-- output found by its position in the arrays.
CREATE OR REPLACE FUNCTION sluice.complete_many(worker_id bigint, task_ids bigint[], attempts int[],
                                     outputs jsonb[])
RETURNS SETOF bigint
STRICT LANGUAGE c AS 'MODULE_PATHNAME', 'sluice_complete_many';

CREATE OR REPLACE FUNCTION sluice.complete(worker_id bigint, task_id bigint, attempt int,
                                output jsonb DEFAULT NULL)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT EXISTS (SELECT 1 FROM sluice.complete_many(worker_id, ARRAY[task_id], ARRAY[attempt],
                                                       ARRAY[output]))
$$;

-- Fails attempts. A retryable failure is retried after backoff while retries remain; a
-- non-retryable one fails the task at once. Returns the task ids whose attempt was current.
CREATE OR REPLACE FUNCTION sluice.fail_many(worker_id bigint, task_ids bigint[], attempts int[],
                                 errors text[], retryable boolean[] DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off
    SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    t    sluice.task_run;
    f    record;
BEGIN
    IF cardinality(task_ids) IS DISTINCT FROM cardinality(attempts)
       OR cardinality(task_ids) IS DISTINCT FROM cardinality(errors)
       OR (retryable IS NOT NULL AND cardinality(task_ids) IS DISTINCT FROM cardinality(retryable)) THEN
        RAISE EXCEPTION 'task_ids, attempts, errors and retryable must have the same length'
            USING ERRCODE = '22023';
    END IF;
    PERFORM sluice._settle_claims(task_ids);
    FOR f IN SELECT * FROM unnest(task_ids, attempts, errors,
                                  coalesce(retryable, array_fill(true, ARRAY[cardinality(task_ids)])))
                           AS x(task_id, attempt, error, retryable)
    LOOP
        SELECT * INTO t FROM sluice.task_run r
         WHERE r.id = f.task_id AND r.attempt = f.attempt
           AND r.worker_id = fail_many.worker_id AND r.status::text = 'running'
        FOR UPDATE;
        CONTINUE WHEN NOT FOUND;
        PERFORM sluice._end_attempt(t, 'failed', coalesce(f.error, 'failed without a message'),
                                    coalesce(f.retryable, true));
        RETURN NEXT t.id;
    END LOOP;
    PERFORM sluice._wake_scheduler();
END
$$;

CREATE OR REPLACE FUNCTION sluice.fail(worker_id bigint, task_id bigint, attempt int, error text,
                            retryable boolean DEFAULT true)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT EXISTS (SELECT 1 FROM sluice.fail_many(worker_id, ARRAY[task_id], ARRAY[attempt],
                                                   ARRAY[error], ARRAY[retryable]))
$$;

-- Stops the worker. Its unfinished tasks are given back (as lost attempts) by the scheduler,
-- which knows them from memory, within its next maintenance pass (100 ms), as for a worker
-- whose session ended: task_run has no index by worker (it would make every claim write index
-- entries; see sql/schema.sql), so finding them here would read every unfinished task.
CREATE OR REPLACE FUNCTION sluice.deregister_worker(worker_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sluice.worker w SET stopped_at = now(), stop_reason = 'deregistered'
     WHERE w.id = worker_id AND w.stopped_at IS NULL;
    IF FOUND THEN
        PERFORM sluice._config_changed();
    END IF;
END
$$;

-- The functions a worker calls per batch run with seqscans disabled (and so JIT off: a plan
-- made expensive by a disabled seqscan would be compiled): a queue table swings between empty
-- and full, and statistics taken while it was empty make a sequential scan look cheaper than
-- one primary-key lookup per id, which it is not once a bulk enqueue has refilled it. They
-- also plan each statement once (plan_cache_mode): with arrays as parameters the plan cache
-- kept making a custom plan per call, a third of a one-task fetch (~0.25 ms), which every
-- pickup waits for; with the settings above the generic plan is the same lookup by id.
--
-- The claim and the completion find each row's attempt (and output, timeout) by its position
-- in the arrays, with sluice._array_position(), a binary search over the array sorted once per
-- statement. Built-in array_position() searches the array from its start for every row:
-- quadratic in the batch, ~1 µs per row at 100, 4-7 µs at 500. A join with unnest() instead
-- (`UPDATE ... FROM unnest(ids, ...) WHERE t.id = u.id`) was 1.5x faster at 500 than
-- array_position(), but it leaves the plan to the statistics: for a table of a few rows the
-- planner drives a nested loop from a full scan of task_run, and a session keeps its generic
-- plan until the next analyze, so a worker that started on a near-empty table would scan all
-- of it for every batch after a bulk enqueue. With `id = ANY(...)` as well, it drives from
-- that scan and rescans the unnest() per row.
-- `id = ANY(...)` alone is a primary-key lookup per id whatever the statistics say.
--
-- Lookups by task id compare `status::text`, not `status`: a plain comparison once let the
-- planner prove a partial index's predicate on `status` and walk that whole index, including
-- every entry vacuum had not removed yet, instead of doing one primary-key lookup per id.

-- Scheduler maintenance -----------------------------------------------------------------------
--
-- Called by the scheduler (the background worker) at most every 100 ms, inside its tick's
-- transaction: first _stop_lost_workers, then _maintain with what its memory says is due. Each
-- phase runs in its own subtransaction, and rows are handled one at a time where one bad row
-- could otherwise fail a whole statement, so one malformed row never stops the scheduler.
--
-- Nothing here scans an index from its start: the candidates come from the scheduler's memory
-- (running attempts it assigned) or from a moving window, so dead index entries left behind
-- while a long transaction holds back vacuum are not walked over again and again.

-- Stops workers whose session ended or that stopped heartbeating (hb_timeout is
-- sluice.heartbeat_timeout). Their running tasks are requeued by _maintain.
CREATE OR REPLACE FUNCTION sluice._stop_lost_workers(hb_timeout interval) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    w record;
BEGIN
    FOR w IN
        SELECT x.id,
               CASE WHEN a.pid IS NULL THEN 'worker session ended'
                    ELSE format('no heartbeat for more than %s', hb_timeout) END AS reason
          FROM sluice.worker x
          LEFT JOIN pg_stat_activity a
            ON a.pid = x.backend_pid AND a.backend_start = x.backend_start
         WHERE x.stopped_at IS NULL
           AND (a.pid IS NULL OR x.last_heartbeat < now() - hb_timeout)
    LOOP
        UPDATE sluice.worker SET stopped_at = now(), stop_reason = w.reason WHERE id = w.id;
    END LOOP;
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'sluice scheduler: checking worker liveness failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
END
$$;

-- The lost running attempts among the given tasks (their worker stopped or gone), locked.
CREATE OR REPLACE FUNCTION sluice._lost_rows(task_ids bigint[]) RETURNS SETOF sluice.task_run
LANGUAGE sql AS $$
    SELECT r.* FROM sluice.task_run r
     WHERE r.id = ANY(task_ids) AND r.status::text = 'running'
       AND NOT EXISTS (SELECT 1 FROM sluice.worker x
                        WHERE x.id = r.worker_id AND x.stopped_at IS NULL)
       FOR UPDATE OF r SKIP LOCKED
$$;

CREATE OR REPLACE FUNCTION sluice._end_lost(t sluice.task_run) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sluice._end_attempt(t, 'lost',
        coalesce((SELECT format('worker %s (%s) lost: %s', x.id, x.name, x.stop_reason)
                    FROM sluice.worker x WHERE x.id = t.worker_id),
                 format('worker %s is gone', t.worker_id)), true);
END
$$;

-- The running attempts among the given tasks whose execution timeout has passed, locked.
CREATE OR REPLACE FUNCTION sluice._timed_out_rows(task_ids bigint[]) RETURNS SETOF sluice.task_run
LANGUAGE sql AS $$
    SELECT r.* FROM sluice.task_run r
     WHERE r.id = ANY(task_ids) AND r.status::text = 'running' AND r.timeout_at <= now()
       FOR UPDATE SKIP LOCKED
$$;

CREATE OR REPLACE FUNCTION sluice._end_timed_out(t sluice.task_run) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sluice._end_attempt(t, 'timed_out',
        format('execution timeout: attempt %s ran longer than %s', t.attempt,
               t.timeout_at - t.assigned_at), true);
END
$$;

-- lost_task_ids: running tasks (per the scheduler) whose worker is not live; timed_out_task_ids:
-- running tasks whose timeout_at has passed (per the scheduler); both are re-checked here.
-- purge_workers: also forget workers stopped more than a day ago. (Schedule timeouts come
-- from the scheduler's memory too: sluice._expire_queued.)
-- Returns the workers to notify that a running task of theirs must stop.
CREATE OR REPLACE FUNCTION sluice._maintain(lost_task_ids bigint[], timed_out_task_ids bigint[],
                                 purge_workers boolean)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    t   sluice.task_run;
BEGIN
    -- Phases 1 and 2 run only with ids to look up. With an empty array the planner proves
    -- `id = ANY('{}')` false, hence implying the predicate of any partial index, and may walk
    -- a whole one (every queued task) instead of the primary key: 150 ms per call at 1,000,000
    -- queued, every 100 ms.
    -- Each phase runs its rows in one subtransaction, and only if that fails row by row (one
    -- subtransaction each, a bad row quarantined): a subtransaction per row would give the
    -- tick hundreds of subtransaction ids when a worker with hundreds of tasks dies, more than
    -- a backend caches (64), which slows every other session's snapshots meanwhile.
    -- Attempts claimed in memory are written into their rows first (crate::claims).
    PERFORM sluice._settle_claims(lost_task_ids || timed_out_task_ids);
    -- 1. Running tasks whose worker is stopped or gone: the attempt is lost, the task requeued.
    IF cardinality(lost_task_ids) > 0 THEN
        BEGIN
            FOR t IN SELECT * FROM sluice._lost_rows(lost_task_ids) LOOP
                PERFORM sluice._end_lost(t);
            END LOOP;
        EXCEPTION WHEN OTHERS THEN
            FOR t IN SELECT * FROM sluice._lost_rows(lost_task_ids) LOOP
                BEGIN
                    PERFORM sluice._end_lost(t);
                EXCEPTION WHEN OTHERS THEN
                    PERFORM sluice._quarantine(t.id, SQLERRM);
                END;
            END LOOP;
        END;
    END IF;

    -- 2. Execution timeouts: a failure (retried while retries remain); the worker is told to
    -- stop (a worker listed twice after a retried batch is told once: the caller dedups).
    IF cardinality(timed_out_task_ids) > 0 THEN
        BEGIN
            FOR t IN SELECT * FROM sluice._timed_out_rows(timed_out_task_ids) LOOP
                PERFORM sluice._end_timed_out(t);
                RETURN NEXT t.worker_id;
            END LOOP;
        EXCEPTION WHEN OTHERS THEN
            FOR t IN SELECT * FROM sluice._timed_out_rows(timed_out_task_ids) LOOP
                BEGIN
                    PERFORM sluice._end_timed_out(t);
                    RETURN NEXT t.worker_id;
                EXCEPTION WHEN OTHERS THEN
                    PERFORM sluice._quarantine(t.id, SQLERRM);
                END;
            END LOOP;
        END;
    END IF;

    -- 3. Forget workers stopped long ago (their tasks were requeued in phase 1).
    IF purge_workers THEN
        BEGIN
            -- (the check reads the unfinished tasks, but only for the few workers stopped
            -- more than a day ago and not yet forgotten)
            DELETE FROM sluice.worker x
             WHERE x.stopped_at < now() - interval '1 day'
               AND NOT EXISTS (SELECT 1 FROM sluice.task_run r
                                WHERE r.finished_at IS NULL AND r.worker_id = x.id
                                  AND r.status = 'running');
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'sluice scheduler: purging stopped workers failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
        END;
    END IF;

    -- 4. Signals queued by cancel().
    RETURN QUERY DELETE FROM sluice.worker_signal RETURNING worker_id;
END
$$;

-- Schedule timeouts: cancels those of the given tasks that are still queued past their
-- schedule deadline (the scheduler knows the deadlines of the tasks waiting in its memory, so
-- no index of queued tasks by deadline is kept). Rows locked by someone are left for the next
-- call. Returns every given task that exists, with its status and deadline after this.
CREATE OR REPLACE FUNCTION sluice._expire_queued(task_ids bigint[])
RETURNS TABLE (task_id bigint, status text, schedule_deadline timestamptz)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $$
#variable_conflict use_column
DECLARE
    expired bigint[];
BEGIN
    IF cardinality(task_ids) = 0 THEN  -- never `id = ANY('{}')`: see _maintain
        RETURN;
    END IF;
    BEGIN
        SELECT array_agg(q.id) INTO expired FROM (
            SELECT q.id FROM sluice.task_run q
             WHERE q.id = ANY(task_ids) AND q.status::text = 'queued'
               AND q.schedule_deadline < now()
               -- an attempt claimed in memory has started: its deadline no longer applies
               AND q.id <> ALL(ARRAY(SELECT c.task_id FROM sluice._claims(task_ids) c))
               FOR UPDATE SKIP LOCKED) q;
        IF expired IS NOT NULL THEN
            UPDATE sluice.task_run r
               SET status = 'cancelled', finished_at = now(),
                   last_error = format('schedule timeout: not started within %s of %s',
                                       r.schedule_deadline - r.run_at, r.run_at)
             WHERE r.id = ANY(expired);
        END IF;
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'sluice scheduler: schedule timeouts failed: % (SQLSTATE %)', SQLERRM, SQLSTATE;
    END;
    RETURN QUERY
    SELECT r.id, r.status::text, r.schedule_deadline FROM sluice.task_run r
     WHERE r.id = ANY(task_ids);
END
$$;

-- Deletes finished tasks (and their attempts) that finished before the cutoffs, oldest first,
-- at most max_rows per status; a NULL cutoff keeps that kind. Each status is read from
-- `after` on (its element: succeeded, failed, cancelled), where the scheduler's previous call
-- ended: under a held xmin horizon the rows deleted before stay in the index until vacuum can
-- remove them, and starting from the oldest every time would walk them all, every call. Rows
-- someone holds are left for the next pass. Returns, per status, how many went and where the
-- next call may start: the finish time of the last one, or the cutoff when fewer than max_rows
-- were due (every row of that status before it is gone; rows of other statuses in between, such
-- as failed tasks kept longer than succeeded ones, are not walked again).
--
-- No row locks before the delete (FOR UPDATE would write every row twice): the delete locks
-- each row itself, and a row someone else holds makes it give up after lock_timeout (the
-- scheduler must not wait on a user's transaction); the batch is tried again later.
CREATE OR REPLACE FUNCTION sluice._purge_finished(succeeded_before timestamptz,
                                                  failed_before timestamptz,
                                                  after timestamptz[], max_rows int)
RETURNS TABLE (status text, deleted int, reached timestamptz)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off SET lock_timeout = '50ms' AS $$
#variable_conflict use_column
DECLARE
    kinds  sluice.task_status[] := ARRAY['succeeded', 'failed', 'cancelled'];
    before timestamptz;
    ids    bigint[];
    with_attempts bigint[];
    last   timestamptz;
    n      int;
BEGIN
    FOR i IN 1 .. 3 LOOP
        before := CASE WHEN i = 1 THEN succeeded_before ELSE failed_before END;
        CONTINUE WHEN before IS NULL;
        BEGIN
            -- Attempt rows exist only for attempts that ended without success.
            SELECT array_agg(x.id), max(x.finished_at), count(*),
                   array_agg(x.id) FILTER (WHERE x.failures + x.lost_attempts > 0
                                              OR x.status <> 'succeeded')
              INTO ids, last, n, with_attempts FROM (
                SELECT t.id, t.finished_at, t.failures, t.lost_attempts, t.status
                  FROM sluice.task_run t
                 WHERE t.finished_at IS NOT NULL AND t.finished_at < before
                   AND t.finished_at >= coalesce(after[i], '-infinity')
                   AND t.status = kinds[i]
                 ORDER BY t.finished_at LIMIT max_rows) x;
            IF n < max_rows THEN
                last := before;
            END IF;
            IF ids IS NOT NULL THEN  -- never `id = ANY('{}')`: see _maintain
                IF with_attempts IS NOT NULL THEN
                    DELETE FROM sluice.task_attempt a WHERE a.task_id = ANY(with_attempts);
                END IF;
                -- Durable tasks' records (sql/durable.sql); most installs have none at all.
                IF EXISTS (SELECT 1 FROM sluice.durable_step) THEN
                    DELETE FROM sluice.durable_step d WHERE d.task_id = ANY(ids);
                END IF;
                DELETE FROM sluice.task_run t WHERE t.id = ANY(ids) AND t.status = kinds[i];
                GET DIAGNOSTICS n = ROW_COUNT;
            END IF;
            status := kinds[i]::text;
            deleted := n;
            reached := last;
            RETURN NEXT;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'sluice scheduler: deleting finished tasks failed: % (SQLSTATE %)',
                SQLERRM, SQLSTATE;
        END;
    END LOOP;
END
$$;

-- Last resort for a row the scheduler cannot process: fail it with the error, so it neither
-- blocks the queue nor is retried forever.
CREATE OR REPLACE FUNCTION sluice._quarantine(task_id bigint, error text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE WARNING 'sluice scheduler: task % could not be processed and is failed: %', task_id, error;
    UPDATE sluice.task_run
       SET status = 'failed', finished_at = now(), timeout_at = NULL,
           last_error = 'scheduler could not process this task: ' || error
     WHERE id = task_id;
END
$$;

-- Deleting a definition fails its queued tasks at once, in the same transaction: no worker can
-- register for that name any more, so they could only wait for their schedule timeout. Running
-- ones finish or fail normally and are never requeued (see _end_attempt).
CREATE OR REPLACE FUNCTION sluice._fail_tasks_of_deleted_definitions() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Attempts claimed in memory are running, though their rows still say queued: written into
    -- their rows first, they finish or fail as running ones do.
    PERFORM sluice._settle_claims(ARRAY(
        SELECT c.task_id FROM sluice._claims() c
          JOIN sluice.task_run t ON t.id = c.task_id
          JOIN deleted d ON d.name = t.task_name));
    UPDATE sluice.task_run t
       SET status = 'failed', finished_at = now(),
           last_error = format('task definition "%s" no longer exists', t.task_name)
      FROM deleted d
     WHERE t.task_name = d.name AND t.finished_at IS NULL AND t.status = 'queued';
    PERFORM sluice._config_changed();
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER fail_tasks_of_deleted_definitions
    AFTER DELETE ON sluice.task_definition
    REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION sluice._fail_tasks_of_deleted_definitions();

-- Definitions edited directly (not through define_task) reach the scheduler and every session's
-- cache of them (sluice.enqueue) at commit, as the API's changes do. Never an error: a restore
-- of the table's rows needs no scheduler.
CREATE OR REPLACE FUNCTION sluice._definitions_edited() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sluice._definitions_changed();
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER definitions_edited
    AFTER INSERT OR UPDATE OR TRUNCATE ON sluice.task_definition
    FOR EACH STATEMENT EXECUTE FUNCTION sluice._definitions_edited();

-- Task rows deleted or truncated directly (the API cancels instead): the scheduler compares the
-- queue in its memory with the table once this commits, instead of at its next periodic sweep
-- (up to a minute), during which it would hand workers tasks that are gone (their claims find
-- nothing, and each holds a slot until the once-a-second check of running attempts). Per
-- statement, not per row: a delete of a million rows costs one call. The scheduler's own
-- retention purge, which deletes finished tasks only, does not count.
CREATE OR REPLACE FUNCTION sluice._task_rows_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sluice._tasks_deleted();
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER task_rows_deleted
    AFTER DELETE OR TRUNCATE ON sluice.task_run
    FOR EACH STATEMENT EXECUTE FUNCTION sluice._task_rows_deleted();

-- Views over tasks ---------------------------------------------------------------------------
-- A task claimed in memory (extension/src/claims.rs) is still queued at the attempt before in
-- its row until the attempt ends or is settled; these views show it running, as its claim has
-- it. (sluice.task_attempts lists such an attempt once it has ended.)

-- A task, with its workflow run and step, or its parent and key, if it has them.
-- Claims are few (one per running task) and cheap to list: estimated as such, a view's
-- per-row lookup of a claimed row's worker is not costed as a full listing per row (which
-- turned JIT on for a scan of sluice.tasks).
ALTER FUNCTION sluice._claims(bigint[]) ROWS 10;

-- The views overlay the claims held in memory (extension/src/claims.rs): a row queued at the
-- attempt before a claim's is running on that claim. The test is written out in each view as
--   t.status = 'queued' AND (t.id, t.attempt + 1) IN (SELECT task_id, attempt FROM sluice._claims())
-- which Postgres runs as a hashed subplan: the claims are read once per statement and each
-- queued row costs a hash probe, whatever the planner estimates. (A join with _claims() became
-- a nested loop over every claim per row when the table's statistics were stale; a SQL
-- function holding the test is not inlined because of the subquery, so it would read the
-- claims once per row.)
CREATE OR REPLACE VIEW sluice.tasks AS
SELECT t.id,
       t.task_name,
       CASE WHEN t.claimed THEN 'running' ELSE t.status END AS status,
       CASE WHEN t.claimed THEN t.attempt + 1 ELSE t.attempt END AS attempt,
       t.priority,
       t.input,
       t.output,
       t.last_error,
       t.worker_id,
       w.name AS worker_name,
       t.idempotency_key,
       t.enqueued_at,
       t.run_at,
       t.started_at,
       t.finished_at,
       t.failures,
       t.lost_attempts,
       t.run_id,
       t.step,
       t.parent_id,
       t.child_key
FROM (SELECT r.id, r.task_name, r.status, r.attempt, r.priority, r.input, r.output,
             r.last_error, r.idempotency_key, r.enqueued_at, r.run_at, r.finished_at,
             r.failures, r.lost_attempts, r.run_id, r.step, r.parent_id, r.child_key,
             r.status = 'queued' AND (r.id, r.attempt + 1) IN (SELECT c.task_id, c.attempt FROM sluice._claims() c) AS claimed,
             -- the claim's worker and time, looked up only for a claimed row
             CASE WHEN r.status = 'queued' AND (r.id, r.attempt + 1) IN (SELECT c.task_id, c.attempt FROM sluice._claims() c)
                  THEN (SELECT c.worker_id FROM sluice._claims(ARRAY[r.id]) c)
                  ELSE r.worker_id END AS worker_id,
             CASE WHEN r.status = 'queued' AND (r.id, r.attempt + 1) IN (SELECT c.task_id, c.attempt FROM sluice._claims() c)
                  THEN (SELECT c.picked_at FROM sluice._claims(ARRAY[r.id]) c)
                  ELSE r.assigned_at END AS started_at
        FROM sluice.task_run r) t
LEFT JOIN sluice.worker w ON w.id = t.worker_id;

-- Every attempt of every task: the ended ones from sluice.task_attempt, each task's current or
-- final attempt from sluice.task_run, and the attempts running on claims held in memory (their
-- rows are still queued at the attempt before).
CREATE OR REPLACE VIEW sluice.task_attempts AS
SELECT a.task_id, a.attempt, a.worker_id, a.assigned_at AS started_at, a.finished_at,
       a.outcome, a.error
FROM sluice.task_attempt a
UNION ALL
SELECT t.id, t.attempt, t.worker_id, t.assigned_at, t.finished_at,
       t.status::text,
       CASE WHEN t.status IN ('failed', 'cancelled') THEN t.last_error END
FROM sluice.task_run t
WHERE t.attempt > 0
  AND NOT EXISTS (SELECT 1 FROM sluice.task_attempt a
                   WHERE a.task_id = t.id AND a.attempt = t.attempt)
UNION ALL
SELECT c.task_id, c.attempt, c.worker_id, c.picked_at, NULL, 'running', NULL
FROM sluice._claims() c
JOIN sluice.task_run t ON t.id = c.task_id AND t.status = 'queued' AND t.attempt = c.attempt - 1;

CREATE OR REPLACE VIEW sluice.queue_stats AS
SELECT t.task_name,
       count(*) FILTER (WHERE t.status = 'queued' AND NOT t.claimed) AS queued,
       count(*) FILTER (WHERE t.status = 'running' OR t.claimed) AS running,
       count(*) FILTER (WHERE t.status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE t.status = 'failed')    AS failed,
       count(*) FILTER (WHERE t.status = 'cancelled') AS cancelled,
       now() - min(t.run_at) FILTER (WHERE t.status = 'queued' AND NOT t.claimed
                                       AND t.run_at <= now())
           AS oldest_queued_age
FROM (SELECT r.task_name, r.status, r.run_at, r.status = 'queued' AND (r.id, r.attempt + 1) IN (SELECT c.task_id, c.attempt FROM sluice._claims() c) AS claimed
        FROM sluice.task_run r) t
GROUP BY t.task_name;

CREATE OR REPLACE VIEW sluice.workers AS
SELECT w.id,
       w.name,
       w.task_names,
       w.slots,
       coalesce(r.running, 0) + coalesce(m.running, 0) AS running,
       w.labels,
       w.backend_pid,
       w.registered_at,
       w.last_heartbeat,
       w.stopped_at,
       w.stop_reason
FROM sluice.worker w
-- one pass over the unfinished tasks for all workers (no index by worker: see task_run)
LEFT JOIN (SELECT t.worker_id, count(*) AS running FROM sluice.task_run t
            WHERE t.finished_at IS NULL AND t.status = 'running'
            GROUP BY t.worker_id) r ON r.worker_id = w.id
LEFT JOIN (SELECT c.worker_id, count(*) AS running FROM sluice._claims() c
            GROUP BY c.worker_id) m ON m.worker_id = w.id;

-- Per concurrency key with unfinished tasks: how many run and how many wait.
CREATE OR REPLACE VIEW sluice.concurrency AS
SELECT t.task_name,
       t.concurrency_key AS key,
       d.max_runs,
       d.concurrency_strategy AS strategy,
       count(*) FILTER (WHERE t.status = 'running') AS running,
       count(*) FILTER (WHERE t.status = 'queued')  AS waiting
FROM (-- through the unfinished tasks' index (no index of its own: it would cost every
      -- keyed task more index writes)
      SELECT r.task_name, r.concurrency_key,
             CASE WHEN r.status = 'queued' AND (r.id, r.attempt + 1) IN (SELECT c.task_id, c.attempt FROM sluice._claims() c)
                  THEN 'running' ELSE r.status END AS status
        FROM sluice.task_run r
       WHERE r.finished_at IS NULL AND r.concurrency_key IS NOT NULL) t
LEFT JOIN sluice.task_definition d ON d.name = t.task_name
GROUP BY t.task_name, t.concurrency_key, d.max_runs, d.concurrency_strategy;
-- ---- copy of sql/workflows.sql ----
-- Workflows: DAGs of task runs.
--
-- A workflow definition is a versioned spec: steps, each running a task definition once its
-- parents have finished. A run records one row per step (sluice.workflow_step); a step whose
-- parents are all done becomes a task run (task_run.run_id / .step) whose input is
--   {"input": <the run's input>, "parents": {"<parent>": <its output>, ...},
--    "skipped": ["<parent that was skipped>", ...]}
-- The step's task finishing (succeeded, failed for good, cancelled), by whatever path, fires
-- a trigger on task_run that records the outcome in the same transaction (a rolled-back
-- completion records nothing); the scheduler applies outcomes one at a time, deleting each in
-- the transaction that applies it: children whose parents are all done start, a failure fails
-- the run and cancels what can no longer run. So a run advances exactly once per outcome.
--
-- Included after api.sql (it uses sluice._definition, sluice._flow, sluice._cancel).

CREATE TABLE sluice.workflow_definition (
    name       text NOT NULL CHECK (name <> ''),
    version    int NOT NULL CHECK (version > 0),
    -- normalized by sluice.define_workflow: {"steps": [{"name", "task", "parents",
    -- "children", "skip_if", "wait_for", "cancel_if"}, ...], "on_failure": task,
    -- "on_success": task,
    -- "concurrency": {"key": jsonpath, "max_runs": n, "strategy": ...}} (the last three
    -- optional)
    spec       jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

CREATE TABLE sluice.workflow_run (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow    text NOT NULL,
    version     int NOT NULL,
    -- queued while its concurrency key is full, running until every step is done (or one
    -- failed: failed; cancel_run: cancelled)
    status      sluice.task_status NOT NULL DEFAULT 'queued',
    input       jsonb NOT NULL,
    -- the workflow's concurrency key for this run (its spec's "concurrency"), else NULL
    concurrency_key text,
    -- the outputs of the leaf steps, by step name
    output      jsonb,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    -- A child run spawned by a running task (sluice.spawn_workflow): the parent task and the
    -- child's key, unique per parent.
    parent_id   bigint,
    child_key   text,
    -- A scheduled run (sluice.run_workflow's run_at): queued and not started before this; NULL
    -- once started (sluice._fire_timers) or for a run started at once.
    run_at      timestamptz,
    FOREIGN KEY (workflow, version) REFERENCES sluice.workflow_definition (name, version)
);
CREATE UNIQUE INDEX workflow_run_child_idx ON sluice.workflow_run (parent_id, child_key)
    WHERE parent_id IS NOT NULL;
CREATE INDEX workflow_run_workflow_idx ON sluice.workflow_run (workflow, created_at);
-- Finished runs by status and age, for retention (sluice._purge_finished_runs).
CREATE INDEX workflow_run_finished_idx ON sluice.workflow_run (status, finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled');
-- Scheduled runs by start time (sluice._fire_timers starts them).
CREATE INDEX workflow_run_scheduled_idx ON sluice.workflow_run (run_at) WHERE run_at IS NOT NULL;
-- Runs holding or waiting for a place of their workflow's concurrency key.
CREATE INDEX workflow_run_concurrency_idx ON sluice.workflow_run (workflow, concurrency_key, id)
    WHERE concurrency_key IS NOT NULL AND status IN ('queued', 'running');

CREATE TABLE sluice.workflow_step (
    run_id       bigint NOT NULL REFERENCES sluice.workflow_run (id) ON DELETE CASCADE,
    step         text NOT NULL,
    -- pending: waiting for parents; waiting: for its conditions (sql/conditions.sql);
    -- started: its task run exists (task_id); then its outcome
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'waiting', 'started', 'succeeded', 'failed',
                                   'skipped', 'cancelled')),
    parents_left int NOT NULL,
    task_id      bigint,
    output       jsonb,
    error        text,
    started_at   timestamptz,
    finished_at  timestamptz,
    -- while waiting: the input its task will get (its conditions' filters read it too)
    envelope     jsonb,
    PRIMARY KEY (run_id, step)
);

-- Definition --------------------------------------------------------------------------------

-- Defines (or redefines) a workflow. spec:
--   {"steps": [{"name": "validate", "task": "validate_media"},
--              {"name": "thumbs", "task": "make_thumbnails", "parents": ["validate"]},
--              {"name": "persist", "task": "persist", "parents": ["thumbs"],
--               "skip_if": "$.parents.thumbs.count == 0", "wait_for": "5 seconds"},
--              {"name": "publish", "task": "publish", "parents": ["persist"],
--               "wait_for": {"event": "media:approved", "filter": "$.id == $input.id"},
--               "cancel_if": [{"any": ["2 days", {"event": "media:rejected"}]}]}],
--    "on_failure": "cleanup_task", "on_success": "notify_task"}
-- Every task must be defined (sluice.define_task). A spec equal to the latest version's returns
-- that version; a different one creates the next version (runs in flight keep theirs).
-- Returns the version.
CREATE OR REPLACE FUNCTION sluice.define_workflow(name text, spec jsonb) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    wf        text := define_workflow.name;
    steps     jsonb := spec->'steps';
    step      jsonb;
    i         int;
    names     text[] := '{}';
    step_name text;
    parent    text;
    norm      jsonb := '[]';
    extra     text;
    ordered   text[];
    normalized jsonb;
    latest    sluice.workflow_definition;
BEGIN
    IF wf IS NULL OR wf = '' THEN
        RAISE EXCEPTION 'workflow name must be a non-empty string' USING ERRCODE = '22023';
    END IF;
    IF spec IS NULL OR jsonb_typeof(spec) <> 'object' THEN
        RAISE EXCEPTION 'workflow "%": spec must be a JSON object with "steps", got %', wf,
            coalesce(spec::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    SELECT string_agg(k, ', ') INTO extra FROM jsonb_object_keys(spec) AS k
     WHERE k NOT IN ('steps', 'on_failure', 'on_success', 'concurrency', 'crons', 'on_events');
    IF extra IS NOT NULL THEN
        RAISE EXCEPTION 'workflow "%": unknown spec key(s) %', wf, extra
            USING ERRCODE = '22023',
                  HINT = 'Known keys: steps, on_failure, on_success, concurrency.';
    END IF;
    IF spec ? 'concurrency' THEN
        PERFORM sluice._check_workflow_concurrency(spec->'concurrency', wf);
    END IF;
    IF steps IS NULL OR jsonb_typeof(steps) <> 'array' OR jsonb_array_length(steps) = 0 THEN
        RAISE EXCEPTION 'workflow "%": "steps" must be a non-empty array', wf
            USING ERRCODE = '22023';
    END IF;

    -- Names first, so parents can be checked against all of them.
    FOR i IN 0 .. jsonb_array_length(steps) - 1 LOOP
        step := steps->i;
        IF jsonb_typeof(step) IS DISTINCT FROM 'object' THEN
            RAISE EXCEPTION 'workflow "%": step % must be an object, got %', wf, i + 1, step
                USING ERRCODE = '22023';
        END IF;
        step_name := step->>'name';
        IF jsonb_typeof(step->'name') IS DISTINCT FROM 'string' OR step_name = '' THEN
            RAISE EXCEPTION 'workflow "%": step % has no name', wf, i + 1
                USING ERRCODE = '22023';
        END IF;
        IF step_name = ANY(names) THEN
            RAISE EXCEPTION 'workflow "%": duplicate step name "%"', wf, step_name
                USING ERRCODE = '22023';
        END IF;
        names := names || step_name;
    END LOOP;

    FOR i IN 0 .. jsonb_array_length(steps) - 1 LOOP
        step := steps->i;
        step_name := step->>'name';
        SELECT string_agg(k, ', ') INTO extra FROM jsonb_object_keys(step) AS k
         WHERE k NOT IN ('name', 'task', 'parents', 'skip_if', 'wait_for', 'cancel_if');
        IF extra IS NOT NULL THEN
            RAISE EXCEPTION 'workflow "%": step "%" has unknown key(s) %', wf, step_name, extra
                USING ERRCODE = '22023',
                      HINT = 'Known keys: name, task, parents, skip_if, wait_for, cancel_if.';
        END IF;
        IF jsonb_typeof(step->'task') IS DISTINCT FROM 'string' OR step->>'task' = '' THEN
            RAISE EXCEPTION 'workflow "%": step "%" has no task', wf, step_name
                USING ERRCODE = '22023',
                      HINT = 'Give each step "task": the name of a task defined with sluice.define_task.';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM sluice.task_definition d WHERE d.name = step->>'task') THEN
            RAISE EXCEPTION 'workflow "%": step "%" runs unknown task "%"', wf, step_name,
                step->>'task'
                USING ERRCODE = '42704', HINT = 'Define it first with sluice.define_task.';
        END IF;
        IF step ? 'parents' AND (jsonb_typeof(step->'parents') <> 'array'
               OR EXISTS (SELECT 1 FROM jsonb_array_elements(step->'parents') p
                           WHERE jsonb_typeof(p) <> 'string')) THEN
            RAISE EXCEPTION 'workflow "%": step "%": "parents" must be an array of step names, got %',
                wf, step_name, step->'parents' USING ERRCODE = '22023';
        END IF;
        FOR parent IN SELECT jsonb_array_elements_text(coalesce(step->'parents', '[]')) LOOP
            IF NOT parent = ANY(names) THEN
                RAISE EXCEPTION 'workflow "%": step "%" has unknown parent "%"', wf, step_name,
                    parent USING ERRCODE = '22023';
            END IF;
            IF parent = step_name THEN
                RAISE EXCEPTION 'workflow "%": step "%" is its own parent', wf, step_name
                    USING ERRCODE = '22023';
            END IF;
        END LOOP;
        IF step ? 'skip_if' THEN
            IF jsonb_typeof(step->'skip_if') <> 'string' THEN
                RAISE EXCEPTION 'workflow "%": step "%": skip_if must be a jsonpath predicate (a string), got %',
                    wf, step_name, step->'skip_if' USING ERRCODE = '22023';
            END IF;
            PERFORM sluice._workflow_jsonpath(step->>'skip_if', wf, step_name, 'skip_if');
        END IF;
        -- wait_for and cancel_if: sleeps and events, see sql/conditions.sql
        norm := norm || jsonb_build_array(jsonb_strip_nulls(jsonb_build_object(
            'name', step_name,
            'task', step->>'task',
            'parents', coalesce((SELECT jsonb_agg(DISTINCT p) FROM jsonb_array_elements_text(
                                     step->'parents') p), '[]'),
            'skip_if', step->'skip_if',
            'wait_for', CASE WHEN step ? 'wait_for' THEN sluice._normalize_conditions(
                                      step->'wait_for', wf, step_name, 'wait_for') END,
            'cancel_if', CASE WHEN step ? 'cancel_if' THEN sluice._normalize_conditions(
                                      step->'cancel_if', wf, step_name, 'cancel_if') END)));
    END LOOP;

    -- Cycles: repeatedly take the steps whose parents are all taken (Kahn); what is left
    -- over lies on a cycle.
    ordered := '{}';
    LOOP
        SELECT array_agg(s->>'name' ORDER BY ord) INTO names
          FROM jsonb_array_elements(norm) WITH ORDINALITY AS x(s, ord)
         WHERE NOT (s->>'name') = ANY(ordered)
           AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements_text(s->'parents') p
                            WHERE NOT p = ANY(ordered));
        EXIT WHEN names IS NULL;
        ordered := ordered || names;
    END LOOP;
    IF cardinality(ordered) < jsonb_array_length(norm) THEN
        SELECT string_agg(s->>'name', ', ' ORDER BY ord) INTO extra
          FROM jsonb_array_elements(norm) WITH ORDINALITY AS x(s, ord)
         WHERE NOT (s->>'name') = ANY(ordered);
        RAISE EXCEPTION 'workflow "%": its steps form a cycle (among: %)', wf, extra
            USING ERRCODE = '22023';
    END IF;

    -- Children, for advancing runs without scanning every step.
    SELECT jsonb_agg(s || jsonb_build_object('children', coalesce(
               (SELECT jsonb_agg(c->>'name' ORDER BY o)
                  FROM jsonb_array_elements(norm) WITH ORDINALITY AS y(c, o)
                 WHERE c->'parents' ? (s->>'name')), '[]')) ORDER BY ord)
      INTO norm
      FROM jsonb_array_elements(norm) WITH ORDINALITY AS x(s, ord);

    FOREACH extra IN ARRAY ARRAY['on_failure', 'on_success'] LOOP
        IF spec ? extra AND jsonb_typeof(spec->extra) <> 'null' THEN
            IF jsonb_typeof(spec->extra) <> 'string'
               OR NOT EXISTS (SELECT 1 FROM sluice.task_definition d
                               WHERE d.name = spec->>extra) THEN
                RAISE EXCEPTION 'workflow "%": % must name a defined task, got %', wf, extra,
                    spec->extra USING ERRCODE = '42704';
            END IF;
        END IF;
    END LOOP;
    normalized := jsonb_strip_nulls(jsonb_build_object(
        'steps', norm, 'on_failure', spec->'on_failure', 'on_success', spec->'on_success',
        'concurrency', CASE WHEN spec ? 'concurrency' THEN jsonb_build_object(
            'key', spec->'concurrency'->'key',
            'max_runs', spec->'concurrency'->'max_runs',
            'strategy', coalesce(spec->'concurrency'->'strategy', '"group_round_robin"'))
            END));

    -- A new version unless the latest is the same (concurrent definers take turns).
    PERFORM pg_advisory_xact_lock(hashtext('sluice.define_workflow'), hashtext(wf));
    SELECT * INTO latest FROM sluice.workflow_definition w
     WHERE w.name = wf ORDER BY w.version DESC LIMIT 1;
    IF latest.spec IS DISTINCT FROM normalized THEN
        INSERT INTO sluice.workflow_definition (name, version, spec)
        VALUES (wf, coalesce(latest.version, 0) + 1, normalized);
        latest.version := coalesce(latest.version, 0) + 1;
    END IF;
    -- Crons and event subscriptions declared here replace those this workflow declared before
    -- (sql/triggers.sql); they are not part of the versioned spec.
    PERFORM sluice._declare_triggers('workflow', wf, coalesce(spec->'crons', '[]'),
                                     coalesce(spec->'on_events', '[]'));
    RETURN latest.version;
END
$$;

CREATE OR REPLACE FUNCTION sluice._workflow_jsonpath(path text, wf text, step text, what text)
RETURNS jsonpath
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN path::jsonpath;
EXCEPTION WHEN syntax_error OR invalid_text_representation OR invalid_parameter_value THEN
    RAISE EXCEPTION 'workflow "%": step "%": % is not a valid jsonpath: %', wf, step, what,
        quote_literal(path) USING ERRCODE = '22023', DETAIL = SQLERRM;
END
$$;

-- A sleep of a step's wait_for or cancel_if (`what`).
CREATE OR REPLACE FUNCTION sluice._workflow_interval(v jsonb, wf text, step text, what text)
RETURNS interval
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    d interval;
BEGIN
    IF jsonb_typeof(v) IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'workflow "%": step "%": % sleep must be a duration such as ''30 seconds'', got %',
            wf, step, what, v USING ERRCODE = '22023';
    END IF;
    BEGIN
        d := (v #>> '{}')::interval;
    EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR interval_field_overflow
                   OR syntax_error THEN
        RAISE EXCEPTION 'workflow "%": step "%": % sleep is not a duration: %', wf, step, what, v
            USING ERRCODE = '22023';
    END;
    IF d < interval '0' THEN
        RAISE EXCEPTION 'workflow "%": step "%": % sleep must not be negative, got %', wf, step,
            what, v USING ERRCODE = '22023';
    END IF;
    RETURN d;
END
$$;

-- Workflow-level concurrency: {"key": "<jsonpath over the run input>", "max_runs": n,
-- "strategy": "group_round_robin" (default) | "cancel_in_progress" | "cancel_newest"}.
CREATE OR REPLACE FUNCTION sluice._check_workflow_concurrency(c jsonb, wf text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    extra text;
BEGIN
    IF jsonb_typeof(c) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'workflow "%": concurrency must be an object {"key", "max_runs", "strategy"}, got %',
            wf, c USING ERRCODE = '22023';
    END IF;
    SELECT string_agg(k, ', ') INTO extra FROM jsonb_object_keys(c) AS k
     WHERE k NOT IN ('key', 'max_runs', 'strategy');
    IF extra IS NOT NULL THEN
        RAISE EXCEPTION 'workflow "%": concurrency has unknown key(s) %', wf, extra
            USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(c->'key') IS DISTINCT FROM 'string' THEN
        RAISE EXCEPTION 'workflow "%": concurrency.key must be a jsonpath over the run input, e.g. ''$.user_id'', got %',
            wf, coalesce(c->'key', 'null') USING ERRCODE = '22023';
    END IF;
    PERFORM sluice._workflow_jsonpath(c->>'key', wf, '(concurrency)', 'key');
    IF NOT sluice._is_whole_number(c->'max_runs', 1, 2147483647) THEN
        RAISE EXCEPTION 'workflow "%": concurrency.max_runs must be a positive whole number, got %',
            wf, coalesce(c->'max_runs', 'null') USING ERRCODE = '22023';
    END IF;
    IF c ? 'strategy' AND coalesce(c->>'strategy', '') <> ALL
           (ARRAY['group_round_robin', 'cancel_in_progress', 'cancel_newest']) THEN
        RAISE EXCEPTION 'workflow "%": unknown concurrency strategy %', wf, c->'strategy'
            USING ERRCODE = '22023',
                  HINT = 'Strategies: group_round_robin, cancel_in_progress, cancel_newest.';
    END IF;
END
$$;

-- Runs ----------------------------------------------------------------------------------------

-- Starts a run of the latest version of a workflow; transactional like sluice.enqueue (a
-- rollback leaves nothing). Returns the run id.
-- run_at: a scheduled run, started then (by the scheduler, sluice._fire_timers); NULL or a
-- time not in the future starts it now.
CREATE OR REPLACE FUNCTION sluice.run_workflow(name text, input jsonb DEFAULT '{}',
                                               run_at timestamptz DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    def    sluice.workflow_definition;
    run    sluice.workflow_run;
BEGIN
    PERFORM sluice._require_preloaded();
    IF input IS NULL THEN
        RAISE EXCEPTION 'input must not be NULL (workflow "%"); use ''{}'' for no input', name
            USING ERRCODE = '22004';
    END IF;
    SELECT * INTO def FROM sluice.workflow_definition w
     WHERE w.name = run_workflow.name ORDER BY w.version DESC LIMIT 1;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown workflow "%"', coalesce(name, 'NULL')
            USING ERRCODE = '42704',
                  HINT = 'Define it first with sluice.define_workflow(name, spec).';
    END IF;
    INSERT INTO sluice.workflow_run (workflow, version, input, status, concurrency_key, run_at)
    VALUES (def.name, def.version, input, 'queued',
            CASE WHEN def.spec ? 'concurrency' THEN
                 coalesce(sluice._path_text(input, (def.spec->'concurrency'->>'key')::jsonpath), '')
            END,
            CASE WHEN run_workflow.run_at > now() THEN run_workflow.run_at END)
    RETURNING * INTO run;
    INSERT INTO sluice.workflow_step (run_id, step, parents_left)
    SELECT run.id, s->>'name', jsonb_array_length(s->'parents')
      FROM jsonb_array_elements(def.spec->'steps') s;
    IF run.run_at IS NOT NULL THEN
        PERFORM sluice._timers_changed();
    ELSIF run.concurrency_key IS NULL THEN
        PERFORM sluice._begin_run(run, def.spec);
    ELSE
        -- The scheduler admits it (sluice._admit_runs): no lock is taken here that could make
        -- the scheduler wait for this transaction.
        PERFORM sluice._request_admission(run.id);
    END IF;
    RETURN run.id;
END
$$;

-- A queued run starts: its root steps become task runs.
CREATE OR REPLACE FUNCTION sluice._begin_run(run sluice.workflow_run, spec jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sluice.workflow_run r SET status = 'running' WHERE r.id = run.id
    RETURNING * INTO run;
    -- The roots of a new run; for a replayed one, the steps whose parents are all done.
    PERFORM sluice._start_steps(run, spec,
        ARRAY(SELECT w.step FROM sluice.workflow_step w
               WHERE w.run_id = run.id AND w.status = 'pending' AND w.parents_left = 0));
END
$$;

-- Asks the scheduler to admit the waiting runs of this run's concurrency key (a step outcome
-- without a step, see sluice._advance_runs).
CREATE OR REPLACE FUNCTION sluice._request_admission(run_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sluice.step_outcome (run_id) VALUES (run_id);
    PERFORM sluice._outcome_recorded();
END
$$;

-- Admits the waiting runs of one concurrency key that fit, oldest first (the places of a key
-- are shared by every version of the workflow; the latest version's limit applies).
-- `newcomer`: a run just queued, which the cancel strategies judge: cancel_newest cancels it
-- if the key is full, cancel_in_progress cancels the oldest running runs to make room for it.
-- Only the scheduler calls this (one admitter: two transactions never both take the last
-- place), and it skips rows a user's transaction holds (cancel_run), trying again later.
CREATE OR REPLACE FUNCTION sluice._admit_runs(wf text, key text, newcomer bigint DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    spec     jsonb;
    max_runs int;
    strategy text;
    running  int;
    run      sluice.workflow_run;
    victim   bigint;
BEGIN
    SELECT d.spec INTO spec FROM sluice.workflow_definition d
     WHERE d.name = wf ORDER BY d.version DESC LIMIT 1;
    max_runs := (spec->'concurrency'->>'max_runs')::int;
    strategy := coalesce(spec->'concurrency'->>'strategy', 'group_round_robin');
    IF max_runs IS NULL THEN
        -- The latest version has no limit: everything waiting starts.
        max_runs := 2147483647;
    END IF;
    SELECT count(*) INTO running FROM sluice.workflow_run r
     WHERE r.workflow = wf AND r.concurrency_key = key AND r.status = 'running';
    IF newcomer IS NOT NULL AND running >= max_runs THEN
        IF strategy = 'cancel_newest' THEN
            UPDATE sluice.workflow_run r
               SET status = 'cancelled', finished_at = now(),
                   error = format('cancelled by concurrency strategy cancel_newest: key %s of workflow "%s" already has max_runs = %s runs',
                                  quote_literal(key), wf, max_runs)
             WHERE r.id = newcomer AND r.status = 'queued';
            UPDATE sluice.workflow_step w SET status = 'cancelled', finished_at = now()
             WHERE w.run_id = newcomer;
            RETURN;
        ELSIF strategy = 'cancel_in_progress' THEN
            FOR victim IN
                SELECT r.id FROM sluice.workflow_run r
                 WHERE r.workflow = wf AND r.concurrency_key = key AND r.status = 'running'
                 ORDER BY r.id LIMIT running - max_runs + 1
                   FOR UPDATE SKIP LOCKED
            LOOP
                UPDATE sluice.workflow_run r
                   SET status = 'cancelled', finished_at = now(),
                       error = format('cancelled by concurrency strategy cancel_in_progress: a newer run of key %s of workflow "%s" took its place',
                                      quote_literal(key), wf)
                 WHERE r.id = victim;
                PERFORM sluice._cancel_run_steps(victim, format('run %s cancelled by concurrency strategy cancel_in_progress', victim));
                running := running - 1;
            END LOOP;
        END IF;
    END IF;
    FOR run IN
        SELECT r.* FROM sluice.workflow_run r
         WHERE r.workflow = wf AND r.concurrency_key = key AND r.status = 'queued'
           AND r.run_at IS NULL  -- a scheduled run asks for admission when it is due
         ORDER BY r.id LIMIT greatest(max_runs - running, 0)
           FOR UPDATE SKIP LOCKED
    LOOP
        PERFORM sluice._begin_run(run,
            (SELECT d.spec FROM sluice.workflow_definition d
              WHERE d.name = run.workflow AND d.version = run.version));
    END LOOP;
END
$$;

-- A run finished: if it held a place of a concurrency key, the key's next waiting run may
-- start (the scheduler decides, see sluice._request_admission).
CREATE OR REPLACE FUNCTION sluice._run_finished(run_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM sluice.workflow_run r
                WHERE r.id = run_id AND r.concurrency_key IS NOT NULL) THEN
        PERFORM sluice._request_admission(run_id);
    END IF;
END
$$;

-- Starts the given steps of a running run (their parents are all done): a step whose skip_if
-- holds is skipped (and counts as done for its children), one with wait_for or cancel_if
-- waits for its conditions (sql/conditions.sql), the others become task runs.
CREATE OR REPLACE FUNCTION sluice._start_steps(run sluice.workflow_run, spec jsonb, names text[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    s        jsonb;
    envelope jsonb;
    skipped  boolean;
BEGIN
    FOR s IN SELECT x FROM jsonb_array_elements(spec->'steps') x WHERE x->>'name' = ANY(names)
    LOOP
        SELECT jsonb_build_object(
                   'input', run.input,
                   'parents', coalesce(jsonb_object_agg(p.step, p.output)
                                       FILTER (WHERE p.status = 'succeeded'), '{}'),
                   'skipped', coalesce(jsonb_agg(p.step) FILTER (WHERE p.status = 'skipped'),
                                       '[]'))
          INTO envelope
          FROM sluice.workflow_step p
         WHERE p.run_id = run.id AND s->'parents' ? p.step;
        skipped := s ? 'skip_if'
                   AND coalesce(jsonb_path_match(envelope, (s->>'skip_if')::jsonpath, silent => true),
                                false);
        IF skipped THEN
            UPDATE sluice.workflow_step
               SET status = 'skipped', started_at = now(), finished_at = now()
             WHERE run_id = run.id AND step = s->>'name';
            PERFORM sluice._step_done(run, spec, s->>'name');
            CONTINUE;
        END IF;
        IF s ? 'wait_for' OR s ? 'cancel_if' THEN
            PERFORM sluice._start_step_with_conditions(run, s, envelope);
            -- a cancel_if met at once cancels the run: nothing more starts
            EXIT WHEN (SELECT r.status FROM sluice.workflow_run r WHERE r.id = run.id)
                      <> 'running';
            CONTINUE;
        END IF;
        PERFORM sluice._enqueue_started_step(run, s, envelope, now());
    END LOOP;
END
$$;

-- One task run for a step: the task definition's priority, timeouts and flow control apply.
CREATE OR REPLACE FUNCTION sluice._enqueue_step(task text, input jsonb, run_at timestamptz,
                                                run_id bigint, step text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    def    sluice.task_definition := sluice._definition(task);
    flow   record;
    new_id bigint;
BEGIN
    SELECT * INTO flow FROM sluice._flow(def, input);  -- all NULL without flow control
    INSERT INTO sluice.task_run
        (task_name, priority, input, run_at, schedule_deadline, concurrency_key,
         rate_limit_keys, rate_limit_units, run_id, step)
    VALUES (task, def.priority, input, run_at, run_at + def.schedule_timeout,
            flow.concurrency_key, flow.rate_limit_keys, flow.rate_limit_units, run_id, step)
    RETURNING id INTO new_id;
    PERFORM sluice._wake_scheduler(run_at);
    RETURN new_id;
END
$$;

-- A step is done (succeeded or skipped): its children with no parent left start; a run with
-- nothing left pending or started has succeeded.
CREATE OR REPLACE FUNCTION sluice._step_done(run sluice.workflow_run, spec jsonb, step text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    ready text[];
BEGIN
    WITH children AS (
        SELECT jsonb_array_elements_text(x->'children') AS name
          FROM jsonb_array_elements(spec->'steps') x WHERE x->>'name' = _step_done.step
    ), decremented AS (
        UPDATE sluice.workflow_step w SET parents_left = w.parents_left - 1
          FROM children c
         WHERE w.run_id = run.id AND w.step = c.name AND w.status = 'pending'
        RETURNING w.step, w.parents_left
    )
    SELECT array_agg(d.step) INTO ready FROM decremented d WHERE d.parents_left = 0;
    IF ready IS NOT NULL THEN
        PERFORM sluice._start_steps(run, spec, ready);
    END IF;
    PERFORM sluice._finish_run_if_done(run.id);
END
$$;

CREATE OR REPLACE FUNCTION sluice._finish_run_if_done(run_id bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    run  sluice.workflow_run;
    spec jsonb;
BEGIN
    SELECT * INTO run FROM sluice.workflow_run r WHERE r.id = run_id;
    IF run.status <> 'running' OR EXISTS (
           SELECT 1 FROM sluice.workflow_step w
            WHERE w.run_id = _finish_run_if_done.run_id
              AND w.status IN ('pending', 'waiting', 'started')) THEN
        RETURN;
    END IF;
    SELECT d.spec INTO spec FROM sluice.workflow_definition d
     WHERE d.name = run.workflow AND d.version = run.version;
    UPDATE sluice.workflow_run r
       SET status = 'succeeded', finished_at = now(),
           output = (SELECT coalesce(jsonb_object_agg(w.step, w.output), '{}')
                       FROM sluice.workflow_step w
                       JOIN jsonb_array_elements(spec->'steps') s ON s->>'name' = w.step
                      WHERE w.run_id = r.id AND s->'children' = '[]'
                        AND w.status = 'succeeded')
     WHERE r.id = _finish_run_if_done.run_id;
    PERFORM sluice._run_finished(run.id);
    IF spec ? 'on_success' THEN
        PERFORM sluice._enqueue_step(spec->>'on_success',
            jsonb_build_object('input', run.input,
                               'outputs', (SELECT coalesce(jsonb_object_agg(w.step, w.output), '{}')
                                             FROM sluice.workflow_step w
                                            WHERE w.run_id = run.id AND w.status = 'succeeded')),
            now(), NULL, NULL);
    END IF;
END
$$;

-- A step's task failed for good or was cancelled: the run fails (or is cancelled), steps that
-- can no longer run are cancelled (running ones are signalled), and on_failure runs with the
-- error.
CREATE OR REPLACE FUNCTION sluice._step_failed(run sluice.workflow_run, spec jsonb, step text,
                                               outcome text, reason text)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sluice.workflow_run r
       SET status = CASE outcome WHEN 'cancelled' THEN 'cancelled'::sluice.task_status
                                 ELSE 'failed' END,
           error = format('step "%s" %s: %s', step, outcome, coalesce(reason, 'no message')),
           finished_at = now()
     WHERE r.id = run.id AND r.status = 'running';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM sluice._cancel_run_steps(run.id, format('run %s: step "%s" %s', run.id, step, outcome));
    PERFORM sluice._run_finished(run.id);
    IF spec ? 'on_failure' THEN
        PERFORM sluice._enqueue_step(spec->>'on_failure',
            jsonb_build_object('input', run.input, 'run_id', run.id, 'failed_step', step,
                               'error', reason),
            now(), NULL, NULL);
    END IF;
END
$$;

-- Cancels the steps of a run that have not finished: pending ones at once, started ones
-- through sluice._cancel (queued: cancelled; running: its worker is signalled).
CREATE OR REPLACE FUNCTION sluice._cancel_run_steps(run_id bigint, reason text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    t sluice.task_run;
BEGIN
    UPDATE sluice.workflow_step w SET status = 'cancelled', finished_at = now(), envelope = NULL
     WHERE w.run_id = _cancel_run_steps.run_id AND w.status IN ('pending', 'waiting');
    DELETE FROM sluice.step_condition c WHERE c.run_id = _cancel_run_steps.run_id;
    FOR t IN
        SELECT r.* FROM sluice.task_run r
         WHERE r.id = ANY(ARRAY(SELECT w.task_id FROM sluice.workflow_step w
                                 WHERE w.run_id = _cancel_run_steps.run_id
                                   AND w.status = 'started'))
           AND r.status IN ('queued', 'running')
         ORDER BY r.id
           FOR UPDATE
    LOOP
        PERFORM sluice._cancel(t, reason);
    END LOOP;
END
$$;

-- Step outcomes for the scheduler to apply (sluice._advance_runs). The trigger below only
-- records them: advancing a run in the finishing transaction would lock the run (fan-in needs
-- one outcome at a time per run) from many workers' completions at once, in whatever order
-- their batches hold, which deadlocks; one applier in the scheduler cannot.
CREATE TABLE sluice.step_outcome (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id  bigint NOT NULL,
    -- NULL step and task: not an outcome but a request to admit the waiting runs of this
    -- run's concurrency key (sluice._request_admission)
    step    text,
    task_id bigint
);

CREATE OR REPLACE FUNCTION sluice._step_task_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO sluice.step_outcome (run_id, step, task_id) VALUES (NEW.run_id, NEW.step, NEW.id);
    PERFORM sluice._outcome_recorded();
    RETURN NULL;
END
$$;

-- OF finished_at, not status: every statement that makes a task final sets finished_at (the
-- table's check constraint), and a claim, which changes status but not finished_at, then
-- skips this trigger without preparing its WHEN clause (a tenth of a one-task fetch).
CREATE TRIGGER task_run_step_finished
    AFTER UPDATE OF finished_at ON sluice.task_run
    FOR EACH ROW
    WHEN (NEW.run_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION sluice._step_task_finished();

-- Applies up to max_outcomes recorded step outcomes, oldest first (the scheduler, every tick).
-- The batch runs in one subtransaction: one per outcome would give the tick's transaction
-- hundreds of subtransaction ids, more than a backend caches (64), which makes every other
-- session's snapshots consult pg_subtrans while it is open. If the batch fails, its outcomes
-- are applied again one by one, each in its own subtransaction, and one that cannot be applied
-- (say a child's task definition was deleted) fails its run with the reason instead of
-- stopping the others. Returns how many were taken.
CREATE OR REPLACE FUNCTION sluice._advance_runs(max_outcomes int) RETURNS int
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $$
DECLARE
    outcomes sluice.step_outcome[];
    o        sluice.step_outcome;
BEGIN
    WITH taken AS (
        DELETE FROM sluice.step_outcome x
         WHERE x.id = ANY(ARRAY(SELECT y.id FROM sluice.step_outcome y
                                 ORDER BY y.id LIMIT max_outcomes))
        RETURNING x.*
    )
    SELECT array_agg(ROW(t.id, t.run_id, t.step, t.task_id)::sluice.step_outcome ORDER BY t.id)
      INTO outcomes FROM taken t;
    IF outcomes IS NULL THEN
        RETURN 0;
    END IF;
    BEGIN
        FOREACH o IN ARRAY outcomes LOOP
            PERFORM sluice._apply_outcome(o);
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        FOREACH o IN ARRAY outcomes LOOP
            BEGIN
                PERFORM sluice._apply_outcome(o);
            EXCEPTION WHEN OTHERS THEN
                BEGIN
                    UPDATE sluice.workflow_run r
                       SET status = 'failed', finished_at = now(),
                           error = format('advancing the run after step "%s" failed: %s',
                                          o.step, SQLERRM)
                     WHERE r.id = o.run_id AND r.status = 'running';
                    PERFORM sluice._cancel_run_steps(o.run_id,
                        format('run %s failed: it could not advance after step "%s"',
                               o.run_id, o.step));
                    PERFORM sluice._run_finished(o.run_id);
                EXCEPTION WHEN OTHERS THEN
                    RAISE WARNING 'sluice scheduler: run % could not advance or fail: %',
                        o.run_id, SQLERRM;
                END;
            END;
        END LOOP;
    END;
    RETURN cardinality(outcomes);
END
$$;

-- One recorded outcome: an admission request (no step) or a step's task that finished. An
-- outcome whose run a user's transaction holds (cancel_run, replay_run) is put back for later.
CREATE OR REPLACE FUNCTION sluice._apply_outcome(o sluice.step_outcome) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF o.step IS NULL THEN
        PERFORM sluice._admit_runs(r.workflow, r.concurrency_key,
                                   CASE WHEN r.status = 'queued' THEN r.id END)
           FROM sluice.workflow_run r
          WHERE r.id = o.run_id AND r.concurrency_key IS NOT NULL;
    ELSIF NOT sluice._apply_step_outcome(o.run_id, o.step, o.task_id) THEN
        INSERT INTO sluice.step_outcome (run_id, step, task_id)
        VALUES (o.run_id, o.step, o.task_id);
    END IF;
END
$$;

-- Applies one step outcome; false if its run is locked by someone else (to be retried).
CREATE OR REPLACE FUNCTION sluice._apply_step_outcome(run_id bigint, step text, task_id bigint)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    run  sluice.workflow_run;
    spec jsonb;
    t    sluice.task_run;
BEGIN
    SELECT * INTO run FROM sluice.workflow_run r WHERE r.id = run_id FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NOT EXISTS (SELECT 1 FROM sluice.workflow_run r WHERE r.id = run_id);
    END IF;
    SELECT * INTO t FROM sluice.task_run r WHERE r.id = task_id;
    IF t.id IS NULL THEN
        RETURN true;
    END IF;
    UPDATE sluice.workflow_step w
       SET status = t.status::text, output = t.output, error = t.last_error,
           finished_at = coalesce(t.finished_at, now()), envelope = NULL
     WHERE w.run_id = _apply_step_outcome.run_id AND w.step = _apply_step_outcome.step
       AND w.task_id = t.id AND w.status = 'started';
    IF NOT FOUND OR run.status <> 'running' THEN
        RETURN true;
    END IF;
    SELECT d.spec INTO spec FROM sluice.workflow_definition d
     WHERE d.name = run.workflow AND d.version = run.version;
    IF jsonb_path_exists(spec, '$.steps[*] ? (@.name == $s).cancel_if', jsonb_build_object('s', step)) THEN
        -- its cancel_if watched the task until now
        DELETE FROM sluice.step_condition c
         WHERE c.run_id = _apply_step_outcome.run_id AND c.step = _apply_step_outcome.step;
    END IF;
    IF t.status = 'succeeded' THEN
        PERFORM sluice._step_done(run, spec, step);
    ELSE
        PERFORM sluice._step_failed(run, spec, step, t.status::text, t.last_error);
    END IF;
    RETURN true;
END
$$;

-- Cancels a run: pending steps are cancelled, queued ones too, running ones are signalled
-- (their handlers see the cancellation). Returns false if the run had already finished.
CREATE OR REPLACE FUNCTION sluice.cancel_run(run_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    run sluice.workflow_run;
BEGIN
    SELECT * INTO run FROM sluice.workflow_run r WHERE r.id = run_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no workflow run with id %', coalesce(run_id::text, 'NULL')
            USING ERRCODE = 'P0002';
    END IF;
    IF run.status NOT IN ('queued', 'running') THEN
        RETURN false;
    END IF;
    UPDATE sluice.workflow_run r
       SET status = 'cancelled', finished_at = now(), error = 'cancelled by sluice.cancel_run()',
           run_at = NULL
     WHERE r.id = run_id;
    PERFORM sluice._cancel_run_steps(run_id, 'run cancelled by sluice.cancel_run()');
    IF run.status = 'running' THEN
        PERFORM sluice._run_finished(run_id);
    END IF;
    RETURN true;
END
$$;

-- One run per input, in one statement (and the caller's transaction); ids in input order.
CREATE OR REPLACE FUNCTION sluice.run_workflow_many(name text, inputs jsonb[])
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    i int;
BEGIN
    IF inputs IS NULL THEN
        RAISE EXCEPTION 'inputs must not be NULL (workflow "%")', name USING ERRCODE = '22004';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(inputs), 0) LOOP
        IF inputs[i] IS NULL THEN
            RAISE EXCEPTION 'inputs[%] is NULL (workflow "%"); use ''{}'' for no input', i, name
                USING ERRCODE = '22004';
        END IF;
        RETURN NEXT sluice.run_workflow(name, inputs[i]);
    END LOOP;
END
$$;

-- Cancels every unfinished run selected by workflow (NULL: any) and creation time
-- [created_from, created_before) (NULL: unbounded). Returns the ids cancelled.
CREATE OR REPLACE FUNCTION sluice.cancel_runs(workflow text DEFAULT NULL,
                                              created_from timestamptz DEFAULT NULL,
                                              created_before timestamptz DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    id bigint;
BEGIN
    FOR id IN
        SELECT r.id FROM sluice.workflow_run r
         WHERE r.status IN ('queued', 'running')
           AND (cancel_runs.workflow IS NULL OR r.workflow = cancel_runs.workflow)
           AND (created_from IS NULL OR r.created_at >= created_from)
           AND (created_before IS NULL OR r.created_at < created_before)
         ORDER BY r.id
    LOOP
        IF sluice.cancel_run(id) THEN
            RETURN NEXT id;
        END IF;
    END LOOP;
END
$$;

-- Replays a failed or cancelled run from the steps that did not succeed: steps that succeeded
-- (or were skipped) keep their outputs and do not run again; the others start over as their
-- parents allow, with the run's own version. Returns false if the run is not failed or
-- cancelled.
CREATE OR REPLACE FUNCTION sluice.replay_run(run_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    run  sluice.workflow_run;
    spec jsonb;
BEGIN
    SELECT * INTO run FROM sluice.workflow_run r WHERE r.id = run_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no workflow run with id %', coalesce(run_id::text, 'NULL')
            USING ERRCODE = 'P0002';
    END IF;
    IF run.status NOT IN ('failed', 'cancelled') THEN
        RETURN false;
    END IF;
    SELECT d.spec INTO spec FROM sluice.workflow_definition d
     WHERE d.name = run.workflow AND d.version = run.version;
    UPDATE sluice.workflow_run r
       SET status = 'queued', error = NULL, output = NULL, finished_at = NULL
     WHERE r.id = run.id
    RETURNING * INTO run;
    -- Steps to run again wait for their parents that are not done (and their conditions
    -- again once those are).
    DELETE FROM sluice.step_condition c
     WHERE c.run_id = run.id
       AND c.step IN (SELECT w.step FROM sluice.workflow_step w
                       WHERE w.run_id = run.id AND w.status NOT IN ('succeeded', 'skipped'));
    UPDATE sluice.workflow_step w
       SET status = 'pending', task_id = NULL, output = NULL, error = NULL,
           started_at = NULL, finished_at = NULL, envelope = NULL,
           parents_left = (SELECT count(*) FROM sluice.workflow_step p
                            WHERE p.run_id = w.run_id
                              AND s.spec->'parents' ? p.step
                              AND p.status NOT IN ('succeeded', 'skipped'))
      FROM jsonb_array_elements(spec->'steps') AS s(spec)
     WHERE w.run_id = run.id AND w.step = s.spec->>'name'
       AND w.status NOT IN ('succeeded', 'skipped');
    IF run.concurrency_key IS NULL THEN
        PERFORM sluice._begin_run(run, spec);
    ELSE
        PERFORM sluice._request_admission(run.id);  -- it waits for a place like a new run
    END IF;
    RETURN true;
END
$$;

-- Replays every run selected by status (failed and/or cancelled), workflow (NULL: any) and
-- creation time [created_from, created_before). Returns the ids replayed.
CREATE OR REPLACE FUNCTION sluice.replay_runs(workflow text DEFAULT NULL,
                                              statuses text[] DEFAULT '{failed}',
                                              created_from timestamptz DEFAULT NULL,
                                              created_before timestamptz DEFAULT NULL)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    id  bigint;
    bad text;
BEGIN
    SELECT string_agg(x, ', ') INTO bad FROM unnest(statuses) x
     WHERE x IS NULL OR x NOT IN ('failed', 'cancelled');
    IF bad IS NOT NULL OR statuses IS NULL THEN
        RAISE EXCEPTION 'replay_runs: statuses must be failed and/or cancelled, got %',
            coalesce(statuses::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    FOR id IN
        SELECT r.id FROM sluice.workflow_run r
         WHERE r.status::text = ANY(statuses)
           AND (replay_runs.workflow IS NULL OR r.workflow = replay_runs.workflow)
           AND (created_from IS NULL OR r.created_at >= created_from)
           AND (created_before IS NULL OR r.created_at < created_before)
         ORDER BY r.id
    LOOP
        IF sluice.replay_run(id) THEN
            RETURN NEXT id;
        END IF;
    END LOOP;
END
$$;

-- Retention of runs, as sluice._purge_finished does for tasks: finished runs (with their
-- steps) past sluice.succeeded_task_retention / sluice.failed_task_retention, oldest first, at
-- most max_rows per status, each status from `after` (succeeded, failed, cancelled) on.
-- Their step tasks go with the task retention. Returns per status ('run:<status>') how many
-- went and the finish time of the last one.
CREATE OR REPLACE FUNCTION sluice._purge_finished_runs(succeeded_before timestamptz,
                                                       failed_before timestamptz,
                                                       after timestamptz[], max_rows int)
RETURNS TABLE (status text, deleted int, reached timestamptz)
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $$
#variable_conflict use_column
DECLARE
    kinds  sluice.task_status[] := ARRAY['succeeded', 'failed', 'cancelled'];
    before timestamptz;
    ids    bigint[];
    last   timestamptz;
    n      int;
BEGIN
    FOR i IN 1 .. 3 LOOP
        before := CASE WHEN i = 1 THEN succeeded_before ELSE failed_before END;
        CONTINUE WHEN before IS NULL;
        BEGIN
            SELECT array_agg(x.id), max(x.finished_at) INTO ids, last FROM (
                SELECT r.id, r.finished_at FROM sluice.workflow_run r
                 WHERE r.status = kinds[i] AND r.finished_at < before
                   AND r.finished_at >= coalesce(after[i], '-infinity')
                   AND r.status IN ('succeeded', 'failed', 'cancelled')
                 ORDER BY r.status, r.finished_at LIMIT max_rows
                   FOR UPDATE SKIP LOCKED) x;
            CONTINUE WHEN ids IS NULL;  -- never `id = ANY('{}')`: see _maintain
            DELETE FROM sluice.workflow_run r WHERE r.id = ANY(ids);
            GET DIAGNOSTICS n = ROW_COUNT;
            status := 'run:' || kinds[i]::text;
            deleted := n;
            reached := last;
            RETURN NEXT;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'sluice scheduler: deleting finished runs failed: % (SQLSTATE %)',
                SQLERRM, SQLSTATE;
        END;
    END LOOP;
END
$$;

-- Child spawning ------------------------------------------------------------------------------

-- Raises P0002 unless the task exists and 55000 unless it is running: only a running task
-- spawns (`what`: children or runs).
CREATE OR REPLACE FUNCTION sluice._require_running_parent(parent_id bigint, what text)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    parent_status sluice.task_status;
BEGIN
    -- a parent claimed in memory is written into its row first (sluice._settle_claims)
    PERFORM sluice._settle_claims(ARRAY[parent_id]);
    SELECT t.status INTO parent_status FROM sluice.task_run t
     WHERE t.id = _require_running_parent.parent_id;
    IF parent_status IS NULL THEN
        RAISE EXCEPTION 'no task with id % to spawn % of', coalesce(parent_id::text, 'NULL'), what
            USING ERRCODE = 'P0002';
    ELSIF parent_status <> 'running' THEN
        RAISE EXCEPTION 'task % is %, not running: only a running task spawns %',
            parent_id, parent_status, what USING ERRCODE = '55000';
    END IF;
END
$$;

-- Spawns children of a running task: one run of `task` per input, keyed by keys[i] (default:
-- the input's position, 1-based, as text). Idempotent per (parent, key): a retried parent that
-- spawns again gets the children it spawned before, not new ones. Returns (key, task id) in
-- input order.
CREATE OR REPLACE FUNCTION sluice.spawn(parent_id bigint, task text, inputs jsonb[],
                                        keys text[] DEFAULT NULL)
RETURNS TABLE (child_key text, task_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    def           sluice.task_definition := sluice._definition(task);
    i             int;
    key           text;
    new_id        bigint;
    flow          record;
BEGIN
    PERFORM sluice._require_running_parent(parent_id, 'children');
    IF inputs IS NULL THEN
        RAISE EXCEPTION 'inputs must not be NULL (spawning "%")', task USING ERRCODE = '22004';
    END IF;
    IF keys IS NOT NULL AND cardinality(keys) IS DISTINCT FROM cardinality(inputs) THEN
        RAISE EXCEPTION 'keys and inputs must have the same length (% vs %)',
            cardinality(keys), cardinality(inputs) USING ERRCODE = '22023';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(inputs), 0) LOOP
        IF inputs[i] IS NULL THEN
            RAISE EXCEPTION 'inputs[%] is NULL (spawning "%")', i, task USING ERRCODE = '22004';
        END IF;
        key := coalesce(keys[i], i::text);
        SELECT * INTO flow FROM sluice._flow(def, inputs[i]);
        new_id := NULL;
        INSERT INTO sluice.task_run
            (task_name, priority, input, run_at, schedule_deadline, concurrency_key,
             rate_limit_keys, rate_limit_units, parent_id, child_key)
        VALUES (task, def.priority, inputs[i], now(), now() + def.schedule_timeout,
                flow.concurrency_key, flow.rate_limit_keys, flow.rate_limit_units,
                spawn.parent_id, key)
        ON CONFLICT (parent_id, child_key) WHERE parent_id IS NOT NULL DO NOTHING
        RETURNING id INTO new_id;
        IF new_id IS NULL THEN
            SELECT t.id INTO new_id FROM sluice.task_run t
             WHERE t.parent_id = spawn.parent_id AND t.child_key = key;
        END IF;
        child_key := key;
        task_id := new_id;
        RETURN NEXT;
    END LOOP;
    PERFORM sluice._wake_scheduler(now());
END
$$;

-- Spawns child workflow runs of a running task, one per input, keyed like sluice.spawn (keys
-- are shared with its child tasks' namespace only by convention: the client numbers both from
-- one counter). Idempotent per (parent, key). Returns (key, run id) in input order.
CREATE OR REPLACE FUNCTION sluice.spawn_workflow(parent_id bigint, workflow text, inputs jsonb[],
                                                 keys text[] DEFAULT NULL)
RETURNS TABLE (child_key text, run_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    i             int;
    key           text;
    found_id      bigint;
BEGIN
    PERFORM sluice._require_running_parent(parent_id, 'runs');
    IF keys IS NOT NULL AND cardinality(keys) IS DISTINCT FROM cardinality(inputs) THEN
        RAISE EXCEPTION 'keys and inputs must have the same length (% vs %)',
            cardinality(keys), cardinality(inputs) USING ERRCODE = '22023';
    END IF;
    -- One spawner per parent at a time, so a key is looked up and taken atomically.
    PERFORM pg_advisory_xact_lock(hashtext('sluice.spawn_workflow'), hashtext(parent_id::text));
    FOR i IN 1 .. coalesce(cardinality(inputs), 0) LOOP
        key := coalesce(keys[i], i::text);
        SELECT r.id INTO found_id FROM sluice.workflow_run r
         WHERE r.parent_id = spawn_workflow.parent_id AND r.child_key = key;
        IF found_id IS NULL THEN
            found_id := sluice.run_workflow(workflow, inputs[i]);
            UPDATE sluice.workflow_run r
               SET parent_id = spawn_workflow.parent_id, child_key = key
             WHERE r.id = found_id;
        END IF;
        child_key := key;
        run_id := found_id;
        RETURN NEXT;
    END LOOP;
END
$$;

-- The children of a task, by key: status, output and error.
CREATE OR REPLACE FUNCTION sluice.children(parent_id bigint)
RETURNS TABLE (child_key text, task_id bigint, task_name text, status text, output jsonb,
               error text)
LANGUAGE sql STABLE AS $$
    SELECT t.child_key, t.id, t.task_name, t.status::text, t.output, t.last_error
      FROM sluice.task_run t
     WHERE t.parent_id = children.parent_id AND t.parent_id IS NOT NULL
     ORDER BY t.id
$$;

-- Runs with their steps: the run's status (queued, running, succeeded, failed, cancelled), and
-- per step its status (a started step shows its task's: queued, running, ...), task, output,
-- error and times. The run's output is the set of its leaf steps' outputs.
CREATE VIEW sluice.runs AS
SELECT r.id,
       r.workflow,
       r.version,
       -- queued until one of its steps has been claimed (or finished, or skipped); a step
       -- whose task was claimed before and is queued again (a retry, a durable step's wait)
       -- counts as claimed
       CASE WHEN r.status = 'running' AND NOT EXISTS (
                SELECT 1 FROM sluice.workflow_step w
                  LEFT JOIN sluice.task_run t ON t.id = w.task_id
                 WHERE w.run_id = r.id
                   AND (w.status NOT IN ('pending', 'started')
                        OR (w.status = 'started'
                            AND (t.status IS DISTINCT FROM 'queued' OR t.attempt > 0))))
            THEN 'queued'::sluice.task_status
            ELSE r.status END AS status,
       r.input,
       r.output,
       r.error,
       r.created_at,
       r.finished_at,
       r.concurrency_key,
       r.parent_id,
       r.child_key,
       (SELECT jsonb_object_agg(w.step, jsonb_strip_nulls(jsonb_build_object(
                   'status', CASE WHEN w.status = 'started' THEN t.status::text ELSE w.status END,
                   'task_id', w.task_id,
                   'output', w.output,
                   'error', w.error,
                   'started_at', w.started_at,
                   'finished_at', w.finished_at)))
          FROM sluice.workflow_step w
          LEFT JOIN sluice.task_run t ON t.id = w.task_id
         WHERE w.run_id = r.id) AS steps,
       -- a scheduled run's start time (sluice.run_workflow's run_at), until it starts
       r.run_at
FROM sluice.workflow_run r;
-- ---- copy of sql/cron.sql ----
-- Time: cron schedules, scheduled runs and the timer the scheduler fires them from.
--
-- A cron schedule starts a task or a workflow on every tick of a cron expression, in a time
-- zone (UTC unless given). The scheduler calls sluice._fire_timers when the earliest
-- schedule is due; each tick it fires is recorded in sluice.cron_fire, whose primary key
-- (schedule, tick) makes a second run of one tick impossible, and the schedule's next tick is
-- advanced in the same transaction: a crash or restart either did both or neither.
--
-- Ticks are wall-clock times in the schedule's zone, computed by sluice._cron_next (Rust, the
-- `cron` crate) and converted with Postgres' zone database: across a daylight-saving change
-- each wall-clock tick fires once (a tick in the skipped hour fires as Postgres reads that
-- time, an hour later by the new clock: 02:30 -> 03:30; a tick in the repeated hour fires once,
-- at the later of the two instants), so none is repeated or dropped.

CREATE TABLE sluice.cron_schedule (
    name          text PRIMARY KEY CHECK (name <> ''),
    cron          text NOT NULL,
    time_zone     text NOT NULL DEFAULT 'UTC',
    target_kind   text NOT NULL CHECK (target_kind IN ('task', 'workflow')),
    target        text NOT NULL,
    input         jsonb NOT NULL DEFAULT '{}',
    -- ticks missed (see sluice._fire_timers: every due tick but the latest, and the latest too
    -- if more than a minute late): 'skip' them, or 'run_once' for all of them together
    missed        text NOT NULL DEFAULT 'skip' CHECK (missed IN ('skip', 'run_once')),
    -- 'task:<name>' or 'workflow:<name>' for a cron declared in a definition, which
    -- redefining it replaces (sluice._declare_triggers); NULL for sluice.schedule_cron's own
    declared_by   text,
    -- the next tick, wall-clock in time_zone, and when it fires: that instant, or the previous
    -- tick's if later (after a skipped hour's ticks, shifted an hour later, the next ones map
    -- to earlier instants)
    next_tick     timestamp NOT NULL,
    next_at       timestamptz NOT NULL,
    last_tick     timestamp,
    last_fired_at timestamptz,
    last_task_id  bigint,
    last_run_id   bigint,
    last_error    text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cron_schedule_next_idx ON sluice.cron_schedule (next_at);

-- One row per fired tick (kept for sluice.succeeded_task_retention).
CREATE TABLE sluice.cron_fire (
    schedule  text NOT NULL,
    tick      timestamp NOT NULL,
    tick_at   timestamptz NOT NULL,
    fired_at  timestamptz NOT NULL DEFAULT now(),
    -- earlier ticks this run stands for (missed = 'run_once' after a pause)
    missed    int NOT NULL DEFAULT 0,
    task_id   bigint,
    run_id    bigint,
    error     text,
    PRIMARY KEY (schedule, tick)
);
CREATE INDEX cron_fire_fired_idx ON sluice.cron_fire (fired_at);

CREATE VIEW sluice.crons AS
SELECT c.name,
       c.cron,
       c.time_zone,
       c.target_kind,
       c.target,
       c.input,
       c.missed,
       c.declared_by,
       c.next_at AS next_fire_at,
       c.last_fired_at,
       c.last_tick AT TIME ZONE c.time_zone AS last_tick_at,
       c.last_task_id,
       c.last_run_id,
       c.last_error,
       (SELECT count(*) FROM sluice.cron_fire f WHERE f.schedule = c.name) AS fires_kept,
       c.created_at
  FROM sluice.cron_schedule c;

-- Tasks and workflow runs scheduled for later (enqueue's or run_workflow's run_at), not yet
-- due: reschedule them with sluice.reschedule / sluice.reschedule_run, delete them with
-- sluice.delete_scheduled / sluice.delete_scheduled_run. Retries waiting out their backoff
-- and suspended durable tasks are not listed (they have attempts).
CREATE VIEW sluice.scheduled AS
SELECT 'task'::text AS kind, t.id, t.task_name AS name, t.input, t.run_at, t.enqueued_at AS created_at
  FROM sluice.task_run t
 WHERE t.finished_at IS NULL AND t.status = 'queued' AND t.run_at > now()
   AND t.attempt = 0 AND t.run_id IS NULL
UNION ALL
SELECT 'workflow', r.id, r.workflow, r.input, r.run_at, r.created_at
  FROM sluice.workflow_run r
 WHERE r.run_at IS NOT NULL AND r.status = 'queued';

-- Schedules -----------------------------------------------------------------------------------

-- What a target names: 'task:<name>' or 'workflow:<name>', or a bare name that is exactly one
-- of a defined workflow or a defined task.
CREATE OR REPLACE FUNCTION sluice._resolve_target(target text, OUT kind text, OUT name text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    is_task     boolean;
    is_workflow boolean;
BEGIN
    IF target IS NULL OR target = '' THEN
        RAISE EXCEPTION 'target must name a task or a workflow, got %',
            coalesce(quote_literal(target), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF target LIKE 'task:%' THEN
        kind := 'task';
        name := substr(target, 6);
    ELSIF target LIKE 'workflow:%' THEN
        kind := 'workflow';
        name := substr(target, 10);
    ELSE
        name := target;
    END IF;
    is_task := EXISTS (SELECT 1 FROM sluice.task_definition d WHERE d.name = _resolve_target.name);
    is_workflow := EXISTS (SELECT 1 FROM sluice.workflow_definition w
                            WHERE w.name = _resolve_target.name);
    IF kind IS NULL THEN
        IF is_task AND is_workflow THEN
            RAISE EXCEPTION '"%" is both a task and a workflow', target
                USING ERRCODE = '42725',
                      HINT = format('Say task:%s or workflow:%s.', target, target);
        END IF;
        kind := CASE WHEN is_workflow THEN 'workflow' WHEN is_task THEN 'task' END;
    END IF;
    IF kind IS NULL OR (kind = 'task' AND NOT is_task) OR (kind = 'workflow' AND NOT is_workflow) THEN
        RAISE EXCEPTION 'unknown %', CASE kind WHEN 'task' THEN format('task "%s"', name)
                                               WHEN 'workflow' THEN format('workflow "%s"', name)
                                               ELSE format('task or workflow "%s"', name) END
            USING ERRCODE = '42704',
                  HINT = 'Define it first (sluice.define_task or sluice.define_workflow).';
    END IF;
END
$$;

-- Starts one run of a target: a task run or a workflow run. Returns (task_id, run_id), one NULL.
CREATE OR REPLACE FUNCTION sluice._start_target(kind text, name text, input jsonb,
                                                OUT task_id bigint, OUT run_id bigint)
LANGUAGE plpgsql AS $$
BEGIN
    IF kind = 'task' THEN
        task_id := sluice.enqueue(name, input);
    ELSE
        run_id := sluice.run_workflow(name, input);
    END IF;
END
$$;

-- The tick after `after_tick` (wall-clock in the zone) and when it fires: never before
-- `not_before` (the previous tick's instant), so ticks fire in order.
CREATE OR REPLACE FUNCTION sluice._cron_next_at(cron text, time_zone text, after_tick timestamp,
                                                not_before timestamptz,
                                                OUT tick timestamp, OUT at timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    tick := sluice._cron_next(cron, after_tick);
    IF tick IS NULL THEN
        tick := 'infinity';
        at := 'infinity';
        RETURN;
    END IF;
    at := greatest(tick AT TIME ZONE time_zone, not_before);
END
$$;

-- Creates or replaces the schedule `name`: `target` (a task or workflow, see
-- sluice._resolve_target) runs with `input` on every tick of `cron` in `time_zone`. Returns
-- the first fire time. Replacing a schedule with the same expression and zone keeps its next
-- tick (it is not fired again); a different one starts from now.
CREATE OR REPLACE FUNCTION sluice.schedule_cron(name text, cron text, target text,
                                                input jsonb DEFAULT '{}',
                                                time_zone text DEFAULT 'UTC',
                                                missed text DEFAULT 'skip')
RETURNS timestamptz
LANGUAGE plpgsql AS $$
BEGIN
    RETURN sluice._schedule_cron(name, cron, target, input, time_zone, missed, NULL);
END
$$;

CREATE OR REPLACE FUNCTION sluice._schedule_cron(name text, cron text, target text, input jsonb,
                                                 time_zone text, missed text, declared_by text)
RETURNS timestamptz
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    t        record;
    local_now timestamp;
    first    record;
    existing sluice.cron_schedule;
BEGIN
    PERFORM sluice._require_preloaded();
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'schedule name must be a non-empty string, got %',
            coalesce(quote_literal(name), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF cron IS NULL THEN
        RAISE EXCEPTION 'cron expression must not be NULL (schedule "%")', name USING ERRCODE = '22004';
    END IF;
    IF input IS NULL THEN
        RAISE EXCEPTION 'input must not be NULL (schedule "%"); use ''{}'' for no input', name
            USING ERRCODE = '22004';
    END IF;
    IF missed IS NULL OR missed NOT IN ('skip', 'run_once') THEN
        RAISE EXCEPTION 'missed must be ''skip'' or ''run_once'', got % (schedule "%")',
            coalesce(quote_literal(missed), 'NULL'), name USING ERRCODE = '22023';
    END IF;
    IF time_zone IS NULL THEN
        RAISE EXCEPTION 'time_zone must not be NULL (schedule "%")', name USING ERRCODE = '22004';
    END IF;
    -- Postgres raises 22023 "time zone ... not recognized" for an unknown zone.
    local_now := now() AT TIME ZONE time_zone;
    SELECT * INTO t FROM sluice._resolve_target(target);
    -- Validates the expression (22023 naming it) and finds the first tick.
    SELECT * INTO first FROM sluice._cron_next_at(cron, time_zone, local_now, now());
    IF first.tick = 'infinity' THEN
        RAISE EXCEPTION 'cron expression "%" never fires after now (schedule "%")', cron, name
            USING ERRCODE = '22023';
    END IF;

    SELECT * INTO existing FROM sluice.cron_schedule c WHERE c.name = _schedule_cron.name FOR UPDATE;
    IF FOUND AND existing.cron = cron AND existing.time_zone = time_zone THEN
        first.tick := existing.next_tick;
        first.at := existing.next_at;
    END IF;
    INSERT INTO sluice.cron_schedule AS c
        (name, cron, time_zone, target_kind, target, input, missed, declared_by, next_tick, next_at)
    VALUES (name, cron, time_zone, t.kind, t.name, input, missed, declared_by, first.tick, first.at)
    ON CONFLICT ON CONSTRAINT cron_schedule_pkey DO UPDATE
       SET cron = EXCLUDED.cron, time_zone = EXCLUDED.time_zone,
           target_kind = EXCLUDED.target_kind, target = EXCLUDED.target, input = EXCLUDED.input,
           missed = EXCLUDED.missed, declared_by = EXCLUDED.declared_by,
           next_tick = EXCLUDED.next_tick, next_at = EXCLUDED.next_at, updated_at = now();
    PERFORM sluice._timers_changed();
    RETURN first.at;
END
$$;

-- Removes a schedule; its fired runs are not touched. Returns false if there was none.
CREATE OR REPLACE FUNCTION sluice.unschedule_cron(name text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sluice.cron_schedule c WHERE c.name = unschedule_cron.name;
    RETURN FOUND;
END
$$;

-- The scheduler's wake-up for changed timers (a new schedule, a scheduled workflow run): the
-- same signal as a changed definition, coalesced per tick.
CREATE OR REPLACE FUNCTION sluice._timers_changed() RETURNS void
LANGUAGE sql AS $$
    SELECT sluice._config_changed()
$$;

-- Scheduled runs ------------------------------------------------------------------------------

-- Moves a task that is still scheduled for later (see sluice.scheduled) to `run_at`. Returns
-- false if it is not (any more): it started, finished, or its time came.
CREATE OR REPLACE FUNCTION sluice.reschedule(task_id bigint, run_at timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    t   sluice.task_run;
    def sluice.task_definition;
BEGIN
    IF run_at IS NULL THEN
        RAISE EXCEPTION 'run_at must not be NULL (task %)', task_id USING ERRCODE = '22004';
    END IF;
    -- The clock, not the transaction's start: the scheduler may read a task as runnable as soon
    -- as its run_at passes.
    SELECT * INTO t FROM sluice.task_run r
     WHERE r.id = task_id AND r.status = 'queued' AND r.attempt = 0 AND r.run_id IS NULL
       AND r.run_at > clock_timestamp()
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    SELECT * INTO def FROM sluice.task_definition d WHERE d.name = t.task_name;
    UPDATE sluice.task_run r
       SET run_at = reschedule.run_at,
           schedule_deadline = reschedule.run_at + coalesce(def.schedule_timeout, interval '5 minutes')
     WHERE r.id = task_id;
    PERFORM sluice._wake_scheduler(reschedule.run_at);
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION sluice.reschedule_run(run_id bigint, run_at timestamptz) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF run_at IS NULL THEN
        RAISE EXCEPTION 'run_at must not be NULL (run %)', run_id USING ERRCODE = '22004';
    END IF;
    UPDATE sluice.workflow_run r SET run_at = reschedule_run.run_at
     WHERE r.id = run_id AND r.status = 'queued' AND r.run_at IS NOT NULL;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM sluice._timers_changed();
    RETURN true;
END
$$;

-- Deletes a task scheduled for later, as if it had never been enqueued. Returns false if it is
-- not scheduled for later (any more); sluice.cancel ends a task at any time, keeping its row.
CREATE OR REPLACE FUNCTION sluice.delete_scheduled(task_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sluice.task_run r
     WHERE r.id = task_id AND r.status = 'queued' AND r.attempt = 0 AND r.run_id IS NULL
       AND r.run_at > clock_timestamp();
    RETURN FOUND;
END
$$;

CREATE OR REPLACE FUNCTION sluice.delete_scheduled_run(run_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sluice.workflow_run r
     WHERE r.id = run_id AND r.status = 'queued' AND r.run_at IS NOT NULL;
    RETURN FOUND;
END
$$;

-- The timer ----------------------------------------------------------------------------------

-- Fires what is due, called by the scheduler: cron ticks (up to max_fires schedules) and
-- scheduled workflow runs (up to max_fires). Returns when the next one is due (NULL: none).
--
-- Of the ticks due for a schedule, the latest fires if it is at most a minute late; the
-- earlier ones were missed (Sluice was not running, the scheduler was held up for longer than
-- the schedule's period, or a transaction held the schedule's row): missed = 'skip' drops them,
-- 'run_once' fires the latest whatever its lateness, the run standing for all of them
-- (sluice.cron_fire.missed counts the others).
--
-- Commits synchronously when it fired anything (the scheduler's own transactions do not wait
-- for the disk): a tick must not be lost in a crash after its run was seen.
CREATE OR REPLACE FUNCTION sluice._fire_timers(max_fires int) RETURNS timestamptz
LANGUAGE plpgsql AS $$
DECLARE
    s        sluice.cron_schedule;
    nxt      record;
    due_tick timestamp;
    due_at   timestamptz;
    n_due    int;
    fire     boolean;
    started  record;
    run      sluice.workflow_run;
    fired    int := 0;
BEGIN
    FOR s IN
        SELECT * FROM sluice.cron_schedule c WHERE c.next_at <= now()
         ORDER BY c.next_at LIMIT max_fires FOR UPDATE SKIP LOCKED
    LOOP
        SELECT s.next_tick AS tick, s.next_at AS at INTO nxt;
        BEGIN
            -- Walk the due ticks to the latest (bounded: after a long pause, jump to now).
            n_due := 0;
            LOOP
                due_tick := nxt.tick;
                due_at := nxt.at;
                n_due := n_due + 1;
                SELECT * INTO nxt FROM sluice._cron_next_at(s.cron, s.time_zone, due_tick, due_at);
                EXIT WHEN nxt.at > now() OR n_due >= 1000;
            END LOOP;
            IF nxt.at <= now() THEN
                SELECT * INTO nxt FROM sluice._cron_next_at(s.cron, s.time_zone,
                                                             now() AT TIME ZONE s.time_zone, now());
                n_due := n_due + 1;  -- at least one more tick was passed over
            END IF;
            fire := s.missed = 'run_once' OR now() - due_at <= interval '1 minute';
            SELECT NULL::bigint AS task_id, NULL::bigint AS run_id INTO started;
            IF fire THEN
                INSERT INTO sluice.cron_fire (schedule, tick, tick_at, missed)
                VALUES (s.name, due_tick, due_at, n_due - 1)
                ON CONFLICT DO NOTHING;
                IF FOUND THEN
                    SELECT * INTO started FROM sluice._start_target(s.target_kind, s.target, s.input);
                    UPDATE sluice.cron_fire f SET task_id = started.task_id, run_id = started.run_id
                     WHERE f.schedule = s.name AND f.tick = due_tick;
                    fired := fired + 1;
                END IF;
            END IF;
            UPDATE sluice.cron_schedule c
               SET next_tick = nxt.tick, next_at = nxt.at,
                   last_tick = CASE WHEN fire THEN due_tick ELSE c.last_tick END,
                   last_fired_at = CASE WHEN fire THEN now() ELSE c.last_fired_at END,
                   last_task_id = CASE WHEN fire THEN started.task_id ELSE c.last_task_id END,
                   last_run_id = CASE WHEN fire THEN started.run_id ELSE c.last_run_id END,
                   last_error = NULL
             WHERE c.name = s.name;
        EXCEPTION WHEN OTHERS THEN
            -- One bad schedule (its target deleted, its input rejected) neither stops the
            -- others nor fires in a loop: the tick is passed over and the error kept.
            UPDATE sluice.cron_schedule c
               SET next_tick = nxt.tick,
                   next_at = CASE WHEN nxt.at > now() THEN nxt.at ELSE now() + interval '1 minute' END,
                   last_error = format('%s (SQLSTATE %s) at %s', SQLERRM, SQLSTATE, now())
             WHERE c.name = s.name;
            RAISE WARNING 'sluice scheduler: cron schedule "%" failed to fire: % (SQLSTATE %)',
                s.name, SQLERRM, SQLSTATE;
        END;
    END LOOP;

    FOR run IN
        SELECT * FROM sluice.workflow_run r
         WHERE r.run_at <= now() AND r.run_at IS NOT NULL
         ORDER BY r.run_at LIMIT max_fires FOR UPDATE SKIP LOCKED
    LOOP
        UPDATE sluice.workflow_run r SET run_at = NULL WHERE r.id = run.id RETURNING * INTO run;
        CONTINUE WHEN run.status <> 'queued';
        BEGIN
            IF run.concurrency_key IS NULL THEN
                PERFORM sluice._begin_run(run,
                    (SELECT d.spec FROM sluice.workflow_definition d
                      WHERE d.name = run.workflow AND d.version = run.version));
            ELSE
                PERFORM sluice._request_admission(run.id);
            END IF;
        EXCEPTION WHEN OTHERS THEN
            -- e.g. a step's task definition deleted since: the run fails, naming why
            UPDATE sluice.workflow_run r
               SET status = 'failed', finished_at = now(),
                   error = format('scheduled run could not start: %s (SQLSTATE %s)', SQLERRM, SQLSTATE)
             WHERE r.id = run.id;
        END;
        fired := fired + 1;
    END LOOP;

    -- Workflow steps' sleeps (sql/conditions.sql).
    fired := fired + sluice._meet_due_sleeps(max_fires);

    IF fired > 0 THEN
        PERFORM set_config('synchronous_commit', 'on', true);
    END IF;
    RETURN least((SELECT min(c.next_at) FROM sluice.cron_schedule c),
                 (SELECT min(r.run_at) FROM sluice.workflow_run r WHERE r.run_at IS NOT NULL),
                 sluice._next_sleep_due());
END
$$;

-- Retention of fired ticks: as long as succeeded tasks are kept.
CREATE OR REPLACE FUNCTION sluice._purge_cron_fires(before timestamptz, max_rows int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    n int;
BEGIN
    DELETE FROM sluice.cron_fire f
     WHERE (f.schedule, f.tick) IN (SELECT x.schedule, x.tick FROM sluice.cron_fire x
                                     WHERE x.fired_at < before ORDER BY x.fired_at LIMIT max_rows);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
-- ---- copy of sql/events.sql ----
-- Events: pushed by applications (sluice.push_event), transactional like enqueue. A push
-- starts one run per matching subscription (a task or a workflow subscribed to the key, with
-- `*` wildcards and an optional jsonpath filter on the payload) and wakes the durable tasks
-- waiting for it (sql/durable.sql), all in the pushing transaction: a push that rolls back
-- started nothing. Nothing is NOTIFYed here; the scheduler is woken at commit.

CREATE TABLE sluice.event (
    id        bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    key       text NOT NULL CHECK (key <> ''),
    payload   jsonb NOT NULL,
    pushed_at timestamptz NOT NULL DEFAULT now(),
    -- what the push started and woke
    task_ids  bigint[] NOT NULL DEFAULT '{}',
    run_ids   bigint[] NOT NULL DEFAULT '{}',
    woke_task_ids bigint[] NOT NULL DEFAULT '{}',
    -- workflow runs with a step whose wait_for or cancel_if it met (sql/conditions.sql)
    woke_run_ids  bigint[] NOT NULL DEFAULT '{}'
);
-- Retention (sluice.event_retention) deletes the oldest first.
CREATE INDEX event_pushed_idx ON sluice.event (pushed_at);

CREATE TABLE sluice.event_subscription (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- an event key, `*` matching any characters (`media:*`)
    pattern     text NOT NULL CHECK (pattern <> ''),
    -- the pattern as a LIKE pattern (the other LIKE wildcards escaped)
    key_like    text NOT NULL,
    target_kind text NOT NULL CHECK (target_kind IN ('task', 'workflow')),
    target      text NOT NULL,
    -- a jsonpath on the payload (see sluice._payload_matches); NULL matches every payload
    filter      text,
    -- as in sluice.cron_schedule: set for subscriptions declared in a definition
    declared_by text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT event_subscription_unique UNIQUE NULLS NOT DISTINCT (pattern, target_kind, target, filter)
);

CREATE VIEW sluice.subscriptions AS
SELECT s.id, s.pattern, s.target_kind, s.target, s.filter, s.declared_by, s.created_at
  FROM sluice.event_subscription s;

CREATE VIEW sluice.events AS
SELECT e.id, e.key, e.payload, e.pushed_at, e.task_ids, e.run_ids, e.woke_task_ids,
       e.woke_run_ids
  FROM sluice.event e;

-- Whether a payload matches a filter: a predicate (`$.size > 100`) must be true; any other
-- path (`$ ? (@.kind == "video")`, `$.user`) must find something. A predicate whose result is
-- unknown (a string compared with a number) does not match, nor does a path that errors. A
-- filter is a predicate when it yields a boolean on an empty object (in lax mode a predicate
-- over missing keys is false, not unknown; a path finds nothing there). `vars` are the
-- filter's variables (a workflow step's conditions name its input: $input, $parents).
CREATE OR REPLACE FUNCTION sluice._payload_matches(payload jsonb, filter jsonpath,
                                                   vars jsonb DEFAULT '{}')
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN jsonb_typeof(jsonb_path_query_first('{}', filter, vars, true)) = 'boolean'
                THEN coalesce(jsonb_path_match(payload, filter, vars, true), false)
                ELSE jsonb_path_exists(payload, filter, vars, true) END
$$;

CREATE OR REPLACE FUNCTION sluice._check_filter(filter text, what text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF filter IS NOT NULL THEN
        PERFORM filter::jsonpath;
    END IF;
EXCEPTION WHEN OTHERS THEN
    RAISE EXCEPTION 'invalid jsonpath filter % (%): %', quote_literal(filter), what, SQLERRM
        USING ERRCODE = '22023';
END
$$;

CREATE OR REPLACE FUNCTION sluice._check_event_key(key text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF key IS NULL OR key = '' THEN
        RAISE EXCEPTION 'event key must be a non-empty string, got %',
            coalesce(quote_literal(key), 'NULL') USING ERRCODE = '22023';
    END IF;
END
$$;

-- Subscriptions -------------------------------------------------------------------------------

-- Subscribes `target` (a task or workflow, see sluice._resolve_target) to events whose key
-- matches `pattern`, and whose payload matches `filter` if given: each such push starts one
-- run with the payload as its input. Subscribing again the same way returns the same id.
CREATE OR REPLACE FUNCTION sluice.subscribe(pattern text, target text, filter text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RETURN sluice._subscribe(pattern, target, filter, NULL);
END
$$;

CREATE OR REPLACE FUNCTION sluice._subscribe(pattern text, target text, filter text,
                                             declared_by text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    t      record;
    sub_id bigint;
BEGIN
    PERFORM sluice._check_event_key(pattern);
    PERFORM sluice._check_filter(filter, format('subscription of %s to %s', target, pattern));
    SELECT * INTO t FROM sluice._resolve_target(target);
    INSERT INTO sluice.event_subscription AS s
        (pattern, key_like, target_kind, target, filter, declared_by)
    VALUES (pattern,
            replace(replace(replace(replace(pattern, '\', '\\'), '%', '\%'), '_', '\_'), '*', '%'),
            t.kind, t.name, filter, declared_by)
    ON CONFLICT ON CONSTRAINT event_subscription_unique DO UPDATE SET declared_by = EXCLUDED.declared_by
    RETURNING s.id INTO sub_id;
    RETURN sub_id;
END
$$;

CREATE OR REPLACE FUNCTION sluice.unsubscribe(subscription_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sluice.event_subscription s WHERE s.id = subscription_id;
    RETURN FOUND;
END
$$;

-- Replaces the crons and event subscriptions a task or workflow definition declares
-- (declared_by = '<kind>:<name>'):
--   crons:     [{"cron": "0 3 * * *", "input": {...}, "time_zone": "UTC", "missed": "skip",
--                "name": "<schedule name>"}, ...]   (input, time_zone, missed, name optional;
--                the name defaults to '<kind>:<name>:<cron>')
--   on_events: [{"key": "media:*", "filter": "$.size > 0"}, ...]   (filter optional)
CREATE OR REPLACE FUNCTION sluice._declare_triggers(kind text, name text, crons jsonb,
                                                    on_events jsonb)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    owner text := kind || ':' || name;
    c     jsonb;
    e     jsonb;
    names text[] := '{}';
    ids   bigint[] := '{}';
    sched text;
BEGIN
    IF jsonb_typeof(crons) <> 'array' OR jsonb_typeof(on_events) <> 'array' THEN
        RAISE EXCEPTION '% "%": crons and on_events must be JSON arrays, got % and %', kind, name,
            crons, on_events USING ERRCODE = '22023';
    END IF;
    FOR c IN SELECT x FROM jsonb_array_elements(crons) x LOOP
        IF jsonb_typeof(c) <> 'object' OR jsonb_typeof(c->'cron') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION '% "%": each cron must be an object with a "cron" string, got %',
                kind, name, c USING ERRCODE = '22023';
        END IF;
        sched := coalesce(c->>'name', owner || ':' || (c->>'cron'));
        PERFORM sluice._schedule_cron(sched, c->>'cron', owner, coalesce(c->'input', '{}'),
                                      coalesce(c->>'time_zone', 'UTC'),
                                      coalesce(c->>'missed', 'skip'), owner);
        names := names || sched;
    END LOOP;
    DELETE FROM sluice.cron_schedule s WHERE s.declared_by = owner AND s.name <> ALL(names);
    FOR e IN SELECT x FROM jsonb_array_elements(on_events) x LOOP
        IF jsonb_typeof(e) <> 'object' OR jsonb_typeof(e->'key') IS DISTINCT FROM 'string' THEN
            RAISE EXCEPTION '% "%": each on_events entry must be an object with a "key" string, got %',
                kind, name, e USING ERRCODE = '22023';
        END IF;
        ids := ids || sluice._subscribe(e->>'key', owner, e->>'filter', owner);
    END LOOP;
    DELETE FROM sluice.event_subscription s WHERE s.declared_by = owner AND s.id <> ALL(ids);
END
$$;

-- Declares the crons and event subscriptions of a task (see sluice._declare_triggers), replacing
-- those it declared before.
CREATE OR REPLACE FUNCTION sluice.set_task_triggers(task text, crons jsonb DEFAULT '[]',
                                                    on_events jsonb DEFAULT '[]')
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM sluice._definition(task);
    PERFORM sluice._declare_triggers('task', task, coalesce(crons, '[]'), coalesce(on_events, '[]'));
END
$$;

-- Pushing -------------------------------------------------------------------------------------

-- Pushes one event: starts a run of every matching subscription (payload as input), wakes
-- the durable tasks waiting for it and meets the conditions of workflow steps waiting for it
-- (sql/conditions.sql). Returns the event's id (see sluice.events).
CREATE OR REPLACE FUNCTION sluice.push_event(key text, payload jsonb DEFAULT '{}') RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint := nextval(pg_get_serial_sequence('sluice.event', 'id'));
    sub      sluice.event_subscription;
    started  record;
    tasks    bigint[] := '{}';
    runs     bigint[] := '{}';
    woke     bigint[];
    woke_runs bigint[];
BEGIN
    PERFORM sluice._require_preloaded();
    PERFORM sluice._check_event_key(key);
    IF payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL (event "%"); use ''{}'' for none', key
            USING ERRCODE = '22004';
    END IF;
    FOR sub IN
        SELECT * FROM sluice.event_subscription s WHERE push_event.key LIKE s.key_like ORDER BY s.id
    LOOP
        CONTINUE WHEN sub.filter IS NOT NULL
                      AND NOT sluice._payload_matches(payload, sub.filter::jsonpath);
        -- A subscription whose target was deleted since must not make every push fail.
        IF (sub.target_kind = 'task'
            AND NOT EXISTS (SELECT 1 FROM sluice.task_definition d WHERE d.name = sub.target))
           OR (sub.target_kind = 'workflow'
            AND NOT EXISTS (SELECT 1 FROM sluice.workflow_definition w WHERE w.name = sub.target))
        THEN
            RAISE WARNING 'sluice: event "%" matches subscription % of % "%", which no longer exists; skipped',
                key, sub.id, sub.target_kind, sub.target;
            CONTINUE;
        END IF;
        SELECT * INTO started FROM sluice._start_target(sub.target_kind, sub.target, payload);
        IF started.task_id IS NOT NULL THEN
            tasks := tasks || started.task_id;
        ELSE
            runs := runs || started.run_id;
        END IF;
    END LOOP;
    woke := sluice._wake_waiters(event_id, key, payload);
    woke_runs := sluice._meet_event_conditions(event_id, key, payload);
    INSERT INTO sluice.event (id, key, payload, task_ids, run_ids, woke_task_ids, woke_run_ids)
    VALUES (event_id, key, payload, tasks, runs, woke, woke_runs);
    RETURN event_id;
END
$$;

-- Pushes events in order, one per (key, payload) pair; returns their ids in the same order.
CREATE OR REPLACE FUNCTION sluice.push_events(keys text[], payloads jsonb[]) RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(keys) IS DISTINCT FROM cardinality(payloads) THEN
        RAISE EXCEPTION 'keys and payloads must have the same length (%, %)',
            cardinality(keys), cardinality(payloads) USING ERRCODE = '22023';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(keys), 0) LOOP
        RETURN NEXT sluice.push_event(keys[i], payloads[i]);
    END LOOP;
END
$$;

-- Retention (sluice.event_retention).
CREATE OR REPLACE FUNCTION sluice._purge_events(before timestamptz, max_rows int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    n int;
BEGIN
    DELETE FROM sluice.event e
     WHERE e.id IN (SELECT x.id FROM sluice.event x WHERE x.pushed_at < before
                     ORDER BY x.pushed_at LIMIT max_rows);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
-- ---- copy of sql/durable.sql ----
-- Durable tasks: a task records the steps it takes (memoised values, sleeps, event waits) in
-- sluice.durable_step, numbered in the order the handler takes them. A later attempt (after a
-- crash, a lost worker, a retry, or a suspension) runs the handler again, which replays: a
-- step already recorded returns its recorded result instead of running again. A replay that
-- asks for a different step than the record has at that number fails the task (the code
-- changed under a task in flight, or the handler is not deterministic).
--
-- Sleeping and waiting suspend the task: the attempt ends without consuming a retry, the task
-- goes back to the queue with run_at = when it should wake (a sleep's end, a wait's timeout,
-- 'infinity' for a wait without one) and its worker slot is free. An event that matches a
-- waiting step (sluice.push_event) records the payload on the step and makes the task runnable
-- at once.
--
-- Every write is fenced by the attempt: only the current attempt of a running task, held by
-- the calling worker, may record, so a stale attempt (timed out, lost) cannot change the record.

CREATE TABLE sluice.durable_step (
    task_id     bigint NOT NULL,
    seq         int NOT NULL CHECK (seq >= 0),
    kind        text NOT NULL CHECK (kind IN ('memo', 'sleep', 'wait_event', 'wait_children')),
    -- memo: its name; sleep: 'sleep'; wait_event: the event key; wait_children: 'children'
    name        text NOT NULL,
    -- waiting (a sleep or wait not over yet), done, or timed_out (a wait without its event)
    state       text NOT NULL CHECK (state IN ('waiting', 'done', 'timed_out')),
    -- memo: the value; wait_event: the event's payload; wait_children: {"tasks": [ids],
    -- "runs": [ids]}
    value       jsonb,
    -- sleep: its end; wait_event: its timeout (NULL: none)
    wake_at     timestamptz,
    -- wait_event: the jsonpath filter on the payload, and the event that ended the wait
    filter      text,
    event_id    bigint,
    attempt     int NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,
    PRIMARY KEY (task_id, seq)
);
-- Waits by event key, for sluice.push_event.
CREATE INDEX durable_step_waiting_idx ON sluice.durable_step (name)
    WHERE kind = 'wait_event' AND state = 'waiting';

CREATE VIEW sluice.durable_steps AS
SELECT d.task_id, d.seq, d.kind, d.name, d.state, d.value, d.wake_at, d.filter, d.event_id,
       d.attempt, d.recorded_at, d.resolved_at
  FROM sluice.durable_step d;

-- The current attempt of a running task held by this worker, locked; NULL if it is not.
CREATE OR REPLACE FUNCTION sluice._current_attempt(worker_id bigint, task_id bigint, attempt int)
RETURNS sluice.task_run
LANGUAGE plpgsql AS $$
DECLARE
    t sluice.task_run;
BEGIN
    -- an attempt claimed in memory is written into its row first (sluice._settle_claims)
    PERFORM sluice._settle_claims(ARRAY[_current_attempt.task_id]);
    SELECT * INTO t FROM sluice.task_run r
     WHERE r.id = _current_attempt.task_id AND r.attempt = _current_attempt.attempt
       AND r.worker_id = _current_attempt.worker_id AND r.status::text = 'running'
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN t;
END
$$;

-- Ends the attempt without an outcome: the task waits in the queue until `until` (or an event)
-- and then runs again, replaying its record. Consumes no retry.
CREATE OR REPLACE FUNCTION sluice._suspend(t sluice.task_run, until timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    timeout interval := coalesce((SELECT d.schedule_timeout FROM sluice.task_definition d
                                   WHERE d.name = t.task_name), interval '5 minutes');
BEGIN
    UPDATE sluice.task_run r
       SET status = 'queued', worker_id = NULL, assigned_at = NULL, picked_at = NULL,
           timeout_at = NULL, run_at = until, schedule_deadline = until + timeout
     WHERE r.id = t.id;
    PERFORM sluice._attempts_ended(ARRAY[t.id], ARRAY[t.attempt]);
    PERFORM sluice._wake_scheduler(CASE WHEN isfinite(until) THEN until END);
END
$$;

-- The step recorded at `seq`, which must be the one the handler asks for: else the replay
-- diverged (22023, naming both).
CREATE OR REPLACE FUNCTION sluice._recorded_step(task_id bigint, seq int, kind text, name text)
RETURNS sluice.durable_step
LANGUAGE plpgsql AS $$
DECLARE
    step sluice.durable_step;
BEGIN
    SELECT * INTO step FROM sluice.durable_step d
     WHERE d.task_id = _recorded_step.task_id AND d.seq = _recorded_step.seq;
    IF step.kind IS DISTINCT FROM kind OR step.name IS DISTINCT FROM name THEN
        RAISE EXCEPTION 'durable task %: replay diverged at step %: the record has %("%") there, the handler asked for %("%")',
            task_id, seq, step.kind, step.name, kind, name USING ERRCODE = '22023';
    END IF;
    RETURN step;
END
$$;

-- Makes suspended tasks runnable now (an event or their children came before their wake
-- time); tasks not suspended are left alone.
CREATE OR REPLACE FUNCTION sluice._resume_now(task_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE sluice.task_run t
       SET run_at = now(),
           schedule_deadline = now() + coalesce((SELECT d.schedule_timeout FROM sluice.task_definition d
                                                  WHERE d.name = t.task_name), interval '5 minutes')
     WHERE t.id = ANY(task_ids) AND t.status = 'queued' AND t.run_at > now();
    IF FOUND THEN
        PERFORM sluice._wake_scheduler(now());
    END IF;
END
$$;

-- The task's record, in order (what a new attempt replays).
CREATE OR REPLACE FUNCTION sluice.durable_record(task_id bigint)
RETURNS TABLE (seq int, kind text, name text, state text, value jsonb, wake_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT d.seq, d.kind, d.name, d.state, d.value, d.wake_at FROM sluice.durable_step d
     WHERE d.task_id = durable_record.task_id ORDER BY d.seq
$$;

-- Records a memoised value. Returns false if the attempt is not current (nothing recorded).
-- A value already recorded at `seq` is kept (the first one wins).
CREATE OR REPLACE FUNCTION sluice.durable_memo(worker_id bigint, task_id bigint, attempt int,
                                               seq int, name text, value jsonb)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    t sluice.task_run := sluice._current_attempt(worker_id, task_id, attempt);
BEGIN
    IF t.id IS NULL THEN
        RETURN false;
    END IF;
    INSERT INTO sluice.durable_step (task_id, seq, kind, name, state, value, attempt, resolved_at)
    VALUES (task_id, seq, 'memo', name, 'done', coalesce(value, 'null'), attempt, now())
    ON CONFLICT DO NOTHING;
    RETURN true;
END
$$;

-- A sleep at `seq` until `wake_at` (a new sleep), or the recorded one. Returns 'continue' if
-- it is over, 'suspended' if the attempt was suspended until it is, 'stale' if the attempt is
-- not current. A new sleep's `wake_at` is computed by the caller from the database's clock:
-- pass `duration` instead to have it computed here.
CREATE OR REPLACE FUNCTION sluice.durable_sleep(worker_id bigint, task_id bigint, attempt int,
                                                seq int, wake_at timestamptz,
                                                duration interval DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    t    sluice.task_run := sluice._current_attempt(worker_id, task_id, attempt);
    step sluice.durable_step;
BEGIN
    IF t.id IS NULL THEN
        RETURN 'stale';
    END IF;
    INSERT INTO sluice.durable_step (task_id, seq, kind, name, state, wake_at, attempt)
    VALUES (task_id, seq, 'sleep', 'sleep', 'waiting',
            coalesce(wake_at, clock_timestamp() + duration, clock_timestamp()), attempt)
    ON CONFLICT DO NOTHING;
    step := sluice._recorded_step(task_id, seq, 'sleep', 'sleep');
    IF step.wake_at <= clock_timestamp() THEN
        UPDATE sluice.durable_step d SET state = 'done', resolved_at = coalesce(d.resolved_at, now())
         WHERE d.task_id = t.id AND d.seq = step.seq AND d.state <> 'done';
        RETURN 'continue';
    END IF;
    PERFORM sluice._suspend(t, step.wake_at);
    RETURN 'suspended';
END
$$;

-- A wait at `seq` for an event `key` whose payload matches `filter` (NULL: any), for at most
-- `timeout` (NULL: no limit), or the recorded one. Returns (state, payload): state 'done' with
-- the event's payload, 'timed_out', 'suspended' (the attempt was suspended until the event or
-- the timeout), or 'stale' (the attempt is not current). Only events pushed after the wait was
-- first recorded count.
CREATE OR REPLACE FUNCTION sluice.durable_wait_event(worker_id bigint, task_id bigint, attempt int,
                                                     seq int, key text, filter text,
                                                     timeout interval,
                                                     OUT state text, OUT payload jsonb)
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    t    sluice.task_run := sluice._current_attempt(worker_id, task_id, attempt);
    step sluice.durable_step;
BEGIN
    IF t.id IS NULL THEN
        state := 'stale';
        RETURN;
    END IF;
    PERFORM sluice._check_event_key(key);
    PERFORM sluice._check_filter(filter, format('wait of task %s', task_id));
    IF timeout < interval '0' THEN
        RAISE EXCEPTION 'timeout must not be negative, got % (task %)', timeout, task_id
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO sluice.durable_step (task_id, seq, kind, name, state, wake_at, filter, attempt)
    VALUES (task_id, seq, 'wait_event', key, 'waiting', clock_timestamp() + timeout, filter, attempt)
    ON CONFLICT DO NOTHING;
    step := sluice._recorded_step(task_id, seq, 'wait_event', key);
    IF step.state = 'waiting' AND step.wake_at <= clock_timestamp() THEN
        UPDATE sluice.durable_step d SET state = 'timed_out', resolved_at = now()
         WHERE d.task_id = t.id AND d.seq = step.seq AND d.state = 'waiting'
        RETURNING * INTO step;
    END IF;
    IF step.state <> 'waiting' THEN
        state := step.state;
        payload := step.value;
        RETURN;
    END IF;
    PERFORM sluice._suspend(t, coalesce(step.wake_at, 'infinity'));
    state := 'suspended';
END
$$;

-- For sluice.push_event: ends the waits for this event, and makes their tasks runnable now.
-- Returns the tasks woken.
CREATE OR REPLACE FUNCTION sluice._wake_waiters(event_id bigint, key text, payload jsonb)
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    woke bigint[];
BEGIN
    WITH ended AS (
        UPDATE sluice.durable_step d
           SET state = 'done', value = payload, event_id = _wake_waiters.event_id,
               resolved_at = now()
         WHERE d.kind = 'wait_event' AND d.state = 'waiting' AND d.name = key
           -- a wait past its timeout has timed out, whether or not its task has run since
           AND (d.wake_at IS NULL OR d.wake_at > clock_timestamp())
           AND (d.filter IS NULL OR sluice._payload_matches(payload, d.filter::jsonpath))
           -- only unfinished tasks' waits (a running attempt that replays reads it from its
           -- step); a cancelled task's wait stays as it was
           AND EXISTS (SELECT 1 FROM sluice.task_run r
                        WHERE r.id = d.task_id AND r.status IN ('queued', 'running'))
        RETURNING d.task_id
    )
    SELECT array_agg(DISTINCT e.task_id) INTO woke FROM ended e;
    IF woke IS NULL THEN
        RETURN '{}';
    END IF;
    -- A task still running (it recorded the wait and has not suspended yet, or is replaying)
    -- finds the event on its step.
    PERFORM sluice._resume_now(woke);
    RETURN woke;
END
$$;

-- A wait at `seq` until the given child tasks and child workflow runs have all finished.
-- Returns 'continue' if they have, 'suspended' if the attempt was suspended meanwhile, 'stale'
-- if the attempt is not current. The last child to finish makes the parent runnable
-- (sluice._wake_parent); the suspension also ends by itself after a while (1 s, growing with the
-- wait to 30 s), so a wake-up lost to a race costs a little latency, never the task.
CREATE OR REPLACE FUNCTION sluice.durable_wait_children(worker_id bigint, task_id bigint,
                                                        attempt int, seq int,
                                                        task_ids bigint[], run_ids bigint[])
RETURNS text
LANGUAGE plpgsql AS $$
#variable_conflict use_variable
DECLARE
    t    sluice.task_run := sluice._current_attempt(worker_id, task_id, attempt);
    step sluice.durable_step;
BEGIN
    IF t.id IS NULL THEN
        RETURN 'stale';
    END IF;
    INSERT INTO sluice.durable_step (task_id, seq, kind, name, state, value, attempt)
    VALUES (task_id, seq, 'wait_children', 'children', 'waiting',
            jsonb_build_object('tasks', coalesce(task_ids, '{}'), 'runs', coalesce(run_ids, '{}')),
            attempt)
    ON CONFLICT DO NOTHING;
    step := sluice._recorded_step(task_id, seq, 'wait_children', 'children');
    IF step.state = 'done' THEN
        RETURN 'continue';
    END IF;
    -- never `id = ANY('{}')` (see sluice._maintain)
    IF (cardinality(task_ids) IS NULL OR cardinality(task_ids) = 0
        OR NOT EXISTS (SELECT 1 FROM sluice.task_run c
                        WHERE c.id = ANY(task_ids) AND c.status IN ('queued', 'running')))
       AND (cardinality(run_ids) IS NULL OR cardinality(run_ids) = 0
        OR NOT EXISTS (SELECT 1 FROM sluice.workflow_run r
                        WHERE r.id = ANY(run_ids) AND r.status IN ('queued', 'running'))) THEN
        UPDATE sluice.durable_step d SET state = 'done', resolved_at = now()
         WHERE d.task_id = t.id AND d.seq = step.seq;
        RETURN 'continue';
    END IF;
    PERFORM sluice._suspend(t, now() + least(interval '30 seconds',
                                             greatest(interval '1 second',
                                                      (now() - step.recorded_at) / 4)));
    RETURN 'suspended';
END
$$;

-- A child task or child workflow run finished: if its parent has no unfinished child left and
-- is suspended waiting for children, it runs again now.
CREATE OR REPLACE FUNCTION sluice._wake_parent() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM sluice.task_run c
                    WHERE c.parent_id = NEW.parent_id AND c.status IN ('queued', 'running'))
       AND NOT EXISTS (SELECT 1 FROM sluice.workflow_run r
                        WHERE r.parent_id = NEW.parent_id AND r.status IN ('queued', 'running')) THEN
        IF EXISTS (SELECT 1 FROM sluice.durable_step w
                    WHERE w.task_id = NEW.parent_id AND w.kind = 'wait_children'
                      AND w.state = 'waiting') THEN
            PERFORM sluice._resume_now(ARRAY[NEW.parent_id]);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

-- OF finished_at, not status: every statement that makes a task final sets finished_at (the
-- table's check constraint), and a claim, which changes status but not finished_at, then
-- skips this trigger without preparing its WHEN clause (a tenth of a one-task fetch).
CREATE TRIGGER task_run_child_finished
    AFTER UPDATE OF finished_at ON sluice.task_run
    FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION sluice._wake_parent();

CREATE TRIGGER workflow_run_child_finished
    AFTER UPDATE OF status ON sluice.workflow_run
    FOR EACH ROW
    WHEN (NEW.parent_id IS NOT NULL AND OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('succeeded', 'failed', 'cancelled'))
    EXECUTE FUNCTION sluice._wake_parent();
-- ---- copy of sql/conditions.sql ----
-- Step conditions of workflows: wait_for and cancel_if.
--
-- A step's "wait_for" holds it back after its parents are done until its conditions are met;
-- its "cancel_if" cancels it (and so the run, as a cancelled step does) when they are met
-- first, or while its task is queued or running. Conditions are sleeps and events:
--   "30 seconds"  or  {"sleep": "30 seconds"}          met that long after the step is ready
--   {"event": "order:paid", "filter": "<jsonpath>"}     met by the first event with that key
--                                                       pushed after the step is ready whose
--                                                       payload matches the filter (optional)
--   {"any": [<condition>, ...]}                         an or-group: met when one of them is
--   [<condition or or-group>, ...]                      met when every item is
-- define_workflow normalizes both to an AND of or-groups: [[<condition>, ...], ...].
-- A filter is matched as a subscription's is (sluice._payload_matches), and may name the
-- step's input: $input (the run's input), $parents (outputs by step), $skipped.
--
-- The step waits with status 'waiting', one row per condition in sluice.step_condition.
-- sluice.push_event meets event conditions in the pushing transaction; the scheduler meets
-- sleeps (sluice._fire_timers). When wait_for is met the step's task is enqueued, its input
-- carrying the payloads of the events it waited for ("events": {"<key>": <payload>}).
-- A step whose wait_for has sleeps only and no cancel_if does not wait here: its task is
-- enqueued at once to run when the sleeps are over, as a delayed task.
--
-- Locks, in this order everywhere: the run, then the step, then its conditions (cancel_run,
-- the scheduler's outcome applier and the timers take the run first too).
--
-- Included after durable.sql (it uses events.sql's sluice._payload_matches).

CREATE TABLE sluice.step_condition (
    run_id       bigint NOT NULL,
    step         text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('wait_for', 'cancel_if')),
    -- or-group and position in it (0-based) in the step's normalized spec
    grp          int NOT NULL,
    pos          int NOT NULL,
    -- an event condition: its key and filter; a sleep: when it is met
    event_key    text,
    filter       text,
    fire_at      timestamptz,
    met_at       timestamptz,
    -- the event that met it
    event_id     bigint,
    payload      jsonb,
    PRIMARY KEY (run_id, step, kind, grp, pos),
    FOREIGN KEY (run_id, step) REFERENCES sluice.workflow_step (run_id, step) ON DELETE CASCADE,
    CHECK ((event_key IS NULL) <> (fire_at IS NULL))
);
-- Unmet event conditions by key (sluice.push_event), unmet sleeps by time (the timers).
CREATE INDEX step_condition_event_idx ON sluice.step_condition (event_key)
    WHERE met_at IS NULL AND event_key IS NOT NULL;
CREATE INDEX step_condition_fire_idx ON sluice.step_condition (fire_at)
    WHERE met_at IS NULL AND fire_at IS NOT NULL;

-- Definition ----------------------------------------------------------------------------------

-- Validates and normalizes a step's wait_for or cancel_if (`what`) to [[<condition>, ...], ...]
-- (an AND of or-groups), each condition {"sleep": "<interval>"} or {"event": key[, "filter"]}.
CREATE OR REPLACE FUNCTION sluice._normalize_conditions(v jsonb, wf text, step text, what text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    items  jsonb;
    item   jsonb;
    groups jsonb := '[]';
    grp    jsonb;
    c      jsonb;
BEGIN
    items := CASE WHEN jsonb_typeof(v) = 'array' THEN v ELSE jsonb_build_array(v) END;
    IF jsonb_array_length(items) = 0 THEN
        RAISE EXCEPTION 'workflow "%": step "%": % must name at least one condition', wf, step, what
            USING ERRCODE = '22023';
    END IF;
    FOR item IN SELECT x FROM jsonb_array_elements(items) x LOOP
        IF jsonb_typeof(item) = 'object' AND item ? 'any' THEN
            IF (SELECT count(*) FROM jsonb_object_keys(item)) <> 1
               OR jsonb_typeof(item->'any') <> 'array' OR jsonb_array_length(item->'any') = 0 THEN
                RAISE EXCEPTION 'workflow "%": step "%": % has a malformed or-group %: it must be {"any": [<condition>, ...]} with at least one condition',
                    wf, step, what, item USING ERRCODE = '22023';
            END IF;
            grp := '[]';
            FOR c IN SELECT x FROM jsonb_array_elements(item->'any') x LOOP
                grp := grp || jsonb_build_array(sluice._normalize_condition(c, wf, step, what));
            END LOOP;
        ELSE
            grp := jsonb_build_array(sluice._normalize_condition(item, wf, step, what));
        END IF;
        groups := groups || jsonb_build_array(grp);
    END LOOP;
    RETURN groups;
END
$$;

CREATE OR REPLACE FUNCTION sluice._normalize_condition(c jsonb, wf text, step text, what text)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    extra text;
    d     interval;
BEGIN
    IF jsonb_typeof(c) = 'string' THEN
        c := jsonb_build_object('sleep', c);
    END IF;
    IF jsonb_typeof(c) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'workflow "%": step "%": % has a malformed condition %', wf, step, what, c
            USING ERRCODE = '22023',
                  HINT = 'A condition is a duration (''30 seconds'' or {"sleep": ...}), {"event": "<key>", "filter": "<jsonpath>"}, or an or-group {"any": [...]}.';
    END IF;
    IF c ? 'sleep' THEN
        SELECT string_agg(k, ', ') INTO extra FROM jsonb_object_keys(c) k WHERE k <> 'sleep';
        IF extra IS NOT NULL THEN
            RAISE EXCEPTION 'workflow "%": step "%": % has a sleep condition with unknown key(s) %',
                wf, step, what, extra USING ERRCODE = '22023';
        END IF;
        d := sluice._workflow_interval(c->'sleep', wf, step, what);
        RETURN jsonb_build_object('sleep', d::text);
    ELSIF c ? 'event' THEN
        SELECT string_agg(k, ', ') INTO extra FROM jsonb_object_keys(c) k
         WHERE k NOT IN ('event', 'filter');
        IF extra IS NOT NULL THEN
            RAISE EXCEPTION 'workflow "%": step "%": % has an event condition with unknown key(s) %',
                wf, step, what, extra USING ERRCODE = '22023';
        END IF;
        IF jsonb_typeof(c->'event') IS DISTINCT FROM 'string' OR c->>'event' = '' THEN
            RAISE EXCEPTION 'workflow "%": step "%": % has an event condition whose key is not a non-empty string: %',
                wf, step, what, c->'event' USING ERRCODE = '22023';
        END IF;
        IF c ? 'filter' THEN
            IF jsonb_typeof(c->'filter') IS DISTINCT FROM 'string' THEN
                RAISE EXCEPTION 'workflow "%": step "%": % has an event filter that is not a jsonpath string: %',
                    wf, step, what, c->'filter' USING ERRCODE = '22023';
            END IF;
            PERFORM sluice._workflow_jsonpath(c->>'filter', wf, step, what || ' filter');
            -- Only the step's own input may be named ($input, $parents, $skipped).
            BEGIN
                PERFORM jsonb_path_query_first('{}', (c->>'filter')::jsonpath,
                                               '{"input": {}, "parents": {}, "skipped": []}', true);
            EXCEPTION WHEN OTHERS THEN
                RAISE EXCEPTION 'workflow "%": step "%": % filter %: %', wf, step, what,
                    quote_literal(c->>'filter'), SQLERRM
                    USING ERRCODE = '22023',
                          HINT = 'A filter may use $input, $parents and $skipped.';
            END;
        END IF;
        RETURN jsonb_strip_nulls(jsonb_build_object('event', c->'event', 'filter', c->'filter'));
    END IF;
    RAISE EXCEPTION 'workflow "%": step "%": % has a condition that is neither a sleep nor an event: %',
        wf, step, what, c
        USING ERRCODE = '22023',
              HINT = 'A condition is a duration (''30 seconds'' or {"sleep": ...}), {"event": "<key>", "filter": "<jsonpath>"}, or an or-group {"any": [...]}.';
END
$$;

-- Runs ----------------------------------------------------------------------------------------

-- A ready step (its parents are done, skip_if did not hold) with conditions: either its task
-- is enqueued now, delayed by its sleeps, or it waits for its conditions. The caller holds
-- the run. Returns the task id, or NULL if the step waits or was cancelled.
CREATE OR REPLACE FUNCTION sluice._start_step_with_conditions(run sluice.workflow_run, s jsonb,
                                                              envelope jsonb)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    wait_for  jsonb := sluice._step_conditions(s->'wait_for');
    cancel_if jsonb := sluice._step_conditions(s->'cancel_if');
    grp       jsonb;
    c         jsonb;
    g         int;
    p         int;
    kind      text;
    delay     interval;
BEGIN
    -- Sleeps only: the step's task is enqueued now, to run once every or-group has one sleep
    -- over (the longest of the groups' shortest sleeps).
    IF cancel_if = '[]' AND NOT jsonb_path_exists(wait_for, '$[*][*].event') THEN
        SELECT max(shortest) INTO delay FROM (
            SELECT min((x->>'sleep')::interval) AS shortest
              FROM jsonb_array_elements(wait_for) WITH ORDINALITY AS q(gr, n)
             CROSS JOIN LATERAL jsonb_array_elements(q.gr) AS x
             GROUP BY q.n) m;
        RETURN sluice._enqueue_started_step(run, s, envelope, now() + coalesce(delay, '0'));
    END IF;

    UPDATE sluice.workflow_step w
       SET status = 'waiting', envelope = _start_step_with_conditions.envelope, started_at = now()
     WHERE w.run_id = run.id AND w.step = s->>'name';
    FOREACH kind IN ARRAY ARRAY['wait_for', 'cancel_if'] LOOP
        g := 0;
        FOR grp IN SELECT x FROM jsonb_array_elements(CASE kind WHEN 'wait_for' THEN wait_for
                                                                ELSE cancel_if END) x LOOP
            p := 0;
            FOR c IN SELECT x FROM jsonb_array_elements(grp) x LOOP
                INSERT INTO sluice.step_condition
                    (run_id, step, kind, grp, pos, event_key, filter, fire_at, met_at)
                VALUES (run.id, s->>'name', kind, g, p, c->>'event', c->>'filter',
                        now() + (c->>'sleep')::interval,
                        CASE WHEN (c->>'sleep')::interval <= '0' THEN now() END);
                p := p + 1;
            END LOOP;
            g := g + 1;
        END LOOP;
    END LOOP;
    IF jsonb_path_exists(wait_for || cancel_if, '$[*][*].sleep') THEN
        PERFORM sluice._timers_changed();  -- the scheduler learns the new earliest sleep
    END IF;
    RETURN sluice._evaluate_step_conditions(run, s->>'name');
END
$$;

-- A step's normalized conditions, '[]' for none (a spec of an earlier version may hold a bare
-- duration).
CREATE OR REPLACE FUNCTION sluice._step_conditions(v jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN v IS NULL THEN '[]'::jsonb
                WHEN jsonb_typeof(v) = 'string' THEN jsonb_build_array(jsonb_build_array(
                                                      jsonb_build_object('sleep', v)))
                ELSE v END
$$;

-- The step's task is enqueued (to run at run_at) and the step is started. A step with
-- cancel_if keeps its input while it runs: the filters of its cancel_if may name it.
CREATE OR REPLACE FUNCTION sluice._enqueue_started_step(run sluice.workflow_run, s jsonb,
                                                        envelope jsonb, run_at timestamptz)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    new_task bigint;
BEGIN
    new_task := sluice._enqueue_step(s->>'task', envelope, run_at, run.id, s->>'name');
    UPDATE sluice.workflow_step w
       SET status = 'started', task_id = new_task, started_at = coalesce(w.started_at, now()),
           envelope = CASE WHEN s ? 'cancel_if' THEN _enqueue_started_step.envelope END
     WHERE w.run_id = run.id AND w.step = s->>'name';
    RETURN new_task;
END
$$;

-- Whether every or-group of the step's conditions of one kind has a condition met; NULL
-- when it has none of that kind (no wait_for: nothing to wait for; no cancel_if: nothing
-- cancels it).
CREATE OR REPLACE FUNCTION sluice._conditions_met(run_id bigint, step text, kind text)
RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT bool_and(g.met)
      FROM (SELECT bool_or(c.met_at IS NOT NULL) AS met
              FROM sluice.step_condition c
             WHERE c.run_id = _conditions_met.run_id AND c.step = _conditions_met.step
               AND c.kind = _conditions_met.kind
             GROUP BY c.grp) g
$$;

-- After some of a step's conditions were met (the caller holds the run, which is running,
-- and the step): a met cancel_if cancels it, a met wait_for starts its task. Returns the
-- task started, if any.
CREATE OR REPLACE FUNCTION sluice._evaluate_step_conditions(run sluice.workflow_run, step text)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    w      sluice.workflow_step;
    spec   jsonb;
    s      jsonb;
    t      sluice.task_run;
    reason text;
BEGIN
    SELECT * INTO w FROM sluice.workflow_step x
     WHERE x.run_id = run.id AND x.step = _evaluate_step_conditions.step;
    IF coalesce(sluice._conditions_met(run.id, step, 'cancel_if'), false) THEN
        SELECT 'cancel_if met: ' || string_agg(coalesce('event "' || c.event_key || '"',
                                                        'sleep until ' || c.fire_at::text), ', '
                                               ORDER BY c.grp, c.pos)
          INTO reason
          FROM sluice.step_condition c
         WHERE c.run_id = run.id AND c.step = w.step AND c.kind = 'cancel_if'
           AND c.met_at IS NOT NULL;
        DELETE FROM sluice.step_condition c WHERE c.run_id = run.id AND c.step = w.step;
        IF w.status = 'waiting' THEN
            UPDATE sluice.workflow_step x
               SET status = 'cancelled', error = reason, finished_at = now(), envelope = NULL
             WHERE x.run_id = run.id AND x.step = w.step;
            SELECT d.spec INTO spec FROM sluice.workflow_definition d
             WHERE d.name = run.workflow AND d.version = run.version;
            PERFORM sluice._step_failed(run, spec, w.step, 'cancelled', reason);
        ELSIF w.status = 'started' THEN
            -- its task's ending is applied as any cancelled step's is
            SELECT * INTO t FROM sluice.task_run r
             WHERE r.id = w.task_id AND r.status IN ('queued', 'running') FOR UPDATE;
            IF FOUND THEN
                PERFORM sluice._cancel(t, reason);
            END IF;
        END IF;
        RETURN NULL;
    END IF;
    IF w.status <> 'waiting'
       OR NOT coalesce(sluice._conditions_met(run.id, step, 'wait_for'), true) THEN
        RETURN NULL;
    END IF;
    SELECT x INTO s FROM sluice.workflow_definition d
     CROSS JOIN LATERAL jsonb_array_elements(d.spec->'steps') x
     WHERE d.name = run.workflow AND d.version = run.version AND x->>'name' = w.step;
    -- The wait is over: what is left of it goes; cancel_if keeps watching the task.
    DELETE FROM sluice.step_condition c
     WHERE c.run_id = run.id AND c.step = w.step AND c.kind = 'wait_for' AND c.met_at IS NULL;
    RETURN sluice._enqueue_started_step(run, s,
        w.envelope || jsonb_build_object('events', coalesce(
            (SELECT jsonb_object_agg(c.event_key, c.payload ORDER BY c.met_at)
               FROM sluice.step_condition c
              WHERE c.run_id = run.id AND c.step = w.step AND c.kind = 'wait_for'
                AND c.event_key IS NOT NULL AND c.met_at IS NOT NULL), '{}')),
        now());
END
$$;

-- An event meets the unmet conditions with its key (and a matching payload) of waiting steps,
-- and the cancel_if conditions of started ones. Returns the runs whose steps it met.
CREATE OR REPLACE FUNCTION sluice._meet_event_conditions(event_id bigint, key text, payload jsonb)
RETURNS bigint[]
LANGUAGE plpgsql AS $$
DECLARE
    target record;
    run    sluice.workflow_run;
    w      sluice.workflow_step;
    runs   bigint[] := '{}';
BEGIN
    FOR target IN
        SELECT DISTINCT c.run_id, c.step FROM sluice.step_condition c
         WHERE c.event_key = key AND c.met_at IS NULL
         ORDER BY c.run_id, c.step
    LOOP
        SELECT * INTO run FROM sluice.workflow_run r WHERE r.id = target.run_id FOR UPDATE;
        CONTINUE WHEN NOT FOUND OR run.status <> 'running';
        SELECT * INTO w FROM sluice.workflow_step x
         WHERE x.run_id = target.run_id AND x.step = target.step FOR UPDATE;
        CONTINUE WHEN w.status NOT IN ('waiting', 'started');
        UPDATE sluice.step_condition c
           SET met_at = now(), event_id = _meet_event_conditions.event_id,
               payload = _meet_event_conditions.payload
         WHERE c.run_id = w.run_id AND c.step = w.step AND c.event_key = key AND c.met_at IS NULL
           AND (c.kind = 'cancel_if' OR w.status = 'waiting')
           AND (c.filter IS NULL
                OR sluice._payload_matches(_meet_event_conditions.payload, c.filter::jsonpath,
                                           -- (never NULL while waiting or watched; a filter
                                           -- missing a variable would fail the push)
                                           coalesce(w.envelope, jsonb_build_object(
                                               'input', run.input, 'parents', '{}'::jsonb,
                                               'skipped', '[]'::jsonb))));
        CONTINUE WHEN NOT FOUND;
        IF NOT run.id = ANY(runs) THEN
            runs := runs || run.id;
        END IF;
        PERFORM sluice._evaluate_step_conditions(run, w.step);
    END LOOP;
    RETURN runs;
END
$$;

-- Sleeps that are over meet their conditions (the scheduler, through sluice._fire_timers).
-- A step whose run another transaction holds is left for the next call. Returns how many
-- steps were looked at.
CREATE OR REPLACE FUNCTION sluice._meet_due_sleeps(max_steps int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    target record;
    run    sluice.workflow_run;
    w      sluice.workflow_step;
    n      int := 0;
BEGIN
    FOR target IN
        SELECT DISTINCT c.run_id, c.step FROM sluice.step_condition c
         WHERE c.fire_at <= now() AND c.met_at IS NULL
         ORDER BY c.run_id, c.step LIMIT max_steps
    LOOP
        SELECT * INTO run FROM sluice.workflow_run r WHERE r.id = target.run_id
           FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        n := n + 1;
        BEGIN
            SELECT * INTO w FROM sluice.workflow_step x
             WHERE x.run_id = target.run_id AND x.step = target.step FOR UPDATE;
            IF run.status <> 'running' OR w.status NOT IN ('waiting', 'started') THEN
                -- left over from a step that ended otherwise
                DELETE FROM sluice.step_condition c
                 WHERE c.run_id = target.run_id AND c.step = target.step AND c.met_at IS NULL;
                CONTINUE;
            END IF;
            UPDATE sluice.step_condition c SET met_at = now()
             WHERE c.run_id = w.run_id AND c.step = w.step AND c.fire_at <= now()
               AND c.met_at IS NULL AND (c.kind = 'cancel_if' OR w.status = 'waiting');
            PERFORM sluice._evaluate_step_conditions(run, w.step);
        EXCEPTION WHEN OTHERS THEN
            -- e.g. the step's task definition was deleted: the run fails, naming why
            UPDATE sluice.workflow_run r
               SET status = 'failed', finished_at = now(),
                   error = format('step "%s" could not start after its wait: %s (SQLSTATE %s)',
                                  target.step, SQLERRM, SQLSTATE)
             WHERE r.id = run.id;
            PERFORM sluice._cancel_run_steps(run.id,
                format('run %s failed: step "%s" could not start', run.id, target.step));
            PERFORM sluice._run_finished(run.id);
        END;
    END LOOP;
    RETURN n;
END
$$;

-- When the next sleep is over, if any.
CREATE OR REPLACE FUNCTION sluice._next_sleep_due() RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(c.fire_at) FROM sluice.step_condition c
     WHERE c.met_at IS NULL AND c.fire_at IS NOT NULL
$$;
