//! Occasions and greetings through the real gRPC client (`EngagementService`, scope
//! scheduler): the job's greetings on each customer's local day (29 February, UTC+14 and
//! UTC−11 at one instant, consent), once per customer, occasion and year with one birthday gift
//! and one bonus however many jobs run; claims under leases with concurrent workers, expiry,
//! stale acks, RETRY_LATER; paging of upcoming occasions; scopes and tenancy; and two real
//! `loyalty serve` processes on one database.

use loyalty_testkit as common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use common::cluster::ServerProcess;
use common::{EngagementClient, Merchant, Options, TestApp, violated_fields};
use loyalty::pb;
use loyalty::platform::clock::Clock;
use loyalty::{Scope, Store};
use tonic::Code;

/// A clock the test sets.
#[derive(Debug)]
struct TestClock(Mutex<DateTime<Utc>>);

impl TestClock {
    fn at(at: DateTime<Utc>) -> Arc<TestClock> {
        Arc::new(TestClock(Mutex::new(at)))
    }

    fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap() = at;
    }

    fn advance(&self, by: chrono::TimeDelta) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap()
    }
}

fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

/// A server whose clock the test holds, a merchant, its scheduler and pos keys.
struct Rig {
    app: TestApp,
    clock: Arc<TestClock>,
    merchant: Merchant,
    scheduler: String,
    pos: String,
}

async fn rig(at: DateTime<Utc>) -> Rig {
    let clock = TestClock::at(at);
    let app = TestApp::spawn_with(Options {
        clock: Some(clock.clone()),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let scheduler = app.key(&merchant, Scope::Scheduler).await;
    let pos = app.key(&merchant, Scope::Pos).await;
    Rig {
        app,
        clock,
        merchant,
        scheduler,
        pos,
    }
}

fn profile(
    external_id: &str,
    birthday: Option<(u32, u32)>,
    time_zone: &str,
    consent: bool,
) -> pb::EnrollCustomerRequest {
    pb::EnrollCustomerRequest {
        external_id: external_id.into(),
        display_name: format!("Member {external_id}"),
        birthday: birthday.map(|(month, day)| pb::Birthday {
            month,
            day,
            year: None,
        }),
        time_zone: time_zone.into(),
        email: format!("{external_id}@example.com"),
        phone: String::new(),
        marketing_consent: consent,
    }
}

async fn enroll(rig: &Rig, request: pb::EnrollCustomerRequest) {
    rig.app
        .member(&rig.pos)
        .await
        .enroll_customer(request)
        .await
        .expect("enrolled");
}

/// Birthdays only (no anniversaries: enrolment happens at the real now), with a reward.
fn birthdays(reward: Option<pb::BirthdayReward>) -> pb::OccasionSettings {
    pb::OccasionSettings {
        birthdays: true,
        anniversaries: false,
        holidays: vec![],
        birthday_reward: reward,
    }
}

async fn set_occasions(
    app: &TestApp,
    admin_key: &str,
    settings: pb::OccasionSettings,
) -> Result<pb::Program, tonic::Status> {
    let mut client = app.program(admin_key).await;
    let mut program = client
        .get_program(pb::GetProgramRequest {})
        .await?
        .into_inner()
        .program
        .unwrap();
    program.occasions = Some(settings);
    Ok(client
        .update_program(pb::UpdateProgramRequest {
            program: Some(program),
            expected_version: 0,
        })
        .await?
        .into_inner()
        .program
        .unwrap())
}

async fn create_gift(app: &TestApp, admin_key: &str, gift_id: &str) {
    app.program(admin_key)
        .await
        .create_gift(pb::CreateGiftRequest {
            gift: Some(pb::Gift {
                gift_id: gift_id.into(),
                name: "Birthday cake".into(),
                kind: pb::GiftKind::Item as i32,
                validity_days: 30,
                active: true,
                ..Default::default()
            }),
        })
        .await
        .expect("gift created");
}

async fn claim(client: &mut EngagementClient, limit: u32, lease_seconds: u32) -> Vec<pb::Greeting> {
    client
        .claim_greetings(pb::ClaimGreetingsRequest {
            limit,
            lease_seconds,
        })
        .await
        .expect("claimed")
        .into_inner()
        .greetings
}

fn ack(greeting: &pb::Greeting, outcome: pb::GreetingOutcome) -> pb::AckGreetingRequest {
    pb::AckGreetingRequest {
        greeting_id: greeting.greeting_id.clone(),
        outcome: outcome as i32,
        lease_token: greeting.lease_token.clone(),
    }
}

async fn count(app: &TestApp, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&app.pool).await.unwrap()
}

#[tokio::test]
async fn a_leapling_is_greeted_on_the_28th_of_february_of_a_common_year() {
    let rig = rig(utc(2027, 2, 28, 12, 0)).await;
    set_occasions(&rig.app, &rig.merchant.admin_key, birthdays(None))
        .await
        .unwrap();
    enroll(&rig, profile("leapling", Some((2, 29)), "UTC", true)).await;
    enroll(&rig, profile("march", Some((3, 1)), "UTC", true)).await;

    rig.app.greetings.run_due().await.unwrap();
    let mut engagement = rig.app.engagement(&rig.scheduler).await;
    let greetings = claim(&mut engagement, 10, 60).await;
    assert_eq!(greetings.len(), 1, "{greetings:?}");
    let greeting = &greetings[0];
    assert_eq!(greeting.external_id, "leapling");
    assert_eq!(greeting.local_date, "2027-02-28");
    let occasion = greeting.occasion.clone().unwrap();
    assert_eq!(occasion.kind, pb::OccasionKind::Birthday as i32);
    assert_eq!(occasion.name, "Birthday");
    assert_eq!(greeting.display_name, "Member leapling");
    assert_eq!(greeting.attempts, 0);
    engagement
        .ack_greeting(ack(greeting, pb::GreetingOutcome::Sent))
        .await
        .unwrap();

    // In a leap year the 28th is nobody's day here; the 29th is.
    rig.clock.set(utc(2028, 2, 28, 12, 0));
    rig.app.greetings.run_due().await.unwrap();
    assert!(claim(&mut engagement, 10, 60).await.is_empty());
    rig.clock.set(utc(2028, 2, 29, 12, 0));
    rig.app.greetings.run_due().await.unwrap();
    let next = claim(&mut engagement, 10, 60).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].local_date, "2028-02-29");
    rig.app.stop().await;
}

