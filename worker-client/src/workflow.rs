//! Typed workflow definitions: a [`WorkflowBuilder`] produces the spec `sluice.define_workflow`
//! takes. A step names its parents by the [`Step`] handles earlier calls returned, so a parent
//! that does not exist cannot compile, and a step's task must take [`StepInput`] of the
//! workflow's input type.

use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::{Concurrency, Error, TaskDefinition};

/// What a workflow step's task receives: the run's input, the outputs of its parents (by step
/// name), the parents that were skipped, and the payloads of the events its `wait_for` waited
/// for (by event key).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepInput<I> {
    pub input: I,
    #[serde(default)]
    pub parents: Map<String, Value>,
    #[serde(default)]
    pub skipped: Vec<String>,
    #[serde(default)]
    pub events: Map<String, Value>,
}

impl<I> StepInput<I> {
    /// A parent's output, typed by its task; `None` if the parent was skipped.
    pub fn parent<T: TaskDefinition>(&self, step: &Step<T>) -> Result<Option<T::Output>, Error> {
        match self.parents.get(&step.name) {
            None => Ok(None),
            Some(output) => serde_json::from_value(output.clone())
                .map(Some)
                .map_err(|e| {
                    Error::json(format!("reading the output of step \"{}\"", step.name), e)
                }),
        }
    }

    /// Whether a parent was skipped (its `skip_if` held).
    pub fn skipped<T>(&self, step: &Step<T>) -> bool {
        self.skipped.contains(&step.name)
    }

    /// The payload of the event with this key that met the step's `wait_for`, typed; `None`
    /// if no such event met it (another condition of its or-group did).
    pub fn event<P: DeserializeOwned>(&self, key: &str) -> Result<Option<P>, Error> {
        match self.events.get(key) {
            None => Ok(None),
            Some(payload) => serde_json::from_value(payload.clone())
                .map(Some)
                .map_err(|e| Error::json(format!("reading the payload of event \"{key}\""), e)),
        }
    }
}

/// What an `on_failure` task receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailureInput<I> {
    pub input: I,
    pub run_id: i64,
    pub failed_step: String,
    pub error: Option<String>,
}

/// What an `on_success` task receives: every step's output, by step name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuccessInput<I> {
    pub input: I,
    pub outputs: Map<String, Value>,
}

/// A step added to a [`WorkflowBuilder`], running task `T`: the handle later steps name as a
/// parent and handlers use to read its output ([`StepInput::parent`]).
pub struct Step<T> {
    name: String,
    task: PhantomData<fn() -> T>,
}

impl<T> Step<T> {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<T> Clone for Step<T> {
    fn clone(&self) -> Self {
        Step {
            name: self.name.clone(),
            task: PhantomData,
        }
    }
}

/// Any step handle, whatever its task (a step's parents may run different tasks).
pub trait StepRef {
    fn step_name(&self) -> &str;
}

impl<T> StepRef for Step<T> {
    fn step_name(&self) -> &str {
        &self.name
    }
}

/// One condition of a step's `wait_for` or `cancel_if`, counted from when the step is ready
/// (its parents are done).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Met this long after the step is ready.
    Sleep(Duration),
    /// Met by the first event with this key pushed after the step is ready whose payload
    /// matches the filter, if any: a jsonpath over the payload, as a subscription's, which may
    /// name the step's input as `$input` (the run's input), `$parents` and `$skipped`.
    Event { key: String, filter: Option<String> },
}

impl Condition {
    pub fn sleep(duration: Duration) -> Condition {
        Condition::Sleep(duration)
    }

    pub fn event(key: impl Into<String>) -> Condition {
        Condition::Event {
            key: key.into(),
            filter: None,
        }
    }

    /// An event condition whose payload must match `filter`, e.g.
    /// `"$.upload_id == $input.upload_id"`.
    pub fn event_matching(key: impl Into<String>, filter: impl Into<String>) -> Condition {
        Condition::Event {
            key: key.into(),
            filter: Some(filter.into()),
        }
    }

    fn spec(&self) -> Value {
        match self {
            Condition::Sleep(d) => json!({"sleep": format!("{} microseconds", d.as_micros())}),
            Condition::Event { key, filter: None } => json!({"event": key}),
            Condition::Event {
                key,
                filter: Some(filter),
            } => json!({"event": key, "filter": filter}),
        }
    }
}

/// A step's `wait_for` or `cancel_if`: or-groups, all of which must be met; an or-group is met
/// when one of its conditions is.
///
/// ```
/// use std::time::Duration;
/// use sluice_client::{Condition, Conditions};
///
/// // the approval, or two days without a rejection; and at least a minute in any case
/// let wait_for = Conditions::any([Condition::event("approved"),
///                                 Condition::sleep(Duration::from_secs(2 * 86_400))])
///     .and(Condition::sleep(Duration::from_secs(60)));
/// # let _ = wait_for;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    groups: Vec<Vec<Condition>>,
}

