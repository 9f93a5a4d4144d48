//! `EngagementService`: what the merchant's internal services call (greeting senders and event
//! consumers), scope scheduler (and admin). The service delegates to the use cases of the
//! features behind it: greetings (list upcoming occasions, claim due greetings under a lease,
//! acknowledge them) and events (`WatchEvents`).

mod grpc;

use crate::events::{Events, EventsConfig, Hub};
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

/// `EngagementService`, ready to register; its watchers share the process's reader `hub`.
pub fn service(parts: &Parts, hub: &Hub, events: &EventsConfig) -> Service {
    let api = grpc::EngagementApi {
        events: Events::new(parts, hub, events),
        greetings: Greetings::new(parts),
    };
    Service::new(
        DECLARATION,
        EngagementServiceServer::new(api).max_decoding_message_size(parts.max_message_bytes),
    )
}
