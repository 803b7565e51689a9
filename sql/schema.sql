-- Sluice storage: tables, indexes and the public views.
--
-- Included first (bootstrap) by the extension; the functions live in api.sql.
-- The views (sluice.tasks, sluice.queue_stats, sluice.workers, sluice.task_attempts) are the
-- public contract; the tables behind them may change between versions.

CREATE TYPE sluice.task_status AS ENUM ('queued', 'running', 'succeeded', 'failed', 'cancelled');

-- One row per task name: how its runs are retried, timed out and prioritised.
CREATE TABLE sluice.task_definition (
    name              text PRIMARY KEY CHECK (name <> ''),
    retries           int NOT NULL DEFAULT 0 CHECK (retries >= 0),
    backoff_factor    float8 NOT NULL DEFAULT 2 CHECK (backoff_factor > 0 AND backoff_factor <> 'Infinity'),
    backoff_max       interval NOT NULL DEFAULT '1 hour' CHECK (backoff_max >= '0'),
    execution_timeout interval NOT NULL DEFAULT '60 seconds' CHECK (execution_timeout > '0'),
    schedule_timeout  interval NOT NULL DEFAULT '5 minutes' CHECK (schedule_timeout > '0'),
    priority          int NOT NULL DEFAULT 1,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- One row per enqueued task. The current attempt's assignment lives on the row; attempts that
-- ended without success are kept in sluice.task_attempt.
--
-- No foreign key to task_definition on purpose: a definition may be deleted while tasks still
-- reference it, and the scheduler fails those tasks with a clear error instead of blocking.
CREATE TABLE sluice.task_run (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_name         text NOT NULL,
    status            sluice.task_status NOT NULL DEFAULT 'queued',
    priority          int NOT NULL,
    input             jsonb NOT NULL,
    -- not runnable before this: the enqueue's run_at, or the end of a retry's backoff
    run_at            timestamptz NOT NULL,
    -- a task still queued after this is cancelled (run_at + the definition's schedule_timeout)
    schedule_deadline timestamptz NOT NULL,
    -- attempts assigned so far; (id, attempt) names one attempt and fences late completions
    attempt           int NOT NULL DEFAULT 0,
    -- application failures (they consume retries); lost attempts are counted apart
    failures          int NOT NULL DEFAULT 0,
    lost_attempts     int NOT NULL DEFAULT 0,
    idempotency_key   text,
    worker_id         bigint,
    assigned_at       timestamptz,
    picked_at         timestamptz,
    timeout_at        timestamptz,
    output            jsonb,
    last_error        text,
    enqueued_at       timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
) WITH (
    -- room for a row's next versions (claimed, finished) on its own page
    fillfactor = 80,
    -- dead versions of finished transitions pile up fast: vacuum early and without throttling
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Indexes are few on purpose: every queued -> running -> finished transition changes `status`,
-- which is in each partial index's predicate, so no such update is HOT and each index costs a
-- write per transition. And each scan below starts from a position the scheduler remembers, so
-- index entries of finished tasks that vacuum cannot remove yet (a long transaction holding the
-- xmin horizon) are never walked over again (see extension/src/queue.rs).
--
-- Arrivals: the scheduler reads tasks that became runnable since its last read, in
-- (run_at, id) order, and keeps the runnable queue in memory; also the next delayed task.
CREATE INDEX task_run_run_at_idx ON sluice.task_run (run_at, id) WHERE status = 'queued';
-- Schedule timeouts, scanned as a moving window.
CREATE INDEX task_run_schedule_deadline_idx ON sluice.task_run (schedule_deadline)
    WHERE status = 'queued';
-- A worker's running attempts (deregistration, the workers view).
CREATE INDEX task_run_worker_idx ON sluice.task_run (worker_id) WHERE status = 'running';
-- An idempotency key is unique among the unfinished tasks of one task name.
CREATE UNIQUE INDEX task_run_idempotency_idx ON sluice.task_run (task_name, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND status IN ('queued', 'running');

-- Attempts that ended without success: failed, timed out, lost with their worker, cancelled.
CREATE TABLE sluice.task_attempt (
    task_id     bigint NOT NULL,
    attempt     int NOT NULL,
    worker_id   bigint,
    assigned_at timestamptz,
    finished_at timestamptz NOT NULL DEFAULT now(),
    outcome     text NOT NULL CHECK (outcome IN ('failed', 'timed_out', 'lost', 'cancelled')),
    error       text,
    PRIMARY KEY (task_id, attempt)
);

-- Registered workers. A worker is bound to the session that registered it: when that backend
-- ends, or the worker stops heartbeating, the scheduler stops it and requeues its tasks.
CREATE TABLE sluice.worker (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name           text NOT NULL,
    task_names     text[] NOT NULL,
    slots          int NOT NULL CHECK (slots > 0),
    backend_pid    int NOT NULL,
    backend_start  timestamptz NOT NULL,
    registered_at  timestamptz NOT NULL DEFAULT now(),
    last_heartbeat timestamptz NOT NULL DEFAULT now(),
    stopped_at     timestamptz,
    stop_reason    text
);
CREATE INDEX worker_live_idx ON sluice.worker (id) WHERE stopped_at IS NULL;

-- Workers the scheduler should poke (a running task of theirs was cancelled or timed out).
-- Unlogged: after a crash every worker session is gone anyway.
CREATE UNLOGGED TABLE sluice.worker_signal (
    worker_id bigint NOT NULL
);

-- Public views ------------------------------------------------------------------------------

CREATE VIEW sluice.tasks AS
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
       t.lost_attempts
FROM sluice.task_run t
LEFT JOIN sluice.worker w ON w.id = t.worker_id;

CREATE VIEW sluice.queue_stats AS
SELECT t.task_name,
       count(*) FILTER (WHERE t.status = 'queued')    AS queued,
       count(*) FILTER (WHERE t.status = 'running')   AS running,
       count(*) FILTER (WHERE t.status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE t.status = 'failed')    AS failed,
       count(*) FILTER (WHERE t.status = 'cancelled') AS cancelled,
       now() - min(t.run_at) FILTER (WHERE t.status = 'queued' AND t.run_at <= now())
           AS oldest_queued_age
FROM sluice.task_run t
GROUP BY t.task_name;

CREATE VIEW sluice.workers AS
SELECT w.id,
       w.name,
       w.task_names,
       w.slots,
       (SELECT count(*) FROM sluice.task_run t
         WHERE t.worker_id = w.id AND t.status = 'running') AS running,
       w.backend_pid,
       w.registered_at,
       w.last_heartbeat,
       w.stopped_at,
       w.stop_reason
FROM sluice.worker w;

-- Every attempt of every task: the ended ones from sluice.task_attempt plus each task's
-- current or final attempt from sluice.task_run.
CREATE VIEW sluice.task_attempts AS
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
                   WHERE a.task_id = t.id AND a.attempt = t.attempt);
