//! One merchant must not starve the others: the largest program a merchant may hold and the
//! largest baskets it may send cost that merchant time, not another merchant's latency.
//!
//! A test binary of its own: its figures are latencies, and cargo runs test binaries one at a
//! time, so the suite's other tests do not share the two cores with it.

use loyalty_testkit as common;

use std::time::{Duration, Instant};

use common::{TestApp, purchase, timestamp_in};
use loyalty::Scope;
use loyalty::pb;
use tonic::Code;

/// A category name of the longest allowed length (64 characters).
fn category(kind: &str, i: usize) -> String {
    format!("{kind}{i:0>63}")
}

/// The largest program the limits allow: 1,000 category multipliers and 100 promotions that
/// each name the same 100 categories (10,000 in all), all running now.
fn largest_program(categories_per_promotion: usize) -> pb::Program {
    pb::Program {
        currency: "EUR".into(),
        earn_rate: Some(pb::EarnRate {
            points: 1,
            currency_units: 1,
        }),
        minimum_purchase_minor: 0,
        category_multipliers: (0..1000)
            .map(|i| pb::CategoryMultiplier {
                category: category("m", i),
                multiplier_bp: 15_000,
            })
            .collect(),
        promotions: (0..100)
            .map(|i| pb::Promotion {
                id: format!("promo-{i}"),
                multiplier_bp: 20_000 + i as u32,
                starts_at: Some(timestamp_in(-3600)),
                ends_at: Some(timestamp_in(3600)),
                categories: (0..categories_per_promotion)
                    .map(|j| category("p", j))
                    .collect(),
            })
            .collect(),
        version: 0,
        updated_at: None,
        ..pb::Program::default()
    }
}

/// The worst basket for that program: 500 lines, each in a category all 100 promotions name.
fn worst_basket() -> pb::QuotePurchaseRequest {
    let lines: Vec<pb::PurchaseLine> = (0..500)
        .map(|i| pb::PurchaseLine {
            sku: format!("sku-{i}"),
            category: category("p", i % 100),
            quantity: 1,
            amount_minor: 100,
        })
        .collect();
    pb::QuotePurchaseRequest {
        external_id: String::new(),
        store_id: String::new(),
        occurred_at: None,
        currency: "EUR".into(),
        total_minor: 500 * 100,
        lines,
    }
}

/// How often each heavy till sends its worst basket: as fast as a busy till scans and
/// totals (beyond that, the per-key rate limit is what applies).
const TILL_PACE: Duration = Duration::from_millis(25);

const DEBUG_BUILD_ALLOWANCE: Duration = Duration::from_millis(10);

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() * 99 / 100]
}