#[tokio::test]
async fn utc_plus_14_and_utc_minus_11_at_the_same_instant() {
    // 31 December 2027, 10:30 UTC: 1 January 2028 00:30 in Kiritimati, 30 December 23:30 in
    // Pago Pago.
    let rig = rig(utc(2027, 12, 31, 10, 30)).await;
    let new_year = pb::Holiday {
        id: "new-year".into(),
        name: "New Year".into(),
        date: Some(pb::HolidayDate {
            month: 1,
            day: 1,
            year: 0,
        }),
    };
    set_occasions(
        &rig.app,
        &rig.merchant.admin_key,
        pb::OccasionSettings {
            holidays: vec![new_year],
            ..birthdays(None)
        },
    )
    .await
    .unwrap();
    enroll(
        &rig,
        profile("east", Some((1, 1)), "Pacific/Kiritimati", true),
    )
    .await;
    enroll(
        &rig,
        profile("west", Some((1, 1)), "Pacific/Pago_Pago", true),
    )
    .await;

    rig.app.greetings.run_due().await.unwrap();
    let mut engagement = rig.app.engagement(&rig.scheduler).await;
    let first = claim(&mut engagement, 10, 60).await;
    let mut seen: Vec<(String, String, String)> = first
        .iter()
        .map(|g| {
            (
                g.external_id.clone(),
                g.occasion.clone().unwrap().name,
                g.local_date.clone(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("east".into(), "Birthday".into(), "2028-01-01".into()),
            ("east".into(), "New Year".into(), "2028-01-01".into()),
        ]
    );
    // The greeting's year is the local one: 2028, while UTC is still in 2027.
    let years: Vec<i32> = sqlx::query_scalar("SELECT year FROM greetings")
        .fetch_all(&rig.app.pool)
        .await
        .unwrap();
    assert_eq!(years, [2028, 2028]);
    for greeting in &first {
        engagement
            .ack_greeting(ack(greeting, pb::GreetingOutcome::Sent))
            .await
            .unwrap();
    }

    // 25 hours later it is New Year's Day in Pago Pago; Kiritimati is not greeted again.
    rig.clock.advance(chrono::TimeDelta::hours(25));
    rig.app.greetings.run_due().await.unwrap();
    let second = claim(&mut engagement, 10, 60).await;
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(second.iter().all(|g| g.external_id == "west"));
    assert_eq!(count(&rig.app, "SELECT count(*) FROM greetings").await, 4);
    rig.app.stop().await;
}

#[tokio::test]
async fn no_consent_no_greeting_and_channels_only_as_allowed() {
    let rig = rig(utc(2027, 6, 1, 12, 0)).await;
    set_occasions(&rig.app, &rig.merchant.admin_key, birthdays(None))
        .await
        .unwrap();
    enroll(&rig, profile("quiet", Some((6, 1)), "UTC", false)).await;
    let mut both = profile("both", Some((6, 1)), "UTC", true);
    both.phone = "+4915112345678".into();
    enroll(&rig, both).await;
    let mut no_address = profile("no-address", Some((6, 1)), "UTC", true);
    no_address.email = String::new();
    enroll(&rig, no_address).await;

    rig.app.greetings.run_due().await.unwrap();
    let mut engagement = rig.app.engagement(&rig.scheduler).await;
    let upcoming = engagement
        .list_upcoming_occasions(pb::ListUpcomingOccasionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        upcoming.occasions.iter().all(|o| o.external_id != "quiet"),
        "no consent, not listed"
    );
    let mut greetings = claim(&mut engagement, 10, 60).await;
    greetings.sort_by(|a, b| a.external_id.cmp(&b.external_id));
    let channels: Vec<(String, Vec<(i32, String)>)> = greetings
        .iter()
        .map(|g| {
            (
                g.external_id.clone(),
                g.channels
                    .iter()
                    .map(|c| (c.channel, c.address.clone()))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        channels,
        [
            (
                "both".to_string(),
                vec![
                    (pb::ContactChannel::Email as i32, "both@example.com".into()),
                    (pb::ContactChannel::Sms as i32, "+4915112345678".into()),
                ]
            ),
            ("no-address".to_string(), vec![]),
        ]
    );
    assert_eq!(
        count(&rig.app, "SELECT count(*) FROM greetings").await,
        2,
        "none for the customer without consent"
    );
    // Consent withdrawn after the greeting was made: handed out again without channels.
    enroll(&rig, profile("both", Some((6, 1)), "UTC", false)).await;
    rig.clock.advance(chrono::TimeDelta::seconds(61));
    let again = claim(&mut engagement, 10, 60).await;
    let both = again.iter().find(|g| g.external_id == "both").unwrap();
    assert!(both.channels.is_empty());
    rig.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_run_twice_and_at_once_make_one_greeting_one_gift_and_one_bonus() {
    let rig = rig(utc(2027, 7, 14, 9, 0)).await;
    create_gift(&rig.app, &rig.merchant.admin_key, "cake").await;
    set_occasions(
        &rig.app,
        &rig.merchant.admin_key,
        birthdays(Some(pb::BirthdayReward {
            gift_id: "cake".into(),
            bonus_points: 150,
        })),
    )
    .await
    .unwrap();
    const CUSTOMERS: usize = 30;
    for i in 0..CUSTOMERS {
        enroll(
            &rig,
            profile(&format!("c{i}"), Some((7, 14)), "Europe/Berlin", true),
        )
        .await;
    }
    // Three passes at once, then two more after them.
    let passes: Vec<_> = (0..3)
        .map(|_| {
            let greetings = rig.app.greetings.clone();
            tokio::spawn(async move { greetings.run_due().await })
        })
        .collect();
    let mut made = 0;
    for pass in passes {
        made += pass.await.unwrap().unwrap().greetings;
    }
    assert_eq!(made, CUSTOMERS as u64, "the passes together made each once");
    for _ in 0..2 {
        assert_eq!(rig.app.greetings.run_due().await.unwrap().greetings, 0);
    }
    let app = &rig.app;
    assert_eq!(
        count(app, "SELECT count(*) FROM greetings").await,
        CUSTOMERS as i64
    );
    assert_eq!(
        count(
            app,
            "SELECT count(*) FROM gift_grants WHERE source = 'birthday'"
        )
        .await,
        CUSTOMERS as i64
    );
    assert_eq!(
        count(
            app,
            "SELECT count(*) FROM ledger_entries WHERE kind = 'bonus'"
        )
        .await,
        CUSTOMERS as i64
    );
    assert_eq!(
        count(
            app,
            "SELECT count(*) FROM events WHERE kind = 'greeting_due'"
        )
        .await,
        CUSTOMERS as i64
    );
    // Each event carries the balance right after the bonus, and no contact data.
    let wrong: i64 = count(
        app,
        "SELECT count(*) FROM events e JOIN accounts a
            ON a.merchant_id = e.merchant_id AND a.customer_id = e.customer_id
          WHERE e.kind = 'greeting_due'
            AND (e.available <> 150 OR e.version <> a.version OR a.available <> 150
                 OR e.details::text LIKE '%@%' OR e.details->>'gift_id' <> 'cake')",
    )
    .await;
    assert_eq!(wrong, 0);
    app.assert_ledger_invariant().await;
    app.assert_lots_invariant().await;
    // The balance is read (cache or Postgres) with the bonus.
    let balance = app
        .member(&rig.pos)
        .await
        .get_balance(pb::GetBalanceRequest {
            external_id: "c7".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap();
    assert_eq!(balance.available, 150);
    // The greeting carries the gift's code and the bonus; the code is the customer's grant.
    let mut engagement = app.engagement(&rig.scheduler).await;
    let greetings = claim(&mut engagement, 100, 60).await;
    assert_eq!(greetings.len(), CUSTOMERS);
    assert!(
        greetings
            .iter()
            .all(|g| g.bonus_points == 150 && g.gift_code.len() == 21)
    );
    let codes: HashSet<&str> = greetings.iter().map(|g| g.gift_code.as_str()).collect();
    assert_eq!(codes.len(), CUSTOMERS);
    rig.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_workers_never_hold_one_greeting_at_once() {
    let rig = rig(utc(2027, 9, 1, 12, 0)).await;
    set_occasions(&rig.app, &rig.merchant.admin_key, birthdays(None))
        .await
        .unwrap();
    const CUSTOMERS: usize = 80;
    for i in 0..CUSTOMERS {
        enroll(&rig, profile(&format!("c{i}"), Some((9, 1)), "UTC", true)).await;
    }
    rig.app.greetings.run_due().await.unwrap();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let mut client = rig.app.engagement(&rig.scheduler).await;
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = claim(&mut client, 3, 600).await;
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|g| g.greeting_id));
            }
        }));
    }
    let mut all = Vec::new();
    let mut busy_workers = 0;
    for worker in workers {
        let mine = worker.await.unwrap();
        busy_workers += usize::from(!mine.is_empty());
        all.extend(mine);
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), CUSTOMERS, "every greeting handed out");
    assert_eq!(distinct.len(), CUSTOMERS, "none handed to two workers");
    assert!(busy_workers > 1, "the workers really ran side by side");
    rig.app.stop().await;
}

