//! The Redis cache: warm reads without Postgres, versioned writes that never go backwards,
//! and a service that keeps working (and recovers by itself) when Redis is away.

use loyalty_testkit as common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{Options, TestApp, purchase};
use loyalty::AccountState;
use loyalty::Scope;
use loyalty::pb;
use loyalty::{CacheRead, CacheWrite};

async fn balance(
    member: &mut common::MemberClient,
    external_id: &str,
    min_version: i64,
) -> pb::GetBalanceResponse {
    member
        .get_balance(pb::GetBalanceRequest {
            external_id: external_id.into(),
            min_version,
        })
        .await
        .unwrap()
        .into_inner()
}

/// The available points `GetBalance` shows, with no `min_version`.
async fn available(member: &mut common::MemberClient, external_id: &str) -> i64 {
    balance(member, external_id, 0)
        .await
        .balance
        .unwrap()
        .available
}

async fn raw_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(common::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_balance_read_needs_no_database() {
    let db_proxy = Proxy::start(common::socket_addr_of(&common::admin_database_url())).await;
    let app = TestApp::spawn_with(Options {
        database_via: Some(db_proxy.addr),
        key_cache_ttl: Duration::from_secs(30),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    app.checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 4200))
        .await
        .unwrap();
    let mut member = app.member(&pos).await;
    assert_eq!(available(&mut member, "card-1").await, 42);

    db_proxy.cut().await;
    let hits = app.metrics.cache_op_count("get", "hit");
    let read = balance(&mut member, "card-1", 0).await;
    assert_eq!(read.balance.unwrap().available, 42);
    assert_eq!(read.purchase_count, 1);
    assert_eq!(app.metrics.cache_op_count("get", "hit"), hits + 1);
    // Without Postgres, what is not cached fails fast and says so.
    let status = member
        .get_customer(pb::GetCustomerRequest {
            external_id: "card-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    db_proxy.restore();
    app.stop().await;
}

/// A copy cached without the standing (written before standings existed, or by a writer
/// that had none) is completed by the next read from Postgres: the reads after it need no
/// database, instead of each finding the copy, refusing it and reading Postgres again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cached_without_a_standing_is_completed_once_then_served() {
    let db_proxy = Proxy::start(common::socket_addr_of(&common::admin_database_url())).await;
    let app = TestApp::spawn_with(Options {
        database_via: Some(db_proxy.addr),
        key_cache_ttl: Duration::from_secs(30),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let recorded = app
        .checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 4200))
        .await
        .unwrap()
        .into_inner();
    let committed = recorded.balance.unwrap();
    // What an older server left in Redis: the same version, no standing.
    let old_copy = AccountState {
        available: committed.available,
        pending: committed.pending,
        lifetime_earned: committed.lifetime_earned,
        lifetime_redeemed: committed.lifetime_redeemed,
        purchase_count: recorded.purchase_count,
        version: committed.version,
        next_expiry: None,
        standing: None,
    };
    let mut raw = raw_redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{}*card-1*", merchant.id.0))
        .query_async(&mut raw)
        .await
        .unwrap();
    for key in &keys {
        let _: () = redis::cmd("HDEL")
            .arg(key)
            .arg("st")
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    assert!(!keys.is_empty(), "the purchase cached its account");
    assert!(matches!(
        app.cache.get(merchant.id, "card-1").await,
        CacheRead::Miss
    ));
    // A writer without a standing cannot complete it either (nothing to add) ...
    app.cache.put(merchant.id, "card-1", &old_copy).await;
    // ... and one that wrote a version of its own left the field empty: a copy the cache
    // holds, which a balance read cannot be answered from.
    for key in &keys {
        let _: () = redis::cmd("HSET")
            .arg(key)
            .arg("st")
            .arg("")
            .query_async(&mut raw)
            .await
            .unwrap();
    }
    assert!(matches!(
        app.cache.get(merchant.id, "card-1").await,
        CacheRead::Hit(AccountState { standing: None, .. })
    ));

    let mut member = app.member(&pos).await;
    let partial = app.metrics.cache_op_count("get", "partial");
    let first = balance(&mut member, "card-1", 0).await;
    assert!(first.standing.is_some());
    // That read found a copy without a standing and went to Postgres: not counted as a hit.
    assert_eq!(app.metrics.cache_op_count("get", "partial"), partial + 1);
    db_proxy.cut().await;
    let hits = app.metrics.cache_op_count("get", "hit");
    for _ in 0..3 {
        let read = balance(&mut member, "card-1", 0).await;
        assert_eq!(read.balance.unwrap(), committed);
        assert_eq!(read.standing, first.standing);
    }
    assert_eq!(app.metrics.cache_op_count("get", "hit"), hits + 3);
    db_proxy.restore();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cache_write_never_overwrites_a_newer_one() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let first = checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap()
        .into_inner();
    let second = checkout
        .record_purchase(purchase("card-1", "r-2", 1000))
        .await
        .unwrap()
        .into_inner();
    let newer = second.balance.unwrap();
    let older = first.balance.unwrap();
    assert!(newer.version > older.version);

    // A slow reader that loaded version 1 from Postgres tries to publish it now.
    let cache = &app.cache;
    let stale = AccountState {
        available: older.available,
        pending: older.pending,
        lifetime_earned: older.lifetime_earned,
        lifetime_redeemed: older.lifetime_redeemed,
        purchase_count: first.purchase_count,
        version: older.version,
        next_expiry: None,
        standing: None,
    };
    assert_eq!(
        cache.put(merchant.id, "card-1", &stale).await,
        CacheWrite::RejectedOlder
    );
    match cache.get(merchant.id, "card-1").await {
        CacheRead::Hit(state) => assert_eq!((state.version, state.available), (newer.version, 20)),
        other => panic!("expected a hit, got {other:?}"),
    }
    let mut member = app.member(&pos).await;
    assert_eq!(
        balance(&mut member, "card-1", 0).await.balance.unwrap(),
        newer
    );

    // Concurrent writers of interleaved versions: the highest version always wins.
    let writers = (1..=40).map(|version| {
        let cache = cache.clone();
        let id = merchant.id;
        tokio::spawn(async move {
            let state = AccountState {
                available: version * 10,
                version: 100 + version,
                ..AccountState::default()
            };
            cache.put(id, "card-2", &state).await
        })
    });
    futures::future::join_all(writers).await;
    match cache.get(merchant.id, "card-2").await {
        CacheRead::Hit(state) => assert_eq!((state.version, state.available), (140, 400)),
        other => panic!("expected a hit, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_skips_an_older_cached_copy() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let receipt = app
        .checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap()
        .into_inner();
    let version = receipt.balance.unwrap().version;

    // Simulate a copy left behind by a replica whose cache write failed: overwrite the entry
    // behind the script's back with an older version.
    let key = app
        .cache
        .key_of(merchant.id, "card-1")
        .await
        .expect("redis in use");
    let mut redis = raw_redis().await;
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            "v", "0", "a", "0", "p", "0", "le", "0", "lr", "0", "pc", "0",
        ])
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut member = app.member(&pos).await;
    assert_eq!(
        balance(&mut member, "card-1", 0)
            .await
            .balance
            .unwrap()
            .version,
        0
    );
    let fresh = balance(&mut member, "card-1", version).await;
    assert_eq!(fresh.balance.unwrap().version, version);
    assert_eq!(fresh.balance.unwrap().available, 10);
    // The Postgres read repaired the cache for everyone.
    assert_eq!(
        balance(&mut member, "card-1", 0)
            .await
            .balance
            .unwrap()
            .version,
        version
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_works_with_redis_on_a_dead_port() {
    let app = TestApp::spawn_with(Options {
        redis_url: Some("redis://127.0.0.1:1".into()),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let mut member = app.member(&pos).await;
    for i in 0..5 {
        let receipt = checkout
            .record_purchase(purchase("card-1", &format!("r-{i}"), 1000))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(receipt.balance.unwrap().available, 10 * (i + 1));
        assert_eq!(available(&mut member, "card-1").await, 10 * (i + 1));
    }
    member
        .enroll_customer(pb::EnrollCustomerRequest {
            external_id: "card-2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    member
        .get_customer(pb::GetCustomerRequest {
            external_id: "card-2".into(),
        })
        .await
        .unwrap();
    member
        .list_ledger(pb::ListLedgerRequest {
            external_id: "card-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    checkout
        .quote_purchase(pb::QuotePurchaseRequest {
            currency: "EUR".into(),
            total_minor: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut program = app.program(&merchant.admin_key).await;
    program.get_program(pb::GetProgramRequest {}).await.unwrap();

    // The fallbacks are counted.
    let metrics = app.metrics_text().await;
    let failures = common::metric_value(
        &metrics,
        "loyalty_cache_operations_total",
        &[("outcome", "error")],
    ) + common::metric_value(
        &metrics,
        "loyalty_cache_operations_total",
        &[("outcome", "skipped")],
    );
    assert!(failures >= 5.0, "cache failures not counted:\n{metrics}");
    app.stop().await;
}

/// Redis goes away mid-use (the proxy cuts every connection) and comes back: no RPC fails,
/// reads never show a balance older than the writes acknowledged meanwhile, and afterwards the
/// cache holds the committed state again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_recovers_by_itself_and_never_serves_a_stale_balance() {
    let redis_proxy = Proxy::start(common::socket_addr_of(&common::redis_url())).await;
    let app = TestApp::spawn_with(Options {
        redis_url: Some(format!("redis://{}", redis_proxy.addr)),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let mut member = app.member(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    assert_eq!(available(&mut member, "card-1").await, 10);

    // Redis unreachable: the write commits, its cache update fails, and the old copy (10
    // points) is still in Redis. Reads must not serve it.
    redis_proxy.cut().await;
    let receipt = checkout
        .record_purchase(purchase("card-1", "r-2", 1000))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.balance.unwrap().available, 20);
    for _ in 0..5 {
        assert_eq!(available(&mut member, "card-1").await, 20);
    }

    // Redis reachable again: even before the repair, reads stay correct; soon the cache holds
    // the committed state and serves hits again.
    redis_proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(available(&mut member, "card-1").await, 20);
        if let CacheRead::Hit(state) = app.cache.get(merchant.id, "card-1").await
            && state.available == 20
        {
            break;
        }
        assert!(Instant::now() < deadline, "cache did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hits = app.metrics.cache_op_count("get", "hit");
    assert_eq!(available(&mut member, "card-1").await, 20);
    assert!(app.metrics.cache_op_count("get", "hit") > hits);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_runs_with_the_cache_disabled() {
    let app = TestApp::spawn_with(Options {
        redis_url: None,
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    app.checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let mut member = app.member(&pos).await;
    assert_eq!(available(&mut member, "card-1").await, 10);
    assert!(!app.cache.is_enabled());
    app.stop().await;
}

/// A cache write that fails after its commit is noted in Postgres, so another replica repairs
/// the entry even when the replica that saw the failure is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_repairs_what_a_dead_one_could_not_write() {
    let redis_proxy = Proxy::start(common::socket_addr_of(&common::redis_url())).await;
    let mut first = TestApp::spawn_with(Options {
        redis_url: Some(format!("redis://{}", redis_proxy.addr)),
        ..Options::default()
    })
    .await;
    let merchant = first.merchant().await;
    let pos = first.key(&merchant, Scope::Pos).await;
    let mut checkout = first.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();

    // The first replica loses Redis, acknowledges a purchase it could not publish (Redis
    // still holds the balance before it), and goes away before Redis is back.
    redis_proxy.cut().await;
    let acknowledged = checkout
        .record_purchase(purchase("card-1", "r-2", 1000))
        .await
        .unwrap()
        .into_inner()
        .balance
        .unwrap();
    let noted: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_repairs")
        .fetch_one(&first.pool)
        .await
        .unwrap();
    assert_eq!(noted, 1);
    first.shutdown_server().await;

    // Another replica on the same database and Redis repairs the entry by itself.
    let second = TestApp::spawn_with(Options {
        database_url: Some(first.db.url.clone()),
        key_prefix: Some(first.key_prefix.clone()),
        ..Options::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let CacheRead::Hit(state) = second.cache.get(merchant.id, "card-1").await
            && state.version == acknowledged.version
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stale entry was not repaired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = balance(&mut second.member(&pos).await, "card-1", 0).await;
    assert_eq!(shown.balance.unwrap(), acknowledged);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_repairs")
        .fetch_one(&first.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
    second.stop().await;
    first.stop().await;
}

/// A till retries when it did not hear the answer, e.g. because the server died between the
/// commit and the cache update. The retry publishes the customer's current state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_purchase_publishes_the_current_state() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let second = purchase("card-1", "r-2", 1000);
    checkout.record_purchase(second.clone()).await.unwrap();

    // Redis still holds version 1, as if the server had died before publishing version 2.
    let key = app
        .cache
        .key_of(merchant.id, "card-1")
        .await
        .expect("redis in use");
    let mut redis = raw_redis().await;
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            "v", "1", "a", "10", "p", "0", "le", "10", "lr", "0", "pc", "1",
        ])
        .query_async(&mut redis)
        .await
        .unwrap();
    checkout.record_purchase(second.clone()).await.unwrap();
    match app.cache.get(merchant.id, "card-1").await {
        CacheRead::Hit(state) => assert_eq!((state.version, state.available), (2, 20)),
        other => panic!("{other:?}"),
    }

    // Into an empty slot a replay puts the current state, not the one in its old receipt.
    checkout
        .record_purchase(purchase("card-1", "r-3", 1000))
        .await
        .unwrap();
    app.cache.evict(merchant.id, "card-1").await.unwrap();
    let replayed = checkout.record_purchase(second).await.unwrap().into_inner();
    assert_eq!(replayed.balance.unwrap().version, 2);
    match app.cache.get(merchant.id, "card-1").await {
        CacheRead::Hit(state) => assert_eq!((state.version, state.available), (3, 30)),
        other => panic!("{other:?}"),
    }
    app.stop().await;
}

/// A till that gives up (its deadline passes, or it hangs up) while the server is still
/// writing the cache after the commit must not leave a stale entry that nobody knows about:
/// the cache update runs to its end even though the request was abandoned, and its failure is
/// noted, so a replica repairs the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_request_still_finishes_its_cache_update() {
    let first = TestApp::spawn().await;
    let merchant = first.merchant().await;
    let pos = first.key(&merchant, Scope::Pos).await;
    first
        .checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let mut member = first.member(&pos).await;
    assert_eq!(available(&mut member, "card-1").await, 10);

    // A second replica on the same database, whose Redis freezes (SIGSTOP) once the replica
    // has checked its connection: its cache write after the commit hangs for the cache
    // timeout (1 s), well past the till's deadline (300 ms).
    let mut frozen = tokio::task::block_in_place(common::cluster::PrivateRedis::launch);
    let second = TestApp::spawn_with(Options {
        database_url: Some(first.db.url.clone()),
        redis_url: Some(frozen.url()),
        cache_timeout: Duration::from_secs(1),
        ..Options::default()
    })
    .await;
    second
        .member(&pos)
        .await
        .get_balance(pb::GetBalanceRequest {
            external_id: "card-1".into(),
            min_version: 0,
        })
        .await
        .unwrap();
    assert!(second.cache.key_of(merchant.id, "card-1").await.is_some());
    frozen.pause();
    let mut request = tonic::Request::new(purchase("card-1", "r-2", 1000));
    request.set_timeout(Duration::from_millis(300));
    let abandoned = second
        .checkout(&pos)
        .await
        .record_purchase(request)
        .await
        .unwrap_err();
    // tonic's client reports its own timeout as CANCELLED; the server's as DEADLINE_EXCEEDED.
    assert!(
        matches!(
            abandoned.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{abandoned:?}"
    );
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM purchases WHERE purchase_id = 'r-2'")
            .fetch_one(&first.pool)
            .await
            .unwrap();
    assert_eq!(stored, 1, "the purchase committed before the cache write");

    // The first replica shows the committed balance once the noted repair is done, without
    // any retry by the till.
    let deadline = Instant::now() + Duration::from_secs(5);
    while available(&mut member, "card-1").await != 20 {
        assert!(
            Instant::now() < deadline,
            "the cache kept the balance from before the abandoned purchase"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    frozen.resume();
    second.stop().await;
    tokio::task::block_in_place(|| frozen.stop());
    first.stop().await;
}

/// The outside run's finding: a purchase whose deadline passed while it waited on a row lock
/// still committed once the lock was free, but nothing published it, and GetBalance served
/// the old balance for the whole cache TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_that_commits_after_its_deadline_still_reaches_the_cache() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let mut member = app.member(&pos).await;
    assert_eq!(available(&mut member, "card-1").await, 10, "cached");

    // Another transaction holds the customer's account row.
    let holder = app.hold_account("card-1").await;
    let mut request = tonic::Request::new(purchase("card-1", "r-2", 1000));
    request.set_timeout(Duration::from_millis(300));
    let abandoned = checkout.record_purchase(request).await.unwrap_err();
    assert!(
        matches!(
            abandoned.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{abandoned:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.commit().await.unwrap();

    // The purchase commits once the lock is free, and the cache shows it within a second.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM purchases WHERE purchase_id = 'r-2'")
                .fetch_one(&app.pool)
                .await
                .unwrap();
        if stored == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "r-2 never committed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    while available(&mut member, "card-1").await != 20 {
        assert!(
            Instant::now() < deadline,
            "GetBalance still serves the balance from before the committed purchase"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
}

/// The outside run's finding: after Redis came back from an older snapshot (as after a
/// failover to a lagging replica), reads returned the older balances it had kept, for as long
/// as those entries lived. Entries written to another Redis server, or to this one before it
/// restarted, are never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_an_older_snapshot_never_serves_what_it_lost() {
    let mut redis = tokio::task::block_in_place(common::cluster::PrivateRedis::launch);
    let app = TestApp::spawn_with(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    let mut member = app.member(&pos).await;
    let customers = ["card-1", "card-2", "card-3", "card-4"];
    for customer in customers {
        checkout
            .record_purchase(purchase(customer, &format!("{customer}-r1"), 1000))
            .await
            .unwrap();
        assert_eq!(available(&mut member, customer).await, 10);
    }
    // The snapshot holds version 1 of everyone; then everyone buys again.
    let mut raw = redis.connection().await;
    let _: () = redis::cmd("SAVE").query_async(&mut raw).await.unwrap();
    for customer in customers {
        checkout
            .record_purchase(purchase(customer, &format!("{customer}-r2"), 1000))
            .await
            .unwrap();
        assert_eq!(available(&mut member, customer).await, 20);
    }
    let old_key = app.cache.key_of(merchant.id, "card-4").await.unwrap();

    // Redis dies and comes back from the snapshot: it holds version 1 again.
    tokio::task::block_in_place(|| {
        redis.stop();
        redis.start();
    });
    let mut raw = redis.connection().await;
    let kept: Option<i64> = redis::cmd("HGET")
        .arg(&old_key)
        .arg("a")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(kept, Some(10), "the restarted Redis holds the older state");

    // No read ever shows it; the cache is in use again at once.
    for round in 0..5 {
        for customer in customers {
            assert_eq!(
                available(&mut member, customer).await,
                20,
                "{customer}, round {round}: a balance the restarted Redis went back to"
            );
        }
    }
    let new_key = app.cache.key_of(merchant.id, "card-4").await.unwrap();
    assert_ne!(
        new_key, old_key,
        "entries of the restarted server have new keys"
    );
    let cached: Option<i64> = redis::cmd("HGET")
        .arg(&new_key)
        .arg("a")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(cached, Some(20));
    app.stop().await;
}

/// The outside run's finding: a `min_version` above anything committed was answered with an
/// older balance and OK, although the proto promises the answer is never older than it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_min_version_above_anything_committed_is_refused_not_answered_older() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let receipt = app
        .checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap()
        .into_inner();
    let version = receipt.balance.unwrap().version;
    let mut member = app.member(&pos).await;
    assert_eq!(
        balance(&mut member, "card-1", version)
            .await
            .balance
            .unwrap()
            .version,
        version
    );
    for _ in 0..2 {
        // Twice: once with the entry cached, once after it was read from Postgres.
        let refused = member
            .get_balance(pb::GetBalanceRequest {
                external_id: "card-1".into(),
                min_version: version + 1,
            })
            .await
            .unwrap_err();
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused
                .message()
                .contains(&format!("latest committed version {version}"))
        );
    }
    app.stop().await;
}

/// The outside run's finding: with Redis down and no client traffic at all, the repair job
/// ran ~1,400 Postgres transactions a second per replica, reading every suspect before asking
/// whether Redis was back. Repairs wait for Redis: while it is away a pass sends Postgres
/// nothing (measured as the bytes the server sends through a proxy to Postgres).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_the_repair_job_sends_postgres_nothing() {
    let db = common::TestDb::create().await;
    let postgres = Proxy::start(common::socket_addr_of(&db.url)).await;
    let app = TestApp::spawn_on(
        db,
        Options {
            redis_url: Some("redis://127.0.0.1:1".into()),
            database_via: Some(postgres.addr),
            health_interval: Duration::from_secs(60),
            // The event sequencer polls Postgres on its own; not what is measured here.
            events: loyalty::events::EventsConfig {
                poll_interval: Duration::from_secs(60),
                prune_interval: None,
                warning_interval: None,
                ..loyalty::events::EventsConfig::default()
            },
            ..Options::default()
        },
    )
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    for i in 0..50 {
        checkout
            .record_purchase(purchase(&format!("card-{i}"), &format!("r-{i}"), 1000))
            .await
            .unwrap();
    }
    let noted: i64 = sqlx::query_scalar("SELECT count(*) FROM cache_repairs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(noted, 50, "every failed publication is noted");

    // Sixteen repair passes (every 250 ms), 50 suspects each.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = postgres.bytes_sent();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let sent = postgres.bytes_sent() - before;
    assert!(
        sent < 1024,
        "{sent} bytes sent to Postgres in 4 s with Redis down and no traffic"
    );
    app.stop().await;
}

/// The outside run's finding: while Redis was down, notes of a hot customer's failed cache
/// writes (`INSERT ... ON CONFLICT DO UPDATE`) waited on each other and on the repair pass
/// holding the row, for the whole statement timeout, until the pool ran dry and tills timed
/// out. A note waits on nothing: here a repair pass (played by the test) holds every noted
/// row while twenty tills buy for one customer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noting_a_repair_never_waits_on_a_repair_in_progress() {
    let app = TestApp::spawn_with(Options {
        redis_url: Some("redis://127.0.0.1:1".into()),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let mut checkout = app.checkout(&pos).await;
    checkout
        .record_purchase(purchase("card-1", "r-0", 1000))
        .await
        .unwrap();
    let mut repair_pass = app.pool.begin().await.unwrap();
    let held: Vec<(String,)> = sqlx::query_as("SELECT external_id FROM cache_repairs FOR UPDATE")
        .fetch_all(&mut *repair_pass)
        .await
        .unwrap();
    assert_eq!(held.len(), 1);

    let started = Instant::now();
    let tills: Vec<_> = (1..=20)
        .map(|i| {
            let mut checkout = checkout.clone();
            tokio::spawn(async move {
                let mut request = tonic::Request::new(purchase("card-1", &format!("r-{i}"), 1000));
                request.set_timeout(Duration::from_secs(2));
                checkout.record_purchase(request).await
            })
        })
        .collect();
    for till in tills {
        till.await.unwrap().expect("a purchase while Redis is down");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    repair_pass.rollback().await.unwrap();
    app.stop().await;
}
