//! The producer side: defining tasks, enqueuing and cancelling them.
//!
//! Every function takes anything implementing [`GenericClient`]: a `Client`, or the caller's own
//! `Transaction`, in which case the enqueue commits or rolls back with the caller's writes.
//! Statements are sent with explicit parameter types (`query_typed`), so each call is a single
//! round trip with no prepare step.

use std::time::{Duration, SystemTime};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;

use crate::error::Error;
use crate::task::TaskDefinition;

/// How runs of a task are retried, timed out and prioritised. `None` keeps the SQL default
/// (see `sluice.define_task`).
#[derive(Debug, Default, Clone)]
pub struct TaskOptions {
    pub retries: Option<i32>,
    pub backoff_factor: Option<f64>,
    pub backoff_max: Option<Duration>,
    pub execution_timeout: Option<Duration>,
    pub schedule_timeout: Option<Duration>,
    pub priority: Option<i32>,
}

/// Per-enqueue settings. `None` keeps the SQL default: run now, the task's priority, no key.
#[derive(Debug, Default, Clone)]
pub struct EnqueueOptions {
    pub run_at: Option<SystemTime>,
    pub priority: Option<i32>,
    pub idempotency_key: Option<String>,
}

/// Creates the task definition, or updates it if it exists.
pub async fn define_task(
    client: &impl GenericClient,
    name: &str,
    options: &TaskOptions,
) -> Result<(), Error> {
    let (sql, args) = define_task_call(name, options);
    let params: Vec<(&(dyn ToSql + Sync), Type)> = args.iter().map(SqlArg::as_param).collect();
    client
        .query_typed(&sql, &params)
        .await
        .map_err(|e| Error::postgres(format!("defining task \"{name}\" failed"), e))?;
    Ok(())
}

/// Enqueues one run of `T` and returns its task id. With an idempotency key that an unfinished
/// run of `T` already holds, returns that run's id instead.
pub async fn enqueue<T: TaskDefinition>(
    client: &impl GenericClient,
    input: &T::Input,
    options: &EnqueueOptions,
) -> Result<i64, Error> {
    let input = serde_json::to_value(input)
        .map_err(|e| Error::json(format!("serializing the input of \"{}\"", T::name()), e))?;
    let name = T::name();
    let params: [(&(dyn ToSql + Sync), Type); 5] = [
        (&name, Type::TEXT),
        (&input, Type::JSONB),
        (&options.run_at, Type::TIMESTAMPTZ),
        (&options.priority, Type::INT4),
        (&options.idempotency_key, Type::TEXT),
    ];
    let row = client
        .query_typed_one("SELECT sluice.enqueue($1, $2, $3, $4, $5)", &params)
        .await
        .map_err(|e| Error::postgres(format!("enqueuing \"{name}\" failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the enqueued task id", e))
}

/// Enqueues one run of `T` per input, in one statement; returns the ids in input order.
pub async fn enqueue_many<T: TaskDefinition>(
    client: &impl GenericClient,
    inputs: &[T::Input],
) -> Result<Vec<i64>, Error> {
    let name = T::name();
    let inputs = inputs
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::json(format!("serializing an input of \"{name}\""), e))?;
    let params: [(&(dyn ToSql + Sync), Type); 2] =
        [(&name, Type::TEXT), (&inputs, Type::JSONB_ARRAY)];
    let rows = client
        .query_typed(
            "SELECT id FROM sluice.enqueue_many($1, $2) AS e(id) ORDER BY id",
            &params,
        )
        .await
        .map_err(|e| Error::postgres(format!("enqueuing many \"{name}\" failed"), e))?;
    rows.iter()
        .map(|row| row.try_get(0))
        .collect::<Result<Vec<i64>, _>>()
        .map_err(|e| Error::postgres("reading the enqueued task ids", e))
}

