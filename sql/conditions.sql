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
