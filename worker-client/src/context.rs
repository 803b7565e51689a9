use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::watch;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;

use crate::batch::AttemptKey;
use crate::error::{Error, ErrorKind};
use crate::pool::{ConnectionPool, PooledConnection};

/// What a handler knows about the attempt it runs. Cheap to clone.
#[derive(Clone)]
pub struct TaskContext {
    shared: Arc<AttemptShared>,
}

struct AttemptShared {
    key: AttemptKey,
    task_name: String,
    cancel: watch::Receiver<bool>,
    pool: Arc<ConnectionPool>,
    completed_in_transaction: Arc<AtomicBool>,
    /// Children spawned by this attempt so far: the next child's index (its default key).
    spawned: AtomicUsize,
    /// Durable steps taken by this attempt so far: the next step's number in the record.
    next_step: AtomicI32,
    /// The task's durable record as this attempt found it, loaded by the first durable step.
    record: tokio::sync::OnceCell<HashMap<i32, RecordedStep>>,
}

/// One step of a durable task's record (`sluice.durable_step`).
#[derive(Debug, Clone)]
struct RecordedStep {
    kind: String,
    name: String,
    state: String,
    value: Option<serde_json::Value>,
}

/// A finished child (see [`TaskContext::wait_children`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ChildOutcome<O> {
    pub task_id: i64,
    /// succeeded, failed or cancelled
    pub status: String,
    /// The child's output if it succeeded, else its error.
    pub result: Result<O, String>,
}

impl TaskContext {
    pub(crate) fn new(
        key: AttemptKey,
        task_name: String,
        cancel: watch::Receiver<bool>,
        pool: Arc<ConnectionPool>,
        completed_in_transaction: Arc<AtomicBool>,
    ) -> Self {
        TaskContext {
            shared: Arc::new(AttemptShared {
                key,
                task_name,
                cancel,
                pool,
                completed_in_transaction,
                spawned: AtomicUsize::new(0),
                next_step: AtomicI32::new(0),
                record: tokio::sync::OnceCell::new(),
            }),
        }
    }