impl Conditions {
    /// Met when every one of `conditions` is.
    pub fn all(conditions: impl IntoIterator<Item = Condition>) -> Conditions {
        Conditions {
            groups: conditions.into_iter().map(|c| vec![c]).collect(),
        }
    }

    /// Met when one of `conditions` is (an or-group).
    pub fn any(conditions: impl IntoIterator<Item = Condition>) -> Conditions {
        Conditions {
            groups: vec![conditions.into_iter().collect()],
        }
    }

    /// Met when both these and `more` are.
    pub fn and(mut self, more: impl Into<Conditions>) -> Conditions {
        self.groups.extend(more.into().groups);
        self
    }

    fn spec(&self) -> Value {
        Value::Array(
            self.groups
                .iter()
                .map(|group| json!({"any": group.iter().map(Condition::spec).collect::<Vec<_>>()}))
                .collect(),
        )
    }
}

impl From<Condition> for Conditions {
    fn from(condition: Condition) -> Conditions {
        Conditions::all([condition])
    }
}

impl From<Duration> for Conditions {
    fn from(duration: Duration) -> Conditions {
        Conditions::all([Condition::Sleep(duration)])
    }
}

/// Conditions of a step.
#[derive(Debug, Clone, Default)]
pub struct StepOptions {
    /// A jsonpath predicate over the step's [`StepInput`]; when it holds the step is skipped
    /// and counts as done for its children.
    pub skip_if: Option<String>,
    /// What the step waits for after its parents are done before its task is enqueued. The
    /// payloads of the events it waited for are in its [`StepInput::events`]. A waiting step
    /// holds no slot.
    pub wait_for: Option<Conditions>,
    /// What cancels the step (and so the run, as a cancelled step does) while it waits or its
    /// task is queued or running: a deadline (a sleep), an event, or both.
    pub cancel_if: Option<Conditions>,
}

/// Builds a workflow whose runs take input `I`.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use sluice_client::{StepInput, TaskDefinition, WorkflowBuilder};
///
/// #[derive(Serialize, Deserialize)]
/// struct Upload { media_id: i64 }
///
/// struct Validate;
/// impl TaskDefinition for Validate {
///     const NAME: &'static str = "validate_media";
///     type Input = StepInput<Upload>;
///     type Output = bool;
/// }
/// struct Thumbnails;
/// impl TaskDefinition for Thumbnails {
///     const NAME: &'static str = "make_thumbnails";
///     type Input = StepInput<Upload>;
///     type Output = Vec<String>;
/// }
///
/// let mut media = WorkflowBuilder::<Upload>::new("media");
/// let validate = media.step::<Validate>("validate", &[]);
/// let thumbnails = media.step::<Thumbnails>("thumbnails", &[&validate]);
/// assert_eq!(media.spec()["steps"][1]["parents"][0], "validate");
/// # let _ = thumbnails;
/// ```
pub struct WorkflowBuilder<I> {
    name: String,
    steps: Vec<Value>,
    on_failure: Option<&'static str>,
    on_success: Option<&'static str>,
    concurrency: Option<Concurrency>,
    crons: Vec<crate::Cron>,
    on_events: Vec<crate::OnEvent>,
    input: PhantomData<fn(I)>,
}

impl<I: Serialize> WorkflowBuilder<I> {
    pub fn new(name: impl Into<String>) -> Self {
        WorkflowBuilder {
            name: name.into(),
            steps: Vec::new(),
            on_failure: None,
            on_success: None,
            concurrency: None,
            crons: Vec::new(),
            on_events: Vec::new(),
            input: PhantomData,
        }
    }

    /// Adds a step running task `T` after `parents`.
    pub fn step<T>(&mut self, name: &str, parents: &[&dyn StepRef]) -> Step<T>
    where
        T: TaskDefinition<Input = StepInput<I>>,
    {
        self.step_with::<T>(name, parents, StepOptions::default())
    }

    /// Adds a step with conditions.
    pub fn step_with<T>(
        &mut self,
        name: &str,
        parents: &[&dyn StepRef],
        options: StepOptions,
    ) -> Step<T>
    where
        T: TaskDefinition<Input = StepInput<I>>,
    {
        let mut step = json!({
            "name": name,
            "task": T::name(),
            "parents": parents.iter().map(|p| p.step_name()).collect::<Vec<_>>(),
        });
        if let Some(path) = options.skip_if {
            step["skip_if"] = json!(path);
        }
        if let Some(wait_for) = options.wait_for {
            step["wait_for"] = wait_for.spec();
        }
        if let Some(cancel_if) = options.cancel_if {
            step["cancel_if"] = cancel_if.spec();
        }
        self.steps.push(step);
        Step {
            name: name.to_string(),
            task: PhantomData,
        }
    }

