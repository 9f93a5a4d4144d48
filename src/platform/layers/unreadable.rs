//! Answers to request messages tonic could not read, in the codes callers expect.

use tonic::Status;
use tonic::body::Body;

/// Rewrites tonic's answers to request messages it could not read into the codes callers
/// expect, keeping tonic's message:
/// * an oversized message (tonic: OUT_OF_RANGE) becomes RESOURCE_EXHAUSTED, the code the gRPC
///   specification gives it;
/// * a message that is not valid protobuf (tonic-prost: INTERNAL, which reads as a fault of
///   ours and would page someone) becomes INVALID_ARGUMENT: bad input is the caller's to fix.
///
/// Used as `tower::util::MapResponseLayer::new(unreadable_request_status)`.
pub fn unreadable_request_status(response: http::Response<Body>) -> http::Response<Body> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    match status.code() {
        tonic::Code::OutOfRange if status.message().contains("message length too large") => {
            Status::resource_exhausted(status.message().to_string()).into_http()
        }
        tonic::Code::Internal
            if status
                .message()
                .starts_with("failed to decode Protobuf message") =>
        {
            Status::invalid_argument(status.message().to_string()).into_http()
        }
        _ => response,
    }
}
