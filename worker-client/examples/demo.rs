//! The README demo: the media pipeline of the introduction, end to end.
//!
//!     cargo run --release -p sluice-client --example demo -- [dsn]
//!
//! * Uploads are rows of the application table `demo_media`; each upload pushes the event
//!   `media:uploaded` in the same transaction as its INSERT (one upload rolls back: no row, no
//!   event, no run).
//! * The workflow `media` subscribes to that event: validate → (thumbnails ∥ caption) →
//!   persist → publish → notify, at most 3 runs per user at once (group round robin). A
//!   duplicate upload skips persist and publish; an unsupported file fails validation and
//!   `media_cleanup` (on_failure) marks it rejected.
//! * publish waits for a moderator (step conditions): `wait_for` the event `media:approved`
//!   for its media, `cancel_if` `media:rejected` for it or 30 s without a decision. The
//!   demo's moderator finds the waiting steps in `sluice.runs` and rejects dave's meme.png.
//! * `ai_caption` uses the fleet-wide rate limit `ai-caption` (5 per second) and up to 5
//!   retries: the simulated AI API answers 503 to the first attempt for uploads over 5 MB and
//!   to the first two over 20 MB.
//! * `nightly_cleanup` declares the cron `0 3 * * *` (UTC); the demo also runs it once.
//! * Two workers with 5 slots each run in this process; the demo waits for every run, prints
//!   them from `sluice.runs`, and stops the workers gracefully.
//!
//! Every definition is an upsert and only this invocation's runs are summarized, so the demo
//! can run again and again on the same database. The DSN defaults to the dev cluster.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_client::tokio_postgres::{self, Client, NoTls};
use sluice_client::{
    define_task, enqueue, push_event, set_rate_limit, set_task_triggers, Concurrency,
    ConcurrencyStrategy, Condition, Conditions, Cron, EnqueueOptions, FailureInput, RateLimitUse,
    Step, StepInput, StepOptions, TaskContext, TaskDefinition, TaskError, TaskOptions, Units,
    Worker, WorkflowBuilder,
};

const DEFAULT_DSN: &str = "host=127.0.0.1 port=28815 user=postgres dbname=sluice";
const EVENT: &str = "media:uploaded";
const APPROVED: &str = "media:approved";
const REJECTED: &str = "media:rejected";
/// What the moderator pushes: approved or rejected, by media id.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Moderation {
    media_id: i64,
    by: String,
    reason: Option<String>,
}
/// The one upload the demo's moderator rejects.
const REJECTED_FILE: &str = "meme.png";
const CAPTION_LIMIT: i32 = 5; // per second, fleet-wide
const RUNS_PER_USER: i32 = 3;

type DynError = Box<dyn std::error::Error + Send + Sync>;

// ---- Tasks -------------------------------------------------------------------------------

/// The event payload, hence every run's input.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Upload {
    media_id: i64,
    user: String,
    file: String,
    mb: f64,
    /// This demo invocation (a sequence value), so a re-upload is a duplicate only within it.
    batch: i64,
}

#[derive(Serialize, Deserialize)]
struct Validated {
    kind: String,
    duplicate: bool,
}

struct ValidateMedia;
impl TaskDefinition for ValidateMedia {
    const NAME: &'static str = "validate_media";
    type Input = StepInput<Upload>;
    type Output = Validated;
}

struct MakeThumbnails;
impl TaskDefinition for MakeThumbnails {
    const NAME: &'static str = "make_thumbnails";
    type Input = StepInput<Upload>;
    type Output = Vec<String>;
}

struct AiCaption;
impl TaskDefinition for AiCaption {
    const NAME: &'static str = "ai_caption";
    type Input = StepInput<Upload>;
    type Output = String;
}

struct PersistMedia;
impl TaskDefinition for PersistMedia {
    const NAME: &'static str = "persist_media";
    type Input = StepInput<Upload>;
    type Output = i64;
}

struct PublishMedia;
impl TaskDefinition for PublishMedia {
    const NAME: &'static str = "publish_media";
    type Input = StepInput<Upload>;
    type Output = String;
}

struct NotifyUser;
impl TaskDefinition for NotifyUser {
    const NAME: &'static str = "notify_user";
    type Input = StepInput<Upload>;
    type Output = String;
}

struct MediaCleanup;
impl TaskDefinition for MediaCleanup {
    const NAME: &'static str = "media_cleanup";
    type Input = FailureInput<Upload>;
    type Output = String;
}

#[derive(Serialize, Deserialize)]
struct CleanupPolicy {
    keep_days: i32,
}

