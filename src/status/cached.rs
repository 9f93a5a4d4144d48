//! The standing as the Redis cache keeps it: a compact binary form (protobuf, with instants as
//! microseconds), read on every cached GetBalance. The JSON of `accounts.standing` stays the
//! stored form; this one exists because parsing that JSON (and its RFC 3339 instants) on each
//! cached read cost the server a measurable share of its CPU per read (BENCHMARKS.md).
//!
//! The first byte is the format's version, so an encoded standing is never empty ("" is how
//! the cache says "no standing") and a later format can tell old entries apart.

use chrono::{DateTime, Utc};
use prost::Message;

use crate::status::rules::{HintRoute, NextStatusHint, RepeatStatus};
use crate::status::standing::{Standing, TierView};
use crate::tiers::rules::{TierMetric, TierProgress};

const VERSION: u8 = 1;

#[derive(Clone, PartialEq, Message)]
struct CachedStanding {
    #[prost(uint32, tag = "1")]
    status: u32,
    #[prost(int64, optional, tag = "2")]
    status_since: Option<i64>,
    #[prost(message, optional, tag = "3")]
    hint: Option<CachedHint>,
    #[prost(message, optional, tag = "4")]
    tier: Option<CachedTier>,
    #[prost(message, optional, tag = "5")]
    progress: Option<CachedProgress>,
    #[prost(int64, tag = "6")]
    as_of: i64,
}

