//! The proto conversion of a customer's standing (GetBalance and GetCustomer show it).

use chrono::{DateTime, Utc};

use crate::pb;
use crate::platform::proto::timestamp;
use crate::programs::grpc::metric_message;
use crate::status::rules::RepeatStatus;
use crate::status::standing::Standing;

pub fn status_message(status: RepeatStatus) -> pb::RepeatStatus {
    match status {
        RepeatStatus::New => pb::RepeatStatus::New,
        RepeatStatus::Returning => pb::RepeatStatus::Returning,
        RepeatStatus::Regular => pb::RepeatStatus::Regular,
        RepeatStatus::Loyal => pb::RepeatStatus::Loyal,
        RepeatStatus::AtRisk => pb::RepeatStatus::AtRisk,
        RepeatStatus::Lapsed => pb::RepeatStatus::Lapsed,
    }
}

/// The standing as seen at `now`: the hint's sentence and days left are made now.
/// Takes the standing by value: its strings move into the message (a cached read's hot path).
pub fn standing_message(standing: Standing, now: DateTime<Utc>) -> pb::CustomerStanding {
    let standing = standing.at(now);
    pb::CustomerStanding {
        status: status_message(standing.status) as i32,
        status_since: standing.status_since.map(timestamp),
        next_status: standing.hint.map(|hint| pb::NextStatusHint {
            sentence: hint.sentence(),
            target: status_message(hint.target) as i32,
            purchases_needed: hint.purchases_needed,
            deadline: hint.deadline.map(timestamp),
            within_days: hint.within_days,
            arrives_at: hint.arrives_at.map(timestamp),
        }),
        tier: standing.tier.map(|tier| pb::CustomerTier {
            id: tier.id,
            name: tier.name,
            perks: tier.perks,
            earn_multiplier_bp: tier.earn_multiplier_bp,
            since: Some(timestamp(tier.since)),
            downgrade_at: tier.downgrade_at.map(timestamp),
        }),
        tier_progress: standing.progress.map(|p| pb::TierProgress {
            next_tier_id: p.next_tier_id,
            next_tier_name: p.next_tier_name,
            metric: metric_message(p.metric) as i32,
            window_days: p.window_days,
            value: p.value,
            threshold: p.threshold,
            needed: p.needed,
        }),
        as_of: Some(timestamp(standing.as_of)),
    }
}