#[derive(Serialize, Deserialize)]
struct CleanupReport {
    rejected: u64,
    duplicates: u64,
    expired: u64,
}

struct NightlyCleanup;
impl TaskDefinition for NightlyCleanup {
    const NAME: &'static str = "nightly_cleanup";
    type Input = CleanupPolicy;
    type Output = CleanupReport;
}

/// The workflow's step handles: handlers read their parents' outputs typed through them.
#[derive(Clone)]
struct Steps {
    validate: Step<ValidateMedia>,
    thumbnails: Step<MakeThumbnails>,
    caption: Step<AiCaption>,
    persist: Step<PersistMedia>,
}

fn media_workflow() -> (WorkflowBuilder<Upload>, Steps) {
    let mut wf = WorkflowBuilder::<Upload>::new("media");
    let validate = wf.step::<ValidateMedia>("validate", &[]);
    let thumbnails = wf.step::<MakeThumbnails>("thumbnails", &[&validate]);
    let caption = wf.step::<AiCaption>("caption", &[&validate]);
    // validate is a direct parent of persist too, though thumbnails and caption already wait
    // for it: skip_if sees only the outputs of a step's own parents.
    let persist = wf.step_with::<PersistMedia>(
        "persist",
        &[&validate, &thumbnails, &caption],
        StepOptions {
            skip_if: Some("$.parents.validate.duplicate == true".into()),
            ..StepOptions::default()
        },
    );
    // A moderator decides: publish starts on the approval of this media, and is cancelled
    // (and so the run: on_failure marks the upload rejected) by a rejection or by 30 s
    // without a decision. A duplicate has nothing to publish.
    let this_media = "$.media_id == $input.media_id";
    let publish = wf.step_with::<PublishMedia>(
        "publish",
        &[&persist],
        StepOptions {
            skip_if: Some("$.skipped[*] == \"persist\"".into()),
            wait_for: Some(Condition::event_matching(APPROVED, this_media).into()),
            cancel_if: Some(Conditions::any([
                Condition::event_matching(REJECTED, this_media),
                Condition::sleep(Duration::from_secs(30)),
            ])),
        },
    );
    // persist is a parent too: notify tells a duplicate (persist skipped) apart.
    wf.step::<NotifyUser>("notify", &[&persist, &publish]);
    wf.on_failure::<MediaCleanup>()
        .concurrency(
            Concurrency::new("$.user", RUNS_PER_USER)
                .with_strategy(ConcurrencyStrategy::GroupRoundRobin),
        )
        .on_event(sluice_client::OnEvent::new(EVENT));
    let steps = Steps {
        validate,
        thumbnails,
        caption,
        persist,
    };
    (wf, steps)
}

// ---- Handlers ----------------------------------------------------------------------------

async fn validate_media(ctx: TaskContext, step: StepInput<Upload>) -> Result<Validated, TaskError> {
    let upload = step.input;
    tokio::time::sleep(Duration::from_millis(60)).await;
    let ext = upload.file.rsplit('.').next().unwrap_or("").to_lowercase();
    let kind = match ext.as_str() {
        "jpg" | "png" | "heic" => "image",
        "mov" | "mp4" => "video",
        _ => return Err(TaskError::fatal(format!("unsupported file type .{ext}"))),
    };
    let tx = ctx.transaction().await?;
    let earlier: i64 = tx
        .client()
        .query_one(
            "SELECT count(*) FROM demo_media
              WHERE batch = $1 AND user_name = $2 AND file = $3 AND id < $4",
            &[&upload.batch, &upload.user, &upload.file, &upload.media_id],
        )
        .await?
        .get(0);
    let validated = Validated {
        kind: kind.into(),
        duplicate: earlier > 0,
    };
    let status = if validated.duplicate {
        "duplicate"
    } else {
        "validated"
    };
    tx.client()
        .execute(
            "UPDATE demo_media SET status = $2 WHERE id = $1",
            &[&upload.media_id, &status],
        )
        .await?;
    tx.commit_with(&validated).await?;
    Ok(validated)
}

async fn make_thumbnails(
    _ctx: TaskContext,
    step: StepInput<Upload>,
) -> Result<Vec<String>, TaskError> {
    let upload = step.input;
    tokio::time::sleep(Duration::from_millis(150 + (upload.mb * 8.0) as u64)).await;
    let stem = upload
        .file
        .rsplit_once('.')
        .map_or(&*upload.file, |(s, _)| s);
    Ok([160, 640]
        .iter()
        .map(|w| format!("{}/{stem}-{w}w.webp", upload.user))
        .collect())
}

