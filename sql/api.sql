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
