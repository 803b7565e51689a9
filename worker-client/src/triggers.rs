//! Time and events: cron schedules, scheduled runs, event pushes and subscriptions (the SQL in
//! sql/cron.sql and sql/events.sql). Every call runs in the caller's transaction when `client`
//! is one: an event pushed in a transaction that rolls back starts nothing.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::{json, Value};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;

use crate::error::Error;

/// What happens to missed cron ticks. When the scheduler finds several ticks of a schedule due
/// at once (Sluice was not running, or was held up for longer than the schedule's period), the
/// latest fires if it is at most a minute late and the earlier ones are missed; the latest is
/// missed too if it is later than that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissedTicks {
    /// Drop them; the schedule goes on with its next tick.
    #[default]
    Skip,
    /// Fire the latest due tick whatever its lateness, one run standing for all of them.
    RunOnce,
}

impl MissedTicks {
    pub fn as_sql(self) -> &'static str {
        match self {
            MissedTicks::Skip => "skip",
            MissedTicks::RunOnce => "run_once",
        }
    }
}

/// A cron trigger: a schedule for [`schedule_cron`], or one declared in a definition
/// ([`crate::WorkflowBuilder::cron`], [`set_task_triggers`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Cron {
    /// 5 fields (minute hour day-of-month month day-of-week, Sunday = 0), 6 with seconds
    /// first, or a shorthand such as `@daily`.
    pub expression: String,
    pub input: Value,
    /// An IANA zone name, e.g. `"Europe/Paris"`; ticks are wall-clock times there.
    pub time_zone: String,
    pub missed: MissedTicks,
    /// The schedule's name; declared crons default to `<kind>:<name>:<expression>`.
    pub name: Option<String>,
}

impl Cron {
    /// A UTC schedule with input `{}` that skips missed ticks.
    pub fn new(expression: impl Into<String>) -> Self {
        Cron {
            expression: expression.into(),
            input: json!({}),
            time_zone: "UTC".into(),
            missed: MissedTicks::Skip,
            name: None,
        }
    }

    pub fn input(mut self, input: impl Serialize) -> Result<Self, Error> {
        self.input =
            serde_json::to_value(input).map_err(|e| Error::json("serializing a cron input", e))?;
        Ok(self)
    }

    pub fn time_zone(mut self, zone: impl Into<String>) -> Self {
        self.time_zone = zone.into();
        self
    }

    pub fn missed(mut self, missed: MissedTicks) -> Self {
        self.missed = missed;
        self
    }

    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    pub(crate) fn to_json(&self) -> Value {
        let mut c = json!({
            "cron": self.expression,
            "input": self.input,
            "time_zone": self.time_zone,
            "missed": self.missed.as_sql(),
        });
        if let Some(name) = &self.name {
            c["name"] = json!(name);
        }
        c
    }
}

/// An event subscription declared in a definition: events whose key matches `key` (`*` matches
/// any characters) and whose payload matches `filter` (a jsonpath, optional) start a run.
#[derive(Debug, Clone, PartialEq)]
pub struct OnEvent {
    pub key: String,
    pub filter: Option<String>,
}

impl OnEvent {
    pub fn new(key: impl Into<String>) -> Self {
        OnEvent {
            key: key.into(),
            filter: None,
        }
    }

    /// Only payloads matching this jsonpath: a predicate (`$.size > 100`) must be true, any
    /// other path must find something.
    pub fn filter(mut self, jsonpath: impl Into<String>) -> Self {
        self.filter = Some(jsonpath.into());
        self
    }

    pub(crate) fn to_json(&self) -> Value {
        match &self.filter {
            Some(f) => json!({"key": self.key, "filter": f}),
            None => json!({"key": self.key}),
        }
    }
}

