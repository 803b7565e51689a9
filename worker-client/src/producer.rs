//! The producer side: defining tasks, enqueuing and cancelling them.
//!
//! Every function takes anything implementing [`GenericClient`]: a `Client`, or the caller's own
//! `Transaction`, in which case the enqueue commits or rolls back with the caller's writes.
//! Statements are sent with explicit parameter types (`query_typed`), so each call is a single
//! round trip with no prepare step; [`PreparedEnqueue`] prepares the enqueue once instead.

use std::time::{Duration, SystemTime};

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Statement};

use crate::error::Error;
use crate::task::TaskDefinition;

/// How runs of a task are retried, timed out, prioritised, throttled and placed. `None` and empty
/// lists keep the SQL default (see `sluice.define_task`): no concurrency limit, no rate limits,
/// no desired labels.
///
/// ```
/// use std::time::Duration;
/// use sluice_client::{Concurrency, DesiredLabel, RateLimitUse, TaskOptions, Units};
///
/// let options = TaskOptions {
///     retries: Some(3),
///     // at most two runs at a time per user
///     concurrency: Some(Concurrency::new("$.user_id", 2)),
///     rate_limits: vec![
///         // declared beforehand with `set_rate_limit(client, "smtp", 100, ...)`
///         RateLimitUse::declared("smtp", Units::Fixed(1)),
///         // 10 runs per minute per tenant
///         RateLimitUse::dynamic("$.tenant", Units::Fixed(1), 10, Duration::from_secs(60)),
///     ],
///     desired_labels: vec![DesiredLabel::required("region", "eu")],
///     ..TaskOptions::default()
/// };
/// # let _ = options;
/// ```
#[derive(Debug, Default, Clone)]
pub struct TaskOptions {
    pub retries: Option<i32>,
    pub backoff_factor: Option<f64>,
    pub backoff_max: Option<Duration>,
    pub execution_timeout: Option<Duration>,
    pub schedule_timeout: Option<Duration>,
    pub priority: Option<i32>,
    /// Limits how many runs with the same key run at once.
    pub concurrency: Option<Concurrency>,
    /// Rate limits each run consumes units of when it starts.
    pub rate_limits: Vec<RateLimitUse>,
    /// Worker labels the runs require or prefer (see [`WorkerBuilder::label`]).
    ///
    /// [`WorkerBuilder::label`]: crate::WorkerBuilder::label
    pub desired_labels: Vec<DesiredLabel>,
}

/// A concurrency limit: at most `max_runs` runs at a time per key, the key being the first match
/// of the jsonpath `key` in the run's input (evaluated at enqueue; runs whose input has no match
/// share the empty key, so e.g. `"$.none"` limits the task as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concurrency {
    /// A jsonpath over the task input, e.g. `"$.user_id"`.
    pub key: String,
    /// How many runs per key may run at once; must be positive.
    pub max_runs: i32,
    /// What happens to runs beyond `max_runs`.
    pub strategy: ConcurrencyStrategy,
}

impl Concurrency {
    /// A limit of `max_runs` per key, with the default strategy ([`ConcurrencyStrategy::GroupRoundRobin`]).
    pub fn new(key: impl Into<String>, max_runs: i32) -> Self {
        Concurrency {
            key: key.into(),
            max_runs,
            strategy: ConcurrencyStrategy::default(),
        }
    }

    /// The same limit with another strategy.
    pub fn with_strategy(mut self, strategy: ConcurrencyStrategy) -> Self {
        self.strategy = strategy;
        self
    }
}

/// What a task's runs beyond its concurrency limit do (`concurrency_strategy` in SQL).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConcurrencyStrategy {
    /// Extra runs wait; keys take turns, so a busy key cannot starve the others.
    #[default]
    GroupRoundRobin,
    /// A new run cancels the oldest running run of its key to make room.
    CancelInProgress,
    /// A run that finds its key full is cancelled.
    CancelNewest,
}

