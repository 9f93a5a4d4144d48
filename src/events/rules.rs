//! The pure rules of the event stream: the event kinds, the cursor a watcher resumes from,
//! what a watch asks for, and the details each kind carries. No I/O.
//!
//! The details are built here (not in each writer) so that every writer of one kind writes
//! the same fields; README ("Following events (WatchEvents)") lists them per kind.

use serde_json::{Value, json};

use crate::platform::validation::{Invalid, Violation, Violations};

/// What happened. The strings are the `events.kind` values (the table's CHECK lists them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    PurchaseRecorded,
    PointsRedeemed,
    PointsReturned,
    PointsExpiring,
    StatusChanged,
    TierChanged,
    GiftIssued,
    GiftRedeemed,
    GreetingDue,
}

impl EventKind {
    pub const ALL: [EventKind; 9] = [
        EventKind::PurchaseRecorded,
        EventKind::PointsRedeemed,
        EventKind::PointsReturned,
        EventKind::PointsExpiring,
        EventKind::StatusChanged,
        EventKind::TierChanged,
        EventKind::GiftIssued,
        EventKind::GiftRedeemed,
        EventKind::GreetingDue,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::PurchaseRecorded => "purchase_recorded",
            EventKind::PointsRedeemed => "points_redeemed",
            EventKind::PointsReturned => "points_returned",
            EventKind::PointsExpiring => "points_expiring",
            EventKind::StatusChanged => "status_changed",
            EventKind::TierChanged => "tier_changed",
            EventKind::GiftIssued => "gift_issued",
            EventKind::GiftRedeemed => "gift_redeemed",
            EventKind::GreetingDue => "greeting_due",
        }
    }

    pub fn parse(kind: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == kind)
    }
}

/// Where a watch starts: after a position of the stream, or at the oldest retained event.
/// The cursor a client sees is the position in decimal; clients treat it as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// Empty `after_cursor`: from the oldest event still retained.
    Oldest,
    /// After this position.
    After(i64),
}

/// Longest cursor accepted (an i64 has 19 digits).
const MAX_CURSOR_CHARS: usize = 19;

impl Cursor {
    pub fn parse(field: &str, value: &str) -> Result<Cursor, Violation> {
        if value.is_empty() {
            return Ok(Cursor::Oldest);
        }
        let bad = || {
            Violation::new(
                field,
                "is not a cursor of this stream: pass an Event.cursor as it was received, or \
                 empty to start from the oldest retained event",
            )
        };
        if value.len() > MAX_CURSOR_CHARS || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        match value.parse::<i64>() {
            Ok(position) if position > 0 => Ok(Cursor::After(position)),
            _ => Err(bad()),
        }
    }

    /// The text of the cursor of the event at `position`.
    pub fn encode(position: i64) -> String {
        position.to_string()
    }
}

/// What a watcher asks for: the kinds it wants (`None`: all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub after: Cursor,
    pub kinds: Option<Vec<EventKind>>,
}

impl Watch {
    /// `kinds` as the request sent them (`None` for an unspecified or unknown value, with its
    /// index for the field path); an empty list means every kind.
    pub fn parse(after_cursor: &str, kinds: &[Option<EventKind>]) -> Result<Watch, Invalid> {
        let mut v = Violations::default();
        let after = v.check(Cursor::parse("after_cursor", after_cursor));
        let mut wanted = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            match kind {
                Some(kind) if !wanted.contains(kind) => wanted.push(*kind),
                Some(_) => {}
                None => v.add(
                    format!("types[{i}]"),
                    "must be a known event type (not UNSPECIFIED)",
                ),
            }
        }
        v.finish()?;
        Ok(Watch {
            after: after.unwrap_or(Cursor::Oldest),
            kinds: if wanted.is_empty() {
                None
            } else {
                Some(wanted)
            },
        })
    }

    /// Whether an event of `kind` is one this watcher wants.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.kinds.as_ref().is_none_or(|k| k.contains(&kind))
    }

    /// The kinds as the store filters them (`None`: all).
    pub fn kind_names(&self) -> Option<Vec<String>> {
        self.kinds
            .as_ref()
            .map(|k| k.iter().map(|k| k.as_str().to_string()).collect())
    }
}

/// The message of OUT_OF_RANGE: the events after the cursor are (partly) pruned.
pub fn pruned_message(cursor: i64, pruned_through: i64) -> String {
    format!(
        "after_cursor {cursor} is older than the retention: events up to {pruned_through} are \
         pruned, so resuming would skip some; restart with an empty after_cursor (the oldest \
         retained event) and resynchronise what you keep"
    )
}

