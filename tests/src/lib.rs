//! Test harness: connections to the shared test cluster, private clusters for tests that
//! restart Postgres or change server settings, worker processes that can be killed, and
//! polling helpers.
//!
//! The shared cluster has one database and one scheduler for every test, and tests in one binary
//! run in parallel: every test uses task names from [`unique`] and only looks at its own tasks.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The shared cluster started by `make test` (scripts/dev.sh start).
pub fn shared_dsn() -> String {
    std::env::var("SLUICE_TEST_DSN")
        .unwrap_or_else(|_| "host=127.0.0.1 port=28815 user=postgres dbname=sluice".to_string())
}

/// Connects, driving the connection on its own task; panics with a hint when it cannot.
pub async fn connect(dsn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to {dsn}: {e} (is the cluster running? `scripts/dev.sh start`)")
        });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A suffix no other test, test process or earlier run uses: process id, counter, clock.
pub fn unique_suffix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000)
        .unwrap_or(0);
    format!("{}_{n}_{micros}", std::process::id())
}

/// `prefix` plus [`unique_suffix`]: a task name (or database name) of this test alone.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", unique_suffix())
}

/// Polls `check` every 50 ms until it returns `Ok`, or panics after `timeout` with `what` and the
/// last `Err` it returned (the observation that was not yet good enough).
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if start.elapsed() > timeout => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Status counts of the given tasks, as "status=count ..." text for messages and assertions.
pub async fn status_summary(client: &Client, ids: &[i64]) -> String {
    let rows = client
        .query(
            "SELECT status::text, count(*) FROM sluice.tasks WHERE id = ANY($1) GROUP BY 1 ORDER BY 1",
            &[&ids],
        )
        .await
        .expect("status summary");
    rows.iter()
        .map(|r| format!("{}={}", r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sluice.tasks rows of the given tasks (at most 20, unfinished first), one per line.
pub async fn describe_tasks(client: &Client, ids: &[i64]) -> String {
    let rows = client
        .query(
            "SELECT format('id=%s status=%s attempt=%s failures=%s lost=%s worker=%s last_error=%s output=%s',
                           id, status, attempt, failures, lost_attempts, coalesce(worker_name, '-'),
                           coalesce(last_error, '-'), coalesce(output::text, '-'))
               FROM sluice.tasks WHERE id = ANY($1)
              ORDER BY status IN ('queued', 'running') DESC, id LIMIT 20",
            &[&ids],
        )
        .await;
    match rows {
        Ok(rows) => rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n  "),
        Err(e) => format!("(cannot read sluice.tasks: {e})"),
    }
}

/// Enqueues `copies` tasks with the same input in one `sluice.enqueue_many`; returns their ids.
pub async fn enqueue_copies(
    client: &Client,
    task: &str,
    input: serde_json::Value,
    copies: i32,
) -> Vec<i64> {
    client
        .query(
            "SELECT sluice.enqueue_many($1, array_fill($2::jsonb, ARRAY[$3::int]))",
            &[&task, &input, &copies],
        )
        .await
        .expect("sluice.enqueue_many")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Enqueues one task per input in one `sluice.enqueue_many`; returns their ids in input order.
pub async fn enqueue_inputs(client: &Client, task: &str, inputs: &[serde_json::Value]) -> Vec<i64> {
    client
        .query(
            "SELECT sluice.enqueue_many($1, $2::jsonb[])",
            &[&task, &inputs],
        )
        .await
        .expect("sluice.enqueue_many")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until at least `n` of `ids` succeeded (a run is under way, mid-run).
pub async fn wait_succeeded(client: &Client, ids: &[i64], n: i64, timeout: Duration) {
    wait_until(timeout, &format!("{n} tasks to succeed"), || async {
        let done: i64 = client
            .query_one(
                "SELECT count(*) FROM sluice.tasks WHERE id = ANY($1) AND status = 'succeeded'",
                &[&ids],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if done >= n {
            Ok(())
        } else {
            Err(format!("{done} succeeded"))
        }
    })
    .await
}

/// Waits until none of `ids` is queued or running; on timeout the panic shows their rows.
pub async fn wait_finished(client: &Client, ids: &[i64], timeout: Duration) {
    let ids = ids.to_vec();
    wait_until(timeout, "tasks to finish", || async {
        let open: i64 = client
            .query_one(
                "SELECT count(*) FROM sluice.tasks WHERE id = ANY($1) AND status IN ('queued', 'running')",
                &[&ids],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if open == 0 {
            Ok(())
        } else {
            Err(format!(
                "{} ({open} unfinished)\n  {}",
                status_summary(client, &ids).await,
                describe_tasks(client, &ids).await
            ))
        }
    })
    .await
}

/// Tables the test worker writes: one row per handler execution (autocommit, so a killed
/// process leaves its trace), and the transactional effect committed with the completion.
pub async fn create_test_tables(client: &Client) {
    client
        .batch_execute(
            "BEGIN;
             -- Tests in parallel threads all call this; the lock makes IF NOT EXISTS race-free.
             SELECT pg_advisory_xact_lock(7300001);
             CREATE SCHEMA IF NOT EXISTS sluice_test;
             CREATE TABLE IF NOT EXISTS sluice_test.execution (
                 task_id bigint NOT NULL, attempt int NOT NULL, worker_pid int NOT NULL,
                 started_at timestamptz NOT NULL, finished_at timestamptz, outcome text);
             CREATE INDEX IF NOT EXISTS execution_task_idx ON sluice_test.execution (task_id);
             CREATE TABLE IF NOT EXISTS sluice_test.flag (name text PRIMARY KEY);
             CREATE TABLE IF NOT EXISTS sluice_test.effect (
                 task_id bigint NOT NULL, attempt int NOT NULL, note text);
             CREATE INDEX IF NOT EXISTS effect_task_idx ON sluice_test.effect (task_id);
             COMMIT;",
        )
        .await
        .expect("creating sluice_test tables");
}

/// The scheduler's backend pid, or None when it is not running.
pub async fn scheduler_pid(client: &Client) -> Option<i32> {
    client
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'sluice scheduler'",
            &[],
        )
        .await
        .expect("reading pg_stat_activity")
        .map(|r| r.get(0))
}

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target")
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Postgres refuses to run as root: its programs run as the postgres user.
fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", &format!("{PG_BIN}/{program}")]);
    cmd
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("paths under target/ are UTF-8")
}

/// A port nobody listens on right now (the kernel's pick for an ephemeral bind).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("finding a free port")
}

/// Stops and removes the clusters of test processes that died before their Drop ran (the
/// directory name ends with the pid of the test process that made it).
fn remove_abandoned_clusters(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        let Some(owner) = owner else { continue };
        if Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let data = dir.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = as_postgres("pg_ctl")
                .args(["-D", path_str(&data), "-m", "immediate", "-w", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A cluster of its own under `target/test-clusters/<name>-<test pid>`, on its own port, for tests that
/// restart Postgres or need other server settings. Stopped and removed on drop (kept, with its
/// log, when the test failed).
pub struct PrivateCluster {
    dir: PathBuf,
    port: u16,
}

impl PrivateCluster {
    /// Creates and starts the cluster, then creates database `sluice` with the extension.
    /// `preload`: whether `shared_preload_libraries = 'sluice'` (and `sluice.database`) is set.
    /// `settings`: extra postgresql.conf lines, e.g. `("sluice.heartbeat_timeout", "1")`.
    pub fn start(name: &str, preload: bool, settings: &[(&str, &str)]) -> Self {
        let root = target_dir().join("test-clusters");
        remove_abandoned_clusters(&root);
        // The test process's pid in the name: two test runs at once do not collide.
        let dir = root.join(format!("{name}-{}", std::process::id()));
        let data = dir.join("data");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the cluster directory");
        run(Command::new("chown").args(["-R", "postgres:postgres", path_str(&dir)]));
        run(as_postgres("initdb").args([
            "-D",
            path_str(&data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-instructions",
        ]));
        let mut conf = format!(
            "\n# --- sluice test cluster ---\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nmax_connections = 100\nfsync = off\n\
             log_line_prefix = '%m [%p] %b '\n",
            dir.display()
        );
        if preload {
            conf.push_str("shared_preload_libraries = 'sluice'\nsluice.database = 'sluice'\n");
        }
        for (key, value) in settings {
            conf.push_str(&format!("{key} = '{value}'\n"));
        }
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).expect("reading postgresql.conf");
        text.push_str(&conf);
        std::fs::write(&conf_path, text).expect("writing postgresql.conf");

        // Another process may take the free port before Postgres binds it: try a few.
        let mut cluster = PrivateCluster { dir, port: 0 };
        let mut last_error = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            match cluster.pg_ctl(&["start", "-w", "-t", "60"]) {
                Ok(()) => break,
                Err(e) => last_error = e,
            }
            cluster.port = 0;
        }
        assert!(
            cluster.port != 0,
            "cannot start cluster {name}: {last_error}"
        );
        let port = cluster.port.to_string();
        run(as_postgres("createdb").args(["-h", "127.0.0.1", "-p", &port, "sluice"]));
        run(as_postgres("psql").args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-d",
            "sluice",
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            "CREATE EXTENSION sluice",
        ]));
        cluster
    }

    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=sluice",
            self.port
        )
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        let out = as_postgres("pg_ctl")
            .args(["-D", path_str(&data), "-l", path_str(&log)])
            .args(["-o", &format!("-p {}", self.port)])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl {args:?}: {}{}\nlog tail:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail(20)
            ))
        }
    }

    /// Crash-stops Postgres (every backend killed, no shutdown checkpoint: crash recovery runs
    /// at the next start) and starts it again on the same port.
    pub fn restart_immediate(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"])
            .expect("immediate stop");
        self.pg_ctl(&["start", "-w", "-t", "60"])
            .expect("start after immediate stop");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_postgres("pg_ctl")
            .args(["-D", path_str(&data), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if std::thread::panicking() {
            eprintln!(
                "test failed: keeping {} (see postgres.log)",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A `test_worker` process (see src/bin/test_worker.rs), killed on drop. Its stderr goes to
/// `target/test-workers/test_worker-<pid>.log`.
pub struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    /// `exe` is `env!("CARGO_BIN_EXE_test_worker")` from the calling test. The worker serves
    /// `task` with `slots` slots and is named `test_worker-<pid>`.
    pub fn spawn(exe: &str, dsn: &str, task: &str, slots: i32) -> Self {
        Self::spawn_with(exe, dsn, task, slots, &serde_json::json!({}), None)
    }

    /// Like `spawn`, registering the worker with these labels (a JSON object).
    pub fn spawn_labelled(
        exe: &str,
        dsn: &str,
        task: &str,
        slots: i32,
        labels: &serde_json::Value,
    ) -> Self {
        Self::spawn_with(exe, dsn, task, slots, labels, None)
    }

    /// Like `spawn`, fetching without a notification only this often (500 ms otherwise).
    pub fn spawn_polling(exe: &str, dsn: &str, task: &str, slots: i32, poll: Duration) -> Self {
        Self::spawn_with(exe, dsn, task, slots, &serde_json::json!({}), Some(poll))
    }

    fn spawn_with(
        exe: &str,
        dsn: &str,
        task: &str,
        slots: i32,
        labels: &serde_json::Value,
        poll: Option<Duration>,
    ) -> Self {
        let dir = target_dir().join("test-workers");
        std::fs::create_dir_all(&dir).expect("creating target/test-workers");
        let pending = dir.join(format!("starting-{}.log", unique_suffix()));
        let stderr = std::fs::File::create(&pending).expect("creating the worker log");
        let child = Command::new(exe)
            .args([dsn, task, &slots.to_string()])
            .env("SLUICE_TEST_WORKER_LABELS", labels.to_string())
            .env(
                "SLUICE_TEST_WORKER_POLL_MS",
                poll.map_or(500, |poll| poll.as_millis()).to_string(),
            )
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning test_worker");
        let log = dir.join(format!("test_worker-{}.log", child.id()));
        let _ = std::fs::rename(&pending, &log);
        WorkerProcess { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name the worker registers under (sluice.workers.name, sluice.tasks.worker_name).
    pub fn name(&self) -> String {
        format!("test_worker-{}", self.pid())
    }

    /// Whether the process is still running (it did not exit or crash).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What the worker wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown, no deregistration, no flush; as when a machine dies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for the graceful shutdown.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        run(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
        self.child.wait().expect("waiting for test_worker")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

// Helpers for the test worker's tables and the raw worker protocol ------------------------------

/// Defines a task named `<prefix>_<unique suffix>` with the given extra `define_task` arguments
/// (SQL text such as `", retries => 3"`); returns its name.
pub async fn define_unique_task(client: &Client, prefix: &str, options_sql: &str) -> String {
    let task = unique(prefix);
    client
        .execute(
            &format!("SELECT sluice.define_task($1 {options_sql})"),
            &[&task],
        )
        .await
        .unwrap_or_else(|e| panic!("define_task({task} {options_sql}): {e}"));
    task
}

/// `sluice.enqueue(task, input)` in its own transaction; returns the task id.
pub async fn enqueue_sql(client: &Client, task: &str, input: serde_json::Value) -> i64 {
    client
        .query_one("SELECT sluice.enqueue($1, $2)", &[&task, &input])
        .await
        .unwrap_or_else(|e| panic!("sluice.enqueue({task}, {input}): {e}"))
        .get(0)
}

/// The handler executions the test worker logged for a task: (attempt, worker pid, outcome),
/// in start order.
pub async fn executions(client: &Client, task_id: i64) -> Vec<(i32, i32, Option<String>)> {
    client
        .query(
            "SELECT attempt, worker_pid, outcome FROM sluice_test.execution
              WHERE task_id = $1 ORDER BY started_at",
            &[&task_id],
        )
        .await
        .expect("reading sluice_test.execution")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The attempts whose transactional write (sluice_test.effect) committed for a task.
pub async fn effects(client: &Client, task_id: i64) -> Vec<i32> {
    client
        .query(
            "SELECT attempt FROM sluice_test.effect WHERE task_id = $1 ORDER BY attempt",
            &[&task_id],
        )
        .await
        .expect("reading sluice_test.effect")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until the test worker logged an execution of `task_id` whose outcome is `outcome`
/// (None: any execution, e.g. one that has just started).
pub async fn wait_execution(client: &Client, task_id: i64, outcome: Option<&str>) {
    let what = format!("task {task_id}'s handler to log outcome {outcome:?}");
    wait_until(Duration::from_secs(20), &what, || async {
        let seen = executions(client, task_id).await;
        let found = seen
            .iter()
            .any(|(_, _, o)| outcome.is_none() || o.as_deref() == outcome);
        if found {
            Ok(())
        } else {
            Err(format!(
                "executions {seen:?}; task: {}",
                describe_tasks(client, &[task_id]).await
            ))
        }
    })
    .await
}

/// The rows of sluice.task_attempts for a task: (attempt, outcome, error), by attempt.
pub async fn attempts(client: &Client, task_id: i64) -> Vec<(i32, String, Option<String>)> {
    client
        .query(
            "SELECT attempt, outcome, error FROM sluice.task_attempts
              WHERE task_id = $1 ORDER BY attempt",
            &[&task_id],
        )
        .await
        .expect("reading sluice.task_attempts")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// A raw-SQL worker's fetch: polls `sluice.fetch_tasks` until the scheduler has assigned it
/// something; returns the first (task id, attempt).
pub async fn fetch_one(worker_session: &Client, worker_id: i64) -> (i64, i32) {
    wait_until(
        Duration::from_secs(15),
        "an assignment to the raw worker",
        || async {
            let rows = worker_session
                .query(
                    "SELECT task_id, attempt FROM sluice.fetch_tasks($1)",
                    &[&worker_id],
                )
                .await
                .map_err(|e| e.to_string())?;
            match rows.first() {
                Some(r) => Ok((r.get::<_, i64>(0), r.get::<_, i32>(1))),
                None => Err("nothing assigned yet".into()),
            }
        },
    )
    .await
}

/// One row of sluice.tasks as (status, attempt, last_error).
pub async fn task_state(client: &Client, task_id: i64) -> (String, i32, Option<String>) {
    let r = client
        .query_one(
            "SELECT status::text, attempt, last_error FROM sluice.tasks WHERE id = $1",
            &[&task_id],
        )
        .await
        .unwrap_or_else(|e| panic!("reading task {task_id}: {e}"));
    (r.get(0), r.get(1), r.get(2))
}

// Durable tasks --------------------------------------------------------------------------------

/// The test tables of [`create_test_tables`] plus `sluice_test.memo_run`: one row per run of a
/// durable memo step's closure in the test worker (autocommit, so a killed process leaves its
/// trace).
pub async fn create_durable_test_tables(client: &Client) {
    create_test_tables(client).await;
    client
        .batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7300001);
             CREATE TABLE IF NOT EXISTS sluice_test.memo_run (
                 task_id bigint NOT NULL, attempt int NOT NULL, step text NOT NULL,
                 worker_pid int NOT NULL, ran_at timestamptz NOT NULL);
             CREATE INDEX IF NOT EXISTS memo_run_task_idx ON sluice_test.memo_run (task_id);
             COMMIT;",
        )
        .await
        .expect("creating sluice_test.memo_run");
}

/// The memo closures the test worker ran for a task: (step, attempt, worker pid), in run order.
pub async fn memo_runs(client: &Client, task_id: i64) -> Vec<(String, i32, i32)> {
    client
        .query(
            "SELECT step, attempt, worker_pid FROM sluice_test.memo_run
              WHERE task_id = $1 ORDER BY ran_at",
            &[&task_id],
        )
        .await
        .expect("reading sluice_test.memo_run")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// A task's durable record (sluice.durable_steps) as (seq, kind, name, state), by seq.
pub async fn durable_steps(client: &Client, task_id: i64) -> Vec<(i32, String, String, String)> {
    client
        .query(
            "SELECT seq, kind, name, state FROM sluice.durable_steps
              WHERE task_id = $1 ORDER BY seq",
            &[&task_id],
        )
        .await
        .expect("reading sluice.durable_steps")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

/// Expects a client call to have failed with SQLSTATE `code`; returns the error's text (the
/// client's context and Postgres' message).
pub fn client_error<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, sluice_client::Error>,
    code: &str,
) -> String {
    let error = match result {
        Ok(v) => panic!("{what} should have failed with {code}, returned {v:?}"),
        Err(e) => e,
    };
    assert_eq!(
        error.kind(),
        sluice_client::ErrorKind::Db,
        "{what}: {error}"
    );
    assert_eq!(
        error.code().map(|c| c.code()),
        Some(code),
        "{what}: {error}"
    );
    error.to_string()
}

/// Waits until the workflow run is no longer queued or running; returns its sluice.runs row as
/// JSON.
pub async fn wait_run(client: &Client, run_id: i64, timeout: Duration) -> serde_json::Value {
    wait_until(timeout, &format!("run {run_id} to finish"), || async {
        let row: serde_json::Value = client
            .query_one(
                "SELECT to_jsonb(r) FROM sluice.runs r WHERE r.id = $1",
                &[&run_id],
            )
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if ["succeeded", "failed", "cancelled"].contains(&row["status"].as_str().unwrap_or("")) {
            Ok(row)
        } else {
            Err(row.to_string())
        }
    })
    .await
}

/// `sluice.define_workflow(name, spec)`; panics naming the spec if it is rejected.
pub async fn define_workflow(client: &Client, name: &str, spec: serde_json::Value) -> i32 {
    client
        .query_one("SELECT sluice.define_workflow($1, $2)", &[&name, &spec])
        .await
        .unwrap_or_else(|e| panic!("define_workflow({name}, {spec}): {e}"))
        .get(0)
}

/// `sluice.run_workflow(name, input)`; returns the run id.
pub async fn run_workflow(client: &Client, name: &str, input: serde_json::Value) -> i64 {
    client
        .query_one("SELECT sluice.run_workflow($1, $2)", &[&name, &input])
        .await
        .unwrap_or_else(|e| panic!("run_workflow({name}, {input}): {e}"))
        .get(0)
}

/// Declares a task type whose wire name is `<prefix>_<unique suffix>`, fixed at first use, so
/// that tests running at once on the shared cluster never share a task. The caller imports
/// `TaskDefinition`, `OnceLock` and `unique`.
#[macro_export]
macro_rules! task_type {
    ($ty:ident, $prefix:literal, $input:ty, $output:ty) => {
        struct $ty;
        impl TaskDefinition for $ty {
            const NAME: &'static str = $prefix;
            type Input = $input;
            type Output = $output;
            fn name() -> &'static str {
                static NAME: OnceLock<String> = OnceLock::new();
                NAME.get_or_init(|| unique($prefix))
            }
        }
    };
}