impl ConcurrencyStrategy {
    /// The name `sluice.define_task` takes, e.g. `"group_round_robin"`.
    pub fn as_sql(self) -> &'static str {
        match self {
            ConcurrencyStrategy::GroupRoundRobin => "group_round_robin",
            ConcurrencyStrategy::CancelInProgress => "cancel_in_progress",
            ConcurrencyStrategy::CancelNewest => "cancel_newest",
        }
    }
}

/// A rate limit a task's runs consume units of (an entry of `rate_limits` in SQL).
#[derive(Debug, Clone, PartialEq)]
pub enum RateLimitUse {
    /// A limit declared fleet-wide with [`set_rate_limit`]; defining the task fails with
    /// SQLSTATE 42704 if `key` is not declared.
    Declared { key: String, units: Units },
    /// A limit per key, the key being the first match of the jsonpath `key_path` in the input:
    /// at most `limit` units per `per` for each key.
    Dynamic {
        key_path: String,
        units: Units,
        limit: i32,
        per: Duration,
    },
}

impl RateLimitUse {
    /// Consumes `units` of the declared limit `key`.
    pub fn declared(key: impl Into<String>, units: Units) -> Self {
        RateLimitUse::Declared {
            key: key.into(),
            units,
        }
    }

    /// Consumes `units` of a limit of `limit` units per `per` for each value of `key_path`.
    pub fn dynamic(key_path: impl Into<String>, units: Units, limit: i32, per: Duration) -> Self {
        RateLimitUse::Dynamic {
            key_path: key_path.into(),
            units,
            limit,
            per,
        }
    }

    /// The JSON object `sluice.define_task` takes for this entry.
    fn to_json(&self) -> serde_json::Value {
        let mut object = serde_json::Map::new();
        let units = match self {
            RateLimitUse::Declared { key, units } => {
                object.insert("key".into(), key.as_str().into());
                units
            }
            RateLimitUse::Dynamic {
                key_path,
                units,
                limit,
                per,
            } => {
                object.insert("key_path".into(), key_path.as_str().into());
                object.insert("limit".into(), (*limit).into());
                object.insert("per".into(), interval_literal(*per).into());
                units
            }
        };
        match units {
            Units::Fixed(n) => object.insert("units".into(), (*n).into()),
            Units::Path(path) => object.insert("units_path".into(), path.as_str().into()),
        };
        serde_json::Value::Object(object)
    }
}

/// How many units of a rate limit one run consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Units {
    /// The same number for every run; must be positive.
    Fixed(i32),
    /// The number at this jsonpath in the run's input, e.g. `"$.recipients.size()"`.
    Path(String),
}

impl Default for Units {
    /// One unit per run.
    fn default() -> Self {
        Units::Fixed(1)
    }
}

/// A worker label a task's runs ask for (an entry of `desired_labels` in SQL). A required label
/// must match for a worker to get a run; among the workers that may, the one whose matching
/// preferred labels weigh the most gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredLabel {
    /// The label's name, as given to [`WorkerBuilder::label`](crate::WorkerBuilder::label).
    pub label: String,
    /// The wanted value: a JSON string or number.
    pub value: serde_json::Value,
    /// Whether only workers with this label and value may run the task.
    pub required: bool,
    /// How much a match counts when choosing a worker, 1 to 1,000,000.
    pub weight: i32,
}

impl DesiredLabel {
    /// A label a worker must have, with this value, to run the task.
    pub fn required(label: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        DesiredLabel {
            label: label.into(),
            value: value.into(),
            required: true,
            weight: 1,
        }
    }

    /// A label that makes a worker preferred, by `weight`, over workers without it.
    pub fn preferred(
        label: impl Into<String>,
        value: impl Into<serde_json::Value>,
        weight: i32,
    ) -> Self {
        DesiredLabel {
            label: label.into(),
            value: value.into(),
            required: false,
            weight,
        }
    }

    /// The JSON object `sluice.define_task` takes for this entry.
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "label": self.label,
            "value": self.value,
            "required": self.required,
            "weight": self.weight,
        })
    }
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

