//! What every feature's gRPC handlers share: the caller the auth layer attached, and the
//! conversions of well-known proto types.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use tonic::{Request, Status};

use crate::error::Error;
use crate::platform::caller::Caller;

/// The caller the auth layer attached to the request.
pub fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer <api key>"))
}

pub fn datetime(field: &str, ts: &Timestamp) -> Result<DateTime<Utc>, Error> {
    u32::try_from(ts.nanos)
        .ok()
        .filter(|nanos| *nanos < 1_000_000_000)
        .and_then(|nanos| DateTime::from_timestamp(ts.seconds, nanos))
        .ok_or_else(|| Error::invalid(field, "is not a valid timestamp"))
}

pub fn optional_datetime(
    field: &str,
    ts: Option<&Timestamp>,
) -> Result<Option<DateTime<Utc>>, Error> {
    ts.map(|ts| datetime(field, ts)).transpose()
}

pub fn timestamp(at: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_out_of_range_are_invalid_arguments_not_panics() {
        for ts in [
            Timestamp {
                seconds: 0,
                nanos: -1,
            },
            Timestamp {
                seconds: 0,
                nanos: 1_000_000_000,
            },
            Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            },
            Timestamp {
                seconds: i64::MIN,
                nanos: 0,
            },
        ] {
            assert!(
                matches!(datetime("occurred_at", &ts), Err(Error::InvalidArgument(_))),
                "{ts:?}"
            );
        }
        let at = datetime(
            "t",
            &Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            },
        )
        .unwrap();
        assert_eq!(
            timestamp(at),
            Timestamp {
                seconds: 1_700_000_000,
                nanos: 5
            }
        );
    }
}