#[tokio::test]
async fn an_expired_lease_is_offered_again_and_the_stale_ack_changes_nothing() {
    let rig = rig(utc(2027, 10, 5, 8, 0)).await;
    set_occasions(&rig.app, &rig.merchant.admin_key, birthdays(None))
        .await
        .unwrap();
    enroll(&rig, profile("ada", Some((10, 5)), "UTC", true)).await;
    rig.app.greetings.run_due().await.unwrap();
    let mut engagement = rig.app.engagement(&rig.scheduler).await;
    let first = claim(&mut engagement, 10, 60).await.remove(0);
    // Leased: nobody else gets it until the lease ends.
    rig.clock.advance(chrono::TimeDelta::seconds(59));
    assert!(claim(&mut engagement, 10, 60).await.is_empty());
    rig.clock.advance(chrono::TimeDelta::seconds(2));
    let second = claim(&mut engagement, 10, 60).await.remove(0);
    assert_eq!(second.greeting_id, first.greeting_id);
    assert_ne!(second.lease_token, first.lease_token);
    assert_eq!(second.attempts, 1);

    // The first worker's late ack is refused and changes nothing.
    let stale = engagement
        .ack_greeting(ack(&first, pb::GreetingOutcome::Sent))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");
    let status: String = sqlx::query_scalar("SELECT status FROM greetings")
        .fetch_one(&rig.app.pool)
        .await
        .unwrap();
    assert_eq!(status, "leased");
    // The current holder's ack counts; its replay answers the same; it is never offered again.
    engagement
        .ack_greeting(ack(&second, pb::GreetingOutcome::Sent))
        .await
        .unwrap();
    engagement
        .ack_greeting(ack(&second, pb::GreetingOutcome::Sent))
        .await
        .expect("a replay of the same ack is OK");
    let other = engagement
        .ack_greeting(ack(&second, pb::GreetingOutcome::RetryLater))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition);
    rig.clock.advance(chrono::TimeDelta::days(1));
    assert!(claim(&mut engagement, 10, 60).await.is_empty());
    rig.app.stop().await;
}

