use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A typed task: its name in `sluice.task_definition` and the JSON shapes of its input and
/// output.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use sluice_client::TaskDefinition;
///
/// #[derive(Serialize, Deserialize)]
/// struct Resize { url: String, width: u32 }
///
/// struct ResizeImage;
/// impl TaskDefinition for ResizeImage {
///     const NAME: &'static str = "resize_image";
///     type Input = Resize;
///     type Output = String;
/// }
/// ```
pub trait TaskDefinition: Send + Sync + 'static {
    const NAME: &'static str;
    type Input: Serialize + DeserializeOwned + Send + 'static;
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// The name used on the wire; [`NAME`](TaskDefinition::NAME) unless overridden, e.g. to
    /// add a per-environment prefix chosen at run time.
    fn name() -> &'static str {
        Self::NAME
    }
}

/// Why a handler gave up on an attempt, and whether another attempt may succeed.
///
/// Any `std::error::Error` converts into a retryable `TaskError`, so `?` works in handlers.
/// (This is also why `TaskError` itself does not implement `std::error::Error`.)
#[derive(Clone, PartialEq, Eq)]
pub struct TaskError {
    message: String,
    retryable: bool,
}

impl TaskError {
    /// A failure that is retried per the task's `retries` and backoff.
    pub fn retryable(msg: impl Into<String>) -> Self {
        TaskError {
            message: msg.into(),
            retryable: true,
        }
    }

    /// A failure that fails the task at once, whatever retries remain.
    pub fn fatal(msg: impl Into<String>) -> Self {
        TaskError {
            message: msg.into(),
            retryable: false,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn is_retryable(&self) -> bool {
        self.retryable
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(error: E) -> Self {
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // Our own Error already folds its Postgres cause into its message.
            if !message.contains(&cause_text) {
                message.push_str(": ");
                message.push_str(&cause_text);
            }
            source = cause.source();
        }
        // A diverged replay fails the task: another attempt would diverge the same way.
        let diverged = (&error as &dyn std::any::Any)
            .downcast_ref::<crate::Error>()
            .is_some_and(|e| e.kind() == crate::ErrorKind::ReplayDiverged);
        if diverged {
            TaskError::fatal(message)
        } else {
            TaskError::retryable(message)
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskError")
            .field("message", &self.message)
            .field("retryable", &self.retryable)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors() {
        let e = TaskError::retryable("try later");
        assert!(e.is_retryable());
        assert_eq!(e.message(), "try later");
        let e = TaskError::fatal(String::from("bad input"));
        assert!(!e.is_retryable());
        assert_eq!(e.to_string(), "bad input");
    }

    #[test]
    fn std_errors_convert_to_retryable_with_causes() {
        fn parse(s: &str) -> Result<i32, TaskError> {
            Ok(s.parse::<i32>()?)
        }
        let e = parse("x").unwrap_err();
        assert!(e.is_retryable());
        assert!(e.message().contains("invalid digit"), "{}", e.message());

        let io = std::io::Error::other("disk on fire");
        let e: TaskError = io.into();
        assert_eq!(e.message(), "disk on fire");
    }
}
