//! Reliability suite, scenario 6: bad input. Property tests generate malformed and extreme
//! requests for every RPC (empty, huge, negative, overflowing, unicode and control characters,
//! thousands of lines, broken timestamps); each gets a clear error (or, when the random request
//! happens to be valid, is served), nothing is ever written by a refused request, and the
//! server never panics. Raw garbage on the gRPC port does not bring the server down either.

use loyalty_testkit as common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{Buf, BufMut};
use common::{TestApp, purchase};
use loyalty::Scope;
use loyalty::pb;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

static PANICS: AtomicUsize = AtomicUsize::new(0);
static REQUESTS: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        default(info);
    }));
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9-]{1,12}",
        "\\PC{1,40}",
        ".{0,20}",
        "[\\x00-\\x1f]{1,4}",
        " [a-z]{1,5} ",
        "x{129,400}",
        "\\PC{100,140}",
    ]
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(-1i64),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(100_000_000_000_001i64),
        0..100_000i64,
        any::<i64>(),
    ]
}

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    prop_oneof![
        Just(None),
        Just(Some(common::now_timestamp())),
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        (-86_400i64..86_400).prop_map(|offset| Some(common::timestamp_in(offset))),
    ]
}

fn currency() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("EUR".to_string()),
        Just("USD".to_string()),
        Just("XAU".to_string()),
        "[A-Za-z]{0,4}",
        text()
    ]
}

fn line() -> impl Strategy<Value = pb::PurchaseLine> {
    (
        text(),
        text(),
        prop_oneof![Just(0u32), Just(1u32), any::<u32>()],
        amount(),
    )
        .prop_map(|(sku, category, quantity, amount_minor)| pb::PurchaseLine {
            sku,
            category,
            quantity,
            amount_minor,
        })
}

fn lines() -> impl Strategy<Value = Vec<pb::PurchaseLine>> {
    prop_oneof![
        8 => prop::collection::vec(line(), 0..6),
        1 => prop::collection::vec(line(), 495..520),
    ]
}

fn record_purchase() -> impl Strategy<Value = pb::RecordPurchaseRequest> {
    (
        text(),
        text(),
        text(),
        timestamp(),
        currency(),
        amount(),
        lines(),
    )
        .prop_map(
            |(external_id, purchase_id, store_id, occurred_at, currency, total_minor, lines)| {
                pb::RecordPurchaseRequest {
                    external_id,
                    purchase_id,
                    store_id,
                    occurred_at,
                    currency,
                    total_minor,
                    lines,
                }
            },
        )
}

fn enroll() -> impl Strategy<Value = pb::EnrollCustomerRequest> {
    let birthday = prop_oneof![
        Just(None),
        (any::<u32>(), any::<u32>(), prop::option::of(any::<u32>()))
            .prop_map(|(month, day, year)| Some(pb::Birthday { month, day, year })),
        (1u32..=12, 1u32..=31, prop::option::of(1890u32..2030))
            .prop_map(|(month, day, year)| Some(pb::Birthday { month, day, year })),
    ];
    let time_zone = prop_oneof![
        Just(String::new()),
        Just("Europe/Berlin".to_string()),
        text()
    ];
    let email = prop_oneof![
        Just(String::new()),
        "[a-z]{1,8}@[a-z]{1,8}\\.[a-z]{2,3}",
        text()
    ];
    let phone = prop_oneof![Just(String::new()), "\\+[1-9][0-9]{7,14}", text()];
    (
        text(),
        text(),
        birthday,
        time_zone,
        email,
        phone,
        any::<bool>(),
    )
        .prop_map(
            |(external_id, display_name, birthday, time_zone, email, phone, marketing_consent)| {
                pb::EnrollCustomerRequest {
                    external_id,
                    display_name,
                    birthday,
                    time_zone,
                    email,
                    phone,
                    marketing_consent,
                }
            },
        )
}