#[tokio::test]
async fn retry_later_offers_the_greeting_again_after_a_back_off() {
    let rig = rig(utc(2027, 11, 11, 8, 0)).await;
    set_occasions(&rig.app, &rig.merchant.admin_key, birthdays(None))
        .await
        .unwrap();
    enroll(&rig, profile("bob", Some((11, 11)), "UTC", true)).await;
    rig.app.greetings.run_due().await.unwrap();
    let mut engagement = rig.app.engagement(&rig.scheduler).await;
    let first = claim(&mut engagement, 10, 300).await.remove(0);
    engagement
        .ack_greeting(ack(&first, pb::GreetingOutcome::RetryLater))
        .await
        .unwrap();
    // Not at once: after one minute (the first back-off).
    assert!(claim(&mut engagement, 10, 300).await.is_empty());
    rig.clock.advance(chrono::TimeDelta::seconds(59));
    assert!(claim(&mut engagement, 10, 300).await.is_empty());
    rig.clock.advance(chrono::TimeDelta::seconds(2));
    let again = claim(&mut engagement, 10, 300).await.remove(0);
    assert_eq!(again.greeting_id, first.greeting_id);
    assert_eq!(again.attempts, 1);
    // The ack of the earlier lease replays as OK; the new lease's ack is final.
    engagement
        .ack_greeting(ack(&first, pb::GreetingOutcome::RetryLater))
        .await
        .unwrap();
    engagement
        .ack_greeting(ack(&again, pb::GreetingOutcome::FailedPermanently))
        .await
        .unwrap();
    rig.clock.advance(chrono::TimeDelta::hours(7));
    assert!(claim(&mut engagement, 10, 300).await.is_empty());
    let status: String = sqlx::query_scalar("SELECT status FROM greetings")
        .fetch_one(&rig.app.pool)
        .await
        .unwrap();
    assert_eq!(status, "failed");
    rig.app.stop().await;
}

