//! Long-lived streams under the server's limits, through the test kit's streaming probe
//! (`loyalty.testkit.v1.ProbeService/Ticks`): they have a slot pool of their own, the unary
//! deadline does not cut them, and a graceful shutdown ends them at once.

use loyalty_testkit as common;

use std::time::{Duration, Instant};

use common::probe::pb::TicksRequest;
use common::{Options, TestApp};
use loyalty::pb;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn forever(interval_ms: u32) -> TicksRequest {
    TicksRequest {
        interval_ms,
        count: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_never_take_the_slots_of_unary_calls() {
    let app = TestApp::spawn_with(Options {
        streaming_probe: true,
        max_in_flight: 2,
        max_streams: 4,
        queue_timeout: Duration::from_millis(50),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let mut probe = app.probe(&merchant.admin_key).await;

    // Fill the stream pool, each stream seen alive.
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut ticks = probe.ticks(forever(20)).await.unwrap().into_inner();
        assert_eq!(ticks.message().await.unwrap().unwrap().seq, 0);
        open.push(ticks);
    }
    // More streams than unary slots are open, and unary calls still run, over and over.
    let mut member = app.member(&merchant.admin_key).await;
    for _ in 0..20 {
        let status = member
            .get_balance(pb::GetBalanceRequest {
                external_id: "nobody".into(),
                min_version: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // A fifth stream finds the pool full ...
    let refused = probe.ticks(forever(20)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // ... and gets a slot once a stream ends.
    drop(open.pop());
    let started = Instant::now();
    loop {
        match probe.ticks(forever(20)).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                assert!(stream.message().await.unwrap().is_some());
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "slot never freed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // The streams that stayed open are still alive.
    for ticks in &mut open {
        assert!(ticks.message().await.unwrap().is_some());
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_the_unary_deadline() {
    let app = TestApp::spawn_with(Options {
        streaming_probe: true,
        request_timeout: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let mut probe = app.probe(&merchant.admin_key).await;
    let started = Instant::now();
    let mut ticks = probe
        .ticks(TicksRequest {
            interval_ms: 100,
            count: 8,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(tick) = ticks.message().await.unwrap() {
        seen.push(tick.seq);
    }
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert!(started.elapsed() >= Duration::from_millis(700));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_ends_open_streams_at_once() {
    let mut app = TestApp::spawn_with(Options {
        streaming_probe: true,
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let mut probe = app.probe(&merchant.admin_key).await;
    let mut ticks = probe.ticks(forever(50)).await.unwrap().into_inner();
    assert!(ticks.message().await.unwrap().is_some());
    let mut health = HealthClient::new(app.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());

    // The test kit's grace period is 5 s; the streams must not make shutdown wait for it.
    let started = Instant::now();
    app.shutdown_server().await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
    let ended = loop {
        match ticks.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    match ended {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(_) => panic!("the stream ended without a status"),
    }
    let watch_ended = loop {
        match watch.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(&watch_ended, Err(status) if status.code() == Code::Unavailable),
        "{watch_ended:?}"
    );
    app.stop().await;
}

/// A stream refused before its first message (here: a compression the server does not
/// support) must end in its headers, as gRPC's trailers-only answer; clients other than
/// tonic's (grpc-go, grpc-java, grpcurl) report INTERNAL when the trailers never come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_at_once_ends_in_its_headers() {
    let app = TestApp::spawn().await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{}/grpc.health.v1.Health/Watch", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", "gzip")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    body.send_data(bytes::Bytes::from_static(&[1, 0, 0, 0, 0]), true)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(
        response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap()),
        Some("12"),
        "{response:?}"
    );
    assert!(
        response.body().is_end_stream(),
        "the refusal must end the stream in its headers"
    );
    app.stop().await;
}
