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
