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
