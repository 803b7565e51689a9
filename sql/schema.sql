-- Sluice storage: tables, indexes and the public views.
--
-- Included first (bootstrap) by the extension; the functions live in api.sql.
-- The views (sluice.tasks, sluice.queue_stats, sluice.workers, sluice.task_attempts) are the
-- public contract; the tables behind them may change between versions.

-- Unfinished statuses come first: task_run's check constraint compares with 'succeeded'.
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
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- Concurrency: at most max_runs running per key, the key being this path's first match in
    -- the input (evaluated at enqueue); all three set or none.
    concurrency_key      jsonpath,
    max_runs             int CHECK (max_runs > 0),
    concurrency_strategy text CHECK (concurrency_strategy IN
                             ('group_round_robin', 'cancel_in_progress', 'cancel_newest')),
    -- Rate limits a run consumes, validated by sluice.define_task: an array of
    --   {"key": "<declared key>", "units": n | "units_path": "<jsonpath>"}
    --   {"key_path": "<jsonpath>", "units": n | "units_path": ..., "limit": n, "per": "<interval>"}
    rate_limits          jsonb NOT NULL DEFAULT '[]',
    -- Worker labels a run asks for, validated by sluice.define_task: an array of
    --   {"label": "<name>", "value": "<text>" | <number>, "required": bool, "weight": n}
    -- A required label must match for a worker to get the task; among the workers that may,
    -- the one with the most weight of matching preferred labels gets it.
    desired_labels       jsonb NOT NULL DEFAULT '[]',
    CHECK ((concurrency_key IS NULL) = (max_runs IS NULL)
           AND (max_runs IS NULL) = (concurrency_strategy IS NULL))
);

-- Declared (static) rate limits: at most max_units units consumed per `per`, fleet-wide, over
-- any interval of that length. Dynamic keys take their limit from the task definition.
CREATE TABLE sluice.rate_limit (
    key        text PRIMARY KEY CHECK (key <> ''),
    max_units  int NOT NULL CHECK (max_units > 0),
    per        interval NOT NULL CHECK (per > '0'),
    updated_at timestamptz NOT NULL DEFAULT now()
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
    -- attempts assigned so far; (id, attempt) names one attempt and fences late completions.
    -- While an attempt is claimed in memory (extension/src/claims.rs) the row is still queued
    -- at the attempt before; sluice.tasks shows the claim's.
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
    finished_at       timestamptz,
    -- Flow control, evaluated once at enqueue from the definition and the input (NULL when the
    -- definition has none): the concurrency key ('' when the path matches nothing), and the
    -- rate-limit keys with the units a run consumes, one per entry of the definition's
    -- rate_limits, in its order.
    concurrency_key   text,
    rate_limit_keys   text[],
    rate_limit_units  int[],
    -- A step of a workflow run (sql/workflows.sql): the run and the step's name.
    run_id            bigint,
    step              text,
    -- A child spawned by a running task (sluice.spawn): the parent and the child's key, unique
    -- per parent, so a retried parent spawning again gets the same children.
    parent_id         bigint,
    child_key         text,
    -- When the current or last attempt of a rate-limited task started (NULL for tasks without
    -- rate limits): the starts the limits count. Kept when an attempt ends: its start still
    -- counts in the window. Not indexed, so that a rate-limited claim is HOT too: a start in
    -- the last window belongs to an unfinished task or to one finished since, and those two
    -- indexes find them (see the rate_limits view).
    rate_limited_at   timestamptz,
    -- finished_at is set exactly when the task reached its final status; the indexes rely on it.
    -- `status < 'succeeded'` is `status IN ('queued', 'running')` by the enum's order (a new
    -- unfinished status must go before 'succeeded'): Postgres prepares a check anew for every
    -- statement, and the IN list took 8 µs of a single-row insert, the comparison under 5.
    CONSTRAINT task_run_finished_at_check
        CHECK ((finished_at IS NULL) = (status < 'succeeded'))
) WITH (
    -- Most claims are held in memory and write no row version (extension/src/claims.rs); the
    -- rest (tasks with rate limits, claims written into the row by a failure, cancel or
    -- timeout) are updates of the row, as all claims were before:
    -- room on its own page for a row's claimed version, so that a claim is a HOT update (no
    -- index entries; see below): at 80 only about a quarter of claims found room, and a drain
    -- of 100,000 tasks ran about 8% slower (benches/README.md). Queued tasks take twice the
    -- pages they would take packed; the versions a claim and completion leave are pruned and
    -- their room reused.
    fillfactor = 50,
    -- dead versions of finished transitions pile up fast: vacuum early and without throttling
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_cost_delay = 0
);

-- Indexes are few, and none mentions `status`, `attempt`, `worker_id`, `assigned_at`,
-- `picked_at`, `timeout_at` or `rate_limited_at`: a claim (queued -> running) changes only
-- those, so it is a HOT update that writes no index entry at all, in the page fillfactor
-- keeps room on. Completion sets `finished_at` and costs one entry in the primary key and one
-- in the retention index.
-- (Partial indexes on `status` cost a claim two index writes and made it non-HOT, a fifth of
-- the drain's time.) Running tasks by worker have no index: the scheduler knows them from
-- memory (it posted them), and reads them from the table only when it starts and as it
-- sweeps. Each scan below starts from a position the scheduler remembers, so index entries of
-- finished tasks that vacuum cannot remove yet (a long transaction holding the xmin horizon)
-- are not walked over again (see extension/src/queue.rs).
--
-- Unfinished tasks by (run_at, id): the scheduler reads tasks that became runnable since its
-- last read (queued ones; running ones are passed over on the heap: at most one per slot),
-- and keeps the runnable queue in memory; also the next delayed task.
CREATE INDEX task_run_unfinished_idx ON sluice.task_run (run_at, id) WHERE finished_at IS NULL;
-- Finished tasks by age: the scheduler deletes those past their retention
-- (sluice.succeeded_task_retention, sluice.failed_task_retention), oldest first.
CREATE INDEX task_run_finished_idx ON sluice.task_run (finished_at)
    WHERE finished_at IS NOT NULL;
-- Children of a parent task, by key (sluice.spawn is idempotent through it).
CREATE UNIQUE INDEX task_run_child_idx ON sluice.task_run (parent_id, child_key)
    WHERE parent_id IS NOT NULL;
-- An idempotency key is unique among the unfinished tasks of one task name.
CREATE UNIQUE INDEX task_run_idempotency_idx ON sluice.task_run (task_name, idempotency_key)
    WHERE idempotency_key IS NOT NULL AND finished_at IS NULL;

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
    -- Labels for placement (sluice.task_definition.desired_labels): text or number per name.
    labels         jsonb NOT NULL DEFAULT '{}',
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

-- sluice.tasks, sluice.task_attempts, sluice.queue_stats, sluice.workers and sluice.concurrency
-- are defined at the end of sql/api.sql: they overlay the claims held in memory
-- (sluice._claims()).

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
