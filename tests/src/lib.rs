//! Test harness: connections to the shared test cluster, private clusters for tests that
//! restart Postgres or change server settings, worker processes that can be killed, and
//! polling helpers.

use std::path::PathBuf;
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

pub async fn connect(dsn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {dsn}: {e} (is the cluster running? `make start`)"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A name no other test (or earlier run) uses: prefix, process id, counter.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}_{}_{n}_{nanos}", std::process::id())
}

/// Polls `check` until it returns Some or `timeout` passes; panics with `what` and the last
/// observation on timeout.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
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

/// Status counts of the given tasks, as "status=count" text for messages.
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

/// Waits until none of `ids` is queued or running.
pub async fn wait_finished(client: &Client, ids: &[i64], timeout: Duration) {
    let ids = ids.to_vec();
    wait_for(timeout, "tasks to finish", || async {
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
            Err(status_summary(client, &ids).await)
        }
    })
    .await
}

/// Tables the test worker writes: one row per handler execution, and the transactional effect.
pub async fn create_test_tables(client: &Client) {
    client
        .batch_execute(
            "BEGIN;
             SELECT pg_advisory_xact_lock(7300001);
             CREATE SCHEMA IF NOT EXISTS sluice_test;
             CREATE TABLE IF NOT EXISTS sluice_test.execution (
                 task_id bigint NOT NULL, attempt int NOT NULL, worker_pid int NOT NULL,
                 started_at timestamptz NOT NULL, finished_at timestamptz, outcome text);
             CREATE TABLE IF NOT EXISTS sluice_test.effect (
                 task_id bigint NOT NULL, attempt int NOT NULL, note text);
             COMMIT;",
        )
        .await
        .expect("creating sluice_test tables");
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn as_postgres(program: &str) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--", &format!("{PG_BIN}/{program}")]);
    cmd
}

/// A cluster of its own, for tests that restart Postgres or need other server settings.
/// Stopped and removed on drop.
pub struct PrivateCluster {
    dir: PathBuf,
    port: u16,
}

impl PrivateCluster {
    pub fn start(name: &str, port: u16, preload: bool, extra_conf: &str) -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/test-clusters")
            .join(name);
        if dir.join("data/postmaster.pid").exists() {
            let _ = as_postgres("pg_ctl")
                .args(["-D", dir.join("data").to_str().unwrap(), "-m", "immediate", "stop"])
                .output();
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating cluster dir");
        run(Command::new("chown").args(["-R", "postgres:postgres", dir.to_str().unwrap()]));
        let data = dir.join("data");
        run(as_postgres("initdb").args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-instructions",
        ]));
        let preload_conf = if preload {
            "shared_preload_libraries = 'sluice'\nsluice.database = 'sluice'\n"
        } else {
            ""
        };
        let conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 100\nfsync = off\n{preload_conf}{extra_conf}\n",
            dir.display()
        );
        let conf_path = data.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).expect("reading postgresql.conf");
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).expect("writing postgresql.conf");
        let cluster = PrivateCluster { dir, port };
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        run(as_postgres("createdb").args(["-h", "127.0.0.1", "-p", &port.to_string(), "sluice"]));
        run(as_postgres("psql").args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-d",
            "sluice",
            "-qc",
            "CREATE EXTENSION sluice",
        ]));
        cluster
    }

    pub fn dsn(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=sluice", self.port)
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        let mut cmd = as_postgres("pg_ctl");
        cmd.args(["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap()]).args(args);
        run(&mut cmd);
    }

    /// Crash-stops Postgres (no checkpoint, like a power cut for the processes) and starts it.
    pub fn restart_immediate(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
        self.pg_ctl(&["start", "-w", "-t", "60"]);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = as_postgres("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `test_worker` process (see src/bin/test_worker.rs), killed on drop.
pub struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    /// `exe` is `env!("CARGO_BIN_EXE_test_worker")` from the calling test.
    pub fn spawn(exe: &str, dsn: &str, task: &str, slots: i32) -> Self {
        let child = Command::new(exe)
            .args([dsn, task, &slots.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning test_worker");
        WorkerProcess { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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
    }
}
