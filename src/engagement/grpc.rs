//! The handlers of `EngagementService` and the proto conversions of greetings and events.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::events::Events;
use crate::events::rules::{Cursor, EventKind, Watch};
use crate::events::store::StoredEvent;
use crate::gifts::rules::GiftCode;
use crate::greetings::Greetings;
use crate::greetings::rules::{
    self, ClaimRequest, Occasion, OccasionKind, Occurrence, Outcome, UpcomingRequest,
};
use crate::greetings::store::ClaimedRow;
use crate::pb::{self, engagement_service_server::EngagementService};
use crate::platform::proto::{caller, datetime, timestamp};
use crate::points;

pub struct EngagementApi {
    pub events: Events,
    pub greetings: Greetings,
}

/// A greeting id as the service makes them: 32 lower-case hex digits.
fn greeting_id(value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid("greeting_id", "is required"));
    }
    if value.len() != 32
        || !value
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Error::invalid("greeting_id", "is not a greeting id"));
    }
    Ok(())
}

fn kind_message(kind: OccasionKind) -> pb::OccasionKind {
    match kind {
        OccasionKind::Birthday => pb::OccasionKind::Birthday,
        OccasionKind::Anniversary => pb::OccasionKind::EnrollmentAnniversary,
        OccasionKind::Holiday => pb::OccasionKind::Holiday,
    }
}

fn occasion_message(occurrence: &Occurrence) -> pb::Occasion {
    let occasion: &Occasion = &occurrence.occasion;
    pb::Occasion {
        kind: kind_message(occasion.kind()) as i32,
        holiday_id: occasion.holiday_id().to_string(),
        name: occasion.name().to_string(),
    }
}

fn greeting_message(row: ClaimedRow) -> pb::Greeting {
    let kind = match row.kind.as_str() {
        "birthday" => pb::OccasionKind::Birthday,
        "anniversary" => pb::OccasionKind::EnrollmentAnniversary,
        "holiday" => pb::OccasionKind::Holiday,
        _ => pb::OccasionKind::Unspecified,
    };
    let holiday_id = row
        .occasion
        .strip_prefix("holiday:")
        .unwrap_or_default()
        .to_string();
    let mut channels = Vec::new();
    // Only what the customer allowed: marketing consent (read now: withdrawn since the
    // greeting was made wins) and an address on file.
    if row.marketing_consent {
        if let Some(email) = row.email.filter(|e| !e.is_empty()) {
            channels.push(pb::ContactPoint {
                channel: pb::ContactChannel::Email as i32,
                address: email,
            });
        }
        if let Some(phone) = row.phone.filter(|p| !p.is_empty()) {
            channels.push(pb::ContactPoint {
                channel: pb::ContactChannel::Sms as i32,
                address: phone,
            });
        }
    }
    pb::Greeting {
        greeting_id: row.greeting_id,
        external_id: row.external_id,
        display_name: row.display_name,
        occasion: Some(pb::Occasion {
            kind: kind as i32,
            holiday_id,
            name: row.occasion_name,
        }),
        local_date: row.local_date.to_string(),
        channels,
        // As GiftGrant shows it (grouped for people); the till accepts either form.
        gift_code: row
            .gift_code
            .map(|code| GiftCode::from_stored(code).display())
            .unwrap_or_default(),
        bonus_points: row.bonus_points,
        attempts: u32::try_from(row.attempts.saturating_sub(1)).unwrap_or(0),
        lease_expires_at: Some(timestamp(row.lease_expires_at)),
        lease_token: row.lease_token,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EngagementService for EngagementApi {
    async fn list_upcoming_occasions(
        &self,
        request: Request<pb::ListUpcomingOccasionsRequest>,
    ) -> Result<Response<pb::ListUpcomingOccasionsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let from = r.from.as_ref().map(|ts| datetime("from", ts)).transpose()?;
        let parsed = UpcomingRequest::parse(
            from,
            r.days,
            r.page_size,
            &r.page_token,
            self.greetings.now(),
        )?;
        let page = self.greetings.list_upcoming(&caller, &parsed).await?;
        Ok(Response::new(pb::ListUpcomingOccasionsResponse {
            occasions: page
                .entries
                .into_iter()
                .map(|(entry, display_name)| pb::UpcomingOccasion {
                    occasion: Some(occasion_message(&entry.occurrence)),
                    local_date: entry.occurrence.date.to_string(),
                    starts_at: Some(timestamp(entry.cursor.starts_at)),
                    external_id: entry.cursor.external_id,
                    display_name,
                })
                .collect(),
            next_page_token: page
                .next
                .map(|token| rules::encode_token(&token))
                .unwrap_or_default(),
        }))
    }

    async fn claim_greetings(
        &self,
        request: Request<pb::ClaimGreetingsRequest>,
    ) -> Result<Response<pb::ClaimGreetingsResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let claim = ClaimRequest::parse(r.limit, r.lease_seconds)?;
        let claimed = self.greetings.claim(&caller, claim).await?;
        Ok(Response::new(pb::ClaimGreetingsResponse {
            greetings: claimed.into_iter().map(greeting_message).collect(),
        }))
    }

    async fn ack_greeting(
        &self,
        request: Request<pb::AckGreetingRequest>,
    ) -> Result<Response<pb::AckGreetingResponse>, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let mut violations = Vec::new();
        if let Err(Error::InvalidArgument(v)) = greeting_id(&r.greeting_id) {
            violations.extend(v);
        }
        let outcome = match pb::GreetingOutcome::try_from(r.outcome) {
            Ok(pb::GreetingOutcome::Sent) => Some(Outcome::Sent),
            Ok(pb::GreetingOutcome::FailedPermanently) => Some(Outcome::FailedPermanently),
            Ok(pb::GreetingOutcome::RetryLater) => Some(Outcome::RetryLater),
            Ok(pb::GreetingOutcome::Unspecified) | Err(_) => {
                violations.push(crate::platform::validation::Violation::new(
                    "outcome",
                    "must be SENT, FAILED_PERMANENTLY or RETRY_LATER",
                ));
                None
            }
        };
        if r.lease_token.is_empty() {
            violations.push(crate::platform::validation::Violation::new(
                "lease_token",
                "is required",
            ));
        } else if r.lease_token.len() > 64 {
            violations.push(crate::platform::validation::Violation::new(
                "lease_token",
                "is not a lease token",
            ));
        }
        let Some(outcome) = outcome.filter(|_| violations.is_empty()) else {
            return Err(Error::InvalidArgument(violations).into());
        };
        self.greetings
            .ack(&caller, &r.greeting_id, outcome, &r.lease_token)
            .await?;
        Ok(Response::new(pb::AckGreetingResponse {}))
    }

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