/// The AI API is busy with big files: it answers 503 to the first attempt over 5 MB and to
/// the first two over 20 MB, the same on every run of the demo.
async fn ai_caption(ctx: TaskContext, step: StepInput<Upload>) -> Result<String, TaskError> {
    let upload = step.input;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let busy_attempts = match upload.mb {
        mb if mb > 20.0 => 2,
        mb if mb > 5.0 => 1,
        _ => 0,
    };
    if ctx.attempt() <= busy_attempts {
        return Err(TaskError::retryable(format!(
            "AI API: 503 model overloaded (attempt {})",
            ctx.attempt()
        )));
    }
    Ok(format!("a photo by {} ({})", upload.user, upload.file))
}

/// The row and the step's completion commit together.
async fn persist_media(
    ctx: TaskContext,
    step: StepInput<Upload>,
    steps: Steps,
) -> Result<i64, TaskError> {
    let kind = step.parent(&steps.validate)?.map(|v| v.kind);
    let thumbnails = step.parent(&steps.thumbnails)?.unwrap_or_default();
    let caption = step.parent(&steps.caption)?.unwrap_or_default();
    let tx = ctx.transaction().await?;
    tx.client()
        .execute(
            "UPDATE demo_media SET status = 'ready', kind = $2, thumbnails = $3, caption = $4
              WHERE id = $1",
            &[&step.input.media_id, &kind, &thumbnails, &caption],
        )
        .await?;
    tx.commit_with(&step.input.media_id).await?;
    Ok(step.input.media_id)
}

async fn publish_media(ctx: TaskContext, step: StepInput<Upload>) -> Result<String, TaskError> {
    let moderation: Option<Moderation> = step.event(APPROVED)?;
    let by = moderation.map_or_else(|| "?".to_owned(), |m| m.by);
    let tx = ctx.transaction().await?;
    tx.client()
        .execute(
            "UPDATE demo_media SET status = 'published' WHERE id = $1",
            &[&step.input.media_id],
        )
        .await?;
    let note = format!("approved by {by}");
    tx.commit_with(&note).await?;
    Ok(note)
}

async fn notify_user(
    _ctx: TaskContext,
    step: StepInput<Upload>,
    steps: Steps,
) -> Result<String, TaskError> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let upload = &step.input;
    // persist was skipped: a duplicate
    if step.skipped(&steps.persist) {
        return Ok(format!(
            "to {}: {} was already uploaded",
            upload.user, upload.file
        ));
    }
    Ok(format!("to {}: {} is ready", upload.user, upload.file))
}

async fn media_cleanup(
    ctx: TaskContext,
    failure: FailureInput<Upload>,
) -> Result<String, TaskError> {
    let tx = ctx.transaction().await?;
    tx.client()
        .execute(
            "UPDATE demo_media SET status = 'rejected', error = $2 WHERE id = $1",
            &[&failure.input.media_id, &failure.error],
        )
        .await?;
    let note = format!("marked media {} rejected", failure.input.media_id);
    tx.commit_with(&note).await?;
    Ok(note)
}

async fn nightly_cleanup(
    ctx: TaskContext,
    policy: CleanupPolicy,
) -> Result<CleanupReport, TaskError> {
    let tx = ctx.transaction().await?;
    let rejected = tx
        .client()
        .execute("DELETE FROM demo_media WHERE status = 'rejected'", &[])
        .await?;
    let duplicates = tx
        .client()
        .execute("DELETE FROM demo_media WHERE status = 'duplicate'", &[])
        .await?;
    let expired = tx
        .client()
        .execute(
            "DELETE FROM demo_media WHERE uploaded_at < now() - make_interval(days => $1)",
            &[&policy.keep_days],
        )
        .await?;
    let report = CleanupReport {
        rejected,
        duplicates,
        expired,
    };
    tx.commit_with(&report).await?;
    Ok(report)
}

// ---- Setup -------------------------------------------------------------------------------