fn program() -> impl Strategy<Value = Option<pb::Program>> {
    let rate = prop::option::of((any::<u32>(), any::<u32>()).prop_map(
        |(points, currency_units)| pb::EarnRate {
            points,
            currency_units,
        },
    ));
    let multiplier =
        (text(), any::<u32>()).prop_map(|(category, multiplier_bp)| pb::CategoryMultiplier {
            category,
            multiplier_bp,
        });
    let promotion = (
        text(),
        any::<u32>(),
        timestamp(),
        timestamp(),
        prop::collection::vec(text(), 0..3),
    )
        .prop_map(
            |(id, multiplier_bp, starts_at, ends_at, categories)| pb::Promotion {
                id,
                multiplier_bp,
                starts_at,
                ends_at,
                categories,
            },
        );
    prop::option::of(
        (
            (
                currency(),
                rate,
                amount(),
                prop::collection::vec(multiplier, 0..4),
                prop::collection::vec(promotion, 0..3),
            ),
            prop_oneof![0u32..40, any::<u32>()],
            -1i32..4,
            lifecycle(),
        )
            .prop_map(
                |(
                    (currency, earn_rate, minimum_purchase_minor, category_multipliers, promotions),
                    max_receipt_age_days,
                    old_receipts,
                    (pending_days, expiry, redemption, return_policy),
                )| pb::Program {
                    currency,
                    earn_rate,
                    minimum_purchase_minor,
                    category_multipliers,
                    promotions,
                    max_receipt_age_days,
                    old_receipts,
                    pending_days,
                    expiry,
                    redemption,
                    return_policy,
                    ..Default::default()
                },
            ),
    )
}

/// Pending period, expiry, redemption rule and return policy: in range, out of range, unknown
/// enum values.
#[allow(clippy::type_complexity)]
fn lifecycle() -> impl Strategy<
    Value = (
        u32,
        Option<pb::ExpiryPolicy>,
        Option<pb::RedemptionRule>,
        i32,
    ),
> {
    let expiry = prop::option::of(
        (-1i32..6, prop_oneof![0u32..130, any::<u32>()])
            .prop_map(|(kind, months)| pb::ExpiryPolicy { kind, months }),
    );
    let redemption = prop::option::of(
        (
            prop_oneof![0u32..200, any::<u32>()],
            any::<i64>(),
            prop::option::of(prop_oneof![0u32..10_001, any::<u32>()]),
        )
            .prop_map(|(points_per_unit, minimum_points, max_share_bp)| {
                pb::RedemptionRule {
                    points_per_unit,
                    minimum_points,
                    max_share_bp,
                }
            }),
    );
    (
        prop_oneof![0u32..400, any::<u32>()],
        expiry,
        redemption,
        -1i32..4,
    )
}

/// Runs `cases` generated inputs; each case must answer with one of `allowed` and, if refused,
/// leave every table as it was.
fn check<S, F, Fut>(
    rt: &tokio::runtime::Runtime,
    app: &TestApp,
    name: &str,
    strategy: S,
    allowed: &[Code],
    call: F,
) where
    S: Strategy,
    S::Value: Clone + std::fmt::Debug,
    F: Fn(S::Value) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let mut runner = TestRunner::new(Config {
        cases: 48,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |input| {
        rt.block_on(async {
            let before = app.row_counts().await;
            REQUESTS.fetch_add(1, Ordering::Relaxed);
            match call(input.clone()).await {
                Ok(()) => {}
                Err(status) => {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    prop_assert!(
                        allowed.contains(&status.code()),
                        "{name}: unexpected {:?}: {}",
                        status.code(),
                        status.message()
                    );
                    if status.code() == Code::InvalidArgument {
                        prop_assert!(
                            !common::violated_fields(&status).is_empty(),
                            "{name}: no field named"
                        );
                    }
                    prop_assert_eq!(
                        app.row_counts().await,
                        before,
                        "{} wrote despite {:?}",
                        name,
                        status.code()
                    );
                }
            }
            Ok(())
        })
    });
    if let Err(failure) = result {
        panic!("{name}: {failure}");
    }
}

