//! The worker's main loop: one connection that registers, listens, fetches, heartbeats and
//! sends batched attempt endings, and the handlers it spawns. While nothing runs and nothing is
//! left to send, the connection waits in Postgres for the next assignments instead
//! (`sluice.await_tasks`, which also claims them).

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::{self, MissedTickBehavior};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use crate::backoff::Backoff;
use crate::batch::{group_by_worker, AttemptKey, CompletionBatcher, Ending, PendingEnding};
use crate::context::TaskContext;
use crate::error::{worker_not_registered, Error};
use crate::pool::ConnectionPool;
use crate::stats::WorkerStats;
use crate::task::TaskError;
use crate::worker::{HandlerFuture, WorkerConfig};

/// How long cancelled handlers get to wind down at shutdown before the worker deregisters
/// anyway (their attempts are then requeued as lost).
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// How long shutdown keeps trying to reach Postgres, after the connection broke, to flush and
/// deregister.
const SHUTDOWN_RECONNECT_BUDGET: Duration = Duration::from_secs(5);

/// (task id, attempt): one attempt, whichever registration ran it; attempt numbers only grow.
type TaskAttempt = (i64, i32);

pub(crate) type ShutdownFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub(crate) async fn run(config: WorkerConfig, shutdown: ShutdownFuture<'_>) -> Result<(), Error> {
    let (finished_tx, finished_rx) = mpsc::unbounded_channel();
    let pool = ConnectionPool::new(config.connection.clone(), slot_count(config.slots));
    let batcher = CompletionBatcher::new(config.batch_max, config.batch_max_delay);
    let mut runtime = Runtime {
        config,
        pool,
        session: None,
        last_worker_id: None,
        in_flight: HashMap::new(),
        batcher,
        finished_tx,
        finished_rx,
        more_may_be_assigned: false,
        shutdown: Shutdown {
            future: shutdown,
            fired: false,
        },
    };
    let result = runtime.run().await;
    runtime.pool.close();
    result
}

fn slot_count(slots: i32) -> usize {
    usize::try_from(slots).unwrap_or(1).max(1)
}

struct Shutdown<'a> {
    future: ShutdownFuture<'a>,
    fired: bool,
}

impl Shutdown<'_> {
    /// Resolves once the caller's shutdown future has; safe to call again afterwards (the
    /// future itself is never polled after completing).
    async fn requested(&mut self) {
        if !self.fired {
            (&mut self.future).await;
            self.fired = true;
        }
    }
}

/// The main connection and the registration made on it.
struct Session {
    client: Client,
    worker_id: i64,
    notifications: mpsc::UnboundedReceiver<String>,
    /// `CALL sluice.await_tasks`, unless the server lacks it or rejected it once.
    await_tasks: Option<Statement>,
    fetch: Statement,
    heartbeat: Statement,
    complete_many: Statement,
    fail_many: Statement,
}

struct InFlight {
    task_name: String,
    cancel: watch::Sender<bool>,
    abort: AbortHandle,
    cancelled: bool,
    completed_in_transaction: Arc<AtomicBool>,
}

impl InFlight {
    /// Whether the attempt may have ended in Postgres while the handler still runs (cancelled,
    /// timed out, superseded, or completed in the handler's own transaction): the scheduler
    /// may then already have handed its slot to another task.
    fn may_have_ended(&self) -> bool {
        self.cancelled || self.completed_in_transaction.load(Ordering::Acquire)
    }

    fn cancel(&mut self) {
        self.cancelled = true;
        self.cancel.send_replace(true);
    }
}

pub(crate) enum HandlerResult {
    Returned(Result<Value, TaskError>),
    Panicked(String),
    Aborted,
}

struct Finished {
    key: AttemptKey,
    result: HandlerResult,
}

/// Runs a handler in its own task, which sends its `Finished`: how it ended, a panic included,
/// or `Aborted` if the task is aborted first (its report is then dropped unfilled). One task per
/// handler: a second one awaiting the handler's JoinHandle did the same at twice the spawns.
fn spawn_reporting(
    key: AttemptKey,
    handler: HandlerFuture,
    finished_tx: mpsc::UnboundedSender<Finished>,
) -> AbortHandle {
    let mut report = FinishReport {
        key,
        result: None,
        finished_tx,
    };
    tokio::spawn(async move {
        let returned = AssertUnwindSafe(handler).catch_unwind().await;
        report.record(match returned {
            Ok(returned) => HandlerResult::Returned(returned),
            Err(payload) => HandlerResult::Panicked(panic_message(payload.as_ref())),
        });
    })
    .abort_handle()
}

/// Sends a handler's `Finished` when dropped: with its result once it returned or panicked,
/// as `Aborted` if its task was aborted (dropped) before.
struct FinishReport {
    key: AttemptKey,
    result: Option<HandlerResult>,
    finished_tx: mpsc::UnboundedSender<Finished>,
}

impl FinishReport {
    fn record(&mut self, result: HandlerResult) {
        self.result = Some(result);
    }
}

