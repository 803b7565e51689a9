//! Client for Sluice, the task orchestrator that lives inside PostgreSQL.
//!
//! * Producers define tasks and enqueue runs with [`define_task`], [`enqueue`],
//!   [`enqueue_many`], [`enqueue_json`] and [`cancel`], on a client or inside their own
//!   transaction. [`TaskOptions`] also carries flow control: a [`Concurrency`] limit per key,
//!   [rate limits](RateLimitUse) (declared ones with [`set_rate_limit`]) and
//!   [`DesiredLabel`]s that place runs on labelled workers ([`set_worker_labels`]).
//! * Workflows: a [`WorkflowBuilder`] defines a DAG of steps (parents named by their [`Step`]
//!   handles), [`run_workflow`] starts runs, [`run_state`] reads them, [`cancel_run`] stops
//!   them; a step's task takes [`StepInput`] (the run input and its parents' outputs).
//! * A [`Worker`] registers with the scheduler, runs typed handlers for the tasks assigned to
//!   it, and reports their endings. [`TaskContext::transaction`] makes a handler's database
//!   writes and its task's completion a single atomic change.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use sluice_client::{TaskContext, TaskDefinition, TaskError, Worker};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Email { to: String }
//!
//! struct SendEmail;
//! impl TaskDefinition for SendEmail {
//!     const NAME: &'static str = "send_email";
//!     type Input = Email;
//!     type Output = ();
//! }
//!
//! async fn send_email(_ctx: TaskContext, email: Email) -> Result<(), TaskError> {
//!     println!("sending to {}", email.to);
//!     Ok(())
//! }
//!
//! # async fn example() -> Result<(), sluice_client::Error> {
//! Worker::builder("host=127.0.0.1 user=postgres dbname=sluice")
//!     .task::<SendEmail, _, _>(send_email)
//!     .build()?
//!     .run()
//!     .await
//! # }
//! ```
//!
//! Connections are made without TLS.

mod backoff;
mod batch;
mod context;
mod error;
mod pool;
mod producer;
mod runtime;
mod stats;
mod task;
mod triggers;
mod worker;
mod workflow;

pub use context::{ChildOutcome, TaskContext, TaskTransaction};
pub use error::{Error, ErrorKind};
pub use producer::{
    cancel, define_task, enqueue, enqueue_json, enqueue_many, set_rate_limit, set_worker_labels,
    Concurrency, ConcurrencyStrategy, DesiredLabel, EnqueueOptions, PreparedEnqueue, RateLimitUse,
    TaskOptions, Units,
};
pub use stats::WorkerStats;
pub use task::{TaskDefinition, TaskError};
pub use triggers::{
    delete_scheduled, delete_scheduled_run, push_event, push_events, reschedule, reschedule_run,
    run_workflow_at, schedule_cron, set_task_triggers, subscribe, unschedule_cron, Cron,
    MissedTicks, OnEvent,
};
pub use worker::{Worker, WorkerBuilder};
pub use workflow::{
    cancel_run, run_state, run_workflow, Condition, Conditions, FailureInput, RunState, Step,
    StepInput, StepOptions, StepRef, SuccessInput, WorkflowBuilder,
};

/// Re-exported so callers can name the client types and SQLSTATEs without a version mismatch.
pub use tokio_postgres;