#[test]
fn malformed_and_extreme_requests_get_clear_errors_and_write_nothing() {
    count_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(TestApp::spawn());
    let (pos, admin) = rt.block_on(async {
        let merchant = app.merchant().await;
        let pos = app.key(&merchant, Scope::Pos).await;
        app.checkout(&pos)
            .await
            .record_purchase(purchase("card-1", "seed", 1000))
            .await
            .unwrap();
        (pos, merchant.admin_key)
    });
    let checkout = rt.block_on(app.checkout(&pos));
    let member = rt.block_on(app.member(&pos));
    let programs = rt.block_on(app.program(&admin));
    let read_codes = [Code::InvalidArgument, Code::NotFound];

    check(
        &rt,
        &app,
        "RecordPurchase",
        record_purchase(),
        &[
            Code::InvalidArgument,
            Code::AlreadyExists,
            Code::FailedPrecondition,
        ],
        |r| {
            let mut c = checkout.clone();
            async move { c.record_purchase(r).await.map(|_| ()) }
        },
    );
    check(
        &rt,
        &app,
        "QuotePurchase",
        record_purchase(),
        &[Code::InvalidArgument],
        |r| {
            let mut c = checkout.clone();
            let quote = pb::QuotePurchaseRequest {
                external_id: r.external_id,
                store_id: r.store_id,
                occurred_at: r.occurred_at,
                currency: r.currency,
                total_minor: r.total_minor,
                lines: r.lines,
            };
            async move { c.quote_purchase(quote).await.map(|_| ()) }
        },
    );
    check(
        &rt,
        &app,
        "EnrollCustomer",
        enroll(),
        &[Code::InvalidArgument],
        |r| {
            let mut c = member.clone();
            async move { c.enroll_customer(r).await.map(|_| ()) }
        },
    );
    check(
        &rt,
        &app,
        "GetCustomer",
        text(),
        &read_codes,
        |external_id| {
            let mut c = member.clone();
            async move {
                c.get_customer(pb::GetCustomerRequest { external_id })
                    .await
                    .map(|_| ())
            }
        },
    );
    check(
        &rt,
        &app,
        "GetBalance",
        (text(), any::<i64>()),
        &read_codes,
        |(external_id, min_version)| {
            let mut c = member.clone();
            async move {
                c.get_balance(pb::GetBalanceRequest {
                    external_id,
                    min_version,
                })
                .await
                .map(|_| ())
            }
        },
    );
    check(
        &rt,
        &app,
        "ListLedger",
        (text(), any::<i32>(), text()),
        &read_codes,
        |(external_id, page_size, page_token)| {
            let mut c = member.clone();
            async move {
                c.list_ledger(pb::ListLedgerRequest {
                    external_id,
                    page_size,
                    page_token,
                })
                .await
                .map(|_| ())
            }
        },
    );
    check(
        &rt,
        &app,
        "IssueCustomerToken",
        (text(), prop_oneof![0u32..100_000, any::<u32>()]),
        &[Code::InvalidArgument],
        |(external_id, ttl_seconds)| {
            let mut c = member.clone();
            async move {
                c.issue_customer_token(pb::IssueCustomerTokenRequest {
                    external_id,
                    ttl_seconds,
                })
                .await
                .map(|_| ())
            }
        },
    );
    check(
        &rt,
        &app,
        "UpdateProgram",
        (program(), any::<i64>()),
        &[Code::InvalidArgument, Code::FailedPrecondition],
        |(program_rules, expected_version)| {
            let mut c = programs.clone();
            async move {
                c.update_program(pb::UpdateProgramRequest {
                    program: program_rules,
                    expected_version,
                })
                .await
                .map(|_| ())
            }
        },
    );

    let spend_codes = [
        Code::InvalidArgument,
        Code::NotFound,
        Code::FailedPrecondition,
        Code::AlreadyExists,
    ];
    check(
        &rt,
        &app,
        "RedeemPoints",
        (text(), text(), any::<i64>(), text()),
        &spend_codes,
        |(external_id, redemption_id, points, purchase_id)| {
            let mut c = checkout.clone();
            async move {
                c.redeem_points(pb::RedeemPointsRequest {
                    external_id,
                    redemption_id,
                    points,
                    purchase_id,
                })
                .await
                .map(|_| ())
            }
        },
    );
    check(
        &rt,
        &app,
        "ReservePoints",
        (text(), text(), any::<i64>(), any::<u32>()),
        &spend_codes,
        |(external_id, reservation_id, points, ttl_seconds)| {
            let mut c = checkout.clone();
            async move {
                c.reserve_points(pb::ReservePointsRequest {
                    external_id,
                    reservation_id,
                    points,
                    ttl_seconds,
                    purchase_id: String::new(),
                })
                .await
                .map(|_| ())
            }
        },
    );
    check(
        &rt,
        &app,
        "CommitReservation",
        text(),
        &spend_codes,
        |reservation_id| {
            let mut c = checkout.clone();
            async move {
                c.commit_reservation(pb::CommitReservationRequest { reservation_id })
                    .await
                    .map(|_| ())
            }
        },
    );
    check(
        &rt,
        &app,
        "ReleaseReservation",
        text(),
        &spend_codes,
        |reservation_id| {
            let mut c = checkout.clone();
            async move {
                c.release_reservation(pb::ReleaseReservationRequest { reservation_id })
                    .await
                    .map(|_| ())
            }
        },
    );
    let returned_line =
        (any::<u32>(), any::<i64>()).prop_map(|(line_no, amount_minor)| pb::ReturnedLine {
            line_no,
            amount_minor,
        });
    check(
        &rt,
        &app,
        "ReturnPurchase",
        (
            prop_oneof![Just("seed".to_string()), text()],
            text(),
            prop::collection::vec(returned_line, 0..4),
            any::<i64>(),
        ),
        &spend_codes,
        |(purchase_id, return_id, lines, amount_minor)| {
            let mut c = checkout.clone();
            async move {
                c.return_purchase(pb::ReturnPurchaseRequest {
                    purchase_id,
                    return_id,
                    lines,
                    amount_minor,
                })
                .await
                .map(|_| ())
            }
        },
    );
    check(
        &rt,
        &app,
        "AdjustPoints",
        (
            prop_oneof![Just("card-1".to_string()), text()],
            text(),
            any::<i64>(),
            text(),
        ),
        &spend_codes,
        |(external_id, adjustment_key, points, reason)| {
            let mut c = programs.clone();
            async move {
                c.adjust_points(pb::AdjustPointsRequest {
                    external_id,
                    adjustment_key,
                    points,
                    reason,
                })
                .await
                .map(|_| ())
            }
        },
    );

    // Extremes that random generation rarely reaches: 10 000 lines, and the largest values.
    rt.block_on(async {
        let before = app.row_counts().await;
        let mut huge = purchase("card-1", "huge", 10_000);
        huge.lines = vec![
            pb::PurchaseLine {
                sku: "s".into(),
                category: String::new(),
                quantity: 1,
                amount_minor: 1
            };
            10_000
        ];
        let status = checkout.clone().record_purchase(huge).await.unwrap_err();
        assert_eq!(common::violated_fields(&status), ["lines"]);
        let mut max = purchase("card-1", "max", 0);
        max.total_minor = i64::MAX;
        max.lines[0].amount_minor = i64::MAX;
        max.lines[1].quantity = u32::MAX;
        let status = checkout.clone().record_purchase(max).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(app.row_counts().await, before);
    });

    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a handler panicked");
    common::report(
        "6-bad-input",
        serde_json::json!({
            "generated_requests": REQUESTS.load(Ordering::Relaxed) + 2,
            "refused": REFUSED.load(Ordering::Relaxed) + 2,
            "writes_by_refused_requests": 0,
            "panics": 0,
            "violations": 0,
        }),
    );
    rt.block_on(app.stop());
}

