use std::fmt;

use tokio_postgres::error::SqlState;

/// What went wrong, coarsely: enough to decide whether to retry, reconnect or give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Postgres raised an error; [`Error::code`] has its SQLSTATE.
    Db,
    /// The connection could not be made, broke, or was closed.
    Connection,
    /// A value could not be converted to or from JSON.
    Serialization,
    /// The attempt is no longer the task's current attempt (it timed out, was lost or was
    /// cancelled), so its completion was refused and its transaction rolled back.
    Fenced,
    /// Invalid worker configuration or connection string.
    Config,
    /// A durable task suspended itself (a sleep or an event wait): its attempt ended and its
    /// slot is free; the handler must return (propagate this error with `?`). Not a failure.
    Suspended,
    /// A durable task's replay asked for a different step than its record has: the handler
    /// is not deterministic or its code changed under a task in flight. Fails the task.
    ReplayDiverged,
    /// Client and server disagreed about the shape of a message or a result (a type mismatch,
    /// an unexpected row count): a bug, not a condition to retry.
    Protocol,
}

enum Source {
    Postgres(tokio_postgres::Error),
    Json(serde_json::Error),
}

/// The error type of this crate.
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Source>,
}

impl Error {
    /// The SQLSTATE when Postgres raised the error.
    pub fn code(&self) -> Option<&SqlState> {
        match &self.source {
            Some(Source::Postgres(e)) => e.code(),
            _ => None,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The Postgres error behind this one, if any.
    pub fn as_postgres(&self) -> Option<&tokio_postgres::Error> {
        match &self.source {
            Some(Source::Postgres(e)) => Some(e),
            _ => None,
        }
    }

    pub(crate) fn postgres(context: impl Into<String>, error: tokio_postgres::Error) -> Self {
        Error {
            kind: classify(&error),
            context: context.into(),
            source: Some(Source::Postgres(error)),
        }
    }

    pub(crate) fn json(context: impl Into<String>, error: serde_json::Error) -> Self {
        Error {
            kind: ErrorKind::Serialization,
            context: context.into(),
            source: Some(Source::Json(error)),
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Config,
            context: message.into(),
            source: None,
        }
    }

    pub(crate) fn fenced(task_id: i64, attempt: i32) -> Self {
        Error {
            kind: ErrorKind::Fenced,
            context: format!(
                "attempt {attempt} of task {task_id} is no longer current (timed out, lost or \
                 cancelled); its transaction was rolled back"
            ),
            source: None,
        }
    }

    /// The attempt was told to stop (cancelled, timed out, lost) while it waited.
    pub(crate) fn attempt_stopped(task_id: i64, attempt: i32, while_doing: &str) -> Self {
        Error {
            kind: ErrorKind::Fenced,
            context: format!(
                "attempt {attempt} of task {task_id} was told to stop while {while_doing}"
            ),
            source: None,
        }
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Protocol,
            context: message.into(),
            source: None,
        }
    }

    pub(crate) fn suspended(task_id: i64, attempt: i32, until: &str) -> Self {
        Error {
            kind: ErrorKind::Suspended,
            context: format!("attempt {attempt} of task {task_id} suspended {until}"),
            source: None,
        }
    }

    pub(crate) fn replay_diverged(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::ReplayDiverged,
            context: message.into(),
            source: None,
        }
    }

    pub(crate) fn connection(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Connection,
            context: message.into(),
            source: None,
        }
    }

    /// Whether trying again later (on a new connection if need be) may succeed: the connection
    /// broke, the server is restarting or overloaded, or the transaction lost a race.
    pub(crate) fn is_transient(&self) -> bool {
        match self.kind {
            ErrorKind::Connection => true,
            ErrorKind::Db => self.code().is_some_and(is_transient_code),
            _ => false,
        }
    }

    pub(crate) fn has_code(&self, code: &SqlState) -> bool {
        self.code() == Some(code)
    }
}

/// SQLSTATE of "worker is not registered (stopped or unknown)": the worker must register again.
pub(crate) fn worker_not_registered() -> SqlState {
    SqlState::from_code("SL001")
}