/// The event a points movement writes with its account change (`points::store::lifecycle::
/// write_account`): its kind and details.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub kind: EventKind,
    pub details: Value,
}

impl NewEvent {
    /// RedeemPoints: `{"redemption_id", "points", "discount_minor"}`.
    pub fn points_redeemed(redemption_id: &str, points: i64, discount_minor: i64) -> NewEvent {
        NewEvent {
            kind: EventKind::PointsRedeemed,
            details: json!({
                "redemption_id": redemption_id,
                "points": points,
                "discount_minor": discount_minor,
            }),
        }
    }

    /// CommitReservation: `{"reservation_id", "points", "discount_minor"}`.
    pub fn reservation_committed(
        reservation_id: &str,
        points: i64,
        discount_minor: i64,
    ) -> NewEvent {
        NewEvent {
            kind: EventKind::PointsRedeemed,
            details: json!({
                "reservation_id": reservation_id,
                "points": points,
                "discount_minor": discount_minor,
            }),
        }
    }

    /// ReturnPurchase: `{"purchase_id", "return_id", "returned_minor", "points",
    /// "points_written_off", "points_refunded"}` (`points`: taken back from the balance).
    pub fn points_returned(
        purchase_id: &str,
        return_id: &str,
        returned_minor: i64,
        clawed_back: i64,
        written_off: i64,
        refunded: i64,
    ) -> NewEvent {
        NewEvent {
            kind: EventKind::PointsReturned,
            details: json!({
                "purchase_id": purchase_id,
                "return_id": return_id,
                "returned_minor": returned_minor,
                "points": clawed_back,
                "points_written_off": written_off,
                "points_refunded": refunded,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EventKind::parse("purchase"), None);
    }

    #[test]
    fn cursors_are_positive_positions_or_empty() {
        assert_eq!(Cursor::parse("c", ""), Ok(Cursor::Oldest));
        assert_eq!(Cursor::parse("c", "42"), Ok(Cursor::After(42)));
        assert_eq!(Cursor::parse("c", &Cursor::encode(7)), Ok(Cursor::After(7)));
        for bad in [
            "0",
            "-1",
            "+1",
            " 1",
            "1.0",
            "abc",
            "9223372036854775808",
            "99999999999999999999",
            "٣",
        ] {
            let err = Cursor::parse("after_cursor", bad).unwrap_err();
            assert_eq!(err.field, "after_cursor", "{bad}");
        }
        assert_eq!(
            Cursor::parse("c", "9223372036854775807"),
            Ok(Cursor::After(i64::MAX))
        );
    }

    #[test]
    fn a_watch_names_every_bad_field() {
        let err = Watch::parse("x", &[Some(EventKind::GiftIssued), None]).unwrap_err();
        let fields: Vec<_> = err.0.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["after_cursor", "types[1]"]);
    }

    #[test]
    fn no_types_means_every_type_and_repeats_are_one() {
        let all = Watch::parse("", &[]).unwrap();
        assert!(EventKind::ALL.iter().all(|k| all.wants(*k)));
        assert_eq!(all.kind_names(), None);
        let some = Watch::parse(
            "5",
            &[Some(EventKind::GiftIssued), Some(EventKind::GiftIssued)],
        )
        .unwrap();
        assert_eq!(some.after, Cursor::After(5));
        assert!(some.wants(EventKind::GiftIssued));
        assert!(!some.wants(EventKind::PurchaseRecorded));
        assert_eq!(some.kind_names(), Some(vec!["gift_issued".to_string()]));
    }

    #[test]
    fn details_carry_the_documented_fields() {
        let e = NewEvent::points_redeemed("r-1", 300, 300);
        assert_eq!(e.kind, EventKind::PointsRedeemed);
        assert_eq!(
            e.details,
            json!({"redemption_id": "r-1", "points": 300, "discount_minor": 300})
        );
        let e = NewEvent::points_returned("p-1", "ret-1", 500, 40, 2, 10);
        assert_eq!(e.details["points"], 40);
        assert_eq!(e.details["return_id"], "ret-1");
    }

    #[test]
    fn the_pruned_message_says_how_to_restart() {
        let m = pruned_message(3, 10);
        assert!(m.contains("empty after_cursor"), "{m}");
    }
}