/// Creates or replaces the cron schedule `name` for `target` (a task or workflow name, or
/// `task:<name>` / `workflow:<name>`). Returns when it first fires. An invalid expression or
/// zone fails with SQLSTATE 22023, an unknown target with 42704.
pub async fn schedule_cron(
    client: &impl GenericClient,
    name: &str,
    target: &str,
    cron: &Cron,
) -> Result<SystemTime, Error> {
    let missed = cron.missed.as_sql();
    let params: [(&(dyn ToSql + Sync), Type); 6] = [
        (&name, Type::TEXT),
        (&cron.expression, Type::TEXT),
        (&target, Type::TEXT),
        (&cron.input, Type::JSONB),
        (&cron.time_zone, Type::TEXT),
        (&missed, Type::TEXT),
    ];
    let row = client
        .query_typed_one(
            "SELECT sluice.schedule_cron($1, $2, $3, $4, $5, $6)",
            &params,
        )
        .await
        .map_err(|e| Error::postgres(format!("scheduling cron \"{name}\" failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the first fire time", e))
}

/// Removes a cron schedule; false if there was none.
pub async fn unschedule_cron(client: &impl GenericClient, name: &str) -> Result<bool, Error> {
    let row = client
        .query_typed_one("SELECT sluice.unschedule_cron($1)", &[(&name, Type::TEXT)])
        .await
        .map_err(|e| Error::postgres(format!("unscheduling cron \"{name}\" failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the unschedule result", e))
}

/// Declares the crons and event subscriptions of task `task`, replacing those it declared
/// before (workflows declare theirs with [`crate::WorkflowBuilder::cron`] and `on_event`).
pub async fn set_task_triggers(
    client: &impl GenericClient,
    task: &str,
    crons: &[Cron],
    on_events: &[OnEvent],
) -> Result<(), Error> {
    let crons = Value::Array(crons.iter().map(Cron::to_json).collect());
    let events = Value::Array(on_events.iter().map(OnEvent::to_json).collect());
    client
        .query_typed(
            "SELECT sluice.set_task_triggers($1, $2, $3)",
            &[
                (&task, Type::TEXT),
                (&crons, Type::JSONB),
                (&events, Type::JSONB),
            ],
        )
        .await
        .map_err(|e| {
            Error::postgres(
                format!("declaring the triggers of task \"{task}\" failed"),
                e,
            )
        })?;
    Ok(())
}

/// Subscribes `target` to events matching `pattern` (and `filter`); returns the subscription's
/// id (the same id for the same subscription).
pub async fn subscribe(
    client: &impl GenericClient,
    pattern: &str,
    target: &str,
    filter: Option<&str>,
) -> Result<i64, Error> {
    let row = client
        .query_typed_one(
            "SELECT sluice.subscribe($1, $2, $3)",
            &[
                (&pattern, Type::TEXT),
                (&target, Type::TEXT),
                (&filter, Type::TEXT),
            ],
        )
        .await
        .map_err(|e| {
            Error::postgres(
                format!("subscribing \"{target}\" to \"{pattern}\" failed"),
                e,
            )
        })?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the subscription id", e))
}

/// Pushes an event: every matching subscription starts a run with `payload` as its input, and
/// durable tasks waiting for it wake. Returns the event's id (`sluice.events`).
pub async fn push_event(
    client: &impl GenericClient,
    key: &str,
    payload: &impl Serialize,
) -> Result<i64, Error> {
    let payload = serde_json::to_value(payload)
        .map_err(|e| Error::json(format!("serializing the payload of event \"{key}\""), e))?;
    let row = client
        .query_typed_one(
            "SELECT sluice.push_event($1, $2)",
            &[(&key, Type::TEXT), (&payload, Type::JSONB)],
        )
        .await
        .map_err(|e| Error::postgres(format!("pushing event \"{key}\" failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the event id", e))
}

/// Pushes several events in one statement, in order; returns their ids.
pub async fn push_events(
    client: &impl GenericClient,
    events: &[(String, Value)],
) -> Result<Vec<i64>, Error> {
    let keys: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    let payloads: Vec<&Value> = events.iter().map(|(_, p)| p).collect();
    let rows = client
        .query_typed(
            "SELECT sluice.push_events($1, $2)",
            &[(&keys, Type::TEXT_ARRAY), (&payloads, Type::JSONB_ARRAY)],
        )
        .await
        .map_err(|e| Error::postgres("pushing events failed", e))?;
    rows.iter()
        .map(|r| {
            r.try_get(0)
                .map_err(|e| Error::postgres("reading an event id", e))
        })
        .collect()
}

/// Starts a run of workflow `name` at `run_at` (now if it is not in the future); returns the
/// run id. Until then it is listed in `sluice.scheduled`.
pub async fn run_workflow_at<I: Serialize>(
    client: &impl GenericClient,
    name: &str,
    input: &I,
    run_at: SystemTime,
) -> Result<i64, Error> {
    let input = serde_json::to_value(input)
        .map_err(|e| Error::json(format!("serializing the input of workflow \"{name}\""), e))?;
    let row = client
        .query_typed_one(
            "SELECT sluice.run_workflow($1, $2, $3)",
            &[
                (&name, Type::TEXT),
                (&input, Type::JSONB),
                (&run_at, Type::TIMESTAMPTZ),
            ],
        )
        .await
        .map_err(|e| Error::postgres(format!("scheduling workflow \"{name}\" failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the run id", e))
}

/// Moves a task scheduled for later (see `sluice.scheduled`) to `run_at`; false if it is not
/// scheduled for later any more.
pub async fn reschedule(
    client: &impl GenericClient,
    task_id: i64,
    run_at: SystemTime,
) -> Result<bool, Error> {
    scheduled_call(
        client,
        "SELECT sluice.reschedule($1, $2)",
        task_id,
        Some(run_at),
    )
    .await
}

/// Moves a scheduled workflow run to `run_at`; false if it has started or finished.
pub async fn reschedule_run(
    client: &impl GenericClient,
    run_id: i64,
    run_at: SystemTime,
) -> Result<bool, Error> {
    scheduled_call(
        client,
        "SELECT sluice.reschedule_run($1, $2)",
        run_id,
        Some(run_at),
    )
    .await
}

/// Deletes a task scheduled for later; false if it is not scheduled for later any more.
pub async fn delete_scheduled(client: &impl GenericClient, task_id: i64) -> Result<bool, Error> {
    scheduled_call(client, "SELECT sluice.delete_scheduled($1)", task_id, None).await
}

/// Deletes a scheduled workflow run that has not started.
pub async fn delete_scheduled_run(client: &impl GenericClient, run_id: i64) -> Result<bool, Error> {
    scheduled_call(
        client,
        "SELECT sluice.delete_scheduled_run($1)",
        run_id,
        None,
    )
    .await
}

async fn scheduled_call(
    client: &impl GenericClient,
    sql: &str,
    id: i64,
    run_at: Option<SystemTime>,
) -> Result<bool, Error> {
    let row = match run_at {
        Some(at) => {
            client
                .query_typed_one(sql, &[(&id, Type::INT8), (&at, Type::TIMESTAMPTZ)])
                .await
        }
        None => client.query_typed_one(sql, &[(&id, Type::INT8)]).await,
    }
    .map_err(|e| Error::postgres(format!("{sql} for {id} failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the result", e))
}
