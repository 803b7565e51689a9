use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::context::TaskContext;
use crate::error::Error;
use crate::runtime;
use crate::stats::WorkerStats;
use crate::task::{TaskDefinition, TaskError};

pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;

/// A handler with its task's input and output types erased to JSON.
pub(crate) type ErasedHandler = Arc<dyn Fn(TaskContext, Value) -> HandlerFuture + Send + Sync>;

pub(crate) struct WorkerConfig {
    pub(crate) connection: tokio_postgres::Config,
    pub(crate) name: String,
    pub(crate) slots: i32,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) batch_max: usize,
    pub(crate) batch_max_delay: Duration,
    pub(crate) handlers: HashMap<String, ErasedHandler>,
    /// Labels for placement (`desired_labels` on task definitions), a JSON object.
    pub(crate) labels: serde_json::Map<String, serde_json::Value>,
    pub(crate) stats: WorkerStats,
}

/// Runs task handlers for the tasks it was built with, as one registered Sluice worker.
pub struct Worker {
    config: WorkerConfig,
}

impl Worker {
    pub fn builder(connection_string: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder {
            connection_string: connection_string.into(),
            name: None,
            slots: 10,
            heartbeat_interval: Duration::from_secs(5),
            poll_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            batch_max: 500,
            batch_max_delay: Duration::from_millis(5),
            handlers: HashMap::new(),
            duplicate_task: None,
            labels: serde_json::Map::new(),
        }
    }

    /// What this worker has done so far, updated while it runs: keep the handle before `run`.
    pub fn stats(&self) -> WorkerStats {
        self.config.stats.clone()
    }

    /// Runs until SIGTERM or Ctrl-C, then shuts down gracefully.
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(termination_signal()).await
    }

    /// Runs until `shutdown` resolves, then shuts down gracefully: no new tasks are fetched,
    /// running handlers get `shutdown_timeout` to finish before they are cancelled, pending
    /// completions are flushed and the worker deregisters.
    ///
    /// Returns an error if Postgres rejects the registration (e.g. SQLSTATE 42704 for a task
    /// that was never defined) or if the worker could not deregister at shutdown. Connection
    /// failures while running are retried, not returned.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
        runtime::run(self.config, Box::pin(shutdown)).await
    }
}

/// Configures a [`Worker`]; see [`Worker::builder`].
pub struct WorkerBuilder {
    connection_string: String,
    name: Option<String>,
    slots: i32,
    heartbeat_interval: Duration,
    poll_interval: Duration,
    shutdown_timeout: Duration,
    batch_max: usize,
    batch_max_delay: Duration,
    handlers: HashMap<String, ErasedHandler>,
    duplicate_task: Option<String>,
    labels: serde_json::Map<String, serde_json::Value>,
}

impl WorkerBuilder {
    /// The worker's name in `sluice.workers`; default `<hostname>-<pid>`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// A label for placement: tasks whose definition asks for it (`desired_labels`) require or
    /// prefer workers that have it. The value is text or a number. Labels given here are
    /// registered again after a reconnect; `sluice.set_worker_labels` changes them meanwhile.
    pub fn label(mut self, name: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.labels.insert(name.into(), value.into());
        self
    }

    /// How many handlers may run at once; default 10.
    pub fn slots(mut self, n: i32) -> Self {
        self.slots = n;
        self
    }

    /// Registers the handler for task `T`.
    pub fn task<T, F, Fut>(mut self, handler: F) -> Self
    where
        T: TaskDefinition,
        F: Fn(TaskContext, T::Input) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T::Output, TaskError>> + Send + 'static,
    {
        let erased = erase_handler::<T, F, Fut>(handler);
        if self.handlers.insert(T::name().to_owned(), erased).is_some() {
            self.duplicate_task
                .get_or_insert_with(|| T::name().to_owned());
        }
        self
    }

    /// How often the worker reports that it is alive; default 5 s.
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.heartbeat_interval = d;
        self
    }

    /// How often to look for assigned tasks when no notification arrives; default 1 s. An idle
    /// worker waits in Postgres for its assignments (`sluice.await_tasks`) up to this
    /// long (at most the heartbeat interval) at a time.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// How long running handlers may take to finish at shutdown; default 30 s.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// Completions and failures are sent together once `max` are pending or the oldest has
    /// waited `max_delay`; default 500 and 5 ms.
    pub fn completion_batch(mut self, max: usize, max_delay: Duration) -> Self {
        self.batch_max = max;
        self.batch_max_delay = max_delay;
        self
    }

    pub fn build(self) -> Result<Worker, Error> {
        if self.handlers.is_empty() {
            return Err(Error::config(
                "a worker needs at least one task handler (WorkerBuilder::task)",
            ));
        }
        if let Some(name) = self.duplicate_task {
            return Err(Error::config(format!(
                "task \"{name}\" has more than one handler"
            )));
        }
        if self.slots <= 0 {
            return Err(Error::config(format!(
                "slots must be positive, got {}",
                self.slots
            )));
        }
        if let Some((name, value)) = self
            .labels
            .iter()
            .find(|(k, v)| k.is_empty() || !(v.is_string() || v.is_number()))
        {
            return Err(Error::config(format!(
                "label {name:?} must have a non-empty name and a text or number value, got {value}"
            )));
        }
        if self.heartbeat_interval.is_zero() || self.poll_interval.is_zero() {
            return Err(Error::config(
                "heartbeat_interval and poll_interval must be longer than zero",
            ));
        }
        let mut connection: tokio_postgres::Config = self
            .connection_string
            .parse()
            .map_err(|e| Error::postgres("invalid connection string", e))?;
        let name = match self.name {
            Some(name) if name.is_empty() => {
                return Err(Error::config("the worker name must not be empty"))
            }
            Some(name) => name,
            None => default_worker_name(),
        };
        if connection.get_application_name().is_none() {
            connection.application_name(format!("sluice worker {name}"));
        }
        Ok(Worker {
            config: WorkerConfig {
                connection,
                name,
                slots: self.slots,
                heartbeat_interval: self.heartbeat_interval,
                poll_interval: self.poll_interval,
                shutdown_timeout: self.shutdown_timeout,
                batch_max: self.batch_max,
                batch_max_delay: self.batch_max_delay,
                handlers: self.handlers,
                labels: self.labels,
                stats: WorkerStats::default(),
            },
        })
    }
}

