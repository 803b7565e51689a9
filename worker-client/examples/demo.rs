//! The README demo: define tasks, run a worker in-process, enqueue from SQL and from Rust,
//! and print what happened.
//!
//!     cargo run --release -p sluice-client --example demo -- [dsn]
//!
//! The DSN defaults to the dev cluster (`scripts/dev.sh start`).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_client::tokio_postgres::{self, Client, NoTls};
use sluice_client::{
    define_task, enqueue, enqueue_many, EnqueueOptions, TaskContext, TaskDefinition, TaskError,
    TaskOptions, Worker,
};

const DEFAULT_DSN: &str = "host=127.0.0.1 port=28815 user=postgres dbname=sluice";

#[derive(Serialize, Deserialize)]
struct ResizeRequest {
    url: String,
    width: u32,
}

#[derive(Serialize, Deserialize)]
struct Thumbnail {
    url: String,
    bytes: u64,
}

struct ResizeImage;
impl TaskDefinition for ResizeImage {
    const NAME: &'static str = "resize_image";
    type Input = ResizeRequest;
    type Output = Thumbnail;
}

#[derive(Serialize, Deserialize)]
struct Email {
    to: String,
    subject: String,
}

struct SendEmail;
impl TaskDefinition for SendEmail {
    const NAME: &'static str = "send_email";
    type Input = Email;
    type Output = String;
}

#[derive(Serialize, Deserialize)]
struct Charge {
    customer: String,
    cents: i64,
}

#[derive(Serialize, Deserialize)]
struct Receipt {
    charge_id: i64,
    cents: i64,
}

struct ChargeCard;
impl TaskDefinition for ChargeCard {
    const NAME: &'static str = "charge_card";
    type Input = Charge;
    type Output = Receipt;
}

async fn resize_image(_ctx: TaskContext, request: ResizeRequest) -> Result<Thumbnail, TaskError> {
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stem = request
        .url
        .trim_end_matches(".png")
        .trim_end_matches(".jpg");
    Ok(Thumbnail {
        url: format!("{stem}-{}w.webp", request.width),
        bytes: u64::from(request.width) * 37,
    })
}

