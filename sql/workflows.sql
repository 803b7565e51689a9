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