#[derive(Clone, PartialEq, Message)]
struct CachedHint {
    #[prost(uint32, tag = "1")]
    target: u32,
    #[prost(uint32, tag = "2")]
    route: u32,
    #[prost(uint32, tag = "3")]
    purchases_needed: u32,
    #[prost(int64, optional, tag = "4")]
    deadline: Option<i64>,
    #[prost(uint32, optional, tag = "5")]
    within_days: Option<u32>,
    #[prost(int64, optional, tag = "6")]
    arrives_at: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct CachedTier {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    name: String,
    #[prost(string, repeated, tag = "3")]
    perks: Vec<String>,
    #[prost(uint32, tag = "4")]
    earn_multiplier_bp: u32,
    #[prost(int64, tag = "5")]
    since: i64,
    #[prost(int64, optional, tag = "6")]
    downgrade_at: Option<i64>,
}

#[derive(Clone, PartialEq, Message)]
struct CachedProgress {
    #[prost(string, tag = "1")]
    next_tier_id: String,
    #[prost(string, tag = "2")]
    next_tier_name: String,
    #[prost(uint32, tag = "3")]
    metric: u32,
    #[prost(uint32, tag = "4")]
    window_days: u32,
    #[prost(int64, tag = "5")]
    value: i64,
    #[prost(int64, tag = "6")]
    threshold: i64,
    #[prost(int64, tag = "7")]
    needed: i64,
}

// The codes of the enums are part of the cached format: each value keeps its number for good
// (a new value takes a new one). Matches, so that a new value cannot be left without one.
fn status_code(status: RepeatStatus) -> u32 {
    match status {
        RepeatStatus::New => 0,
        RepeatStatus::Returning => 1,
        RepeatStatus::Regular => 2,
        RepeatStatus::Loyal => 3,
        RepeatStatus::AtRisk => 4,
        RepeatStatus::Lapsed => 5,
    }
}

fn status_of(code: u32) -> Option<RepeatStatus> {
    Some(match code {
        0 => RepeatStatus::New,
        1 => RepeatStatus::Returning,
        2 => RepeatStatus::Regular,
        3 => RepeatStatus::Loyal,
        4 => RepeatStatus::AtRisk,
        5 => RepeatStatus::Lapsed,
        _ => return None,
    })
}

fn route_code(route: HintRoute) -> u32 {
    match route {
        HintRoute::MorePurchases => 0,
        HintRoute::PurchasesInWindow => 1,
        HintRoute::StayRegular => 2,
        HintRoute::ComeBack => 3,
    }
}

fn route_of(code: u32) -> Option<HintRoute> {
    Some(match code {
        0 => HintRoute::MorePurchases,
        1 => HintRoute::PurchasesInWindow,
        2 => HintRoute::StayRegular,
        3 => HintRoute::ComeBack,
        _ => return None,
    })
}

fn metric_code(metric: TierMetric) -> u32 {
    match metric {
        TierMetric::Spend => 0,
        TierMetric::Visits => 1,
        TierMetric::PointsEarned => 2,
    }
}

fn metric_of(code: u32) -> Option<TierMetric> {
    Some(match code {
        0 => TierMetric::Spend,
        1 => TierMetric::Visits,
        2 => TierMetric::PointsEarned,
        _ => return None,
    })
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

fn instant(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// An instant that may be absent: `Some(None)` for none, `None` when unreadable.
fn optional_instant(micros: Option<i64>) -> Option<Option<DateTime<Utc>>> {
    match micros {
        None => Some(None),
        Some(m) => instant(m).map(Some),
    }
}

/// The cached form of `standing` (never empty).
pub fn encode(standing: &Standing) -> Vec<u8> {
    let cached = CachedStanding {
        status: status_code(standing.status),
        status_since: standing.status_since.map(micros),
        hint: standing.hint.map(|h| CachedHint {
            target: status_code(h.target),
            route: route_code(h.route),
            purchases_needed: h.purchases_needed,
            deadline: h.deadline.map(micros),
            within_days: h.within_days,
            arrives_at: h.arrives_at.map(micros),
        }),
        tier: standing.tier.as_ref().map(|t| CachedTier {
            id: t.id.clone(),
            name: t.name.clone(),
            perks: t.perks.clone(),
            earn_multiplier_bp: t.earn_multiplier_bp,
            since: micros(t.since),
            downgrade_at: t.downgrade_at.map(micros),
        }),
        progress: standing.progress.as_ref().map(|p| CachedProgress {
            next_tier_id: p.next_tier_id.clone(),
            next_tier_name: p.next_tier_name.clone(),
            metric: metric_code(p.metric),
            window_days: p.window_days,
            value: p.value,
            threshold: p.threshold,
            needed: p.needed,
        }),
        as_of: micros(standing.as_of),
    };
    let mut bytes = Vec::with_capacity(1 + cached.encoded_len());
    bytes.push(VERSION);
    cached
        .encode(&mut bytes)
        .expect("a Vec grows to any length");
    bytes
}

/// The standing of a cached form; `None` for anything `encode` did not write (another
/// version, garbage), which the cache treats as a miss.
pub fn decode(bytes: &[u8]) -> Option<Standing> {
    let (&VERSION, body) = bytes.split_first()? else {
        return None;
    };
    let cached = CachedStanding::decode(body).ok()?;
    let hint = match cached.hint {
        None => None,
        Some(h) => Some(NextStatusHint {
            target: status_of(h.target)?,
            route: route_of(h.route)?,
            purchases_needed: h.purchases_needed,
            deadline: optional_instant(h.deadline)?,
            within_days: h.within_days,
            arrives_at: optional_instant(h.arrives_at)?,
        }),
    };
    let tier = match cached.tier {
        None => None,
        Some(t) => Some(TierView {
            since: instant(t.since)?,
            downgrade_at: optional_instant(t.downgrade_at)?,
            id: t.id,
            name: t.name,
            perks: t.perks,
            earn_multiplier_bp: t.earn_multiplier_bp,
        }),
    };
    let progress = match cached.progress {
        None => None,
        Some(p) => Some(TierProgress {
            metric: metric_of(p.metric)?,
            next_tier_id: p.next_tier_id,
            next_tier_name: p.next_tier_name,
            window_days: p.window_days,
            value: p.value,
            threshold: p.threshold,
            needed: p.needed,
        }),
    };
    Some(Standing {
        status: status_of(cached.status)?,
        status_since: optional_instant(cached.status_since)?,
        hint,
        tier,
        progress,
        as_of: instant(cached.as_of)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(micros: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(micros).unwrap()
    }

    fn full() -> Standing {
        Standing {
            status: RepeatStatus::Regular,
            status_since: Some(at(1_767_225_600_123_456)),
            hint: Some(NextStatusHint {
                target: RepeatStatus::Loyal,
                route: HintRoute::StayRegular,
                purchases_needed: 6,
                deadline: Some(at(1_770_000_000_000_001)),
                within_days: Some(120),
                arrives_at: Some(at(1_780_000_000_000_000)),
            }),
            tier: Some(TierView {
                id: "silver".into(),
                name: "Silver".into(),
                perks: vec!["Free delivery".into(), "Try at home".into()],
                earn_multiplier_bp: 12_500,
                since: at(1_760_000_000_000_000),
                downgrade_at: Some(at(1_790_000_000_000_000)),
            }),
            progress: Some(TierProgress {
                next_tier_id: "gold".into(),
                next_tier_name: "Gold".into(),
                metric: TierMetric::PointsEarned,
                window_days: 365,
                value: 42_000,
                threshold: 100_000,
                needed: 58_000,
            }),
            as_of: at(1_767_300_000_000_000),
        }
    }

    #[test]
    fn every_standing_reads_back_as_it_was_written() {
        let mut cases = vec![full()];
        for status in RepeatStatus::ALL {
            for route in ROUTES {
                let mut s = full();
                s.status = status;
                s.hint.as_mut().unwrap().target = status;
                s.hint.as_mut().unwrap().route = route;
                cases.push(s);
            }
        }
        for metric in METRICS {
            let mut s = full();
            s.progress.as_mut().unwrap().metric = metric;
            cases.push(s);
        }
        // Everything optional absent: a new customer of a program without tiers.
        cases.push(Standing {
            status: RepeatStatus::New,
            status_since: None,
            hint: None,
            tier: None,
            progress: None,
            as_of: at(0),
        });
        let mut partial = full();
        partial.hint.as_mut().unwrap().deadline = None;
        partial.hint.as_mut().unwrap().within_days = None;
        partial.tier.as_mut().unwrap().downgrade_at = None;
        partial.tier.as_mut().unwrap().perks.clear();
        cases.push(partial);
        for standing in cases {
            let bytes = encode(&standing);
            assert_eq!(bytes[0], VERSION, "never empty, versioned");
            assert_eq!(decode(&bytes), Some(standing));
        }
    }

    const ROUTES: [HintRoute; 4] = [
        HintRoute::MorePurchases,
        HintRoute::PurchasesInWindow,
        HintRoute::StayRegular,
        HintRoute::ComeBack,
    ];
    const METRICS: [TierMetric; 3] = [
        TierMetric::Spend,
        TierMetric::Visits,
        TierMetric::PointsEarned,
    ];

    #[test]
    fn every_value_has_a_code_of_its_own_that_reads_back() {
        for status in RepeatStatus::ALL {
            assert_eq!(status_of(status_code(status)), Some(status));
        }
        for route in ROUTES {
            assert_eq!(route_of(route_code(route)), Some(route));
        }
        for metric in METRICS {
            assert_eq!(metric_of(metric_code(metric)), Some(metric));
        }
        assert_eq!(
            (status_of(6), route_of(4), metric_of(3)),
            (None, None, None)
        );
    }

    #[test]
    fn anything_else_is_unreadable_not_a_wrong_standing() {
        let bytes = encode(&full());
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&bytes[1..]), None, "no version byte");
        let mut other_version = bytes.clone();
        other_version[0] = VERSION + 1;
        assert_eq!(decode(&other_version), None);
        assert_eq!(decode(&bytes[..bytes.len() - 3]), None, "truncated");
        assert_eq!(decode(b"{\"status\":\"regular\"}"), None, "the stored JSON");
        // A status code no variant has.
        let mut unknown = CachedStanding::decode(&bytes[1..]).unwrap();
        unknown.status = 99;
        let mut with_version = vec![VERSION];
        unknown.encode(&mut with_version).unwrap();
        assert_eq!(decode(&with_version), None);
    }

    #[test]
    fn the_cached_form_is_smaller_than_the_stored_json() {
        let standing = full();
        let json = serde_json::to_vec(&standing).unwrap();
        let bytes = encode(&standing);
        assert!(
            bytes.len() * 2 < json.len(),
            "{} vs {}",
            bytes.len(),
            json.len()
        );
    }
}