    /// The task that runs when a run fails.
    pub fn on_failure<T: TaskDefinition<Input = FailureInput<I>>>(&mut self) -> &mut Self {
        self.on_failure = Some(T::name());
        self
    }

    /// The task that runs when every step of a run succeeded.
    pub fn on_success<T: TaskDefinition<Input = SuccessInput<I>>>(&mut self) -> &mut Self {
        self.on_success = Some(T::name());
        self
    }

    /// Limits whole runs: at most `max_runs` per key (a jsonpath over the run input) at once;
    /// the strategy says what happens to the others.
    pub fn concurrency(&mut self, concurrency: Concurrency) -> &mut Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// Runs the workflow on every tick of a cron schedule (with the cron's input as the run
    /// input). Defining the workflow replaces the crons it declared before.
    pub fn cron(&mut self, cron: crate::Cron) -> &mut Self {
        self.crons.push(cron);
        self
    }

    /// Runs the workflow for every pushed event matching `on` (the payload is the run input).
    /// Defining the workflow replaces the subscriptions it declared before.
    pub fn on_event(&mut self, on: crate::OnEvent) -> &mut Self {
        self.on_events.push(on);
        self
    }

    /// The spec `sluice.define_workflow` takes.
    pub fn spec(&self) -> Value {
        let mut spec = json!({ "steps": self.steps });
        if let Some(task) = self.on_failure {
            spec["on_failure"] = json!(task);
        }
        if let Some(task) = self.on_success {
            spec["on_success"] = json!(task);
        }
        if let Some(c) = &self.concurrency {
            spec["concurrency"] = json!({"key": c.key, "max_runs": c.max_runs,
                                         "strategy": c.strategy.as_sql()});
        }
        if !self.crons.is_empty() {
            spec["crons"] = Value::Array(self.crons.iter().map(|c| c.to_json()).collect());
        }
        if !self.on_events.is_empty() {
            spec["on_events"] = Value::Array(self.on_events.iter().map(|e| e.to_json()).collect());
        }
        spec
    }

    /// Defines (or redefines) the workflow; returns its version. Its tasks must be defined.
    pub async fn define(&self, client: &impl GenericClient) -> Result<i32, Error> {
        let spec = self.spec();
        let row = client
            .query_typed_one(
                "SELECT sluice.define_workflow($1, $2)",
                &[(&self.name, Type::TEXT), (&spec, Type::JSONB)],
            )
            .await
            .map_err(|e| {
                Error::postgres(format!("defining workflow \"{}\" failed", self.name), e)
            })?;
        row.try_get(0)
            .map_err(|e| Error::postgres("reading the workflow version", e))
    }

    /// Starts a run of this workflow (in the caller's transaction, if `client` is one).
    pub async fn run(&self, client: &impl GenericClient, input: &I) -> Result<i64, Error> {
        run_workflow(client, &self.name, input).await
    }
}

/// Starts a run of the latest version of workflow `name`; returns the run id.
pub async fn run_workflow<I: Serialize>(
    client: &impl GenericClient,
    name: &str,
    input: &I,
) -> Result<i64, Error> {
    let input = serde_json::to_value(input)
        .map_err(|e| Error::json(format!("serializing the input of workflow \"{name}\""), e))?;
    let row = client
        .query_typed_one(
            "SELECT sluice.run_workflow($1, $2)",
            &[(&name, Type::TEXT), (&input, Type::JSONB)],
        )
        .await
        .map_err(|e| Error::postgres(format!("starting workflow \"{name}\" failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the run id", e))
}

/// Cancels a run; false if it had already finished.
pub async fn cancel_run(client: &impl GenericClient, run_id: i64) -> Result<bool, Error> {
    let row = client
        .query_typed_one("SELECT sluice.cancel_run($1)", &[(&run_id, Type::INT8)])
        .await
        .map_err(|e| Error::postgres(format!("cancelling run {run_id} failed"), e))?;
    row.try_get(0)
        .map_err(|e| Error::postgres("reading the cancel_run result", e))
}

/// A run as `sluice.runs` shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct RunState {
    pub id: i64,
    pub workflow: String,
    pub version: i32,
    /// queued, running, succeeded, failed or cancelled
    pub status: String,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// Per step: status, task_id, output, error, started_at, finished_at.
    pub steps: Map<String, Value>,
}