async fn define_everything(client: &Client, wf: &WorkflowBuilder<Upload>) -> Result<i32, DynError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS demo_media (
                 id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 batch       bigint NOT NULL,
                 user_name   text NOT NULL,
                 file        text NOT NULL,
                 mb          float8 NOT NULL,
                 status      text NOT NULL DEFAULT 'uploaded',
                 kind        text,
                 thumbnails  text[],
                 caption     text,
                 error       text,
                 uploaded_at timestamptz NOT NULL DEFAULT now());
             CREATE SEQUENCE IF NOT EXISTS demo_media_batch;",
        )
        .await?;
    set_rate_limit(client, "ai-caption", CAPTION_LIMIT, Duration::from_secs(1)).await?;
    let plain = TaskOptions::default();
    define_task(client, ValidateMedia::NAME, &plain).await?;
    define_task(client, MakeThumbnails::NAME, &plain).await?;
    let caption = TaskOptions {
        retries: Some(5),
        backoff_max: Some(Duration::from_secs(1)),
        rate_limits: vec![RateLimitUse::declared("ai-caption", Units::Fixed(1))],
        ..TaskOptions::default()
    };
    define_task(client, AiCaption::NAME, &caption).await?;
    define_task(client, PersistMedia::NAME, &plain).await?;
    define_task(client, PublishMedia::NAME, &plain).await?;
    define_task(client, NotifyUser::NAME, &plain).await?;
    define_task(client, MediaCleanup::NAME, &plain).await?;
    define_task(client, NightlyCleanup::NAME, &plain).await?;
    let nightly = Cron::new("0 3 * * *")
        .named("nightly-cleanup")
        .input(CleanupPolicy { keep_days: 30 })?;
    set_task_triggers(client, NightlyCleanup::NAME, &[nightly], &[]).await?;
    Ok(wf.define(client).await?)
}