/// Declares the rate limit `key`, or changes it: at most `max_units` units consumed per `per`,
/// fleet-wide, by the tasks that name it in [`RateLimitUse::Declared`].
pub async fn set_rate_limit(
    client: &impl GenericClient,
    key: &str,
    max_units: i32,
    per: Duration,
) -> Result<(), Error> {
    let per = interval_literal(per);
    let params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&key, Type::TEXT),
        (&max_units, Type::INT4),
        (&per, Type::TEXT),
    ];
    client
        .query_typed(
            "SELECT sluice.set_rate_limit($1, $2, $3::interval)",
            &params,
        )
        .await
        .map_err(|e| Error::postgres(format!("declaring rate limit \"{key}\" failed"), e))?;
    Ok(())
}

/// Replaces the labels of a live worker (names to JSON strings or numbers); its next
/// assignments use them. Fails with SQLSTATE SL001 if the worker is not registered.
pub async fn set_worker_labels(
    client: &impl GenericClient,
    worker_id: i64,
    labels: serde_json::Map<String, serde_json::Value>,
) -> Result<(), Error> {
    let labels = serde_json::Value::Object(labels);
    let params: [(&(dyn ToSql + Sync), Type); 2] =
        [(&worker_id, Type::INT8), (&labels, Type::JSONB)];
    client
        .query_typed("SELECT sluice.set_worker_labels($1, $2)", &params)
        .await
        .map_err(|e| {
            Error::postgres(
                format!("setting the labels of worker {worker_id} failed"),
                e,
            )
        })?;
    Ok(())
}

/// Enqueues one run of `T` and returns its task id. With an idempotency key that an unfinished
/// run of `T` already holds, returns that run's id instead.
///
/// Each call sends the statement text to be parsed and planned again (one round trip, nothing
/// to set up). A producer that enqueues single tasks at a high rate on one connection should
/// use a [`PreparedEnqueue`] instead.
pub async fn enqueue<T: TaskDefinition>(
    client: &impl GenericClient,
    input: &T::Input,
    options: &EnqueueOptions,
) -> Result<i64, Error> {
    let input = enqueue_input::<T>(input)?;
    let name = T::name();
    let values = enqueue_values(&name, &input, options);
    let params: [(&(dyn ToSql + Sync), Type); 5] =
        std::array::from_fn(|i| (values[i], ENQUEUE_TYPES[i].clone()));
    let row = client
        .query_typed_one(ENQUEUE_SQL, &params)
        .await
        .map_err(|e| Error::postgres(format!("enqueuing \"{name}\" failed"), e))?;
    enqueued_id(&row)
}

const ENQUEUE_SQL: &str = "SELECT sluice.enqueue($1, $2, $3, $4, $5)";
const ENQUEUE_TYPES: [Type; 5] = [
    Type::TEXT,
    Type::JSONB,
    Type::TIMESTAMPTZ,
    Type::INT4,
    Type::TEXT,
];

fn enqueue_input<T: TaskDefinition>(input: &T::Input) -> Result<serde_json::Value, Error> {
    serde_json::to_value(input)
        .map_err(|e| Error::json(format!("serializing the input of \"{}\"", T::name()), e))
}

/// The enqueue's parameters, in the order of `ENQUEUE_SQL` and `ENQUEUE_TYPES`.
fn enqueue_values<'a>(
    name: &'a &'a str,
    input: &'a serde_json::Value,
    options: &'a EnqueueOptions,
) -> [&'a (dyn ToSql + Sync); 5] {
    [
        name,
        input,
        &options.run_at,
        &options.priority,
        &options.idempotency_key,
    ]
}

fn enqueued_id(row: &tokio_postgres::Row) -> Result<i64, Error> {
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the enqueued task id", e))
}

