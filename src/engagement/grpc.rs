//! The handlers of `EngagementService` and the proto conversions of events.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::events::Events;
use crate::events::rules::{Cursor, EventKind, Watch};
use crate::events::store::StoredEvent;
use crate::pb::{self, engagement_service_server::EngagementService};
use crate::platform::proto::{caller, timestamp};
use crate::points;

pub struct EngagementApi {
    pub events: Events,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EngagementService for EngagementApi {
    // ---- Greetings: land with the greetings feature (replaced at merge). ----
    async fn list_upcoming_occasions(
        &self,
        _request: Request<pb::ListUpcomingOccasionsRequest>,
    ) -> Result<Response<pb::ListUpcomingOccasionsResponse>, Status> {
        Err(Status::unimplemented(
            "greetings land with the greetings feature",
        ))
    }

    async fn claim_greetings(
        &self,
        _request: Request<pb::ClaimGreetingsRequest>,
    ) -> Result<Response<pb::ClaimGreetingsResponse>, Status> {
        Err(Status::unimplemented(
            "greetings land with the greetings feature",
        ))
    }

    async fn ack_greeting(
        &self,
        _request: Request<pb::AckGreetingRequest>,
    ) -> Result<Response<pb::AckGreetingResponse>, Status> {
        Err(Status::unimplemented(
            "greetings land with the greetings feature",
        ))
    }
    // ---- End of the greetings block. ----

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let kinds: Vec<Option<EventKind>> = r.types.iter().map(|t| event_kind(*t)).collect();
        let watch = Watch::parse(&r.after_cursor, &kinds)?;
        let feed = self.events.watch(&caller, watch).await?;
        let stream = ReceiverStream::new(feed).map(|item| match item {
            Ok(event) => Ok(pb::WatchEventsResponse {
                event: Some(event_message(&event)),
            }),
            Err(error) => Err(Status::from(error)),
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The kind of a proto event type; `None` for UNSPECIFIED or a number no type has.
fn event_kind(value: i32) -> Option<EventKind> {
    use pb::EventType as T;
    Some(match T::try_from(value).ok()? {
        T::Unspecified => return None,
        T::PurchaseRecorded => EventKind::PurchaseRecorded,
        T::PointsRedeemed => EventKind::PointsRedeemed,
        T::PointsReturned => EventKind::PointsReturned,
        T::PointsExpiring => EventKind::PointsExpiring,
        T::StatusChanged => EventKind::StatusChanged,
        T::TierChanged => EventKind::TierChanged,
        T::GiftIssued => EventKind::GiftIssued,
        T::GiftRedeemed => EventKind::GiftRedeemed,
        T::GreetingDue => EventKind::GreetingDue,
    })
}

fn event_type(kind: EventKind) -> pb::EventType {
    use pb::EventType as T;
    match kind {
        EventKind::PurchaseRecorded => T::PurchaseRecorded,
        EventKind::PointsRedeemed => T::PointsRedeemed,
        EventKind::PointsReturned => T::PointsReturned,
        EventKind::PointsExpiring => T::PointsExpiring,
        EventKind::StatusChanged => T::StatusChanged,
        EventKind::TierChanged => T::TierChanged,
        EventKind::GiftIssued => T::GiftIssued,
        EventKind::GiftRedeemed => T::GiftRedeemed,
        EventKind::GreetingDue => T::GreetingDue,
    }
}

pub fn event_message(event: &Arc<StoredEvent>) -> pb::Event {
    pb::Event {
        cursor: Cursor::encode(event.position),
        r#type: event_type(event.kind) as i32,
        external_id: event.external_id.clone(),
        occurred_at: Some(timestamp(event.occurred_at)),
        balance: event.balance.as_ref().map(points::balance_message),
        details_json: event.details.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_its_proto_type_and_back() {
        for kind in EventKind::ALL {
            assert_eq!(event_kind(event_type(kind) as i32), Some(kind));
        }
        assert_eq!(event_kind(0), None);
        assert_eq!(event_kind(99), None);
    }
}