impl Drop for FinishReport {
    fn drop(&mut self) {
        let result = self.result.take().unwrap_or(HandlerResult::Aborted);
        // The receiver is gone only when the runtime itself is, and then nobody is left to
        // tell.
        let _ = self.finished_tx.send(Finished {
            key: self.key,
            result,
        });
    }
}

enum Event {
    ShutdownRequested,
    Notification(Option<String>),
    Finished(Finished),
    FlushDue,
    PollDue,
    HeartbeatDue,
}

struct Runtime<'a> {
    config: WorkerConfig,
    pool: Arc<ConnectionPool>,
    session: Option<Session>,
    /// The latest registration, kept after its connection broke so that shutdown can still
    /// deregister it.
    last_worker_id: Option<i64>,
    /// By registration too: after a server restart the same attempt of a task can be fetched
    /// again (its claim was held in memory) while the handler of the lost session winds down.
    in_flight: HashMap<AttemptKey, InFlight>,
    batcher: CompletionBatcher,
    finished_tx: mpsc::UnboundedSender<Finished>,
    finished_rx: mpsc::UnboundedReceiver<Finished>,
    /// Tasks may be waiting here for a slot: a notification came while every slot was taken,
    /// or the last fetch was cut short by the free slots while the scheduler may count more.
    more_may_be_assigned: bool,
    shutdown: Shutdown<'a>,
}