/// `sluice.enqueue` prepared once on one connection. [`enqueue`] has Postgres parse and plan
/// the statement on every call; a prepared statement skips that, which is most of the
/// difference in server time between an enqueue and a bare single-row INSERT (see
/// benches/README.md). Worth it for a producer that enqueues single tasks at a high rate.
///
/// Use it with the connection it was prepared on, directly or through that connection's
/// transactions (the enqueue then commits or rolls back with them). On any other connection
/// Postgres rejects the call (SQLSTATE 26000, no such prepared statement).
///
/// ```no_run
/// # async fn example(client: &mut tokio_postgres::Client) -> Result<(), sluice_client::Error> {
/// use sluice_client::{EnqueueOptions, PreparedEnqueue, TaskDefinition};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct Email { to: String }
/// # struct SendEmail;
/// # impl TaskDefinition for SendEmail {
/// #     const NAME: &'static str = "send_email"; type Input = Email; type Output = (); }
/// let prepared = PreparedEnqueue::prepare(&*client).await?;
/// for to in ["a@example.com", "b@example.com"] {
///     let tx = client.transaction().await.expect("begin");
///     // ... the application's own writes ...
///     prepared.enqueue::<SendEmail>(&tx, &Email { to: to.into() }, &EnqueueOptions::default())
///         .await?;
///     tx.commit().await.expect("commit");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PreparedEnqueue {
    statement: Statement,
}

impl PreparedEnqueue {
    /// Prepares the statement on `client`'s connection (one round trip).
    pub async fn prepare(client: &impl GenericClient) -> Result<PreparedEnqueue, Error> {
        let statement = client
            .prepare_typed(ENQUEUE_SQL, &ENQUEUE_TYPES)
            .await
            .map_err(|e| Error::postgres("preparing sluice.enqueue failed", e))?;
        Ok(PreparedEnqueue { statement })
    }

    /// As [`enqueue`], through the prepared statement. `client` must be the connection the
    /// statement was prepared on, or one of its transactions.
    pub async fn enqueue<T: TaskDefinition>(
        &self,
        client: &impl GenericClient,
        input: &T::Input,
        options: &EnqueueOptions,
    ) -> Result<i64, Error> {
        let input = enqueue_input::<T>(input)?;
        let name = T::name();
        let row = client
            .query_one(&self.statement, &enqueue_values(&name, &input, options))
            .await
            .map_err(|e| Error::postgres(format!("enqueuing \"{name}\" failed"), e))?;
        enqueued_id(&row)
    }
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
    Json(serde_json::Value),
}

impl SqlArg {
    fn as_param(&self) -> (&(dyn ToSql + Sync), Type) {
        match self {
            SqlArg::Text(v) => (v, Type::TEXT),
            SqlArg::Int(v) => (v, Type::INT4),
            SqlArg::Float(v) => (v, Type::FLOAT8),
            SqlArg::Json(v) => (v, Type::JSONB),
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
    if let Some(concurrency) = &options.concurrency {
        named.push(("concurrency_key", "", SqlArg::Text(concurrency.key.clone())));
        named.push(("max_runs", "", SqlArg::Int(concurrency.max_runs)));
        named.push((
            "concurrency_strategy",
            "",
            SqlArg::Text(concurrency.strategy.as_sql().to_owned()),
        ));
    }
    if !options.rate_limits.is_empty() {
        let specs = options.rate_limits.iter().map(RateLimitUse::to_json);
        named.push(("rate_limits", "", SqlArg::Json(specs.collect())));
    }
    if !options.desired_labels.is_empty() {
        let specs = options.desired_labels.iter().map(DesiredLabel::to_json);
        named.push(("desired_labels", "", SqlArg::Json(specs.collect())));
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
    use serde_json::json;

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
            concurrency: Some(
                Concurrency::new("$.user_id", 2).with_strategy(ConcurrencyStrategy::CancelNewest),
            ),
            rate_limits: vec![RateLimitUse::declared("smtp", Units::default())],
            desired_labels: vec![DesiredLabel::required("region", "eu")],
        };
        let (sql, args) = define_task_call("send_email", &options);
        assert_eq!(
            sql,
            "SELECT sluice.define_task(name => $1, retries => $2, backoff_factor => $3, \
             backoff_max => $4::interval, execution_timeout => $5::interval, \
             schedule_timeout => $6::interval, priority => $7, concurrency_key => $8, \
             max_runs => $9, concurrency_strategy => $10, rate_limits => $11, \
             desired_labels => $12)"
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
                SqlArg::Text("$.user_id".into()),
                SqlArg::Int(2),
                SqlArg::Text("cancel_newest".into()),
                SqlArg::Json(json!([{"key": "smtp", "units": 1}])),
                SqlArg::Json(json!([
                    {"label": "region", "value": "eu", "required": true, "weight": 1}
                ])),
            ]
        );
    }