/// The mail server is flaky: each message fails a few first attempts, as many as its task id
/// modulo 3, so retries show up the same way on every run. An address without '@' can never
/// succeed, so that failure is not retried.
async fn send_email(ctx: TaskContext, email: Email) -> Result<String, TaskError> {
    if !email.to.contains('@') {
        return Err(TaskError::fatal(format!("invalid address {:?}", email.to)));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let planned_failures = i32::try_from(ctx.task_id() % 3).unwrap_or(0);
    if ctx.attempt() <= planned_failures {
        return Err(TaskError::retryable(format!(
            "SMTP 451 temporary failure (attempt {})",
            ctx.attempt()
        )));
    }
    Ok(format!("sent {:?} to {}", email.subject, email.to))
}

/// The charge row and the task's completion commit together: if the attempt timed out or was
/// cancelled meanwhile, neither happens.
async fn charge_card(ctx: TaskContext, charge: Charge) -> Result<Receipt, TaskError> {
    let tx = ctx.transaction().await?;
    let row = tx
        .client()
        .query_one(
            "INSERT INTO demo.charges (task_id, customer, cents) VALUES ($1, $2, $3)
             ON CONFLICT (task_id) DO UPDATE SET cents = excluded.cents
             RETURNING id",
            &[&ctx.task_id(), &charge.customer, &charge.cents],
        )
        .await?;
    let receipt = Receipt {
        charge_id: row.get(0),
        cents: charge.cents,
    };
    tx.commit_with(&receipt).await?;
    Ok(receipt)
}

async fn setup(client: &Client) -> Result<(), Box<dyn std::error::Error>> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS demo;
             CREATE TABLE IF NOT EXISTS demo.charges (
                 id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                 task_id    bigint NOT NULL UNIQUE,
                 customer   text NOT NULL,
                 cents      bigint NOT NULL,
                 charged_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await?;
    define_task(client, ResizeImage::NAME, &TaskOptions::default()).await?;
    let flaky = TaskOptions {
        retries: Some(3),
        backoff_factor: Some(1.5),
        backoff_max: Some(Duration::from_secs(2)),
        ..TaskOptions::default()
    };
    define_task(client, SendEmail::NAME, &flaky).await?;
    let payments = TaskOptions {
        execution_timeout: Some(Duration::from_secs(10)),
        priority: Some(5),
        ..TaskOptions::default()
    };
    define_task(client, ChargeCard::NAME, &payments).await?;
    Ok(())
}

async fn enqueue_demo_tasks(client: &mut Client) -> Result<Vec<i64>, Box<dyn std::error::Error>> {
    let mut ids = Vec::new();

    // Plain SQL, as any application could.
    let row = client
        .query_one(
            "SELECT sluice.enqueue('resize_image', '{\"url\": \"cat.png\", \"width\": 320}')",
            &[],
        )
        .await?;
    ids.push(row.get::<_, i64>(0));

    // Typed, one at a time and in bulk.
    let request = ResizeRequest {
        url: "dog.jpg".into(),
        width: 640,
    };
    ids.push(enqueue::<ResizeImage>(client, &request, &EnqueueOptions::default()).await?);
    let emails: Vec<Email> = ["ada@example.com", "grace@example.com", "linus@example.com"]
        .into_iter()
        .chain(["not-an-address"])
        .map(|to| Email {
            to: to.into(),
            subject: "Your order shipped".into(),
        })
        .collect();
    ids.extend(enqueue_many::<SendEmail>(client, &emails).await?);

    // Inside the caller's own transaction: the charge is queued only if the order commits.
    let order = client.transaction().await?;
    let charges = [("ada", 1999), ("grace", 4500)];
    for (customer, cents) in charges {
        let charge = Charge {
            customer: customer.into(),
            cents,
        };
        ids.push(enqueue::<ChargeCard>(&order, &charge, &EnqueueOptions::default()).await?);
    }
    order.commit().await?;
    Ok(ids)
}

struct Summary {
    id: i64,
    task_name: String,
    status: String,
    attempts: i32,
    output: Option<Value>,
    last_error: Option<String>,
}

async fn wait_for(client: &Client, ids: &[i64], timeout: Duration) -> Result<Vec<Summary>, String> {
    let give_up = Instant::now() + timeout;
    loop {
        let rows = client
            .query(
                "SELECT id, task_name, status::text, attempt, output, last_error
                   FROM sluice.tasks WHERE id = ANY($1) ORDER BY id",
                &[&ids],
            )
            .await
            .map_err(|e| e.to_string())?;
        let summaries: Vec<Summary> = rows
            .iter()
            .map(|row| Summary {
                id: row.get(0),
                task_name: row.get(1),
                status: row.get(2),
                attempts: row.get(3),
                output: row.get(4),
                last_error: row.get(5),
            })
            .collect();
        let unfinished = summaries
            .iter()
            .filter(|s| s.status == "queued" || s.status == "running")
            .count();
        if unfinished == 0 {
            return Ok(summaries);
        }
        if Instant::now() >= give_up {
            return Err(format!(
                "{unfinished} task(s) still unfinished after {timeout:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_summary(summaries: &[Summary], elapsed: Duration) {
    println!();
    println!(
        "{:>8}  {:<13} {:<10} {:>8}  result",
        "task", "name", "status", "attempts"
    );
    for s in summaries {
        let result = match (&s.output, &s.last_error) {
            (Some(output), _) if s.status == "succeeded" => format!("output {output}"),
            (_, Some(error)) => format!("error  {error}"),
            _ => String::new(),
        };
        println!(
            "{:>8}  {:<13} {:<10} {:>8}  {result}",
            s.id, s.task_name, s.status, s.attempts
        );
    }
    let succeeded = summaries.iter().filter(|s| s.status == "succeeded").count();
    let failed = summaries.iter().filter(|s| s.status == "failed").count();
    let retried = summaries.iter().filter(|s| s.attempts > 1).count();
    let attempts: i32 = summaries.iter().map(|s| s.attempts).sum();
    println!();
    println!(
        "{} tasks run in {:.1} s: {succeeded} succeeded, {failed} failed, {retried} retried \
         ({attempts} attempts in all)",
        summaries.len(),
        elapsed.as_secs_f64()
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dsn = std::env::args()
        .nth(1)
        .unwrap_or_else(|| DEFAULT_DSN.to_owned());
    let (mut client, connection) = tokio_postgres::connect(&dsn, NoTls).await?;
    tokio::spawn(connection);

    setup(&client).await?;

    let worker = Worker::builder(dsn.clone())
        .name(format!("demo-{}", std::process::id()))
        .slots(4)
        .shutdown_timeout(Duration::from_secs(5))
        .task::<ResizeImage, _, _>(resize_image)
        .task::<SendEmail, _, _>(send_email)
        .task::<ChargeCard, _, _>(charge_card)
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(worker.run_until(async move {
        let _ = stop_rx.await;
    }));

    let started = Instant::now();
    let ids = enqueue_demo_tasks(&mut client).await?;
    println!("enqueued {} tasks: {ids:?}", ids.len());

    let outcome = wait_for(&client, &ids, Duration::from_secs(60)).await;
    if let Ok(summaries) = &outcome {
        print_summary(summaries, started.elapsed());
    }

    let _ = stop_tx.send(());
    worker.await??;
    println!("worker shut down and deregistered");
    outcome?;
    Ok(())
}