/// Untyped enqueue: the task name and its input as JSON text. The text is cast to jsonb by
/// Postgres, so malformed JSON fails with SQLSTATE 22P02.
pub async fn enqueue_json(
    client: &impl GenericClient,
    task: &str,
    json: &str,
    options: &EnqueueOptions,
) -> Result<i64, Error> {
    let params: [(&(dyn ToSql + Sync), Type); 5] = [
        (&task, Type::TEXT),
        (&json, Type::TEXT),
        (&options.run_at, Type::TIMESTAMPTZ),
        (&options.priority, Type::INT4),
        (&options.idempotency_key, Type::TEXT),
    ];
    let row = client
        .query_typed_one("SELECT sluice.enqueue($1, $2::jsonb, $3, $4, $5)", &params)
        .await
        .map_err(|e| Error::postgres(format!("enqueuing \"{task}\" failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the enqueued task id", e))
}

/// Cancels a queued or running task. Returns false if it had already finished; fails with
/// SQLSTATE P0002 if there is no such task.
pub async fn cancel(client: &impl GenericClient, task_id: i64) -> Result<bool, Error> {
    let row = client
        .query_typed_one("SELECT sluice.cancel($1)", &[(&task_id, Type::INT8)])
        .await
        .map_err(|e| Error::postgres(format!("cancelling task {task_id} failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the cancel result", e))
}

#[derive(Debug, Clone, PartialEq)]
enum SqlArg {
    Text(String),
    Int(i32),
    Float(f64),
}

impl SqlArg {
    fn as_param(&self) -> (&(dyn ToSql + Sync), Type) {
        match self {
            SqlArg::Text(v) => (v, Type::TEXT),
            SqlArg::Int(v) => (v, Type::INT4),
            SqlArg::Float(v) => (v, Type::FLOAT8),
        }
    }
}

/// A `sluice.define_task` call that names only the options that are set, so the others keep
/// their SQL defaults.
fn define_task_call(name: &str, options: &TaskOptions) -> (String, Vec<SqlArg>) {
    let mut named = vec![("name", "", SqlArg::Text(name.to_owned()))];
    if let Some(retries) = options.retries {
        named.push(("retries", "", SqlArg::Int(retries)));
    }
    if let Some(factor) = options.backoff_factor {
        named.push(("backoff_factor", "", SqlArg::Float(factor)));
    }
    let intervals = [
        ("backoff_max", options.backoff_max),
        ("execution_timeout", options.execution_timeout),
        ("schedule_timeout", options.schedule_timeout),
    ];
    for (param, duration) in intervals {
        if let Some(duration) = duration {
            named.push((
                param,
                "::interval",
                SqlArg::Text(interval_literal(duration)),
            ));
        }
    }
    if let Some(priority) = options.priority {
        named.push(("priority", "", SqlArg::Int(priority)));
    }

    let list = named
        .iter()
        .enumerate()
        .map(|(i, (param, cast, _))| format!("{param} => ${}{cast}", i + 1))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SELECT sluice.define_task({list})");
    (sql, named.into_iter().map(|(_, _, arg)| arg).collect())
}

/// Interval input text for a duration, to the microsecond (Postgres' interval resolution).
pub(crate) fn interval_literal(duration: Duration) -> String {
    format!(
        "{}.{:06} seconds",
        duration.as_secs(),
        duration.subsec_micros()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn define_task_with_defaults_names_only_the_task() {
        let (sql, args) = define_task_call("resize", &TaskOptions::default());
        assert_eq!(sql, "SELECT sluice.define_task(name => $1)");
        assert_eq!(args, vec![SqlArg::Text("resize".into())]);
    }

    #[test]
    fn define_task_with_every_option() {
        let options = TaskOptions {
            retries: Some(3),
            backoff_factor: Some(1.5),
            backoff_max: Some(Duration::from_secs(2)),
            execution_timeout: Some(Duration::from_millis(1500)),
            schedule_timeout: Some(Duration::from_secs(300)),
            priority: Some(-4),
        };
        let (sql, args) = define_task_call("send_email", &options);
        assert_eq!(
            sql,
            "SELECT sluice.define_task(name => $1, retries => $2, backoff_factor => $3, \
             backoff_max => $4::interval, execution_timeout => $5::interval, \
             schedule_timeout => $6::interval, priority => $7)"
        );
        assert_eq!(
            args,
            vec![
                SqlArg::Text("send_email".into()),
                SqlArg::Int(3),
                SqlArg::Float(1.5),
                SqlArg::Text("2.000000 seconds".into()),
                SqlArg::Text("1.500000 seconds".into()),
                SqlArg::Text("300.000000 seconds".into()),
                SqlArg::Int(-4),
            ]
        );
    }

    #[test]
    fn define_task_numbers_parameters_densely() {
        let options = TaskOptions {
            execution_timeout: Some(Duration::from_secs(5)),
            priority: Some(2),
            ..TaskOptions::default()
        };
        let (sql, args) = define_task_call("t", &options);
        assert_eq!(
            sql,
            "SELECT sluice.define_task(name => $1, execution_timeout => $2::interval, \
             priority => $3)"
        );
        assert_eq!(args.len(), 3);
    }

    #[test]
    fn interval_literals() {
        assert_eq!(interval_literal(Duration::ZERO), "0.000000 seconds");
        assert_eq!(
            interval_literal(Duration::from_micros(1)),
            "0.000001 seconds"
        );
        assert_eq!(
            interval_literal(Duration::from_secs(3600) + Duration::from_nanos(2_500)),
            "3600.000002 seconds"
        );
    }
}