fn erase_handler<T, F, Fut>(handler: F) -> ErasedHandler
where
    T: TaskDefinition,
    F: Fn(TaskContext, T::Input) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T::Output, TaskError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |context: TaskContext, input: Value| -> HandlerFuture {
        let handler = Arc::clone(&handler);
        // Decoding and the handler call itself happen inside the future, so that a panic in
        // either is caught by the task the runtime spawns for it.
        Box::pin(async move {
            let input: T::Input = serde_json::from_value(input).map_err(|e| {
                TaskError::fatal(format!(
                    "the input does not match the input type of task \"{}\": {e}",
                    T::name()
                ))
            })?;
            let output = handler(context, input).await?;
            serde_json::to_value(output).map_err(|e| {
                TaskError::fatal(format!(
                    "the output of task \"{}\" cannot be serialized to JSON: {e}",
                    T::name()
                ))
            })
        })
    })
}

fn default_worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .or_else(|_| std::fs::read_to_string("/etc/hostname"))
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "sluice-worker".to_owned());
    format!("{host}-{}", std::process::id())
}

async fn termination_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler could be installed: never resolve rather than shut down at once.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                tokio::select! {
                    _ = sigterm.recv() => {}
                    _ = ctrl_c => {}
                }
            }
            Err(_) => ctrl_c.await,
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct AddInput {
        a: i32,
        b: i32,
    }
    struct Add;
    impl TaskDefinition for Add {
        const NAME: &'static str = "add";
        type Input = AddInput;
        type Output = i32;
    }

    async fn add(_: TaskContext, input: AddInput) -> Result<i32, TaskError> {
        Ok(input.a + input.b)
    }

    const DSN: &str = "host=127.0.0.1 port=1 user=postgres dbname=sluice";

    #[test]
    fn build_needs_a_task() {
        let error = Worker::builder(DSN).build().err().map(|e| e.kind());
        assert_eq!(error, Some(ErrorKind::Config));
    }

    #[test]
    fn build_rejects_nonpositive_slots_and_zero_intervals() {
        let zero_slots = Worker::builder(DSN).task::<Add, _, _>(add).slots(0).build();
        assert_eq!(zero_slots.err().map(|e| e.kind()), Some(ErrorKind::Config));
        let zero_poll = Worker::builder(DSN)
            .task::<Add, _, _>(add)
            .poll_interval(Duration::ZERO)
            .build();
        assert_eq!(zero_poll.err().map(|e| e.kind()), Some(ErrorKind::Config));
    }

    #[test]
    fn build_rejects_duplicate_handlers() {
        let result = Worker::builder(DSN)
            .task::<Add, _, _>(add)
            .task::<Add, _, _>(add)
            .build();
        let message = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("\"add\""), "{message}");
    }

    #[test]
    fn build_rejects_bad_connection_strings() {
        let result = Worker::builder("port=notanumber")
            .task::<Add, _, _>(add)
            .build();
        assert_eq!(result.err().map(|e| e.kind()), Some(ErrorKind::Config));
    }

    #[test]
    fn build_defaults() {
        let worker = Worker::builder(DSN)
            .task::<Add, _, _>(add)
            .build()
            .expect("valid configuration");
        let config = &worker.config;
        assert_eq!(config.slots, 10);
        assert_eq!(config.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(config.poll_interval, Duration::from_secs(1));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(
            (config.batch_max, config.batch_max_delay),
            (500, Duration::from_millis(5))
        );
        assert!(config.name.ends_with(&format!("-{}", std::process::id())));
        assert!(config.handlers.contains_key("add"));
    }

    #[tokio::test]
    async fn erased_handler_decodes_runs_and_encodes() {
        let handler = erase_handler::<Add, _, _>(add);
        let pool = crate::pool::ConnectionPool::new(DSN.parse().expect("valid dsn"), 1);
        let (_cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
        let context = || {
            TaskContext::new(
                crate::batch::AttemptKey {
                    worker_id: 1,
                    task_id: 2,
                    attempt: 1,
                },
                "add".into(),
                cancel_rx.clone(),
                Arc::clone(&pool),
                Arc::default(),
            )
        };
        let output = handler(context(), serde_json::json!({"a": 2, "b": 3})).await;
        assert_eq!(output, Ok(Value::from(5)));
        let bad = handler(context(), serde_json::json!({"a": "two"})).await;
        let bad = bad.expect_err("a string is not an i32");
        assert!(!bad.is_retryable());
        assert!(bad.message().contains("task \"add\""), "{}", bad.message());
    }
}