/// Sends `payload` as the body of one gRPC call, bypassing the generated types.
async fn raw_call(
    app: &TestApp,
    key: &str,
    path: &'static str,
    payload: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(app.channel().await);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(payload);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_does_not_bring_the_server_down() {
    count_panics();
    let app = TestApp::spawn().await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let counts = app.row_counts().await;

    // 1. Raw bytes on the TCP port: HTTP/1, a broken HTTP/2 preface, binary noise.
    let mut noise = vec![0u8; 4096];
    for (i, byte) in noise.iter_mut().enumerate() {
        *byte = (i * 7919 % 251) as u8;
    }
    let payloads: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(),
        [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), noise.clone()].concat(),
        noise.clone(),
        vec![0u8; 65_536],
    ];
    for payload in payloads {
        let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let _ = stream.write_all(&payload).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut sink)).await;
    }

    // 2. Well-framed gRPC calls whose message is not valid protobuf, or valid protobuf of
    // the wrong shape.
    let record = "/loyalty.v1.CheckoutService/RecordPurchase";
    for payload in [
        vec![0xff; 64],
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        noise[..300].to_vec(),
        Vec::new(),
    ] {
        let status = raw_call(&app, &pos, record, payload).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    }
    // 3. Unknown fields are ignored, as protobuf requires: a valid purchase with an extra
    // field 99 is served.
    let mut encoded = prost::Message::encode_to_vec(&purchase("card-1", "r-unknown-field", 1000));
    encoded.extend_from_slice(&[0x98, 0x06, 0x01]); // field 99, varint 1
    let reply = raw_call(&app, &pos, record, encoded).await.unwrap();
    let receipt: pb::RecordPurchaseResponse = prost::Message::decode(reply.as_slice()).unwrap();
    assert_eq!(receipt.points_earned, 10);

    // The server is still healthy and serving.
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    app.checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-after", 1000))
        .await
        .unwrap();
    let after = app.row_counts().await;
    assert_eq!(
        after.purchases,
        counts.purchases + 2,
        "only the two valid purchases were written"
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a handler panicked");
    common::report(
        "6-garbage-on-the-wire",
        serde_json::json!({
            "raw_tcp_connections": 5,
            "undecodable_grpc_calls": 4,
            "unknown_field_calls": 1,
            "server_down": false,
            "panics": 0,
            "violations": 0,
        }),
    );
    app.stop().await;
}

/// Passes message bytes through untouched.
#[derive(Clone, Copy)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}