impl Runtime<'_> {
    async fn run(&mut self) -> Result<(), Error> {
        let outcome = self.serve().await;
        let drained = self.drain().await;
        outcome.and(drained)
    }

    /// Serves tasks until shutdown is requested. Returns an error only for a registration that
    /// Postgres rejects for good.
    async fn serve(&mut self) -> Result<(), Error> {
        let mut backoff = Backoff::new();
        let mut poll = time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heartbeat = time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            if self.session.is_none() {
                if !self.open_session(&mut backoff).await? {
                    return Ok(());
                }
                heartbeat.reset();
            }
            if self.can_await() {
                let Some(signalled) = self.take_notifications() else {
                    self.lose_session("the connection to Postgres was lost");
                    continue;
                };
                let shutdown_requested = match self.await_tasks().await {
                    Ok(requested) => requested,
                    Err(error) => {
                        self.on_session_error(error);
                        false
                    }
                };
                let heartbeat_due = signalled || heartbeat.tick().now_or_never().is_some();
                if heartbeat_due {
                    if let Err(error) = self.step(false, true).await {
                        self.on_session_error(error);
                    }
                }
                if shutdown_requested {
                    return Ok(());
                }
                continue;
            }
            let mut fetch_due = false;
            let mut heartbeat_due = false;
            match self.next_event(&mut poll, &mut heartbeat).await {
                Event::ShutdownRequested => return Ok(()),
                Event::Notification(None) => {
                    self.lose_session("the connection to Postgres was lost");
                    continue;
                }
                Event::Notification(Some(payload)) => {
                    (fetch_due, heartbeat_due) = notification_kinds(&payload);
                }
                Event::Finished(finished) => {
                    let slot_may_be_handed_out = self.on_finished(finished);
                    fetch_due = self.more_may_be_assigned || slot_may_be_handed_out;
                }
                Event::FlushDue => {}
                Event::PollDue => fetch_due = true,
                Event::HeartbeatDue => heartbeat_due = true,
            }
            if let Err(error) = self.step(fetch_due, heartbeat_due).await {
                self.on_session_error(error);
            }
        }
    }

    async fn step(&mut self, fetch_due: bool, heartbeat_due: bool) -> Result<(), Error> {
        // Waiting for more endings only pays while handlers are still running: once none is,
        // the slots stay empty until this batch commits and the scheduler hands out more.
        let nothing_left_to_batch = self.in_flight.is_empty() && !self.batcher.is_empty();
        if nothing_left_to_batch || self.batcher.is_due(Instant::now()) {
            self.flush().await?;
        }
        if heartbeat_due {
            self.heartbeat().await?;
        }
        if fetch_due {
            self.fetch().await?;
        }
        Ok(())
    }

    async fn next_event(
        &mut self,
        poll: &mut time::Interval,
        heartbeat: &mut time::Interval,
    ) -> Event {
        let flush_at = self.batcher.deadline().map(time::Instant::from_std);
        let notifications = self.session.as_mut().map(|s| &mut s.notifications);
        tokio::select! {
            biased;
            _ = self.shutdown.requested() => Event::ShutdownRequested,
            Some(finished) = self.finished_rx.recv() => Event::Finished(finished),
            _ = sleep_until_some(flush_at) => Event::FlushDue,
            payload = recv_some(notifications) => Event::Notification(payload),
            _ = heartbeat.tick() => Event::HeartbeatDue,
            _ = poll.tick() => Event::PollDue,
        }
    }

    /// Connects and registers, retrying transient failures with backoff. Returns false if
    /// shutdown was requested first.
    async fn open_session(&mut self, backoff: &mut Backoff) -> Result<bool, Error> {
        loop {
            let attempt = tokio::select! {
                _ = self.shutdown.requested() => return Ok(false),
                attempt = register(&self.config) => attempt,
            };
            match attempt {
                Ok(session) => {
                    backoff.reset();
                    self.last_worker_id = Some(session.worker_id);
                    self.session = Some(session);
                    // Assignments made before LISTEN took effect sent no notification we saw.
                    if let Err(error) = self.fetch().await {
                        self.on_session_error(error);
                        continue;
                    }
                    return Ok(true);
                }
                Err(error) if error.is_transient() => {
                    let delay = backoff.next_delay();
                    self.warn(&format!("{error}; retrying in {delay:?}"));
                    tokio::select! {
                        _ = self.shutdown.requested() => return Ok(false),
                        _ = time::sleep(delay) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn on_session_error(&mut self, error: Error) {
        if error.has_code(&worker_not_registered()) {
            self.lose_session(&format!("{error}; registering again"));
        } else if error.is_transient() {
            self.lose_session(&error.to_string());
        } else {
            self.warn(&error.to_string());
        }
    }

    /// Drops the connection and registration. The scheduler requeues the registration's
    /// attempts once it notices, so their handlers are cancelled; endings already collected
    /// are still sent later (they are fenced if no longer current).
    fn lose_session(&mut self, reason: &str) {
        if self.session.take().is_some() {
            self.warn(reason);
        }
        for in_flight in self.in_flight.values_mut() {
            in_flight.cancel();
            in_flight.abort.abort();
        }
    }

    /// Records a handler's end. Returns whether the scheduler may already have handed its slot
    /// to another task (see InFlight::may_have_ended), so that a fetch this slot held back may
    /// have left an assignment behind.
    fn on_finished(&mut self, finished: Finished) -> bool {
        let Some(in_flight) = self.in_flight.remove(&finished.key) else {
            return false;
        };
        let completed = in_flight.completed_in_transaction.load(Ordering::Acquire);
        if completed {
            // The handler's own transaction ended the attempt, and committed before it returned.
            self.config.stats.add_completed(1, Instant::now());
        }
        if let Some(ending) = decide_ending(completed, in_flight.cancelled, finished.result) {
            self.batcher.push(finished.key, ending, Instant::now());
        }
        in_flight.may_have_ended()
    }

    /// Whether to wait for work in Postgres (`sluice.await_tasks`) rather than for a
    /// notification: nothing runs and nothing is left to send, so the connection has nothing
    /// else to do until work comes.
    fn can_await(&self) -> bool {
        !self.shutdown.fired
            && self.in_flight.is_empty()
            && self.batcher.is_empty()
            && self
                .session
                .as_ref()
                .is_some_and(|s| s.await_tasks.is_some())
    }

    /// Empties the notification channel without waiting (an idle wait takes assignments
    /// itself). Returns whether a heartbeat was asked for, or None if the connection ended.
    fn take_notifications(&mut self) -> Option<bool> {
        let session = self.session.as_mut()?;
        let mut signalled = false;
        loop {
            match session.notifications.try_recv() {
                Ok(payload) => signalled |= notification_kinds(&payload).1,
                Err(mpsc::error::TryRecvError::Empty) => return Some(signalled),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
            }
        }
    }

    /// Waits in Postgres until the scheduler assigns this worker work, or the poll interval
    /// (at most the heartbeat interval) passes, and starts what the wait claimed: one
    /// statement, no NOTIFY. Returns whether shutdown was requested meanwhile (the wait is then
    /// ended; should it have claimed tasks first, they are started anyway, and the drain
    /// lets them finish or cancels them).
    async fn await_tasks(&mut self) -> Result<bool, Error> {
        let Some(session) = self.session.as_ref() else {
            return Ok(false);
        };
        let Some(statement) = session.await_tasks.as_ref() else {
            return Ok(false);
        };
        let timeout = self
            .config
            .poll_interval
            .min(self.config.heartbeat_interval);
        let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let max_tasks = i32::try_from(slot_count(self.config.slots)).unwrap_or(i32::MAX);
        let worker_id = session.worker_id;
        let client = &session.client;
        let mut shutdown_requested = false;
        let outcome = {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                [&worker_id, &max_tasks, &timeout_ms];
            let waiting = client.query_one(statement, &params);
            tokio::pin!(waiting);
            tokio::select! {
                biased;
                outcome = &mut waiting => outcome,
                _ = self.shutdown.requested() => {
                    shutdown_requested = true;
                    // sluice.end_wait from a second connection ends the wait without an error.
                    // Should it find no wait (the CALL has not begun waiting yet) or fail, a
                    // cancel ends it (SQLSTATE 57014, logged by the server as an ERROR), or
                    // else its timeout does.
                    if !end_wait(&self.config.connection, worker_id).await {
                        let _ = client.cancel_token().cancel_query(NoTls).await;
                    }
                    waiting.await
                }
            }
        };
        let row = match outcome {
            Ok(row) => row,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
                return Ok(shutdown_requested);
            }
            Err(e) => {
                let error = Error::postgres("waiting for tasks failed", e);
                let rejected = error.code().is_some()
                    && !error.is_transient()
                    && !error.has_code(&worker_not_registered());
                if !rejected {
                    return Err(error);
                }
                // Rejected by the server for good (not a broken connection, not a stopped
                // registration): wait for notifications instead from now on.
                if let Some(session) = self.session.as_mut() {
                    session.await_tasks = None;
                }
                self.warn(&format!("{error}; waiting for notifications instead"));
                return Ok(shutdown_requested);
            }
        };
        let claimed = (|| {
            Ok::<_, tokio_postgres::Error>((
                row.try_get::<_, Vec<i64>>(0)?,
                row.try_get::<_, Vec<i32>>(1)?,
                row.try_get::<_, Vec<String>>(2)?,
                row.try_get::<_, Vec<Value>>(3)?,
            ))
        })();
        match claimed {
            Ok((task_ids, attempts, task_names, inputs)) => {
                let tasks = task_ids
                    .into_iter()
                    .zip(attempts)
                    .zip(task_names)
                    .zip(inputs);
                for (((task_id, attempt), task_name), input) in tasks {
                    let key = AttemptKey {
                        worker_id,
                        task_id,
                        attempt,
                    };
                    self.spawn_handler(key, task_name, input);
                }
            }
            Err(e) => {
                let error = Error::postgres("reading the tasks a wait claimed", e);
                self.warn(&error.to_string());
            }
        }
        Ok(shutdown_requested)
    }

    async fn fetch(&mut self) -> Result<(), Error> {
        if self.shutdown.fired {
            return Ok(());
        }
        let Some(session) = &mut self.session else {
            return Ok(());
        };
        let free = slot_count(self.config.slots).saturating_sub(self.in_flight.len());
        if free == 0 {
            self.more_may_be_assigned = true;
            return Ok(());
        }
        let max_tasks = i32::try_from(free).unwrap_or(i32::MAX);
        let rows = session
            .client
            .query(&session.fetch, &[&session.worker_id, &max_tasks])
            .await
            .map_err(|e| Error::postgres("fetching assigned tasks failed", e))?;
        // A fetch that filled every free slot may have left assignments behind only if the
        // scheduler counts more slots free than this worker does. It posts no more than it
        // counts free and frees a slot when the attempt's ending commits, after this worker
        // has; the exception is an attempt that ended in Postgres while its handler still
        // runs. Without one, fetching again on the next end would be a round trip per batch
        // for nothing (a third of the statements of a drain with 10 slots).
        self.more_may_be_assigned =
            rows.len() >= free && self.in_flight.values().any(InFlight::may_have_ended);
        let worker_id = session.worker_id;
        for row in rows {
            let fetched = (|| {
                Ok::<_, tokio_postgres::Error>((
                    row.try_get::<_, i64>(0)?,
                    row.try_get::<_, i32>(1)?,
                    row.try_get::<_, String>(2)?,
                    row.try_get::<_, Value>(3)?,
                ))
            })();
            match fetched {
                Ok((task_id, attempt, task_name, input)) => {
                    let key = AttemptKey {
                        worker_id,
                        task_id,
                        attempt,
                    };
                    self.spawn_handler(key, task_name, input);
                }
                Err(e) => {
                    let error = Error::postgres("reading a fetched task", e);
                    self.warn(&error.to_string());
                }
            }
        }
        Ok(())
    }

    fn spawn_handler(&mut self, key: AttemptKey, task_name: String, input: Value) {
        let Some(handler) = self.config.handlers.get(&task_name).cloned() else {
            // register_worker only lists our own task names, so this means the registration and
            // the handler table disagree; fail the attempt rather than hold it forever.
            let error = format!("worker has no handler for task \"{task_name}\"");
            self.batcher.push(
                key,
                Ending::Failed {
                    error,
                    retryable: true,
                },
                Instant::now(),
            );
            return;
        };
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let completed_in_transaction = Arc::new(AtomicBool::new(false));
        let context = TaskContext::new(
            key,
            task_name.clone(),
            cancel_rx,
            Arc::clone(&self.pool),
            Arc::clone(&completed_in_transaction),
        );
        self.config.stats.add_started();
        let abort = spawn_reporting(key, handler(context, input), self.finished_tx.clone());
        self.in_flight.insert(
            key,
            InFlight {
                task_name,
                cancel: cancel_tx,
                abort,
                cancelled: false,
                completed_in_transaction,
            },
        );
    }

    async fn heartbeat(&mut self) -> Result<(), Error> {
        let Some(session) = &self.session else {
            return Ok(());
        };
        let worker_id = session.worker_id;
        let running: Vec<TaskAttempt> = self
            .in_flight
            .iter()
            .filter(|(key, in_flight)| key.worker_id == worker_id && !in_flight.cancelled)
            .map(|(key, _)| (key.task_id, key.attempt))
            .collect();
        let (current, superseded) = split_superseded(running);
        let (task_ids, attempts): (Vec<i64>, Vec<i32>) = current.iter().copied().unzip();
        let rows = session
            .client
            .query(&session.heartbeat, &[&worker_id, &task_ids, &attempts])
            .await
            .map_err(|e| Error::postgres("heartbeat failed", e))?;
        let mut to_stop = superseded;
        for row in rows {
            let task_id: i64 = row
                .try_get(0)
                .map_err(|e| Error::postgres("reading the heartbeat result", e))?;
            to_stop.extend(current.iter().filter(|(id, _)| *id == task_id).copied());
        }
        for (task_id, attempt) in to_stop {
            let key = AttemptKey {
                worker_id,
                task_id,
                attempt,
            };
            if let Some(in_flight) = self.in_flight.get_mut(&key) {
                in_flight.cancel();
            }
        }
        Ok(())
    }

    /// Sends every pending ending. Transient failures put them back and are returned; other
    /// rejections are handled one ending at a time so one bad output cannot block the rest.
    async fn flush(&mut self) -> Result<(), Error> {
        if self.batcher.is_empty() {
            return Ok(());
        }
        let Some(session) = &self.session else {
            return Ok(());
        };
        let endings = self.batcher.take();
        match send_endings(session, &endings, &self.config.stats).await {
            Ok(warnings) => {
                for warning in warnings {
                    self.warn(&warning);
                }
                Ok(())
            }
            Err(error) => {
                self.batcher.restore(endings, Instant::now());
                Err(error)
            }
        }
    }

    /// Shutdown: lets running handlers finish within the shutdown timeout, cancels the rest,
    /// sends every ending and deregisters.
    async fn drain(&mut self) -> Result<(), Error> {
        let deadline = time::Instant::now() + self.config.shutdown_timeout;
        let mut heartbeat = time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        heartbeat.reset();
        while !self.in_flight.is_empty() {
            let flush_at = self.batcher.deadline().map(time::Instant::from_std);
            let notifications = self.session.as_mut().map(|s| &mut s.notifications);
            let mut heartbeat_due = false;
            tokio::select! {
                biased;
                Some(finished) = self.finished_rx.recv() => {
                    self.on_finished(finished);
                }
                _ = time::sleep_until(deadline) => break,
                _ = sleep_until_some(flush_at) => {}
                payload = recv_some(notifications) => match payload {
                    Some(payload) => heartbeat_due = notification_kinds(&payload).1,
                    None => self.forget_broken_session(),
                },
                _ = heartbeat.tick() => heartbeat_due = true,
            }
            if let Err(error) = self.step(false, heartbeat_due).await {
                self.on_drain_error(error);
            }
        }

        if !self.in_flight.is_empty() {
            for in_flight in self.in_flight.values_mut() {
                in_flight.cancel();
                in_flight.abort.abort();
            }
            let grace = time::Instant::now() + CANCEL_GRACE;
            while !self.in_flight.is_empty() {
                tokio::select! {
                    Some(finished) = self.finished_rx.recv() => {
                        self.on_finished(finished);
                    }
                    _ = time::sleep_until(grace) => break,
                }
            }
            let stuck: Vec<&str> = self
                .in_flight
                .values()
                .map(|f| f.task_name.as_str())
                .collect();
            if !stuck.is_empty() {
                self.warn(&format!(
                    "{} handler(s) did not stop when cancelled ({}); their attempts are \
                     requeued",
                    stuck.len(),
                    stuck.join(", ")
                ));
            }
        }

        let Some(worker_id) = self.last_worker_id else {
            return Ok(());
        };
        self.reconnect_for_shutdown().await;
        let Some(session) = &self.session else {
            return Err(Error::connection(format!(
                "could not reach Postgres to deregister worker {worker_id}; the scheduler \
                 requeues its tasks once it notices the worker is gone"
            )));
        };
        let endings = self.batcher.take();
        let sent = send_endings(session, &endings, &self.config.stats).await;
        let deregistered = session
            .client
            .execute("SELECT sluice.deregister_worker($1)", &[&worker_id])
            .await
            .map_err(|e| Error::postgres(format!("deregistering worker {worker_id} failed"), e));
        match sent {
            Ok(warnings) => {
                for warning in warnings {
                    self.warn(&warning);
                }
            }
            Err(error) => self.warn(&format!("{error}; {} ending(s) not sent", endings.len())),
        }
        self.session = None;
        deregistered.map(|_| ())
    }

    fn on_drain_error(&mut self, error: Error) {
        if error.is_transient() {
            self.warn(&error.to_string());
            self.forget_broken_session();
        } else {
            self.warn(&error.to_string());
        }
    }

    /// During shutdown a broken connection is not replaced at once: handlers keep running and
    /// the final flush reconnects.
    fn forget_broken_session(&mut self) {
        if self.session.take().is_some() {
            self.warn("the connection to Postgres was lost during shutdown");
        }
    }

    /// After the main connection broke, a plain connection (no new registration) is enough to
    /// send the last endings and deregister the old worker id.
    async fn reconnect_for_shutdown(&mut self) {
        if self.session.is_some() {
            return;
        }
        let Some(worker_id) = self.last_worker_id else {
            return;
        };
        let give_up = Instant::now() + SHUTDOWN_RECONNECT_BUDGET;
        let mut backoff = Backoff::new();
        loop {
            match connect_session(&self.config.connection, worker_id).await {
                Ok(session) => {
                    self.session = Some(session);
                    return;
                }
                Err(error) => {
                    let delay = backoff.next_delay();
                    if !error.is_transient() || Instant::now() + delay > give_up {
                        self.warn(&error.to_string());
                        return;
                    }
                    time::sleep(delay).await;
                }
            }
        }
    }

    fn warn(&self, message: &str) {
        eprintln!("sluice worker \"{}\": {message}", self.config.name);
    }
}

/// What the handler's result means for the attempt, if anything must be sent.
fn decide_ending(
    completed_in_transaction: bool,
    cancelled: bool,
    result: HandlerResult,
) -> Option<Ending> {
    if completed_in_transaction {
        return None;
    }
    match result {
        HandlerResult::Returned(Ok(output)) => Some(Ending::Completed(output)),
        // A cancelled attempt already ended (cancelled, timed out or lost) or is requeued as
        // lost at deregistration, which does not consume a retry the way a failure would.
        HandlerResult::Returned(Err(_)) | HandlerResult::Panicked(_) if cancelled => None,
        HandlerResult::Returned(Err(error)) => Some(Ending::Failed {
            error: error.message().to_owned(),
            retryable: error.is_retryable(),
        }),
        HandlerResult::Panicked(message) => Some(Ending::Failed {
            error: format!("handler panicked: {message}"),
            retryable: true,
        }),
        HandlerResult::Aborted => None,
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "(panic payload is not a string)".to_owned()
    }
}

/// Which actions a notification asks for: (fetch, heartbeat). The scheduler sends "assigned",
/// "signal" or both; anything else is answered with both, which is always safe.
fn notification_kinds(payload: &str) -> (bool, bool) {
    let assigned = payload.contains("assigned");
    let signal = payload.contains("signal");
    if assigned || signal {
        (assigned, signal)
    } else {
        (true, true)
    }
}

/// Splits running attempts into the latest attempt per task and older ones. Attempt numbers
/// only grow, so an older attempt of a task that has a newer one here is certainly stale.
fn split_superseded(mut running: Vec<TaskAttempt>) -> (Vec<TaskAttempt>, Vec<TaskAttempt>) {
    running.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut current: Vec<TaskAttempt> = Vec::with_capacity(running.len());
    let mut superseded = Vec::new();
    for key in running {
        match current.last() {
            Some(latest) if latest.0 == key.0 => superseded.push(key),
            _ => current.push(key),
        }
    }
    (current, superseded)
}

async fn sleep_until_some(deadline: Option<time::Instant>) {
    match deadline {
        Some(deadline) => time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn recv_some(receiver: Option<&mut mpsc::UnboundedReceiver<String>>) -> Option<String> {
    match receiver {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

/// Opens the main connection, registers, LISTENs on the worker's channel and prepares the
/// protocol statements.
async fn register(config: &WorkerConfig) -> Result<Session, Error> {
    let (client, notifications) = connect_listening(&config.connection).await?;
    let task_names: Vec<&str> = config.handlers.keys().map(String::as_str).collect();
    let row = client
        .query_one(
            "SELECT sluice.register_worker($1, $2, $3, $4)",
            &[
                &config.name,
                &task_names,
                &config.slots,
                &serde_json::Value::Object(config.labels.clone()),
            ],
        )
        .await
        .map_err(|e| {
            Error::postgres(format!("registering worker \"{}\" failed", config.name), e)
        })?;
    let worker_id: i64 = row
        .try_get(0)
        .map_err(|e| Error::postgres("reading the new worker id", e))?;
    client
        .batch_execute(&format!("LISTEN sluice_worker_{worker_id}"))
        .await
        .map_err(|e| Error::postgres("LISTEN on the worker channel failed", e))?;
    prepare_session(client, worker_id, notifications).await
}

/// A session for an existing worker id, without registering (used to wind down).
async fn connect_session(
    connection: &tokio_postgres::Config,
    worker_id: i64,
) -> Result<Session, Error> {
    let (client, notifications) = connect_listening(connection).await?;
    prepare_session(client, worker_id, notifications).await
}

async fn prepare_session(
    client: Client,
    worker_id: i64,
    notifications: mpsc::UnboundedReceiver<String>,
) -> Result<Session, Error> {
    let prepare = |sql: &'static str, types: &'static [Type]| {
        let client = &client;
        async move {
            client
                .prepare_typed(sql, types)
                .await
                .map_err(|e| Error::postgres("preparing the worker protocol statements failed", e))
        }
    };
    // Absent from a server whose extension predates it: the worker then waits for
    // notifications only.
    let await_tasks = match client
        .prepare_typed(
            "CALL sluice.await_tasks($1, $2, $3, NULL, NULL, NULL, NULL, NULL)",
            &[Type::INT8, Type::INT4, Type::INT4],
        )
        .await
    {
        Ok(statement) => Some(statement),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) => None,
        Err(e) => {
            return Err(Error::postgres(
                "preparing the worker protocol statements failed",
                e,
            ))
        }
    };
    let fetch = prepare(
        "SELECT task_id, attempt, task_name, input FROM sluice.fetch_tasks($1, $2)",
        &[Type::INT8, Type::INT4],
    )
    .await?;
    let heartbeat = prepare(
        "SELECT h FROM sluice.heartbeat($1, $2, $3) AS h",
        &[Type::INT8, Type::INT8_ARRAY, Type::INT4_ARRAY],
    )
    .await?;
    let complete_many = prepare(
        "SELECT c FROM sluice.complete_many($1, $2, $3, $4) AS c",
        &[
            Type::INT8,
            Type::INT8_ARRAY,
            Type::INT4_ARRAY,
            Type::JSONB_ARRAY,
        ],
    )
    .await?;
    let fail_many = prepare(
        "SELECT f FROM sluice.fail_many($1, $2, $3, $4, $5) AS f",
        &[
            Type::INT8,
            Type::INT8_ARRAY,
            Type::INT4_ARRAY,
            Type::TEXT_ARRAY,
            Type::BOOL_ARRAY,
        ],
    )
    .await?;
    Ok(Session {
        client,
        worker_id,
        notifications,
        await_tasks,
        fetch,
        heartbeat,
        complete_many,
        fail_many,
    })
}

/// Ends the worker's `sluice.await_tasks` wait through a connection of its own (the worker's
/// is busy in the wait). Returns whether a wait was ended.
async fn end_wait(config: &tokio_postgres::Config, worker_id: i64) -> bool {
    let Ok((client, connection)) = config.connect(NoTls).await else {
        return false;
    };
    let driver = tokio::spawn(connection);
    let ended = client
        .query_one("SELECT sluice.end_wait($1)", &[&worker_id])
        .await
        .ok()
        .and_then(|row| row.try_get::<_, bool>(0).ok())
        .unwrap_or(false);
    drop(client);
    let _ = driver.await;
    ended
}

/// Connects and spawns the task that drives the connection, forwarding notification payloads.
/// The receiver yields None once the connection has ended.
async fn connect_listening(
    config: &tokio_postgres::Config,
) -> Result<(Client, mpsc::UnboundedReceiver<String>), Error> {
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| Error::postgres("connecting to Postgres failed", e))?;
    let (notification_tx, notification_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(notification))) => {
                    if notification_tx
                        .send(notification.payload().to_owned())
                        .is_err()
                    {
                        break;
                    }
                }
                Some(Ok(_notice)) => {}
                // The runtime learns of the end from the closed channel.
                Some(Err(_)) | None => break,
            }
        }
    });
    Ok((client, notification_rx))
}

