//! `EngagementService`: for the merchant's internal services (scope scheduler, and admin).
//! Greeting senders list upcoming occasions, claim due greetings under a lease and acknowledge
//! them (the greetings feature's use cases); event consumers follow `WatchEvents`.

mod grpc;

use crate::greetings::Greetings;
use crate::pb::engagement_service_server::{EngagementServiceServer, SERVICE_NAME};
use crate::platform::Parts;
use crate::platform::service::{Declaration, Method, SCHEDULER, Service};

pub const DECLARATION: Declaration = Declaration {
    name: SERVICE_NAME,
    methods: &[
        Method::unary("ListUpcomingOccasions", SCHEDULER),
        Method::unary("ClaimGreetings", SCHEDULER),
        Method::unary("AckGreeting", SCHEDULER),
        Method::streaming("WatchEvents", SCHEDULER),
    ],
};

/// `EngagementService`, ready to register.
pub fn service(parts: &Parts) -> Service {
    let api = grpc::EngagementApi {
        greetings: Greetings::new(parts),
    };
    Service::new(
        DECLARATION,
        EngagementServiceServer::new(api).max_decoding_message_size(parts.max_message_bytes),
    )
}