    /// Spawns one child run of `T` per input (`sluice.spawn`). Each child is keyed by its
    /// position among all the children this attempt has spawned, so a retried attempt that
    /// spawns the same way gets the same children instead of duplicates. Returns their task
    /// ids. This is not a durable task: a handler waiting for its children holds its slot.
    pub async fn spawn<T: crate::TaskDefinition>(
        &self,
        inputs: &[T::Input],
    ) -> Result<Vec<i64>, Error> {
        let inputs = inputs
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                Error::json(format!("serializing a child input of \"{}\"", T::name()), e)
            })?;
        self.spawn_json(T::name(), &inputs).await
    }

    /// [`spawn`](TaskContext::spawn) with JSON inputs and a task named at run time.
    pub async fn spawn_json(
        &self,
        task: &str,
        inputs: &[serde_json::Value],
    ) -> Result<Vec<i64>, Error> {
        let first = self
            .shared
            .spawned
            .fetch_add(inputs.len(), Ordering::SeqCst);
        let keys: Vec<String> = (first..first + inputs.len())
            .map(|i| i.to_string())
            .collect();
        self.spawn_keyed_json(task, &keys, inputs).await
    }

    /// Spawns children with explicit keys (unique per parent); idempotent per key.
    pub async fn spawn_keyed_json(
        &self,
        task: &str,
        keys: &[String],
        inputs: &[serde_json::Value],
    ) -> Result<Vec<i64>, Error> {
        let connection = self.shared.pool.checkout().await?;
        let parent = self.task_id();
        let rows = connection
            .client()
            .query_typed(
                "SELECT task_id FROM sluice.spawn($1, $2, $3, $4)",
                &[
                    (&parent, Type::INT8),
                    (&task, Type::TEXT),
                    (&inputs, Type::JSONB_ARRAY),
                    (&keys, Type::TEXT_ARRAY),
                ],
            )
            .await
            .map_err(|e| {
                Error::postgres(format!("spawning children of task {parent} failed"), e)
            })?;
        rows.iter()
            .map(|r| {
                r.try_get(0)
                    .map_err(|e| Error::postgres("reading a child id", e))
            })
            .collect()
    }

    /// Spawns child runs of workflow `workflow`, one per input (`sluice.spawn_workflow`),
    /// keyed by position like [`spawn_json`](TaskContext::spawn_json) (one counter for both),
    /// so a retried attempt gets the same runs. Returns their run ids.
    pub async fn spawn_workflow_json(
        &self,
        workflow: &str,
        inputs: &[serde_json::Value],
    ) -> Result<Vec<i64>, Error> {
        let first = self
            .shared
            .spawned
            .fetch_add(inputs.len(), Ordering::SeqCst);
        let keys: Vec<String> = (first..first + inputs.len())
            .map(|i| i.to_string())
            .collect();
        let connection = self.shared.pool.checkout().await?;
        let parent = self.task_id();
        let rows = connection
            .client()
            .query_typed(
                "SELECT run_id FROM sluice.spawn_workflow($1, $2, $3, $4)",
                &[
                    (&parent, Type::INT8),
                    (&workflow, Type::TEXT),
                    (&inputs, Type::JSONB_ARRAY),
                    (&keys, Type::TEXT_ARRAY),
                ],
            )
            .await
            .map_err(|e| Error::postgres(format!("spawning runs of task {parent} failed"), e))?;
        rows.iter()
            .map(|r| {
                r.try_get(0)
                    .map_err(|e| Error::postgres("reading a run id", e))
            })
            .collect()
    }

    /// Waits until every given workflow run has finished and returns their states, in order.
    /// A durable step: while runs are unfinished the task is suspended (no slot held; a
    /// `Suspended` error to propagate with `?`) and runs again when the last child finishes.
    pub async fn wait_runs(&self, run_ids: &[i64]) -> Result<Vec<crate::RunState>, Error> {
        self.wait_for_children(&[], run_ids).await?;
        {
            let rows = {
                let connection = self.shared.pool.checkout().await?;
                connection
                    .client()
                    .query_typed(
                        "SELECT to_jsonb(r) FROM sluice.runs r WHERE r.id = ANY($1)",
                        &[(&run_ids, Type::INT8_ARRAY)],
                    )
                    .await
                    .map_err(|e| Error::postgres("reading child runs failed", e))?
            };
            let mut found = std::collections::HashMap::new();
            for row in &rows {
                let value: serde_json::Value = row
                    .try_get(0)
                    .map_err(|e| Error::postgres("reading a child run", e))?;
                let state: crate::RunState = serde_json::from_value(value)
                    .map_err(|e| Error::json("decoding a child run", e))?;
                found.insert(state.id, state);
            }
            // A run that is gone (deleted) ends the wait too, as an error below.
            let done = run_ids.iter().all(|id| {
                found
                    .get(id)
                    .is_none_or(|s| !["queued", "running"].contains(&s.status.as_str()))
            });
            if !done {
                return Err(Error::protocol(format!(
                    "durable task {}: its child runs are not all finished after the wait",
                    self.task_id()
                )));
            }
            run_ids
                .iter()
                .map(|id| {
                    found
                        .remove(id)
                        .ok_or_else(|| Error::config(format!("child run {id} no longer exists")))
                })
                .collect()
        }
    }

    /// Waits until every given child has finished and returns their outcomes in the same
    /// order, outputs read as `O` (the child task's `Output`). A durable step: while children
    /// are unfinished the task is suspended (no slot held; a `Suspended` error to propagate with
    /// `?`) and runs again, replaying, when the last one finishes.
    pub async fn wait_children<O: serde::de::DeserializeOwned>(
        &self,
        ids: &[i64],
    ) -> Result<Vec<ChildOutcome<O>>, Error> {
        self.wait_for_children(ids, &[]).await?;
        {
            let rows = {
                let connection = self.shared.pool.checkout().await?;
                connection
                    .client()
                    .query_typed(
                        "SELECT id, status::text, output, last_error FROM sluice.task_run
                          WHERE id = ANY($1)",
                        &[(&ids, Type::INT8_ARRAY)],
                    )
                    .await
                    .map_err(|e| Error::postgres("reading children failed", e))?
            };
            let mut found = std::collections::HashMap::new();
            for row in &rows {
                let id: i64 = row
                    .try_get(0)
                    .map_err(|e| Error::postgres("reading a child", e))?;
                let status: String = row
                    .try_get(1)
                    .map_err(|e| Error::postgres("reading a child", e))?;
                let output: Option<serde_json::Value> = row
                    .try_get(2)
                    .map_err(|e| Error::postgres("reading a child", e))?;
                let error: Option<String> = row
                    .try_get(3)
                    .map_err(|e| Error::postgres("reading a child", e))?;
                found.insert(id, (status, output, error));
            }
            let open = ids.iter().any(|id| {
                found
                    .get(id)
                    .is_some_and(|(s, _, _)| s == "queued" || s == "running")
            });
            if open {
                return Err(Error::protocol(format!(
                    "durable task {}: its children are not all finished after the wait",
                    self.task_id()
                )));
            }
            {
                ids.iter()
                    .map(|id| {
                        let Some((status, output, error)) = found.remove(id) else {
                            return Ok(ChildOutcome {
                                task_id: *id,
                                status: "deleted".into(),
                                result: Err(format!("child task {id} no longer exists")),
                            });
                        };
                        let result = if status == "succeeded" {
                            serde_json::from_value(output.unwrap_or(serde_json::Value::Null))
                                .map_err(|e| format!("child {id}'s output: {e}"))
                        } else {
                            Err(error.unwrap_or_else(|| status.clone()))
                        };
                        Ok(ChildOutcome {
                            task_id: *id,
                            status,
                            result,
                        })
                    })
                    .collect()
            }
        }
    }

    /// The durable wait behind wait_children and wait_runs: returns once every child has
    /// finished, else suspends the task.
    async fn wait_for_children(&self, task_ids: &[i64], run_ids: &[i64]) -> Result<(), Error> {
        let seq = self.shared.next_step.fetch_add(1, Ordering::SeqCst);
        if let Some(step) = self.recorded(seq).await? {
            self.expect_step(seq, &step, "wait_children", "children")?;
            if step.state == "done" {
                return Ok(());
            }
        }
        self.wait_or_suspend(
            "SELECT sluice.durable_wait_children($1, $2, $3, $4, $5, $6)",
            seq,
            &[(&task_ids, Type::INT8_ARRAY), (&run_ids, Type::INT8_ARRAY)],
            "waiting for its children",
            "until its children finish",
        )
        .await
    }

    /// Calls a durable wait (`sql`: the worker, task, attempt and step number, then `extra`)
    /// that answers 'continue' (the wait is over), 'suspended' or 'stale'.
    async fn wait_or_suspend(
        &self,
        sql: &str,
        seq: i32,
        extra: &[(&(dyn ToSql + Sync), Type)],
        doing: &str,
        until: &str,
    ) -> Result<(), Error> {
        let (worker_id, task_id, attempt) = (self.worker_id(), self.task_id(), self.attempt());
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&worker_id, Type::INT8),
            (&task_id, Type::INT8),
            (&attempt, Type::INT4),
            (&seq, Type::INT4),
        ];
        params.extend_from_slice(extra);
        let connection = self.shared.pool.checkout().await?;
        let row = connection
            .client()
            .query_typed_one(sql, &params)
            .await
            .map_err(|e| Error::postgres(format!("{doing} failed"), e))?;
        let outcome: String = row
            .try_get(0)
            .map_err(|e| Error::postgres(format!("reading the result of {doing}"), e))?;
        match outcome.as_str() {
            "continue" => Ok(()),
            "suspended" => Err(self.suspend(until)),
            _ => Err(Error::attempt_stopped(task_id, attempt, doing)),
        }
    }

    // Durable steps ------------------------------------------------------------------------
    //
    // A durable task records each step below in Postgres, numbered in the order the handler
    // takes them; a later attempt (after a crash, a lost worker, a retry or a suspension) runs
    // the handler from the start and replays: recorded steps return their recorded results.
    // So a handler must take its durable steps in the same order every time (branch only on
    // its input and on what durable steps returned). Sleeps and waits suspend the task: they
    // return an error of kind `Suspended` that the handler must propagate with `?`; the slot
    // is free until the task runs again.

    /// Runs `f` once for this task, whatever its attempts: the value is recorded under `name`
    /// and later attempts get the recorded value without running `f`. An error from `f` is not
    /// recorded (the next attempt runs `f` again).
    pub async fn memo<T, F, Fut>(&self, name: &str, f: F) -> Result<T, crate::TaskError>
    where
        T: Serialize + serde::de::DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, crate::TaskError>>,
    {
        let seq = self.shared.next_step.fetch_add(1, Ordering::SeqCst);
        if let Some(step) = self.recorded(seq).await? {
            self.expect_step(seq, &step, "memo", name)?;
            let value = step.value.unwrap_or(serde_json::Value::Null);
            return serde_json::from_value(value).map_err(|e| {
                crate::TaskError::fatal(format!(
                    "durable task {}: the value recorded for memo \"{name}\" does not decode: {e}",
                    self.task_id()
                ))
            });
        }
        let value = f().await?;
        let json = serde_json::to_value(&value)
            .map_err(|e| Error::json(format!("serializing memo \"{name}\""), e))?;
        let connection = self.shared.pool.checkout().await?;
        let row = connection
            .client()
            .query_typed_one(
                "SELECT sluice.durable_memo($1, $2, $3, $4, $5, $6)",
                &[
                    (&self.worker_id(), Type::INT8),
                    (&self.task_id(), Type::INT8),
                    (&self.attempt(), Type::INT4),
                    (&seq, Type::INT4),
                    (&name, Type::TEXT),
                    (&json, Type::JSONB),
                ],
            )
            .await
            .map_err(|e| Error::postgres(format!("recording memo \"{name}\" failed"), e))?;
        let recorded: bool = row
            .try_get(0)
            .map_err(|e| Error::postgres("reading the memo result", e))?;
        if !recorded {
            return Err(
                Error::attempt_stopped(self.task_id(), self.attempt(), "recording a memo").into(),
            );
        }
        Ok(value)
    }

    /// Sleeps for `duration` without holding a worker slot: the first time, the task is
    /// suspended (this returns a `Suspended` error to propagate) and runs again when the
    /// sleep is over; then this returns `Ok`.
    pub async fn sleep_for(&self, duration: Duration) -> Result<(), Error> {
        let micros = duration.as_micros().min(i64::MAX as u128) as i64;
        self.durable_sleep(None, Some(micros)).await
    }

    /// Like [`TaskContext::sleep_for`], until a point in time.
    pub async fn sleep_until(&self, until: SystemTime) -> Result<(), Error> {
        self.durable_sleep(Some(until), None).await
    }

    async fn durable_sleep(
        &self,
        until: Option<SystemTime>,
        micros: Option<i64>,
    ) -> Result<(), Error> {
        let seq = self.shared.next_step.fetch_add(1, Ordering::SeqCst);
        if let Some(step) = self.recorded(seq).await? {
            self.expect_step(seq, &step, "sleep", "sleep")?;
            if step.state == "done" {
                return Ok(());
            }
        }
        let duration = micros.map(|m| format!("{m} microseconds"));
        self.wait_or_suspend(
            "SELECT sluice.durable_sleep($1, $2, $3, $4, $5, $6::interval)",
            seq,
            &[(&until, Type::TIMESTAMPTZ), (&duration, Type::TEXT)],
            "sleeping",
            "until its sleep is over",
        )
        .await
    }

    /// Waits for an event `key` whose payload matches `filter` (a jsonpath, as for
    /// subscriptions), for at most `timeout`, without holding a worker slot: the first time,
    /// the task is suspended (a `Suspended` error to propagate) and runs again when the event
    /// is pushed or the timeout passes. Then this returns the event's payload, or `None` if
    /// the timeout passed first. Only events pushed after the wait began count.
    pub async fn wait_for_event(
        &self,
        key: &str,
        filter: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<Option<serde_json::Value>, Error> {
        let seq = self.shared.next_step.fetch_add(1, Ordering::SeqCst);
        if let Some(step) = self.recorded(seq).await? {
            self.expect_step(seq, &step, "wait_event", key)?;
            match step.state.as_str() {
                "done" => return Ok(step.value),
                "timed_out" => return Ok(None),
                _ => {}
            }
        }
        let timeout = timeout.map(|d| format!("{} microseconds", d.as_micros()));
        let connection = self.shared.pool.checkout().await?;
        let row = connection
            .client()
            .query_typed_one(
                "SELECT state, payload FROM sluice.durable_wait_event($1, $2, $3, $4, $5, $6, $7::interval)",
                &[
                    (&self.worker_id(), Type::INT8),
                    (&self.task_id(), Type::INT8),
                    (&self.attempt(), Type::INT4),
                    (&seq, Type::INT4),
                    (&key, Type::TEXT),
                    (&filter, Type::TEXT),
                    (&timeout, Type::TEXT),
                ],
            )
            .await
            .map_err(|e| Error::postgres(format!("waiting for event \"{key}\" failed"), e))?;
        let state: String = row
            .try_get(0)
            .map_err(|e| Error::postgres("reading the wait result", e))?;
        let payload: Option<serde_json::Value> = row
            .try_get(1)
            .map_err(|e| Error::postgres("reading the wait result", e))?;
        match state.as_str() {
            "done" => Ok(payload),
            "timed_out" => Ok(None),
            "suspended" => Err(self.suspend(&format!("until event \"{key}\" or its timeout"))),
            _ => Err(Error::attempt_stopped(
                self.task_id(),
                self.attempt(),
                "waiting for an event",
            )),
        }
    }

    /// The recorded step `seq`, loading the record with the first durable step.
    async fn recorded(&self, seq: i32) -> Result<Option<RecordedStep>, Error> {
        let record = self
            .shared
            .record
            .get_or_try_init(|| async {
                let connection = self.shared.pool.checkout().await?;
                let rows = connection
                    .client()
                    .query_typed(
                        "SELECT seq, kind, name, state, value FROM sluice.durable_record($1)",
                        &[(&self.task_id(), Type::INT8)],
                    )
                    .await
                    .map_err(|e| Error::postgres("reading the durable record failed", e))?;
                let mut steps = HashMap::new();
                for row in rows {
                    let read = |e| Error::postgres("reading a durable step", e);
                    steps.insert(
                        row.try_get::<_, i32>(0).map_err(read)?,
                        RecordedStep {
                            kind: row.try_get(1).map_err(read)?,
                            name: row.try_get(2).map_err(read)?,
                            state: row.try_get(3).map_err(read)?,
                            value: row.try_get(4).map_err(read)?,
                        },
                    );
                }
                Ok::<_, Error>(steps)
            })
            .await?;
        Ok(record.get(&seq).cloned())
    }

    fn expect_step(
        &self,
        seq: i32,
        step: &RecordedStep,
        kind: &str,
        name: &str,
    ) -> Result<(), Error> {
        if step.kind == kind && step.name == name {
            return Ok(());
        }
        Err(Error::replay_diverged(format!(
            "durable task {}: replay diverged at step {seq}: the record has {}(\"{}\") there, \
             the handler asked for {kind}(\"{name}\")",
            self.task_id(),
            step.kind,
            step.name
        )))
    }

    /// The attempt ended in the database: the runtime must send no ending for it.
    fn suspend(&self, until: &str) -> Error {
        self.shared
            .completed_in_transaction
            .store(true, Ordering::Release);
        Error::suspended(self.task_id(), self.attempt(), until)
    }

    pub fn task_id(&self) -> i64 {
        self.shared.key.task_id
    }

    pub fn attempt(&self) -> i32 {
        self.shared.key.attempt
    }

    pub fn worker_id(&self) -> i64 {
        self.shared.key.worker_id
    }

    pub fn task_name(&self) -> &str {
        &self.shared.task_name
    }

    /// True once the attempt must stop: it was cancelled, timed out or lost, or the worker is
    /// shutting down and the shutdown timeout has passed.
    pub fn is_cancelled(&self) -> bool {
        // A dropped sender means the runtime has let go of this attempt altogether.
        *self.shared.cancel.borrow() || self.shared.cancel.has_changed().is_err()
    }

    /// Resolves when the attempt must stop (see [`TaskContext::is_cancelled`]).
    pub async fn cancelled(&self) {
        let mut cancel = self.shared.cancel.clone();
        // Err means the sender is gone, which also ends the attempt.
        let _ = cancel.wait_for(|cancelled| *cancelled).await;
    }

    /// Opens a transaction on a connection owned by the worker. Commit it with
    /// [`TaskTransaction::commit_with`] to make the handler's writes and the task's completion
    /// one atomic change.
    pub async fn transaction(&self) -> Result<TaskTransaction, Error> {
        let mut connection = self.shared.pool.checkout().await?;
        if let Err(e) = connection.client().batch_execute("BEGIN").await {
            connection.discard();
            return Err(Error::postgres("starting the task transaction failed", e));
        }
        Ok(TaskTransaction {
            connection,
            key: self.shared.key,
            completed_in_transaction: Arc::clone(&self.shared.completed_in_transaction),
            open: true,
        })
    }
}

