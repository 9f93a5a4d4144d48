//! Reliability suite, scenarios 1–5: replays, hot customers, and faults injected under load
//! (Redis stopped, PostgreSQL crashed with `-m immediate`, the server SIGKILLed). Clients retry
//! with the same request, as a real till does. Every scenario ends with an audit of every
//! customer: available + pending == Σ ledger, no overdraft, every acknowledged write present
//! exactly once.
//!
//! Only earning (RecordPurchase) and enrolling exist today. Redeem, return and reserve slot in
//! as further `Op` variants with their own acknowledgement checks in `audit`.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::rig::{PrivatePostgres, PrivateRedis, ServerProcess};
use common::{Options, TestApp, TestDb};
use futures::future::join_all;
use loyalty::domain::api_key::Scope;
use loyalty::pb;
use loyalty::service::admin;
use loyalty::storage::{DatabaseConfig, MerchantId, Store};
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// One scenario at a time: they load the machine and some stop shared processes.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The client deadline of every call.
const DEADLINE: Duration = Duration::from_secs(2);

/// What the workload may do. Redeem, Return and Reserve join when their RPCs exist.
#[derive(Debug, Clone, Copy)]
enum Op {
    Earn,
    Enroll,
}

/// What the clients saw.
#[derive(Default)]
struct Outcome {
    requests: u64,
    retries: u64,
    /// Failed attempts by status code (each was retried).
    failures: BTreeMap<String, u64>,
    slowest_failure: Duration,
    /// purchase_id → (external_id, points_earned) of every acknowledged purchase.
    acknowledged: HashMap<String, (String, i64)>,
    /// Times at which a write succeeded, for recovery measurements.
    successes: Vec<Instant>,
    violations: Vec<String>,
}

type Shared = Arc<Mutex<Outcome>>;

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Unknown
    )
}

async fn channel(endpoint: &str) -> Channel {
    Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(1))
        .timeout(DEADLINE)
        .connect_lazy()
}

fn authed<T>(key: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request.set_timeout(DEADLINE);
    request
}