async fn balance_latencies(member: &mut common::MemberClient, calls: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        member
            .get_balance(pb::GetBalanceRequest {
                external_id: "card-1".into(),
                min_version: 0,
            })
            .await
            .unwrap();
        samples.push(started.elapsed());
    }
    samples
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_beyond_the_size_bound_is_refused_naming_the_field() {
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let refused = app
        .program(&merchant.admin_key)
        .await
        .update_program(pb::UpdateProgramRequest {
            program: Some(largest_program(101)),
            expected_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(common::violated_fields(&refused), ["program.promotions"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worst_baskets_of_the_largest_program_do_not_slow_another_merchant() {
    let app = TestApp::spawn().await;
    let heavy = app.merchant().await;
    app.program(&heavy.admin_key)
        .await
        .update_program(pb::UpdateProgramRequest {
            program: Some(largest_program(100)),
            expected_version: 0,
        })
        .await
        .expect("the largest program the limits allow");
    let heavy_pos = app.key(&heavy, Scope::Pos).await;
    let quoted = app
        .checkout(&heavy_pos)
        .await
        .quote_purchase(worst_basket())
        .await
        .unwrap()
        .into_inner();
    // 500 lines of 1.00 EUR, each at the best of its 100 promotions (2.0099x): 1004.95.
    assert_eq!(quoted.points, 1004);

    let light = app.merchant().await;
    let light_pos = app.key(&light, Scope::Pos).await;
    app.checkout(&light_pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let mut member = app.member(&light_pos).await;
    balance_latencies(&mut member, 50).await; // warm up
    let alone = p99(balance_latencies(&mut member, 400).await);

    // The heavy merchant's tills send their worst basket over and over, two at a time, from a
    // thread of their own (as tills elsewhere would: encoding their baskets is not the
    // server's work).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addr = app.addr;
    let tills = {
        let stop = stop.clone();
        let heavy_pos = heavy_pos.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                // The basket is encoded once: sending it costs the tills next to nothing, so
                // what is measured is the server's work.
                let mut frame = vec![0u8];
                let message = prost::Message::encode_to_vec(&worst_basket());
                frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
                frame.extend_from_slice(&message);
                let frame = bytes::Bytes::from(frame);
                let till = |stop: std::sync::Arc<std::sync::atomic::AtomicBool>| {
                    let heavy_pos = heavy_pos.clone();
                    let frame = frame.clone();
                    async move {
                        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                        tcp.set_nodelay(true).unwrap();
                        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
                        tokio::spawn(connection);
                        let mut latencies = Vec::new();
                        let mut pace = tokio::time::interval(TILL_PACE);
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            pace.tick().await;
                            let started = Instant::now();
                            let mut client = client.clone().ready().await.unwrap();
                            let request = http::Request::post(format!(
                                "http://{addr}/loyalty.v1.CheckoutService/QuotePurchase"
                            ))
                            .header("content-type", "application/grpc")
                            .header("te", "trailers")
                            .header("authorization", format!("Bearer {heavy_pos}"))
                            .body(())
                            .unwrap();
                            let (response, mut body) = client.send_request(request, false).unwrap();
                            body.send_data(frame.clone(), true).unwrap();
                            let mut response = response.await.unwrap().into_body();
                            while let Some(chunk) = response.data().await {
                                let chunk = chunk.unwrap();
                                let _ = response.flow_control().release_capacity(chunk.len());
                            }
                            let trailers = response.trailers().await.unwrap().unwrap_or_default();
                            assert_eq!(
                                trailers.get("grpc-status").map(|v| v.as_bytes()),
                                Some(&b"0"[..]),
                                "{trailers:?}"
                            );
                            latencies.push(started.elapsed());
                        }
                        latencies
                    }
                };
                let (mut a, b) = tokio::join!(till(stop.clone()), till(stop.clone()));
                a.extend(b);
                a
            })
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let beside = p99(balance_latencies(&mut member, 400).await);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let quotes = tokio::task::block_in_place(|| tills.join().unwrap());
    let quote_p99 = p99(quotes.clone());
    eprintln!(
        "GetBalance p99 alone {alone:?}, beside {} worst quotes {beside:?}; quote p99 {quote_p99:?}",
        quotes.len()
    );
    assert!(quotes.len() > 10, "the heavy merchant's load did not run");
    // The basket costs O(lines + matching promotions): ~20 ms at p99 in the debug build (66 ms
    // when every line scanned every promotion's categories). On a machine slower than the one
    // this was measured on (a quiet GetBalance p99 of 2.5 ms there) the bound grows with it:
    // a busy machine once measured 62 ms beside a 15.8 ms GetBalance.
    let slowness = (alone.as_secs_f64() / 0.0025).max(1.0);
    let bound = Duration::from_millis(45).mul_f64(slowness);
    assert!(
        quote_p99 < bound,
        "the worst basket took {quote_p99:?} at p99 (bound {bound:?} at slowness {slowness:.1})"
    );
    // Within 2x plus the largest piece of a worst quote that still runs on an async worker
    // (decoding and validating its 40 KB, copying its basket for the blocking pool): a request
    // queued behind it waits that long. Measured here: debug build 1.5-2.5 ms alone, 4.7-6.8
    // ms beside; release build 0.16 ms alone, 0.57 ms beside. Against the outside run's 2 ms
    // baseline that is within 2x; against this in-process baseline it is not, hence the
    // allowance. Before the index and the blocking pool, a worst quote held a worker for
    // ~50 ms here (1-1.5 s outside) and the other merchant waited as long.
    assert!(
        beside <= alone * 2 + DEBUG_BUILD_ALLOWANCE,
        "another merchant's GetBalance p99 went from {alone:?} to {beside:?}"
    );
    app.stop().await;
}