fn is_transient_code(code: &SqlState) -> bool {
    let code = code.code();
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources (too many connections, out of memory)
        || matches!(
            code,
            "57P01" // admin_shutdown
                | "57P02" // crash_shutdown
                | "57P03" // cannot_connect_now (starting up / shutting down)
                | "57P05" // idle_session_timeout
                | "40001" // serialization_failure
                | "40P01" // deadlock_detected
                | "55P03" // lock_not_available
        )
}

fn classify(error: &tokio_postgres::Error) -> ErrorKind {
    if error.as_db_error().is_some() {
        return ErrorKind::Db;
    }
    if error.is_closed() {
        return ErrorKind::Connection;
    }
    let from_io = std::error::Error::source(error)
        .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some());
    if from_io {
        return ErrorKind::Connection;
    }
    // tokio-postgres keeps its error kinds private; these are the ones without an io cause
    // that still mean the connection is unusable.
    let text = error.to_string();
    if text.starts_with("timeout waiting for server")
        || text.starts_with("error connecting to server")
        || text.starts_with("error performing TLS handshake")
        || text.starts_with("authentication error")
    {
        return ErrorKind::Connection;
    }
    if text.starts_with("invalid connection string") || text.starts_with("invalid configuration") {
        return ErrorKind::Config;
    }
    ErrorKind::Protocol
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.context)?;
        match &self.source {
            Some(Source::Postgres(e)) => match e.as_db_error() {
                Some(db) => {
                    write!(f, ": {} (SQLSTATE {})", db.message(), db.code().code())?;
                    if let Some(detail) = db.detail() {
                        write!(f, "; detail: {detail}")?;
                    }
                    if let Some(hint) = db.hint() {
                        write!(f, "; hint: {hint}")?;
                    }
                    Ok(())
                }
                None => match std::error::Error::source(e) {
                    Some(cause) => write!(f, ": {e}: {cause}"),
                    None => write!(f, ": {e}"),
                },
            },
            Some(Source::Json(e)) => write!(f, ": {e}"),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Error");
        debug.field("kind", &self.kind);
        if let Some(code) = self.code() {
            debug.field("code", &code.code());
        }
        debug.field("message", &self.to_string()).finish()
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.source {
            Some(Source::Postgres(e)) => Some(e),
            Some(Source::Json(e)) => Some(e),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_codes() {
        for code in [
            "08006", "08001", "57P01", "57P03", "53300", "40001", "40P01",
        ] {
            assert!(is_transient_code(&SqlState::from_code(code)), "{code}");
        }
        for code in [
            "SL001", "42704", "22023", "22P02", "55000", "P0002", "23505",
        ] {
            assert!(!is_transient_code(&SqlState::from_code(code)), "{code}");
        }
    }

    #[test]
    fn kinds_without_postgres() {
        let fenced = Error::fenced(7, 2);
        assert_eq!(fenced.kind(), ErrorKind::Fenced);
        assert!(fenced.code().is_none());
        assert!(!fenced.is_transient());
        assert!(fenced.to_string().contains("attempt 2 of task 7"));

        let json = serde_json::from_str::<i32>("nope").unwrap_err();
        let error = Error::json("decoding", json);
        assert_eq!(error.kind(), ErrorKind::Serialization);
        assert!(error.to_string().starts_with("decoding: "));
        assert!(std::error::Error::source(&error).is_some());

        assert!(Error::connection("gone").is_transient());
        assert_eq!(Error::config("bad").kind(), ErrorKind::Config);
    }

    #[test]
    fn unparsable_connection_string_is_config() {
        let parse = "port=notanumber".parse::<tokio_postgres::Config>();
        let e = parse.expect_err("a non-numeric port must be rejected");
        let error = Error::postgres("parsing", e);
        assert_eq!(error.kind(), ErrorKind::Config);
        assert!(error.code().is_none());
    }

    #[test]
    fn sl001_is_custom_code() {
        assert_eq!(worker_not_registered().code(), "SL001");
    }
}