/// Sends `request` until it succeeds (retrying the identical request on retryable failures)
/// or `give_up` passes.
async fn record_until_acknowledged(
    client: &mut pb::checkout_service_client::CheckoutServiceClient<Channel>,
    key: &str,
    request: &pb::RecordPurchaseRequest,
    outcome: &Shared,
    give_up: Instant,
) -> Option<pb::RecordPurchaseResponse> {
    let mut first = true;
    loop {
        let started = Instant::now();
        let result = client.record_purchase(authed(key, request.clone())).await;
        let retry = {
            let mut o = outcome.lock().unwrap();
            o.requests += 1;
            if !first {
                o.retries += 1;
            }
            match result {
                Ok(response) => {
                    let response = response.into_inner();
                    o.successes.push(Instant::now());
                    if let Some((_, points)) = o.acknowledged.get(&request.purchase_id)
                        && *points != response.points_earned
                    {
                        let v = format!(
                            "{} acknowledged twice with different points",
                            request.purchase_id
                        );
                        o.violations.push(v);
                    }
                    o.acknowledged.insert(
                        request.purchase_id.clone(),
                        (request.external_id.clone(), response.points_earned),
                    );
                    return Some(response);
                }
                Err(status) if retryable(status.code()) && Instant::now() < give_up => {
                    *o.failures
                        .entry(format!("{:?}", status.code()))
                        .or_default() += 1;
                    o.slowest_failure = o.slowest_failure.max(started.elapsed());
                    true
                }
                Err(status) => {
                    o.violations.push(format!(
                        "{}: {:?} {}",
                        request.purchase_id,
                        status.code(),
                        status.message()
                    ));
                    false
                }
            }
        };
        if !retry {
            return None;
        }
        first = false;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn receipt(
    rng: &mut impl Rng,
    external_id: &str,
    purchase_id: String,
) -> pb::RecordPurchaseRequest {
    let total = rng.random_range(100..5_000);
    let mut request = common::purchase(external_id, &purchase_id, total);
    request.store_id = format!("store-{}", rng.random_range(1..4));
    request
}

/// `workers` clients loop until `stop` turns true: each picks an operation and a customer
/// (mostly the hot few), sends it, retries it until acknowledged, and now and then replays an
/// acknowledged request to check it gets the same answer.
async fn drive(
    endpoint: String,
    key: String,
    customers: Vec<String>,
    workers: usize,
    stop: watch::Receiver<bool>,
    outcome: Shared,
) {
    let tasks = (0..workers).map(|worker| {
        let endpoint = endpoint.clone();
        let key = key.clone();
        let customers = customers.clone();
        let stop = stop.clone();
        let outcome = outcome.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(worker as u64);
            let channel = channel(&endpoint).await;
            let mut checkout =
                pb::checkout_service_client::CheckoutServiceClient::new(channel.clone());
            let mut member = pb::member_service_client::MemberServiceClient::new(channel);
            let mut n = 0;
            while !*stop.borrow() {
                n += 1;
                let customer = &customers[rng.random_range(0..customers.len())];
                let op = if rng.random_ratio(1, 20) {
                    Op::Enroll
                } else {
                    Op::Earn
                };
                let give_up = Instant::now() + Duration::from_secs(40);
                match op {
                    Op::Earn => {
                        let request = receipt(&mut rng, customer, format!("w{worker}-{n}"));
                        let first = record_until_acknowledged(
                            &mut checkout,
                            &key,
                            &request,
                            &outcome,
                            give_up,
                        )
                        .await;
                        if let Some(first) = first
                            && rng.random_ratio(1, 10)
                        {
                            let again = record_until_acknowledged(
                                &mut checkout,
                                &key,
                                &request,
                                &outcome,
                                give_up,
                            )
                            .await;
                            if again.as_ref() != Some(&first) {
                                outcome
                                    .lock()
                                    .unwrap()
                                    .violations
                                    .push(format!("{}: replay differs", request.purchase_id));
                            }
                        }
                    }
                    Op::Enroll => {
                        let request = pb::EnrollCustomerRequest {
                            external_id: customer.clone(),
                            display_name: format!("Customer {customer}"),
                            time_zone: "Europe/Berlin".into(),
                            ..Default::default()
                        };
                        loop {
                            let result =
                                member.enroll_customer(authed(&key, request.clone())).await;
                            let retry = {
                                let mut o = outcome.lock().unwrap();
                                o.requests += 1;
                                match result {
                                    Ok(_) => false,
                                    Err(s) if retryable(s.code()) && Instant::now() < give_up => {
                                        *o.failures
                                            .entry(format!("{:?}", s.code()))
                                            .or_default() += 1;
                                        o.retries += 1;
                                        true
                                    }
                                    Err(s) => {
                                        o.violations
                                            .push(format!("enroll {customer}: {:?}", s.code()));
                                        false
                                    }
                                }
                            };
                            if !retry {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        })
    });
    join_all(tasks).await;
}

/// The audit every scenario ends with. Returns the violations found.
async fn audit(pool: &PgPool, merchant: MerchantId, outcome: &Outcome) -> Vec<String> {
    let mut violations = outcome.violations.clone();
    let unbalanced: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT c.external_id, a.available, a.pending, COALESCE(l.total, 0)::bigint
           FROM accounts a
           JOIN customers c ON c.merchant_id = a.merchant_id AND c.id = a.customer_id
           LEFT JOIN (SELECT merchant_id, customer_id, sum(points) AS total
                        FROM ledger_entries GROUP BY merchant_id, customer_id) l
                  ON l.merchant_id = a.merchant_id AND l.customer_id = a.customer_id
          WHERE a.merchant_id = $1 AND a.available + a.pending <> COALESCE(l.total, 0)",
    )
    .bind(merchant.0)
    .fetch_all(pool)
    .await
    .unwrap();
    violations.extend(
        unbalanced
            .into_iter()
            .map(|r| format!("available + pending != Σ ledger: {r:?}")),
    );
    let overdrawn: Vec<String> = sqlx::query_scalar(
        "SELECT customer_id::text FROM accounts WHERE merchant_id = $1 AND available < 0",
    )
    .bind(merchant.0)
    .fetch_all(pool)
    .await
    .unwrap();
    violations.extend(
        overdrawn
            .into_iter()
            .map(|c| format!("overdraft: customer {c}")),
    );
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries e
          WHERE e.merchant_id = $1 AND e.kind = 'earn'
            AND NOT EXISTS (SELECT 1 FROM purchases p WHERE p.merchant_id = e.merchant_id AND p.purchase_id = e.reference)",
    )
    .bind(merchant.0)
    .fetch_one(pool)
    .await
    .unwrap();
    if orphans > 0 {
        violations.push(format!("{orphans} earn entries without a purchase"));
    }
    // Every acknowledged purchase: one purchase row, one earn entry, the acknowledged points.
    let ids: Vec<String> = outcome.acknowledged.keys().cloned().collect();
    let stored: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT p.purchase_id, c.external_id, p.points_earned,
                (SELECT count(*) FROM ledger_entries e
                  WHERE e.merchant_id = p.merchant_id AND e.kind = 'earn' AND e.reference = p.purchase_id),
                (SELECT COALESCE(sum(points), 0)::bigint FROM ledger_entries e
                  WHERE e.merchant_id = p.merchant_id AND e.kind = 'earn' AND e.reference = p.purchase_id)
           FROM purchases p JOIN customers c ON c.merchant_id = p.merchant_id AND c.id = p.customer_id
          WHERE p.merchant_id = $1 AND p.purchase_id = ANY($2)",
    )
    .bind(merchant.0)
    .bind(&ids)
    .fetch_all(pool)
    .await
    .unwrap();
    let stored: HashMap<_, _> = stored
        .into_iter()
        .map(|(id, ext, points, n, sum)| (id, (ext, points, n, sum)))
        .collect();
    for (id, (external_id, points)) in &outcome.acknowledged {
        match stored.get(id) {
            None => violations.push(format!("acknowledged purchase {id} is lost")),
            Some((ext, stored_points, entries, sum)) => {
                if ext != external_id || stored_points != points || *entries != 1 || sum != points {
                    violations.push(format!(
                        "purchase {id}: acknowledged ({external_id}, {points}), stored ({ext}, {stored_points}, {entries} entries, {sum})"
                    ));
                }
            }
        }
    }
    violations
}

/// The balance every customer is shown equals what Postgres holds.
async fn audit_reads(
    endpoint: &str,
    key: &str,
    pool: &PgPool,
    merchant: MerchantId,
) -> Vec<String> {
    let accounts: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT c.external_id, a.available, a.version FROM accounts a
           JOIN customers c ON c.merchant_id = a.merchant_id AND c.id = a.customer_id WHERE a.merchant_id = $1",
    )
    .bind(merchant.0)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut member = pb::member_service_client::MemberServiceClient::new(channel(endpoint).await);
    let mut violations = Vec::new();
    for (external_id, available, version) in accounts {
        let shown = member
            .get_balance(authed(
                key,
                pb::GetBalanceRequest {
                    external_id: external_id.clone(),
                    min_version: 0,
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .balance
            .unwrap();
        if (shown.available, shown.version) != (available, version) {
            violations.push(format!(
                "{external_id} shown {shown:?}, committed ({available}, v{version})"
            ));
        }
    }
    violations
}

/// Until `within` passes: every customer's cache entry is absent or equal to Postgres.
async fn cache_converges(
    redis_url: &str,
    prefix: &str,
    pool: &PgPool,
    merchant: MerchantId,
    within: Duration,
) -> bool {
    let client = redis::Client::open(redis_url).unwrap();
    let deadline = Instant::now() + within;
    loop {
        let mut converged = true;
        if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
            let accounts: Vec<(String, i64, i64, i64)> = sqlx::query_as(
                "SELECT c.external_id, a.available, a.purchase_count, a.version FROM accounts a
                   JOIN customers c ON c.merchant_id = a.merchant_id AND c.id = a.customer_id WHERE a.merchant_id = $1",
            )
            .bind(merchant.0)
            .fetch_all(pool)
            .await
            .unwrap();
            for (external_id, available, purchase_count, version) in accounts {
                let key = format!("{prefix}:{{m{}:c{external_id}}}:state", merchant.0);
                let cached: Vec<Option<i64>> = redis::cmd("HMGET")
                    .arg(&key)
                    .arg(&["a", "pc", "v"])
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                match cached[..] {
                    [None, None, None] => {}
                    [Some(a), Some(pc), Some(v)]
                        if (a, pc, v) == (available, purchase_count, version) => {}
                    _ => converged = false,
                }
            }
        } else {
            converged = false;
        }
        if converged {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hot_customers() -> Vec<String> {
    let mut customers: Vec<String> = (1..=4).map(|i| format!("hot-{i}")).collect();
    customers.extend((1..=12).map(|i| format!("cold-{i}")));
    // Hot customers appear three times as often.
    for i in 1..=4 {
        for _ in 0..2 {
            customers.push(format!("hot-{i}"));
        }
    }
    customers
}

fn figures(
    outcome: &Outcome,
    violations: &[String],
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut value = serde_json::json!({
        "requests": outcome.requests,
        "retries": outcome.retries,
        "acknowledged_writes": outcome.acknowledged.len(),
        "failed_attempts_by_code": outcome.failures,
        "slowest_failed_attempt_ms": outcome.slowest_failure.as_millis() as u64,
        "violations": violations.len(),
    });
    if let (Some(map), Some(extra)) = (value.as_object_mut(), extra.as_object()) {
        map.extend(extra.clone());
    }
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scenario_1_every_write_replayed_one_to_five_times_takes_effect_once() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let checkout = app.checkout(&pos).await;
    let member = app.member(&pos).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let outcome: Shared = Arc::default();
    let mut sent = 0u64;

    for n in 0..200 {
        let request = receipt(&mut rng, &format!("c-{}", n % 25), format!("r-{n}"));
        let copies = rng.random_range(1..=5);
        let concurrent = n % 2 == 0;
        sent += copies;
        let responses: Vec<_> = if concurrent {
            let calls = (0..copies).map(|_| {
                let mut client = checkout.clone();
                let request = request.clone();
                tokio::spawn(async move {
                    client
                        .record_purchase(request)
                        .await
                        .map(|r| r.into_inner())
                })
            });
            join_all(calls)
                .await
                .into_iter()
                .map(|r| r.unwrap())
                .collect()
        } else {
            let mut out = Vec::new();
            for _ in 0..copies {
                out.push(
                    checkout
                        .clone()
                        .record_purchase(request.clone())
                        .await
                        .map(|r| r.into_inner()),
                );
            }
            out
        };
        let mut o = outcome.lock().unwrap();
        o.requests += copies;
        match &responses[0] {
            Ok(first) => {
                if responses.iter().any(|r| r.as_ref().ok() != Some(first)) {
                    o.violations.push(format!(
                        "r-{n}: copies got different answers: {responses:?}"
                    ));
                }
                o.acknowledged.insert(
                    request.purchase_id.clone(),
                    (request.external_id.clone(), first.points_earned),
                );
            }
            Err(status) => o.violations.push(format!("r-{n}: {status:?}")),
        }
    }
    // Enrolment replays: the same profile, any number of times, concurrently.
    let enroll = pb::EnrollCustomerRequest {
        external_id: "c-0".into(),
        display_name: "Zoe".into(),
        ..Default::default()
    };
    let calls = (0..5).map(|_| {
        let mut client = member.clone();
        let request = enroll.clone();
        tokio::spawn(async move {
            client
                .enroll_customer(request)
                .await
                .map(|r| r.into_inner().customer.unwrap().display_name)
        })
    });
    for result in join_all(calls).await {
        assert_eq!(result.unwrap().unwrap(), "Zoe");
    }
    sent += 5;

    let outcome = Arc::try_unwrap(outcome).ok().unwrap().into_inner().unwrap();
    let mut violations = audit(&app.pool, merchant.id, &outcome).await;
    let purchases: i64 = sqlx::query_scalar("SELECT count(*) FROM purchases")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    if purchases != 200 {
        violations.push(format!(
            "{purchases} purchases stored for 200 distinct receipts"
        ));
    }
    violations.extend(
        audit_reads(
            &format!("http://{}", app.addr),
            &pos,
            &app.pool,
            merchant.id,
        )
        .await,
    );
    common::report(
        "1-replays",
        serde_json::json!({ "requests": sent, "distinct_writes": 205, "effects": purchases, "violations": violations.len() }),
    );
    assert!(violations.is_empty(), "{violations:#?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scenario_2_hot_customers_under_concurrent_writes_for_30_seconds() {
    let _serial = SERIAL.lock().await;
    let app = TestApp::spawn_with(Options {
        db_max_connections: 8,
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let outcome: Shared = Arc::default();
    let (stop, stopped) = watch::channel(false);
    let load = tokio::spawn(drive(
        format!("http://{}", app.addr),
        pos.clone(),
        hot_customers(),
        16,
        stopped,
        outcome.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    load.await.unwrap();

    let outcome = Arc::try_unwrap(outcome).ok().unwrap().into_inner().unwrap();
    let mut violations = audit(&app.pool, merchant.id, &outcome).await;
    violations.extend(
        audit_reads(
            &format!("http://{}", app.addr),
            &pos,
            &app.pool,
            merchant.id,
        )
        .await,
    );
    let value = figures(
        &outcome,
        &violations,
        serde_json::json!({ "seconds": 30, "workers": 16, "hot_customers": 4 }),
    );
    common::report("2-hot-customers", value);
    assert!(violations.is_empty(), "{violations:#?}");
    assert!(
        outcome.acknowledged.len() > 100,
        "too little load: {}",
        outcome.acknowledged.len()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scenario_3_redis_stopped_and_restarted_under_load() {
    let _serial = SERIAL.lock().await;
    let mut redis = PrivateRedis::start();
    let app = TestApp::spawn_with(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let endpoint = format!("http://{}", app.addr);
    let outcome: Shared = Arc::default();
    let (stop, stopped) = watch::channel(false);
    let load = tokio::spawn(drive(
        endpoint.clone(),
        pos.clone(),
        hot_customers(),
        8,
        stopped,
        outcome.clone(),
    ));
    // Readers too: balance reads go through the cache.
    let reader = {
        let endpoint = endpoint.clone();
        let pos = pos.clone();
        let outcome = outcome.clone();
        let mut stop = stop.subscribe();
        tokio::spawn(async move {
            let mut member =
                pb::member_service_client::MemberServiceClient::new(channel(&endpoint).await);
            let mut reads = 0u64;
            while !*stop.borrow_and_update() {
                for customer in ["hot-1", "hot-2", "hot-3", "hot-4"] {
                    let result = member
                        .get_balance(authed(
                            &pos,
                            pb::GetBalanceRequest {
                                external_id: customer.into(),
                                min_version: 0,
                            },
                        ))
                        .await;
                    reads += 1;
                    if let Err(status) = result
                        && status.code() != Code::NotFound
                    {
                        outcome
                            .lock()
                            .unwrap()
                            .violations
                            .push(format!("read failed: {status:?}"));
                    }
                }
            }
            reads
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.start_again();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    load.await.unwrap();
    let reads = reader.await.unwrap();

    let outcome = Arc::try_unwrap(outcome).ok().unwrap().into_inner().unwrap();
    let mut violations = audit(&app.pool, merchant.id, &outcome).await;
    if outcome.retries > 0 {
        violations.push(format!(
            "{} calls failed although only Redis was down: {:?}",
            outcome.retries, outcome.failures
        ));
    }
    let converged = cache_converges(
        &redis.url(),
        &app.key_prefix,
        &app.pool,
        merchant.id,
        Duration::from_secs(10),
    )
    .await;
    if !converged {
        violations.push("the cache did not converge to the committed state".into());
    }
    violations.extend(audit_reads(&endpoint, &pos, &app.pool, merchant.id).await);
    let value = figures(
        &outcome,
        &violations,
        serde_json::json!({ "balance_reads": reads, "redis_down_seconds": 3, "cache_converged": converged }),
    );
    common::report("3-redis-restart", value);
    assert!(violations.is_empty(), "{violations:#?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scenario_4_postgres_crashed_with_immediate_shutdown_under_load() {
    let _serial = SERIAL.lock().await;
    let postgres = PrivatePostgres::start();
    let db = TestDb::create_on(&postgres.url("postgres")).await;
    // A request waits at most this long for a connection while Postgres is away.
    let acquire_timeout = Duration::from_millis(500);
    let app = TestApp::spawn_on(
        db,
        Options {
            db_acquire_timeout: acquire_timeout,
            ..Options::default()
        },
    )
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let endpoint = format!("http://{}", app.addr);
    let outcome: Shared = Arc::default();
    let (stop, stopped) = watch::channel(false);
    let load = tokio::spawn(drive(
        endpoint.clone(),
        pos.clone(),
        hot_customers(),
        8,
        stopped,
        outcome.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let crash = tokio::task::spawn_blocking(move || {
        postgres.stop_immediate();
        std::thread::sleep(Duration::from_secs(2));
        postgres.start_again();
        (postgres, Instant::now())
    });
    let (postgres, back_at) = crash.await.unwrap();
    // Recovery: the first write acknowledged after Postgres accepts connections again.
    let recovered_in = loop {
        let first = outcome
            .lock()
            .unwrap()
            .successes
            .iter()
            .copied()
            .filter(|t| *t > back_at)
            .min();
        if let Some(first) = first {
            break first - back_at;
        }
        assert!(
            back_at.elapsed() < Duration::from_secs(20),
            "no write succeeded after Postgres came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    load.await.unwrap();

    let outcome = Arc::try_unwrap(outcome).ok().unwrap().into_inner().unwrap();
    let mut violations = audit(&app.pool, merchant.id, &outcome).await;
    if recovered_in > Duration::from_secs(5) {
        violations.push(format!(
            "recovered only {recovered_in:?} after Postgres was back"
        ));
    }
    // Failing fast: well within the client's deadline, bounded by the pool's acquire timeout.
    if outcome.slowest_failure > acquire_timeout + Duration::from_millis(700) {
        violations.push(format!("a failed call took {:?}", outcome.slowest_failure));
    }
    if outcome.failures.is_empty() {
        violations.push("the crash was not noticed by any client".into());
    }
    let unexpected: Vec<_> = outcome
        .failures
        .keys()
        .filter(|code| code.as_str() != "Unavailable")
        .collect();
    if !unexpected.is_empty() {
        violations.push(format!(
            "failures other than UNAVAILABLE: {:?}",
            outcome.failures
        ));
    }
    violations.extend(audit_reads(&endpoint, &pos, &app.pool, merchant.id).await);
    let value = figures(
        &outcome,
        &violations,
        serde_json::json!({ "postgres_down_seconds": 2, "recovered_ms": recovered_in.as_millis() as u64 }),
    );
    common::report("4-postgres-crash", value);
    assert!(violations.is_empty(), "{violations:#?}");
    app.stop().await;
    drop(postgres);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scenario_5_server_killed_with_sigkill_and_restarted_under_load() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::create().await;
    let prefix = format!("test:{}", db.name);
    let pool = db.pool().await;
    let mut server = ServerProcess::start(&db.url, &common::redis_url(), &prefix);
    let store = Store::connect_lazy(&DatabaseConfig {
        url: db.url.clone(),
        max_connections: 2,
        acquire_timeout: Duration::from_secs(5),
        statement_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let (merchant, _) = admin::create_merchant(&store, "Kill test", "EUR")
        .await
        .unwrap();
    let pos = admin::create_key(&store, merchant, Scope::Pos)
        .await
        .unwrap()
        .secret
        .expose()
        .to_string();
    let endpoint = server.endpoint();
    let outcome: Shared = Arc::default();
    let (stop, stopped) = watch::channel(false);
    let load = tokio::spawn(drive(
        endpoint.clone(),
        pos.clone(),
        hot_customers(),
        8,
        stopped,
        outcome.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    server.kill9();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server = tokio::task::spawn_blocking(move || {
        server.start_again();
        server
    })
    .await
    .unwrap();
    let back_at = Instant::now();
    let recovered_in = loop {
        let first = outcome
            .lock()
            .unwrap()
            .successes
            .iter()
            .copied()
            .filter(|t| *t > back_at)
            .min();
        if let Some(first) = first {
            break first - back_at;
        }
        assert!(
            back_at.elapsed() < Duration::from_secs(20),
            "no write succeeded after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send(true).unwrap();
    load.await.unwrap();

    let outcome = Arc::try_unwrap(outcome).ok().unwrap().into_inner().unwrap();
    let mut violations = audit(&pool, merchant, &outcome).await;
    if outcome.failures.is_empty() {
        violations.push("the kill was not noticed by any client".into());
    }
    if recovered_in > Duration::from_secs(5) {
        violations.push(format!(
            "served again only {recovered_in:?} after the restart"
        ));
    }
    violations.extend(audit_reads(&endpoint, &pos, &pool, merchant).await);
    let log = server.log();
    if log.contains("panicked") {
        violations.push(format!(
            "the server panicked; see {}",
            server.log_path().display()
        ));
    }
    let value = figures(
        &outcome,
        &violations,
        serde_json::json!({
            "down_ms": (back_at - killed_at).as_millis() as u64,
            "recovered_ms": recovered_in.as_millis() as u64,
        }),
    );
    common::report("5-server-sigkill", value);
    assert!(violations.is_empty(), "{violations:#?}\n{log}");
    drop(server);
    store.close().await;
    pool.close().await;
    db.drop_database().await;
}