/// Sends endings with complete_many / fail_many. Returns warnings about endings Postgres
/// rejected one by one; an Err is transient and nothing can be assumed sent.
async fn send_endings(
    session: &Session,
    endings: &[PendingEnding],
    stats: &WorkerStats,
) -> Result<Vec<String>, Error> {
    let mut warnings = Vec::new();
    let mut rejected_outputs = Vec::new();
    for batch in group_by_worker(endings) {
        let worker_id = batch.worker_id;
        if !batch.completed_ids.is_empty() {
            let sent = session
                .client
                .query(
                    &session.complete_many,
                    &[
                        &worker_id,
                        &batch.completed_ids,
                        &batch.completed_attempts,
                        &batch.outputs,
                    ],
                )
                .await
                .map_err(|e| Error::postgres("completing tasks failed", e));
            match sent {
                // The rows are the attempts it ended (a late or duplicate ending is not one).
                Ok(rows) => stats.add_completed(rows.len(), Instant::now()),
                Err(error) if error.is_transient() => return Err(error),
                Err(_) => {
                    for i in 0..batch.completed_ids.len() {
                        let key = AttemptKey {
                            worker_id,
                            task_id: batch.completed_ids[i],
                            attempt: batch.completed_attempts[i],
                        };
                        let one = session
                            .client
                            .query(
                                &session.complete_many,
                                &[
                                    &worker_id,
                                    &[key.task_id].as_slice(),
                                    &[key.attempt].as_slice(),
                                    &[&batch.outputs[i]].as_slice(),
                                ],
                            )
                            .await
                            .map_err(|e| Error::postgres("Postgres rejected the task output", e));
                        match one {
                            Ok(rows) => stats.add_completed(rows.len(), Instant::now()),
                            Err(error) if error.is_transient() => return Err(error),
                            Err(error) => rejected_outputs.push(PendingEnding {
                                key,
                                ending: Ending::Failed {
                                    error: error.to_string(),
                                    retryable: false,
                                },
                            }),
                        }
                    }
                }
            }
        }
        if !batch.failed_ids.is_empty() {
            fail_batch(session, &batch, &mut warnings, stats).await?;
        }
    }
    for batch in group_by_worker(&rejected_outputs) {
        fail_batch(session, &batch, &mut warnings, stats).await?;
    }
    Ok(warnings)
}