#[tokio::test]
async fn upcoming_occasions_come_soonest_first_in_pages() {
    let rig = rig(utc(2027, 3, 1, 12, 0)).await;
    set_occasions(&rig.app, &rig.merchant.admin_key, birthdays(None))
        .await
        .unwrap();
    // Seven birthdays over the next ten days, enrolled out of order; one outside the window.
    let days = [9, 3, 5, 1, 7, 2, 8];
    for (i, day) in days.iter().enumerate() {
        enroll(
            &rig,
            profile(&format!("c{i}"), Some((3, *day)), "UTC", true),
        )
        .await;
    }
    enroll(&rig, profile("later", Some((4, 20)), "UTC", true)).await;
    let mut engagement = rig.app.engagement(&rig.scheduler).await;
    let mut token = String::new();
    let mut dates = Vec::new();
    let mut pages = 0;
    loop {
        let page = engagement
            .list_upcoming_occasions(pb::ListUpcomingOccasionsRequest {
                from: None,
                days: 10,
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.occasions.len() <= 3);
        dates.extend(page.occasions.iter().map(|o| o.local_date.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        // Time moves on between pages; the listing keeps the window of its first page.
        rig.clock.advance(chrono::TimeDelta::days(1));
    }
    assert_eq!(pages, 3);
    assert_eq!(
        dates,
        [
            "2027-03-01",
            "2027-03-02",
            "2027-03-03",
            "2027-03-05",
            "2027-03-07",
            "2027-03-08",
            "2027-03-09"
        ]
    );
    let bad = engagement
        .list_upcoming_occasions(pb::ListUpcomingOccasionsRequest {
            days: 367,
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad), ["days", "page_token"]);
    // Nothing was made by listing.
    assert_eq!(count(&rig.app, "SELECT count(*) FROM greetings").await, 0);
    rig.app.stop().await;
}

#[tokio::test]
async fn scopes_validation_and_tenancy() {
    let rig = rig(utc(2027, 5, 5, 12, 0)).await;
    set_occasions(&rig.app, &rig.merchant.admin_key, birthdays(None))
        .await
        .unwrap();
    enroll(&rig, profile("ada", Some((5, 5)), "UTC", true)).await;
    rig.app.greetings.run_due().await.unwrap();

    let mut pos = rig.app.engagement(&rig.pos).await;
    let denied = [
        pos.claim_greetings(pb::ClaimGreetingsRequest::default())
            .await
            .unwrap_err(),
        pos.list_upcoming_occasions(pb::ListUpcomingOccasionsRequest::default())
            .await
            .unwrap_err(),
        pos.ack_greeting(pb::AckGreetingRequest::default())
            .await
            .unwrap_err(),
    ];
    assert!(
        denied.iter().all(|s| s.code() == Code::PermissionDenied),
        "{denied:?}"
    );
    let app_key = rig.app.key(&rig.merchant, Scope::App).await;
    let denied = rig
        .app
        .engagement(&app_key)
        .await
        .claim_greetings(pb::ClaimGreetingsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // Admins may.
    let mut admin = rig.app.engagement(&rig.merchant.admin_key).await;
    assert!(claim(&mut admin, 1, 1).await.len() == 1);
    rig.clock.advance(chrono::TimeDelta::seconds(2));

    let mut engagement = rig.app.engagement(&rig.scheduler).await;
    let bad = engagement
        .claim_greetings(pb::ClaimGreetingsRequest {
            limit: 501,
            lease_seconds: 3601,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&bad), ["limit", "lease_seconds"]);
    let bad = engagement
        .ack_greeting(pb::AckGreetingRequest {
            greeting_id: "x".into(),
            outcome: 0,
            lease_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&bad),
        ["greeting_id", "outcome", "lease_token"]
    );

    // Another merchant's scheduler cannot see or acknowledge this greeting.
    let greeting = claim(&mut engagement, 10, 60).await.remove(0);
    let other = rig.app.merchant().await;
    let other_scheduler = rig.app.key(&other, Scope::Scheduler).await;
    let mut theirs = rig.app.engagement(&other_scheduler).await;
    assert!(claim(&mut theirs, 10, 60).await.is_empty());
    let missing = theirs
        .ack_greeting(ack(&greeting, pb::GreetingOutcome::Sent))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let status: String = sqlx::query_scalar("SELECT status FROM greetings")
        .fetch_one(&rig.app.pool)
        .await
        .unwrap();
    assert_eq!(status, "leased", "the other merchant's ack changed nothing");
    // The event stream of the same service opens for the same key.
    engagement
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap();
    rig.app.stop().await;
}

#[tokio::test]
async fn occasion_settings_are_validated_and_read_back() {
    let rig = rig(utc(2027, 1, 10, 12, 0)).await;
    let admin = &rig.merchant.admin_key;
    let holiday = |id: &str, month, day, year| pb::Holiday {
        id: id.into(),
        name: "Day".into(),
        date: Some(pb::HolidayDate { month, day, year }),
    };
    let bad = set_occasions(
        &rig.app,
        admin,
        pb::OccasionSettings {
            holidays: vec![holiday("a", 2, 29, 2027), holiday("b", 13, 1, 0)],
            ..birthdays(None)
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        violated_fields(&bad),
        [
            "program.occasions.holidays[0].date.day",
            "program.occasions.holidays[1].date.month"
        ]
    );
    let bad = set_occasions(
        &rig.app,
        admin,
        birthdays(Some(pb::BirthdayReward {
            gift_id: "no-such-gift".into(),
            bonus_points: -5,
        })),
    )
    .await
    .unwrap_err();
    assert_eq!(
        violated_fields(&bad),
        ["program.occasions.birthday_reward.bonus_points"]
    );
    let bad = set_occasions(
        &rig.app,
        admin,
        birthdays(Some(pb::BirthdayReward {
            gift_id: "no-such-gift".into(),
            bonus_points: 5,
        })),
    )
    .await
    .unwrap_err();
    assert_eq!(
        violated_fields(&bad),
        ["program.occasions.birthday_reward.gift_id"]
    );
    create_gift(&rig.app, admin, "cake").await;
    let settings = pb::OccasionSettings {
        birthdays: true,
        anniversaries: true,
        holidays: vec![
            holiday("womens-day", 3, 8, 0),
            holiday("launch", 2, 29, 2028),
        ],
        birthday_reward: Some(pb::BirthdayReward {
            gift_id: "cake".into(),
            bonus_points: 50,
        }),
    };
    let written = set_occasions(&rig.app, admin, settings.clone())
        .await
        .unwrap();
    assert_eq!(written.occasions, Some(settings.clone()));
    let read = rig
        .app
        .program(admin)
        .await
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    assert_eq!(read.occasions, Some(settings));
    rig.app.stop().await;
}

/// Two real `loyalty serve` processes on one database, both running the greeting job every
/// 50 ms, and four workers (two on each) claiming and acknowledging: every greeting is made
/// once, handed to one worker once, and every birthday gift and bonus granted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_make_and_hand_out_every_greeting_once() {
    common::init_test_tracing();
    let db = common::TestDb::create().await;
    let pool = db.pool().await;
    let store = Store::from_pool(pool.clone());
    let (merchant, admin) = loyalty::create_merchant(&store, "Replicated", "EUR")
        .await
        .unwrap();
    let admin = admin.secret.expose().to_string();
    let key = |scope| {
        let store = store.clone();
        async move {
            loyalty::create_key(&store, merchant, scope)
                .await
                .unwrap()
                .secret
                .expose()
                .to_string()
        }
    };
    let scheduler = key(Scope::Scheduler).await;
    let pos = key(Scope::Pos).await;
    let prefix = format!("test:{}", db.name);
    let settings = [("LOYALTY_GREETING_INTERVAL_MS", "50")];
    let mut replicas = [
        ServerProcess::spawn_with(&db.url, &common::redis_url(), &prefix, &settings),
        ServerProcess::spawn_with(&db.url, &common::redis_url(), &prefix, &settings),
    ];
    for replica in &mut replicas {
        replica.wait_serving(Duration::from_secs(30)).await;
    }
    let channel = |i: usize| {
        tonic::transport::Endpoint::from_shared(replicas[i].endpoint())
            .unwrap()
            .connect_lazy()
    };
    let authed = |i: usize, key: &str| {
        tonic::service::interceptor::InterceptedService::new(channel(i), TestApp::bearer(key))
    };
    let mut program = pb::program_service_client::ProgramServiceClient::new(authed(0, &admin));
    program
        .create_gift(pb::CreateGiftRequest {
            gift: Some(pb::Gift {
                gift_id: "cake".into(),
                name: "Birthday cake".into(),
                kind: pb::GiftKind::Item as i32,
                validity_days: 30,
                active: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // Customers first, with greetings off, so that both jobs start on them at once.
    let mut current = program
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    current.occasions = Some(pb::OccasionSettings::default());
    program
        .update_program(pb::UpdateProgramRequest {
            program: Some(current.clone()),
            expected_version: 0,
        })
        .await
        .unwrap();
    let today = Utc::now().date_naive();
    const CUSTOMERS: usize = 60;
    let mut members = pb::member_service_client::MemberServiceClient::new(authed(1, &pos));
    for i in 0..CUSTOMERS {
        members
            .enroll_customer(profile(
                &format!("c{i}"),
                Some((today.month(), today.day())),
                "UTC",
                true,
            ))
            .await
            .unwrap();
    }
    let mut workers = Vec::new();
    for w in 0..4 {
        let mut client =
            pb::engagement_service_client::EngagementServiceClient::new(authed(w % 2, &scheduler));
        workers.push(tokio::spawn(async move {
            let mut handed = Vec::new();
            let mut idle = 0;
            while idle < 40 {
                let got = claim(&mut client, 4, 120).await;
                if got.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                idle = 0;
                for greeting in got {
                    client
                        .ack_greeting(ack(&greeting, pb::GreetingOutcome::Sent))
                        .await
                        .unwrap();
                    handed.push(greeting.greeting_id);
                }
            }
            handed
        }));
    }
    current.occasions = Some(pb::OccasionSettings {
        birthdays: true,
        birthday_reward: Some(pb::BirthdayReward {
            gift_id: "cake".into(),
            bonus_points: 25,
        }),
        ..Default::default()
    });
    program
        .update_program(pb::UpdateProgramRequest {
            program: Some(current),
            expected_version: 0,
        })
        .await
        .unwrap();
    let mut handed = Vec::new();
    for worker in workers {
        handed.extend(worker.await.unwrap());
    }
    let distinct: HashSet<&String> = handed.iter().collect();
    assert_eq!(
        distinct.len(),
        handed.len(),
        "a greeting was handed out twice"
    );
    assert_eq!(handed.len(), CUSTOMERS, "every greeting handed out once");
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM greetings").await,
        CUSTOMERS as i64
    );
    assert_eq!(
        count("SELECT count(*) FROM greetings WHERE status = 'sent' AND attempts = 1").await,
        CUSTOMERS as i64
    );
    assert_eq!(
        count("SELECT count(*) FROM gift_grants WHERE source = 'birthday'").await,
        CUSTOMERS as i64
    );
    assert_eq!(
        count("SELECT count(*) FROM ledger_entries WHERE kind = 'bonus'").await,
        CUSTOMERS as i64
    );
    assert_eq!(
        count("SELECT count(*) FROM events WHERE kind = 'greeting_due'").await,
        CUSTOMERS as i64
    );
    assert_eq!(
        count("SELECT count(*) FROM accounts WHERE available <> 25").await,
        0
    );
    for replica in &replicas {
        assert!(
            !replica.log().contains("panicked"),
            "{}",
            common::cluster::tail(&replica.log(), 40)
        );
    }
    drop(replicas);
    pool.close().await;
    db.drop_database().await;
}