/// Runs of an interrupted earlier demo would hold their users' places: cancel them.
async fn cancel_stale_runs(client: &Client) -> Result<i64, DynError> {
    let row = client
        .query_one(
            "SELECT count(sluice.cancel_run(id)) FROM sluice.runs
              WHERE workflow = 'media' AND status IN ('queued', 'running') AND input ? 'batch'
                AND created_at < now() - interval '2 minutes'",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

// ---- Producer ----------------------------------------------------------------------------

const UPLOADS: &[(&str, &str, f64)] = &[
    ("bob", "cat.png", 0.8),
    ("carol", "notes.pdf", 0.4),
    ("bob", "dog.png", 7.5),
    ("dave", "avatar.png", 0.3),
    ("dave", REJECTED_FILE, 1.2),
    ("carol", "sunset.heic", 5.9),
    ("bob", "party.mov", 31.0),
];
const ALBUM: &[(&str, &str, f64)] = &[
    ("alice", "IMG_0001.jpg", 3.1),
    ("alice", "IMG_0002.jpg", 6.4),
    ("alice", "IMG_0003.jpg", 2.2),
    ("alice", "beach.mov", 48.0),
    ("alice", "IMG_0002.jpg", 6.4),
    ("alice", "IMG_0004.jpg", 4.0),
];

/// One application transaction: INSERT the upload row, push its event.
async fn upload(
    tx: &tokio_postgres::Transaction<'_>,
    batch: i64,
    (user, file, mb): (&str, &str, f64),
) -> Result<i64, DynError> {
    let media_id: i64 = tx
        .query_one(
            "INSERT INTO demo_media (batch, user_name, file, mb) VALUES ($1, $2, $3, $4)
             RETURNING id",
            &[&batch, &user, &file, &mb],
        )
        .await?
        .get(0);
    let payload = Upload {
        media_id,
        user: user.into(),
        file: file.into(),
        mb,
        batch,
    };
    Ok(push_event(tx, EVENT, &payload).await?)
}

struct Pushed {
    event_ids: Vec<i64>,
    rolled_back_event: i64,
}

async fn push_uploads(client: &mut Client, batch: i64) -> Result<Pushed, DynError> {
    let mut event_ids = Vec::new();
    // alice's album: six rows and six events, one commit.
    let tx = client.transaction().await?;
    for &u in ALBUM {
        event_ids.push(upload(&tx, batch, u).await?);
    }
    tx.commit().await?;
    // the others one by one, each in its own transaction
    for &u in UPLOADS {
        let tx = client.transaction().await?;
        event_ids.push(upload(&tx, batch, u).await?);
        tx.commit().await?;
    }
    // bob cancels an upload: the row and the event roll back together
    let tx = client.transaction().await?;
    let rolled_back_event = upload(&tx, batch, ("bob", "draft.png", 1.0)).await?;
    tx.rollback().await?;
    Ok(Pushed {
        event_ids,
        rolled_back_event,
    })
}

// ---- Moderator ---------------------------------------------------------------------------

/// The moderation queue is plain SQL over sluice.runs: the runs whose publish step waits.
/// Approves each (rejects REJECTED_FILE) with an event, until `done` fires.
async fn moderate(
    dsn: String,
    run_ids: Vec<i64>,
    mut done: tokio::sync::oneshot::Receiver<()>,
) -> Result<usize, DynError> {
    let (client, connection) = tokio_postgres::connect(&dsn, NoTls).await?;
    tokio::spawn(connection);
    let mut decided = std::collections::HashSet::new();
    loop {
        let waiting = client
            .query(
                "SELECT (input->>'media_id')::bigint, input->>'file' FROM sluice.runs
                  WHERE id = ANY($1) AND steps->'publish'->>'status' = 'waiting'",
                &[&run_ids],
            )
            .await?;
        for row in waiting {
            let (media_id, file): (i64, String) = (row.get(0), row.get(1));
            if !decided.insert(media_id) {
                continue;
            }
            let (key, reason) = if file == REJECTED_FILE {
                (REJECTED, Some("not family-friendly".to_owned()))
            } else {
                (APPROVED, None)
            };
            let decision = Moderation {
                media_id,
                by: "moderator-mia".into(),
                reason,
            };
            push_event(&client, key, &decision).await?;
        }
        tokio::select! {
            _ = &mut done => return Ok(decided.len()),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

// ---- Summary -----------------------------------------------------------------------------

struct Run {
    id: i64,
    user: String,
    file: String,
    mb: f64,
    status: String,
    error: Option<String>,
    created: f64,
    admitted: f64,
    finished: f64,
    /// step name -> (status, attempts)
    steps: HashMap<String, (String, i32)>,
}

/// Waits until every run (and a failed run's on_failure task) has finished. Meanwhile it
/// samples the rate limit: returns the most captions seen waiting while it had no unit left.
async fn wait_for_runs(
    client: &Client,
    run_ids: &[i64],
    timeout: Duration,
) -> Result<i64, DynError> {
    let give_up = Instant::now() + timeout;
    let mut most_throttled = 0;
    loop {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM sluice.runs
                          WHERE id = ANY($1) AND status IN ('queued', 'running')),
                        (SELECT count(*) FROM sluice.tasks
                          WHERE task_name = 'media_cleanup' AND status IN ('queued', 'running')
                            AND (input->>'run_id')::bigint = ANY($1)),
                        (SELECT count(*) FROM sluice.tasks
                          WHERE run_id = ANY($1) AND task_name = 'ai_caption'
                            AND status = 'queued' AND run_at <= now()),
                        (SELECT units_left FROM sluice.rate_limits WHERE key = 'ai-caption')",
                &[&run_ids],
            )
            .await?;
        let (runs, cleanups, ready): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        if row.get::<_, Option<i32>>(3) == Some(0) {
            most_throttled = most_throttled.max(ready);
        }
        if runs + cleanups == 0 {
            return Ok(most_throttled);
        }
        if Instant::now() >= give_up {
            return Err(format!("{runs} run(s) still unfinished after {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn read_runs(client: &Client, run_ids: &[i64]) -> Result<Vec<Run>, DynError> {
    let rows = client
        .query(
            "SELECT r.id, r.input->>'user', r.input->>'file', (r.input->>'mb')::float8,
                    r.status::text, r.error,
                    extract(epoch FROM r.created_at)::float8,
                    extract(epoch FROM r.finished_at)::float8,
                    s.step, s.v->>'status',
                    coalesce(t.attempt, 0),
                    extract(epoch FROM (s.v->>'started_at')::timestamptz)::float8
               FROM sluice.runs r
               CROSS JOIN LATERAL jsonb_each(r.steps) AS s(step, v)
               LEFT JOIN sluice.tasks t ON t.id = (s.v->>'task_id')::bigint
              WHERE r.id = ANY($1)
              ORDER BY r.id",
            &[&run_ids],
        )
        .await?;
    let mut runs: Vec<Run> = Vec::new();
    for row in rows {
        let id: i64 = row.get(0);
        if runs.last().is_none_or(|r| r.id != id) {
            runs.push(Run {
                id,
                user: row.get(1),
                file: row.get(2),
                mb: row.get(3),
                status: row.get(4),
                error: row.get(5),
                created: row.get(6),
                admitted: f64::INFINITY,
                finished: row.get::<_, Option<f64>>(7).unwrap_or(f64::NAN),
                steps: HashMap::new(),
            });
        }
        let run = runs.last_mut().expect("pushed above");
        if let Some(started) = row.get::<_, Option<f64>>(11) {
            run.admitted = run.admitted.min(started);
        }
        run.steps.insert(row.get(8), (row.get(9), row.get(10)));
    }
    Ok(runs)
}

fn step_cell(run: &Run, step: &str) -> String {
    match run.steps.get(step) {
        None => "-".into(),
        Some((status, attempts)) => {
            let word = match status.as_str() {
                "succeeded" => "ok",
                "failed" => "FAILED",
                other => other,
            };
            if *attempts > 1 {
                format!("{word}×{attempts}")
            } else {
                word.into()
            }
        }
    }
}

/// The most intervals open at once (an end and a start at the same instant do not overlap).
fn max_overlap(intervals: &[(f64, f64)]) -> usize {
    let mut edges: Vec<(f64, i32)> = intervals
        .iter()
        .flat_map(|&(start, end)| [(start, 1), (end, -1)])
        .collect();
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut open, mut most) = (0i32, 0i32);
    for (_, delta) in edges {
        open += delta;
        most = most.max(open);
    }
    most as usize
}

fn print_runs(runs: &[Run]) {
    println!(
        "\n  run user  upload          MB status     wait  took  validate thumbnails caption   \
         persist   publish   notify"
    );
    for r in runs {
        println!(
            "{:>5} {:<6}{:<13}{:>5.1} {:<10}{:>4.1}s {:>4.1}s  {:<9}{:<11}{:<10}{:<10}{:<10}{}",
            r.id,
            r.user,
            r.file,
            r.mb,
            r.status,
            // the scheduler stamps a step with its tick's start, which can precede the
            // commit that created the run by a few milliseconds
            (r.admitted - r.created).max(0.0),
            r.finished - r.admitted,
            step_cell(r, "validate"),
            step_cell(r, "thumbnails"),
            step_cell(r, "caption"),
            step_cell(r, "persist"),
            step_cell(r, "publish"),
            step_cell(r, "notify"),
        );
    }
}

async fn print_totals(
    client: &Client,
    runs: &[Run],
    run_ids: &[i64],
    throttled: i64,
) -> Result<(), DynError> {
    let succeeded = runs.iter().filter(|r| r.status == "succeeded").count();
    let failed: Vec<&Run> = runs
        .iter()
        .filter(|r| r.status == "failed" || r.status == "cancelled")
        .collect();
    let retried = runs
        .iter()
        .filter(|r| r.steps.get("caption").is_some_and(|(_, a)| *a > 1))
        .count();
    let skipped = runs
        .iter()
        .filter(|r| r.steps.get("persist").is_some_and(|(s, _)| s == "skipped"))
        .count();
    println!(
        "\n{} runs: {succeeded} succeeded, {} failed or cancelled; {retried} captions retried \
         (×n: attempts), {skipped} duplicate (persist skipped)",
        runs.len(),
        failed.len()
    );
    for r in &failed {
        let cleanup: Option<String> = client
            .query_opt(
                "SELECT output #>> '{}' FROM sluice.tasks
                  WHERE task_name = 'media_cleanup' AND (input->>'run_id')::bigint = $1",
                &[&r.id],
            )
            .await?
            .and_then(|row| row.get(0));
        println!(
            "  run {} ({}'s {}): {}",
            r.id,
            r.user,
            r.file,
            r.error.as_deref().unwrap_or("?")
        );
        println!(
            "    then on_failure media_cleanup: {}",
            cleanup.as_deref().unwrap_or("did not run")
        );
    }

    // Workflow concurrency: runs of one user holding a place at once, from the time the run
    // was admitted (its first step created) to the time it finished.
    let mut per_user: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for r in runs {
        per_user
            .entry(&r.user)
            .or_default()
            .push((r.admitted, r.finished));
    }
    let mut by_user: Vec<(&str, usize, usize)> = per_user
        .iter()
        .map(|(user, iv)| (*user, iv.len(), max_overlap(iv)))
        .collect();
    by_user.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let text: Vec<String> = by_user
        .iter()
        .map(|(u, n, most)| format!("{u} {most} of {n}"))
        .collect();
    println!(
        "most runs at once per user (limit {RUNS_PER_USER}): {}",
        text.join(", ")
    );
    let queued: Vec<&Run> = runs
        .iter()
        .filter(|r| r.admitted - r.created > 0.2)
        .collect();
    if !queued.is_empty() {
        let longest = queued
            .iter()
            .map(|r| r.admitted - r.created)
            .fold(0.0, f64::max);
        let users: std::collections::BTreeSet<&str> =
            queued.iter().map(|r| r.user.as_str()).collect();
        println!(
            "  {} run(s) of {} queued for a place (column wait), up to {longest:.1} s",
            queued.len(),
            users.into_iter().collect::<Vec<_>>().join(", ")
        );
    }

    // The rate limit: every attempt of a caption consumed one unit when it started.
    let rows = client
        .query(
            "SELECT extract(epoch FROM a.started_at)::float8, t.task_name,
                    extract(epoch FROM a.started_at - t.enqueued_at)::float8, a.attempt
               FROM sluice.task_attempts a JOIN sluice.tasks t ON t.id = a.task_id
              WHERE t.run_id = ANY($1) AND t.task_name IN ('ai_caption', 'make_thumbnails')
                AND a.started_at IS NOT NULL",
            &[&run_ids],
        )
        .await?;
    let mut starts: Vec<f64> = Vec::new();
    let (mut caption_wait, mut thumb_wait) = (0.0f64, 0.0f64);
    for row in &rows {
        let (at, task, wait, attempt): (f64, String, f64, i32) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if task == "ai_caption" {
            starts.push(at);
            if attempt == 1 {
                caption_wait = caption_wait.max(wait);
            }
        } else {
            thumb_wait = thumb_wait.max(wait);
        }
    }
    starts.sort_by(f64::total_cmp);
    let span = match (starts.first(), starts.last()) {
        (Some(first), Some(last)) => last - first,
        _ => 0.0,
    };
    println!(
        "rate limit ai-caption ({CAPTION_LIMIT}/s, both workers): {} caption attempts started \
         over {span:.1} s;",
        starts.len()
    );
    println!(
        "  with no unit left up to {throttled} captions waited at once; a caption waited up \
         to {caption_wait:.1} s"
    );
    println!("  to start, its sibling thumbnails (no limit) up to {thumb_wait:.1} s");

    let workers = client
        .query(
            "SELECT coalesce(worker_name, '?'), count(*) FROM sluice.tasks
              WHERE run_id = ANY($1) GROUP BY 1 ORDER BY 1",
            &[&run_ids],
        )
        .await?;
    let text: Vec<String> = workers
        .iter()
        .map(|row| format!("{} {}", row.get::<_, String>(0), row.get::<_, i64>(1)))
        .collect();
    println!("step tasks per worker: {}", text.join(", "));
    Ok(())
}

async fn print_cron(client: &Client) -> Result<(), DynError> {
    let row = client
        .query_one(
            "SELECT name, cron, time_zone, target,
                    to_char(next_fire_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"'),
                    extract(epoch FROM next_fire_at - now())::float8
               FROM sluice.crons WHERE name = 'nightly-cleanup'",
            &[],
        )
        .await?;
    let secs: f64 = row.get(5);
    let (h, m) = ((secs / 3600.0) as i64, ((secs % 3600.0) / 60.0) as i64);
    println!(
        "cron {}: '{}' {} -> task {}, next fire {} (in {h} h {m:02} min)",
        row.get::<_, String>(0),
        row.get::<_, String>(1),
        row.get::<_, String>(2),
        row.get::<_, String>(3),
        row.get::<_, String>(4),
    );
    Ok(())
}

/// Runs the nightly cleanup once now, as its cron would, and waits for it.
async fn run_cleanup_now(client: &Client) -> Result<(), DynError> {
    let id = enqueue::<NightlyCleanup>(
        client,
        &CleanupPolicy { keep_days: 30 },
        &EnqueueOptions::default(),
    )
    .await?;
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        let row = client
            .query_one(
                "SELECT status::text, output, last_error FROM sluice.tasks WHERE id = $1",
                &[&id],
            )
            .await?;
        let status: String = row.get(0);
        if status == "succeeded" {
            let report: CleanupReport = serde_json::from_value(row.get::<_, Value>(1))?;
            println!(
                "  ran it once now (task {id}): deleted {} rejected and {} duplicate \
                 upload(s), {} older than 30 days",
                report.rejected, report.duplicates, report.expired
            );
            return Ok(());
        }
        if status != "queued" && status != "running" || Instant::now() >= give_up {
            let error: Option<String> = row.get(2);
            return Err(format!("cleanup task {id}: {status} {error:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- Main --------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> Result<(), DynError> {
    let dsn = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_DSN.to_owned());
    let (mut client, connection) = tokio_postgres::connect(&dsn, NoTls).await?;
    tokio::spawn(connection);

    let (wf, steps) = media_workflow();
    let version = define_everything(&client, &wf).await?;
    let stale = cancel_stale_runs(&client).await?;
    println!(
        "workflow media v{version}: on {EVENT}, validate -> (thumbnails | caption) -> persist \
         -> publish (waits for {APPROVED}) -> notify,"
    );
    println!(
        "  at most {RUNS_PER_USER} runs per user (group round robin); ai_caption: rate limit \
         ai-caption {CAPTION_LIMIT}/s, 5 retries"
    );
    println!("  workers demo-worker-a and demo-worker-b, 5 slots each, run in this process");
    if stale > 0 {
        println!("  cancelled {stale} unfinished run(s) left by an interrupted demo");
    }

    // Two workers, as two machines of a fleet would be.
    let mut stops = Vec::new();
    let mut handles = Vec::new();
    for name in ["demo-worker-a", "demo-worker-b"] {
        let (persist_steps, notify_steps) = (steps.clone(), steps.clone());
        let worker = Worker::builder(dsn.clone())
            .name(name)
            .slots(5)
            .shutdown_timeout(Duration::from_secs(5))
            .task::<ValidateMedia, _, _>(validate_media)
            .task::<MakeThumbnails, _, _>(make_thumbnails)
            .task::<AiCaption, _, _>(ai_caption)
            .task::<PersistMedia, _, _>(move |ctx, input| {
                persist_media(ctx, input, persist_steps.clone())
            })
            .task::<NotifyUser, _, _>(move |ctx, input| {
                notify_user(ctx, input, notify_steps.clone())
            })
            .task::<PublishMedia, _, _>(publish_media)
            .task::<MediaCleanup, _, _>(media_cleanup)
            .task::<NightlyCleanup, _, _>(nightly_cleanup)
            .build()?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop_tx);
        handles.push(tokio::spawn(worker.run_until(async move {
            let _ = stop_rx.await;
        })));
    }

    let batch: i64 = client
        .query_one("SELECT nextval('demo_media_batch')", &[])
        .await?
        .get(0);
    let started = Instant::now();
    let pushed = push_uploads(&mut client, batch).await?;
    let rows = client
        .query(
            "SELECT r FROM sluice.events e CROSS JOIN LATERAL unnest(e.run_ids) AS r
              JOIN sluice.runs x ON x.id = r AND x.workflow = 'media'
              WHERE e.id = ANY($1) ORDER BY r",
            &[&pushed.event_ids],
        )
        .await?;
    let run_ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let users: std::collections::BTreeSet<&str> =
        ALBUM.iter().chain(UPLOADS).map(|(u, _, _)| *u).collect();
    println!(
        "\npushed {} {EVENT} events from {} users, each in the transaction of its demo_media \
         INSERT",
        pushed.event_ids.len(),
        users.len()
    );
    println!(
        "  (alice's album: 6 rows + 6 events in one commit) -> {} runs started",
        run_ids.len()
    );
    let ghost: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM sluice.events WHERE id = $1)
                  + (SELECT count(*) FROM demo_media WHERE batch = $2 AND file = 'draft.png')",
            &[&pushed.rolled_back_event, &batch],
        )
        .await?
        .get(0);
    println!(
        "  bob's draft.png was rolled back: {}",
        if ghost == 0 {
            "no row, no event, no run"
        } else {
            "BUT SOMETHING OF IT REMAINS"
        }
    );

    let (moderation_done, moderation_stop) = tokio::sync::oneshot::channel();
    let moderator = tokio::spawn(moderate(dsn.clone(), run_ids.clone(), moderation_stop));
    let outcome = wait_for_runs(&client, &run_ids, Duration::from_secs(45)).await;
    let _ = moderation_done.send(());
    let moderated = moderator.await??;
    let elapsed = started.elapsed();
    let runs = read_runs(&client, &run_ids).await?;
    print_runs(&runs);
    match &outcome {
        Ok(_) => println!(
            "all runs finished {:.1} s after the first upload",
            elapsed.as_secs_f64()
        ),
        Err(e) => println!("{e}"),
    }
    print_totals(&client, &runs, &run_ids, *outcome.as_ref().unwrap_or(&0)).await?;
    println!(
        "moderator-mia decided {moderated} publish step(s) waiting in sluice.runs: \
         {APPROVED} for all but {REJECTED_FILE} ({REJECTED}: cancel_if cancelled that run)"
    );
    println!();
    print_cron(&client).await?;
    let cleanup = run_cleanup_now(&client).await;

    for stop in stops {
        let _ = stop.send(());
    }
    for handle in handles {
        handle.await??;
    }
    println!("workers stopped gracefully and deregistered");
    outcome?;
    cleanup?;
    Ok(())
}