impl RunState {
    /// A step's output, typed by its task (None before it succeeded, or if skipped).
    pub fn output_of<T: TaskDefinition>(&self, step: &Step<T>) -> Result<Option<T::Output>, Error>
    where
        T::Output: DeserializeOwned,
    {
        match self.steps.get(&step.name).and_then(|s| s.get("output")) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
                Error::json(format!("reading the output of step \"{}\"", step.name), e)
            }),
        }
    }
}

/// Reads a run from `sluice.runs`.
pub async fn run_state(client: &impl GenericClient, run_id: i64) -> Result<RunState, Error> {
    let row = client
        .query_typed_one(
            "SELECT to_jsonb(r) FROM sluice.runs r WHERE r.id = $1",
            &[(&run_id, Type::INT8)],
        )
        .await
        .map_err(|e| Error::postgres(format!("reading run {run_id} failed"), e))?;
    let value: Value = row
        .try_get(0)
        .map_err(|e| Error::postgres("reading the run row", e))?;
    serde_json::from_value(value).map_err(|e| Error::json(format!("decoding run {run_id}"), e))
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Upload {
        media_id: i64,
    }
    struct A;
    impl TaskDefinition for A {
        const NAME: &'static str = "a_task";
        type Input = StepInput<Upload>;
        type Output = u32;
    }
    struct B;
    impl TaskDefinition for B {
        const NAME: &'static str = "b_task";
        type Input = StepInput<Upload>;
        type Output = String;
    }
    struct Cleanup;
    impl TaskDefinition for Cleanup {
        const NAME: &'static str = "cleanup";
        type Input = FailureInput<Upload>;
        type Output = ();
    }

    #[test]
    fn the_spec_names_parents_by_handle_and_carries_conditions() {
        let mut wf = WorkflowBuilder::<Upload>::new("w");
        let a = wf.step::<A>("a", &[]);
        let b = wf.step_with::<B>(
            "b",
            &[&a],
            StepOptions {
                skip_if: Some("$.parents.a == 0".into()),
                wait_for: Some(Duration::from_millis(1500).into()),
                cancel_if: Some(
                    Conditions::any([
                        Condition::event_matching("stop", "$.id == $input.media_id"),
                        Condition::sleep(Duration::from_secs(60)),
                    ])
                    .and(Condition::event("really")),
                ),
            },
        );
        wf.step::<A>("c", &[&a, &b]);
        wf.on_failure::<Cleanup>();
        wf.concurrency(crate::Concurrency::new("$.media_id", 3));
        assert_eq!(
            wf.spec(),
            json!({"steps": [
                {"name": "a", "task": "a_task", "parents": []},
                {"name": "b", "task": "b_task", "parents": ["a"],
                 "skip_if": "$.parents.a == 0",
                 "wait_for": [{"any": [{"sleep": "1500000 microseconds"}]}],
                 "cancel_if": [{"any": [{"event": "stop", "filter": "$.id == $input.media_id"},
                                        {"sleep": "60000000 microseconds"}]},
                               {"any": [{"event": "really"}]}]},
                {"name": "c", "task": "a_task", "parents": ["a", "b"]}],
             "on_failure": "cleanup",
             "concurrency": {"key": "$.media_id", "max_runs": 3,
                             "strategy": "group_round_robin"}})
        );
    }

    #[test]
    fn a_step_reads_its_parents_typed() {
        let mut wf = WorkflowBuilder::<Upload>::new("w");
        let a = wf.step::<A>("a", &[]);
        let b = wf.step::<B>("b", &[&a]);
        let input: StepInput<Upload> = serde_json::from_value(json!({
            "input": {"media_id": 7}, "parents": {"a": 42}, "skipped": ["b"]}))
        .unwrap();
        assert_eq!(input.input.media_id, 7);
        assert_eq!(input.parent(&a).unwrap(), Some(42));
        assert_eq!(input.parent(&b).unwrap(), None);
        assert!(input.skipped(&b) && !input.skipped(&a));
        assert_eq!(input.event::<Value>("approved").unwrap(), None);
        let waited: StepInput<Upload> = serde_json::from_value(json!({
            "input": {"media_id": 7}, "events": {"approved": {"by": "ann"}}}))
        .unwrap();
        assert_eq!(
            waited.event::<Value>("approved").unwrap(),
            Some(json!({"by": "ann"}))
        );
        assert!(waited.event::<u32>("approved").is_err());
        let wrong: StepInput<Upload> = serde_json::from_value(json!({
            "input": {"media_id": 7}, "parents": {"a": "not a number"}}))
        .unwrap();
        assert!(wrong.parent(&a).is_err());
    }
}