async fn fail_batch(
    session: &Session,
    batch: &crate::batch::WorkerBatch,
    warnings: &mut Vec<String>,
    stats: &WorkerStats,
) -> Result<(), Error> {
    let sent = session
        .client
        .query(
            &session.fail_many,
            &[
                &batch.worker_id,
                &batch.failed_ids,
                &batch.failed_attempts,
                &batch.errors,
                &batch.retryable,
            ],
        )
        .await
        .map_err(|e| Error::postgres("failing tasks failed", e));
    match sent {
        Ok(rows) => {
            stats.add_failed(rows.len(), Instant::now());
            Ok(())
        }
        Err(error) if error.is_transient() => Err(error),
        Err(error) => {
            warnings.push(format!(
                "{error}; dropped {} failure(s) (their attempts end by timeout)",
                batch.failed_ids.len()
            ));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(task_id: i64) -> AttemptKey {
        AttemptKey {
            worker_id: 1,
            task_id,
            attempt: 1,
        }
    }

    #[tokio::test]
    async fn a_handler_reports_its_return_its_panic_or_its_abort() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        spawn_reporting(key(1), Box::pin(async { Ok(Value::from(7)) }), tx.clone());
        let returned = rx.recv().await.expect("a report");
        assert_eq!(returned.key, key(1));
        assert!(matches!(returned.result, HandlerResult::Returned(Ok(v)) if v == 7));

        spawn_reporting(
            key(2),
            Box::pin(async { panic!("handler blew up") }),
            tx.clone(),
        );
        let panicked = rx.recv().await.expect("a report");
        assert_eq!(panicked.key, key(2));
        assert!(matches!(panicked.result, HandlerResult::Panicked(m) if m == "handler blew up"));

        let abort = spawn_reporting(key(3), Box::pin(std::future::pending()), tx.clone());
        tokio::task::yield_now().await;
        abort.abort();
        let aborted = time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an aborted handler reports within 5 s")
            .expect("a report");
        assert_eq!(aborted.key, key(3));
        assert!(matches!(aborted.result, HandlerResult::Aborted));
        drop(tx);
        let after = time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(
            matches!(after, Ok(None)),
            "one report per handler, and every task gone"
        );
    }

    #[test]
    fn notification_payloads() {
        assert_eq!(notification_kinds("assigned"), (true, false));
        assert_eq!(notification_kinds("signal"), (false, true));
        assert_eq!(notification_kinds("assigned signal"), (true, true));
        assert_eq!(notification_kinds(""), (true, true));
    }

    #[test]
    fn endings() {
        let ok = || HandlerResult::Returned(Ok(Value::from(1)));
        let err = |retryable| {
            HandlerResult::Returned(Err(if retryable {
                TaskError::retryable("again")
            } else {
                TaskError::fatal("never")
            }))
        };

        assert_eq!(
            decide_ending(false, false, ok()),
            Some(Ending::Completed(Value::from(1)))
        );
        // Completed inside the handler's transaction: nothing more to send, whatever it returned.
        assert_eq!(decide_ending(true, false, ok()), None);
        assert_eq!(decide_ending(true, false, err(true)), None);
        assert_eq!(
            decide_ending(false, false, err(false)),
            Some(Ending::Failed {
                error: "never".into(),
                retryable: false
            })
        );
        assert_eq!(
            decide_ending(false, false, err(true)),
            Some(Ending::Failed {
                error: "again".into(),
                retryable: true
            })
        );
        assert_eq!(
            decide_ending(false, false, HandlerResult::Panicked("boom".into())),
            Some(Ending::Failed {
                error: "handler panicked: boom".into(),
                retryable: true
            })
        );
        assert_eq!(decide_ending(false, true, err(true)), None);
        assert_eq!(
            decide_ending(false, true, HandlerResult::Panicked("x".into())),
            None
        );
        // Work that finished despite the cancellation is still offered (fenced if stale).
        assert_eq!(
            decide_ending(false, true, ok()),
            Some(Ending::Completed(Value::from(1)))
        );
        assert_eq!(decide_ending(false, false, HandlerResult::Aborted), None);
    }

    #[test]
    fn panic_messages() {
        let payload: Box<dyn std::any::Any + Send> = Box::new("static str");
        assert_eq!(panic_message(payload.as_ref()), "static str");
        let payload: Box<dyn std::any::Any + Send> = Box::new(format!("formatted {}", 42));
        assert_eq!(panic_message(payload.as_ref()), "formatted 42");
        let payload: Box<dyn std::any::Any + Send> = Box::new(7_u8);
        assert_eq!(
            panic_message(payload.as_ref()),
            "(panic payload is not a string)"
        );
    }

    #[test]
    fn superseded_attempts() {
        let (current, superseded) = split_superseded(vec![(5, 1), (3, 1), (5, 2), (9, 4)]);
        assert_eq!(current, [(3, 1), (5, 2), (9, 4)]);
        assert_eq!(superseded, [(5, 1)]);
    }

    #[tokio::test]
    async fn panicking_handler_task_reports_the_message() {
        let handle = tokio::spawn(async {
            if std::hint::black_box(true) {
                panic!("kaboom {}", 1);
            }
        });
        let error = handle.await.expect_err("the task panicked");
        let payload = error.try_into_panic().expect("a panic, not a cancellation");
        assert_eq!(panic_message(payload.as_ref()), "kaboom 1");
    }
}