    #[test]
    fn concurrency_passes_key_max_runs_and_strategy() {
        let options = TaskOptions {
            concurrency: Some(Concurrency::new("$.tenant", 1)),
            ..TaskOptions::default()
        };
        let (sql, args) = define_task_call("t", &options);
        assert_eq!(
            sql,
            "SELECT sluice.define_task(name => $1, concurrency_key => $2, max_runs => $3, \
             concurrency_strategy => $4)"
        );
        assert_eq!(
            args[1..],
            [
                SqlArg::Text("$.tenant".into()),
                SqlArg::Int(1),
                SqlArg::Text("group_round_robin".into()),
            ]
        );
    }

    #[test]
    fn concurrency_strategy_names() {
        assert_eq!(
            ConcurrencyStrategy::default(),
            ConcurrencyStrategy::GroupRoundRobin
        );
        assert_eq!(
            ConcurrencyStrategy::GroupRoundRobin.as_sql(),
            "group_round_robin"
        );
        assert_eq!(
            ConcurrencyStrategy::CancelInProgress.as_sql(),
            "cancel_in_progress"
        );
        assert_eq!(ConcurrencyStrategy::CancelNewest.as_sql(), "cancel_newest");
    }

    #[test]
    fn rate_limits_as_json() {
        let options = TaskOptions {
            rate_limits: vec![
                RateLimitUse::declared("smtp", Units::Fixed(3)),
                RateLimitUse::declared("api", Units::Path("$.calls".into())),
                RateLimitUse::dynamic("$.tenant", Units::default(), 10, Duration::from_secs(60)),
                RateLimitUse::Dynamic {
                    key_path: "$.user".into(),
                    units: Units::Path("$.size".into()),
                    limit: 500,
                    per: Duration::from_millis(1500),
                },
            ],
            ..TaskOptions::default()
        };
        let (sql, args) = define_task_call("t", &options);
        assert_eq!(
            sql,
            "SELECT sluice.define_task(name => $1, rate_limits => $2)"
        );
        assert_eq!(
            args[1],
            SqlArg::Json(json!([
                {"key": "smtp", "units": 3},
                {"key": "api", "units_path": "$.calls"},
                {"key_path": "$.tenant", "limit": 10, "per": "60.000000 seconds", "units": 1},
                {"key_path": "$.user", "limit": 500, "per": "1.500000 seconds",
                 "units_path": "$.size"},
            ]))
        );
    }

    #[test]
    fn desired_labels_as_json() {
        let options = TaskOptions {
            desired_labels: vec![
                DesiredLabel::required("region", "eu"),
                DesiredLabel::preferred("gpu", 1, 10),
                DesiredLabel {
                    label: "zone".into(),
                    value: json!(2.5),
                    required: false,
                    weight: 1_000_000,
                },
            ],
            ..TaskOptions::default()
        };
        let (sql, args) = define_task_call("t", &options);
        assert_eq!(
            sql,
            "SELECT sluice.define_task(name => $1, desired_labels => $2)"
        );
        assert_eq!(
            args[1],
            SqlArg::Json(json!([
                {"label": "region", "value": "eu", "required": true, "weight": 1},
                {"label": "gpu", "value": 1, "required": false, "weight": 10},
                {"label": "zone", "value": 2.5, "required": false, "weight": 1_000_000},
            ]))
        );
    }

    #[test]
    fn json_arguments_are_sent_as_jsonb() {
        let arg = SqlArg::Json(json!([]));
        assert_eq!(arg.as_param().1, Type::JSONB);
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