impl std::fmt::Debug for TaskContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskContext")
            .field("task_id", &self.task_id())
            .field("attempt", &self.attempt())
            .field("worker_id", &self.worker_id())
            .field("task_name", &self.task_name())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// An open transaction on one of the worker's connections, tied to one attempt.
///
/// Dropping it without [`commit_with`](TaskTransaction::commit_with) or
/// [`rollback`](TaskTransaction::rollback) rolls it back.
pub struct TaskTransaction {
    connection: PooledConnection,
    key: AttemptKey,
    completed_in_transaction: Arc<AtomicBool>,
    open: bool,
}

impl TaskTransaction {
    /// The connection, inside the open transaction. Do not run COMMIT or ROLLBACK on it
    /// directly; use [`commit_with`](TaskTransaction::commit_with) and
    /// [`rollback`](TaskTransaction::rollback).
    pub fn client(&self) -> &Client {
        self.connection.client()
    }

    /// Completes the attempt with `output` in this transaction and commits, so the handler's
    /// writes become visible if and only if the task succeeds. If the attempt is no longer
    /// current, rolls back and fails with [`ErrorKind::Fenced`].
    pub async fn commit_with<O: Serialize>(mut self, output: &O) -> Result<(), Error> {
        let output = serde_json::to_value(output)
            .map_err(|e| Error::json("serializing the task output", e))?;
        let key = self.key;
        let params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&key.worker_id, Type::INT8),
            (&key.task_id, Type::INT8),
            (&key.attempt, Type::INT4),
            (&output, Type::JSONB),
        ];
        let completed: bool = match self
            .client()
            .query_typed_one("SELECT sluice.complete($1, $2, $3, $4)", &params)
            .await
        {
            Ok(row) => row
                .try_get(0)
                .map_err(|e| Error::postgres("reading the completion result", e))?,
            Err(e) => {
                let error = Error::postgres("completing the task in its transaction failed", e);
                if error.kind() == ErrorKind::Connection {
                    self.connection.discard();
                    self.open = false;
                }
                return Err(error);
            }
        };
        if !completed {
            // Fenced is the answer either way: a failed ROLLBACK discards the connection, and
            // closing it aborts the transaction on the server.
            self.finish("ROLLBACK").await.ok();
            return Err(Error::fenced(key.task_id, key.attempt));
        }
        self.finish("COMMIT").await?;
        self.completed_in_transaction.store(true, Ordering::Release);
        Ok(())
    }

    pub async fn rollback(mut self) -> Result<(), Error> {
        self.finish("ROLLBACK").await
    }

    /// Ends the transaction with `command`. Postgres ends it even when COMMIT fails, so the
    /// connection stays reusable unless the failure was the connection's own.
    async fn finish(&mut self, command: &str) -> Result<(), Error> {
        self.open = false;
        match self.connection.client().batch_execute(command).await {
            Ok(()) => Ok(()),
            Err(e) => {
                let error = Error::postgres(format!("{command} of the task transaction failed"), e);
                if error.kind() != ErrorKind::Db {
                    self.connection.discard();
                }
                Err(error)
            }
        }
    }
}

impl Drop for TaskTransaction {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let mut connection = self.connection.take();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if connection.client().batch_execute("ROLLBACK").await.is_err() {
                        connection.discard();
                    }
                });
            }
            // Without a runtime the ROLLBACK cannot be sent; closing the connection aborts the
            // transaction on the server just the same.
            Err(_) => connection.discard(),
        }
    }
}
