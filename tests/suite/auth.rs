//! Tenancy and auth through the real gRPC client: keys, scopes, revocation, and merchants that
//! never see or change each other's data.

use loyalty_testkit as common;

use std::time::{Duration, Instant};

use common::{TestApp, purchase};
use loyalty::Scope;
use loyalty::pb;

use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_and_unknown_keys_are_unauthenticated() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let channel = app.channel().await;

    // No header at all.
    let mut bare = pb::member_service_client::MemberServiceClient::new(channel.clone());
    let status = bare
        .get_balance(pb::GetBalanceRequest {
            external_id: "x".into(),
            min_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    for header in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer lk_not-a-real-key",
        "lk_no_scheme",
    ] {
        let mut request = tonic::Request::new(pb::GetBalanceRequest {
            external_id: "x".into(),
            min_version: 0,
        });
        request
            .metadata_mut()
            .insert("authorization", header.parse().unwrap());
        let status = bare.get_balance(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{header}");
        assert!(
            !status.message().contains("lk_"),
            "the key must not be echoed: {}",
            status.message()
        );
    }

    // Health is public.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let _ = merchant;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_reaches_exactly_its_methods() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    // A customer with a purchase, so that reads succeed when allowed.
    app.checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();

    let keys = [
        (Scope::Pos, pos.clone()),
        (Scope::App, app.key(&merchant, Scope::App).await),
        (Scope::Scheduler, app.key(&merchant, Scope::Scheduler).await),
        (Scope::Admin, merchant.admin_key.clone()),
    ];
    for (scope, key) in keys {
        let mut checkout = app.checkout(&key).await;
        let mut member = app.member(&key).await;
        let mut program = app.program(&key).await;
        let record = checkout
            .record_purchase(purchase("card-1", &format!("r-{scope}"), 100))
            .await
            .map(|_| ())
            .map_err(|s| s.code());
        let quote = checkout
            .quote_purchase(pb::QuotePurchaseRequest {
                currency: "EUR".into(),
                total_minor: 100,
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code());
        let enroll = member
            .enroll_customer(pb::EnrollCustomerRequest {
                external_id: "card-9".into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code());
        let balance = member
            .get_balance(pb::GetBalanceRequest {
                external_id: "card-1".into(),
                min_version: 0,
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code());
        let customer = member
            .get_customer(pb::GetCustomerRequest {
                external_id: "card-1".into(),
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code());
        let ledger = member
            .list_ledger(pb::ListLedgerRequest {
                external_id: "card-1".into(),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code());
        let get_program = program
            .get_program(pb::GetProgramRequest {})
            .await
            .map(|_| ())
            .map_err(|s| s.code());

        let denied = Err(Code::PermissionDenied);
        let (can_checkout, can_enroll, can_read, can_admin) = match scope {
            Scope::Pos => (true, true, true, false),
            Scope::App => (false, false, true, false),
            Scope::Scheduler => (false, false, false, false),
            Scope::Admin => (true, true, true, true),
            Scope::Customer => unreachable!("not the scope of a key"),
        };
        let expect = |allowed: bool| if allowed { Ok(()) } else { denied };
        assert_eq!(record, expect(can_checkout), "{scope} RecordPurchase");
        assert_eq!(quote, expect(can_checkout), "{scope} QuotePurchase");
        assert_eq!(enroll, expect(can_enroll), "{scope} EnrollCustomer");
        assert_eq!(balance, expect(can_read), "{scope} GetBalance");
        assert_eq!(customer, expect(can_read), "{scope} GetCustomer");
        assert_eq!(ledger, expect(can_read), "{scope} ListLedger");
        assert_eq!(get_program, expect(can_admin), "{scope} GetProgram");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_within_the_key_cache_ttl() {
    let app = TestApp::spawn().await; // key cache TTL: 200 ms
    let merchant = app.merchant().await;
    let key = loyalty::create_key(&app.store, merchant.id, Scope::App)
        .await
        .unwrap();
    let mut member = app.member(key.secret.expose()).await;
    let call = |mut member: common::MemberClient| async move {
        member
            .get_balance(pb::GetBalanceRequest {
                external_id: "nobody".into(),
                min_version: 0,
            })
            .await
            .unwrap_err()
            .code()
    };
    assert_eq!(call(member.clone()).await, Code::NotFound);
    loyalty::revoke_key(&app.store, key.key_id).await.unwrap();
    let revoked_at = Instant::now();
    loop {
        let code = call(member.clone()).await;
        if code == Code::Unauthenticated {
            break;
        }
        assert_eq!(code, Code::NotFound);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "revocation not effective after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Still refused later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(call(member.clone()).await, Code::Unauthenticated);
    let _ = &mut member;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merchants_never_see_or_change_each_others_data() {
    let app = TestApp::spawn().await;
    let a = app.merchant().await;
    let b = app.merchant().await;
    let a_pos = app.key(&a, Scope::Pos).await;
    let b_pos = app.key(&b, Scope::Pos).await;
    let b_admin = b.admin_key.clone();

    let mut a_checkout = app.checkout(&a_pos).await;
    let a_receipt = a_checkout
        .record_purchase(purchase("card-1", "r-1", 5000))
        .await
        .unwrap()
        .into_inner();
    let mut a_member = app.member(&a_pos).await;
    a_member
        .enroll_customer(pb::EnrollCustomerRequest {
            external_id: "card-1".into(),
            display_name: "A's customer".into(),
            email: "a@example.com".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // Reads of A's customer with B's keys: NOT_FOUND, for every read RPC and every scope.
    for key in [&b_pos, &b_admin] {
        let mut b_member = app.member(key).await;
        let status = b_member
            .get_balance(pb::GetBalanceRequest {
                external_id: "card-1".into(),
                min_version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let status = b_member
            .get_customer(pb::GetCustomerRequest {
                external_id: "card-1".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        let status = b_member
            .list_ledger(pb::ListLedgerRequest {
                external_id: "card-1".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }

    // Writes by B with A's identifiers land in B's own namespace and leave A untouched: B's
    // "card-1" is a different customer, and B may use receipt id "r-1" too.
    let a_before = a_member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut b_checkout = app.checkout(&b_pos).await;
    let b_request = purchase("card-1", "r-1", 100);
    let b_receipt = b_checkout
        .record_purchase(b_request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b_receipt.points_earned, 1);
    assert_eq!(b_receipt.balance.unwrap().available, 1);
    // B replaying A's exact request is B's own retry, not A's purchase (the very same
    // request: `purchase` stamps the current second, and a retry that crossed into the next
    // one would be other content).
    let b_replay = b_checkout
        .record_purchase(b_request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b_replay.points_earned, 1);
    let mut b_member = app.member(&b_pos).await;
    b_member
        .enroll_customer(pb::EnrollCustomerRequest {
            external_id: "card-1".into(),
            display_name: "B's".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut b_program = app.program(&b_admin).await;
    let mut program = b_program
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner()
        .program
        .unwrap();
    program.earn_rate = Some(pb::EarnRate {
        points: 10,
        currency_units: 1,
    });
    b_program
        .update_program(pb::UpdateProgramRequest {
            program: Some(program),
            expected_version: 0,
        })
        .await
        .unwrap();

    let a_after = a_member
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a_after, a_before);
    assert_eq!(a_after.balance.unwrap().available, a_receipt.points_earned);
    let a_customer = a_member
        .get_customer(pb::GetCustomerRequest {
            external_id: "card-1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(a_customer.display_name, "A's customer");
    let a_program = app
        .program(&a.admin_key)
        .await
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a_program.program.unwrap().earn_rate.unwrap().points, 1);
    app.stop().await;
}

/// 300 distinct bogus keys from one address cost at most that address's budget of lookups,
/// repeats and malformed keys cost none, and a real key keeps working during the flood, from
/// the same address, whether its cache entry is fresh or has expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bogus_keys_costs_a_bounded_number_of_lookups() {
    const BUDGET: u32 = 10;
    let app = TestApp::spawn_with(common::Options {
        failed_auth_limit: loyalty::RateLimit {
            per_second: 1,
            burst: BUDGET,
        },
        ..Default::default()
    })
    .await;
    let merchant = app.merchant().await;
    let app_key = app.key(&merchant, Scope::App).await;
    let pos = app.key(&merchant, Scope::Pos).await;
    app.checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let mut real = app.member(&app_key).await;
    let balance = pb::GetBalanceRequest {
        external_id: "card-1".into(),
        min_version: 0,
    };
    real.get_balance(balance.clone()).await.unwrap();
    let lookups = |outcome| app.metrics.credential_lookup_count(outcome);
    let unknown_before = lookups("unknown");

    let started = Instant::now();
    let mut bare = pb::member_service_client::MemberServiceClient::new(app.channel().await);
    let mut exhausted = 0;
    for i in 0..300 {
        // Shaped like a real key: 43 base64url characters.
        let bogus = format!("lk_{i:0>43}");
        let mut request = tonic::Request::new(balance.clone());
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {bogus}").parse().unwrap());
        let status = bare.get_balance(request).await.unwrap_err();
        match status.code() {
            Code::Unauthenticated => {}
            Code::ResourceExhausted => {
                exhausted += 1;
                assert!(
                    status.message().contains("failed authentications"),
                    "{}",
                    status.message()
                );
            }
            other => panic!("unexpected {other:?}: {}", status.message()),
        }
        if i % 50 == 0 {
            // The real key works from the very address that floods.
            real.get_balance(balance.clone()).await.unwrap();
        }
    }
    // The same bogus key again, and keys not shaped like ours: no lookup at all.
    for header in [
        format!("Bearer lk_{:0>43}", 0),
        "Bearer lk_short".to_string(),
        format!("Bearer {}", "x".repeat(200)),
    ] {
        let mut request = tonic::Request::new(balance.clone());
        request
            .metadata_mut()
            .insert("authorization", header.parse().unwrap());
        bare.get_balance(request).await.unwrap_err();
    }
    let refills = started.elapsed().as_secs() + 1;
    let failed = lookups("unknown") - unknown_before;
    assert!(
        failed <= u64::from(BUDGET) + refills,
        "{failed} lookups for 300 bogus keys (budget {BUDGET} + {refills} refills)"
    );
    assert!(exhausted >= 250, "only {exhausted} refused for the budget");
    common::report(
        "10-failed-auth-flood",
        serde_json::json!({
            "bogus_keys": 300,
            "lookups": failed,
            "budget": BUDGET,
            "refused_without_lookup": exhausted,
            "real_key_calls_failed": 0,
            "seconds": started.elapsed().as_secs_f64(),
        }),
    );

    // After its cache entry expired, the real key is looked up again even though this address
    // has no budget left: it was verified before, so its lookup is not charged.
    tokio::time::sleep(Duration::from_millis(300)).await;
    real.get_balance(balance.clone()).await.unwrap();
    app.stop().await;
}
