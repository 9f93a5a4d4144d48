//! The one error type of the service, and the single place where it becomes a `tonic::Status`.
//!
//! The store maps database failures into it (`platform::store::db_error`), rules return
//! [`Invalid`] (pure, no gRPC) which becomes `InvalidArgument` here, and handlers only ever `?`
//! it.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::platform::validation::{Invalid, Violation};
use crate::telemetry::throttle::LogThrottle;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A fault that repeats on every request must not flood the log.
static INTERNAL_ERRORS: LogThrottle = LogThrottle::per_minute(60);

/// At most this many field violations are sent back (the message still counts them all).
pub const MAX_REPORTED_VIOLATIONS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input. Always carries at least one violation naming the field.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<Violation>),
    /// The thing does not exist for this merchant (another merchant's data is also "not found").
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A client key was reused with different content.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the system is not in a state to accept it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A debit of more points than the customer has available. Becomes FAILED_PRECONDITION
    /// with a `google.rpc.PreconditionFailure` detail that states the available points.
    #[error("not enough points: {requested} requested, {available} available")]
    InsufficientPoints { requested: i64, available: i64 },
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("{0}")]
    PermissionDenied(String),
    /// A rate limit or a capacity bound was hit; `retry_after` hints when to try again.
    #[error("{message}")]
    ResourceExhausted {
        message: String,
        retry_after: Option<Duration>,
    },
    /// A position past what is kept (an event cursor older than the retention).
    #[error("{0}")]
    OutOfRange(String),
    /// A dependency that we cannot work without (Postgres) is unreachable.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else. The source is logged, never shown to the client.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// A single-field validation error.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![Violation::new(field, description)])
    }

    pub fn internal(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Error::Internal(source.into())
    }

    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) | Error::InsufficientPoints { .. } => {
                Code::FailedPrecondition
            }
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::ResourceExhausted { .. } => Code::ResourceExhausted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<Invalid> for Error {
    fn from(invalid: Invalid) -> Error {
        Error::InvalidArgument(invalid.0)
    }
}

/// Lets handlers `?` a rule's verdict straight into their `Status`.
impl From<Invalid> for Status {
    fn from(invalid: Invalid) -> Status {
        Error::from(invalid).into()
    }
}

fn describe(violations: &[Violation]) -> String {
    match violations {
        [] => "request".to_string(),
        [only] => format!("{}: {}", only.field, only.description),
        [first, rest @ ..] => format!(
            "{}: {} (and {} more)",
            first.field,
            first.description,
            rest.len()
        ),
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        match error {
            Error::InvalidArgument(violations) => {
                let message = format!("invalid {}", describe(&violations));
                // Details travel in a response header; a 500-line receipt with every line
                // wrong must not produce a header larger than HTTP/2 allows.
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .take(MAX_REPORTED_VIOLATIONS)
                        .map(|v| FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            Error::ResourceExhausted {
                message,
                retry_after,
            } => match retry_after {
                Some(delay) => Status::with_error_details(
                    Code::ResourceExhausted,
                    message,
                    ErrorDetails::with_retry_info(Some(delay)),
                ),
                None => Status::resource_exhausted(message),
            },
            Error::InsufficientPoints {
                requested,
                available,
            } => Status::with_error_details(
                Code::FailedPrecondition,
                format!("not enough points: {requested} requested, {available} available"),
                ErrorDetails::with_precondition_failure_violation(
                    "points",
                    "available",
                    format!("{available} points are available"),
                ),
            ),
            Error::Internal(source) => {
                if let Some(suppressed) = INTERNAL_ERRORS.admit() {
                    tracing::error!(error = %source, suppressed, "internal error");
                }
                Status::internal("internal error")
            }
            other => Status::new(other.code(), other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field_in_message_and_details() {
        let status: Status = Error::InvalidArgument(vec![
            Violation::new("lines[3].amount_minor", "must not be negative"),
            Violation::new("currency", "unknown ISO 4217 code"),
        ])
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("lines[3].amount_minor"),
            "{}",
            status.message()
        );
        let bad_request = status
            .get_details_bad_request()
            .expect("bad request details");
        let fields: Vec<_> = bad_request
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, ["lines[3].amount_minor", "currency"]);
    }

    #[test]
    fn the_details_of_many_violations_stay_small() {
        let violations = (0..500)
            .map(|i| Violation::new(format!("lines[{i}].sku"), "must not be empty"))
            .collect();
        let status: Status = Error::InvalidArgument(violations).into();
        assert!(
            status.message().contains("(and 499 more)"),
            "{}",
            status.message()
        );
        let details = status.get_details_bad_request().expect("details");
        assert_eq!(details.field_violations.len(), MAX_REPORTED_VIOLATIONS);
        assert!(status.details().len() < 4096);
    }

    #[test]
    fn insufficient_points_state_what_is_available() {
        let status: Status = Error::InsufficientPoints {
            requested: 10,
            available: 3,
        }
        .into();
        assert_eq!(status.code(), Code::FailedPrecondition);
        let failure = status.get_details_precondition_failure().expect("details");
        assert_eq!(failure.violations[0].subject, "available");
        assert_eq!(failure.violations[0].description, "3 points are available");
    }

    #[test]
    fn internal_errors_hide_their_source() {
        let status: Status =
            Error::internal("duplicate key value violates unique constraint \"x\"").into();
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
