//! Encryption on every wire: the gRPC server over TLS with client certificates as a second
//! factor for internal keys, PostgreSQL that accepts TLS only, and a TLS-only Redis. The
//! certificates are generated per test (`common::tls::TestPki`); the PostgreSQL cluster and
//! the Redis are private and stopped when dropped, also when a test fails.

use loyalty_testkit as common;

use std::process::Command;

use common::cluster::{DATABASE, PrivatePostgres, PrivateRedis};
use common::tls::TestPki;
use common::{Options, TestApp, TestDb, purchase};
use loyalty::pb::checkout_service_client::CheckoutServiceClient;
use loyalty::pb::member_service_client::MemberServiceClient;
use loyalty::pb::program_service_client::ProgramServiceClient;
use loyalty::{MIGRATOR, Scope, pb};
use sqlx::{Connection, PgConnection};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};

const INTERNAL: &[Scope] = &[Scope::Pos, Scope::Admin, Scope::Scheduler];

/// The server's overall health over `channel` (public: no key needed).
async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|reply| reply.into_inner().status)
}

fn balance_request(external_id: &str) -> pb::GetBalanceRequest {
    pb::GetBalanceRequest {
        external_id: external_id.into(),
        min_version: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_gates_internal_keys_and_refuses_plaintext() {
    let pki = TestPki::generate();
    let app = TestApp::spawn_with(Options {
        tls: Some(pki.server_tls(Some(INTERNAL))),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let app_key = app.key(&merchant, Scope::App).await;
    let with_cert = app.tls_channel(pki.client_tls(true)).await.unwrap();
    let without_cert = app.tls_channel(pki.client_tls(false)).await.unwrap();

    // A till with its key and its certificate records a purchase over TLS.
    let recorded =
        CheckoutServiceClient::with_interceptor(with_cert.clone(), TestApp::bearer(&pos))
            .record_purchase(purchase("card-1", "r-1", 1000))
            .await
            .unwrap()
            .into_inner();
    assert!(recorded.points_earned > 0);

    // The same key without a certificate is refused, and writes nothing.
    let before = app.row_counts().await;
    let status =
        CheckoutServiceClient::with_interceptor(without_cert.clone(), TestApp::bearer(&pos))
            .record_purchase(purchase("card-1", "r-2", 1000))
            .await
            .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("client certificate") && status.message().contains("pos"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains(&pos), "the key is not echoed");
    assert_eq!(app.row_counts().await, before);

    // So is the admin key; with the certificate it works.
    let status = ProgramServiceClient::with_interceptor(
        without_cert.clone(),
        TestApp::bearer(&merchant.admin_key),
    )
    .get_program(pb::GetProgramRequest {})
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    ProgramServiceClient::with_interceptor(with_cert.clone(), TestApp::bearer(&merchant.admin_key))
        .get_program(pb::GetProgramRequest {})
        .await
        .unwrap();

    // An app has no certificate, and needs none.
    let balance =
        MemberServiceClient::with_interceptor(without_cert.clone(), TestApp::bearer(&app_key))
            .get_balance(balance_request("card-1"))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        balance.balance.unwrap().available,
        recorded.balance.unwrap().available
    );

    // Health stays public over TLS.
    assert_eq!(
        health(without_cert).await.unwrap(),
        ServingStatus::Serving as i32
    );

    // A plaintext client gets nowhere on the TLS port.
    let plaintext = match app.try_channel().await {
        Ok(channel) => health(channel).await.map(|_| ()),
        Err(error) => Err(tonic::Status::unavailable(error.to_string())),
    };
    assert!(plaintext.is_err(), "plaintext was served: {plaintext:?}");

    // A certificate from another CA fails the handshake (it is checked, not just present).
    let stranger = TestPki::generate();
    let foreign = match app
        .tls_channel(pki.client_tls(false).identity(stranger.client_identity()))
        .await
    {
        Ok(channel) => health(channel).await.map(|_| ()),
        Err(error) => Err(tonic::Status::unavailable(error.to_string())),
    };
    assert!(foreign.is_err(), "a foreign certificate was accepted");

    // A client that does not trust the server's CA does not connect either.
    let untrusting = match app.tls_channel(stranger.client_tls(false)).await {
        Ok(channel) => health(channel).await.map(|_| ()),
        Err(error) => Err(tonic::Status::unavailable(error.to_string())),
    };
    assert!(untrusting.is_err(), "the client trusted an unknown server");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_without_a_client_ca_takes_keys_alone() {
    let pki = TestPki::generate();
    let app = TestApp::spawn_with(Options {
        tls: Some(pki.server_tls(None)),
        ..Options::default()
    })
    .await;
    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let channel = app.tls_channel(pki.client_tls(false)).await.unwrap();
    CheckoutServiceClient::with_interceptor(channel, TestApp::bearer(&pos))
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    app.stop().await;
}

/// A TLS-only PostgreSQL: the server migrates an empty database and serves a purchase through
/// `sslmode=verify-full`, its connections are encrypted, and plaintext is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_migrates_and_serves_through_a_tls_only_postgres() {
    let pki = TestPki::generate();
    let pg = tokio::task::block_in_place(|| PrivatePostgres::start_tls(&pki));
    let base = pg.database_url();
    let ca = pki.ca_path().display().to_string();

    // Plaintext is refused by the server; a CA that did not sign it is refused by the client.
    let error = PgConnection::connect(&format!("{base}?sslmode=disable"))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("no encryption"), "{error}");
    let stranger = TestPki::generate();
    PgConnection::connect(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        stranger.ca_path().display()
    ))
    .await
    .unwrap_err();
    PgConnection::connect(&format!("{base}?sslmode=require"))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();

    let db = TestDb::existing(&pg.url("postgres"), DATABASE);
    let app = TestApp::spawn_on(
        db,
        Options {
            database_url: Some(format!("{base}?sslmode=verify-full&sslrootcert={ca}")),
            redis_url: None,
            ..Options::default()
        },
    )
    .await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(applied, MIGRATOR.iter().count() as i64);

    let merchant = app.merchant().await;
    let pos = app.key(&merchant, Scope::Pos).await;
    let recorded = app
        .checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap()
        .into_inner();
    assert!(recorded.points_earned > 0);

    // Every connection of the service is encrypted (the server names itself "loyalty").
    let (connections, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl)
           FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
          WHERE a.application_name = 'loyalty'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(connections > 0);
    assert_eq!(encrypted, connections);
    app.stop().await;
    drop(pg);
}

/// The cache over `rediss://`: with the CA setting it stores and hits; with only the
/// system's roots the handshake fails, the cache is skipped and every RPC still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_speaks_tls_to_a_tls_only_redis() {
    let pki = TestPki::generate();
    let redis = tokio::task::block_in_place(|| PrivateRedis::launch_tls(&pki));
    assert!(redis.url().starts_with("rediss://"));

    let app = TestApp::spawn_with(Options {
        redis_url: Some(redis.url()),
        redis_ca_cert_pem: Some(pki.ca_pem.clone().into_bytes()),
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
    let outcome = |metrics: &str, outcome| {
        common::metric_value(
            metrics,
            "loyalty_cache_operations_total",
            &[("outcome", outcome)],
        )
    };
    // The cache is written after the commit, in a task of its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while outcome(&app.metrics_text().await, "stored") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing stored in the cache"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut member = app.member(&pos).await;
    member.get_balance(balance_request("card-1")).await.unwrap();
    let metrics = app.metrics_text().await;
    assert!(outcome(&metrics, "hit") >= 1.0, "{metrics}");
    assert_eq!(outcome(&metrics, "error"), 0.0, "{metrics}");
    app.stop().await;

    let untrusting = TestApp::spawn_with(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    })
    .await;
    let merchant = untrusting.merchant().await;
    let pos = untrusting.key(&merchant, Scope::Pos).await;
    untrusting
        .checkout(&pos)
        .await
        .record_purchase(purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    let metrics = untrusting.metrics_text().await;
    let stored = common::metric_value(
        &metrics,
        "loyalty_cache_operations_total",
        &[("outcome", "stored")],
    );
    assert_eq!(
        stored, 0.0,
        "stored through an unverified TLS connection:\n{metrics}"
    );
    untrusting.stop().await;
}

/// `loyalty health` (the container's health check) speaks TLS to a TLS server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_command_checks_a_tls_server() {
    let pki = TestPki::generate();
    let app = TestApp::spawn_with(Options {
        tls: Some(pki.server_tls(Some(INTERNAL))),
        ..Options::default()
    })
    .await;
    let health = |endpoint: String, ca: Option<std::path::PathBuf>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_loyalty"));
        command
            .args(["health", "--endpoint", &endpoint])
            .args(["--tls-domain", common::tls::SERVER_NAME]);
        if let Some(ca) = ca {
            command.arg("--ca-cert").arg(ca);
        }
        command.output().expect("run loyalty health")
    };
    let (https, http) = (
        format!("https://{}", app.addr),
        format!("http://{}", app.addr),
    );
    let output = tokio::task::block_in_place(|| health(https.clone(), Some(pki.ca_path())));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");
    // Neither plaintext nor the system's roots get an answer from this server.
    assert!(
        !tokio::task::block_in_place(|| health(http, None))
            .status
            .success()
    );
    assert!(
        !tokio::task::block_in_place(|| health(https, None))
            .status
            .success()
    );
    app.stop().await;
}

/// A half-configured TLS stops the real binary at start-up, naming the missing variable.
#[test]
fn a_certificate_without_its_key_stops_start_up() {
    let pki = TestPki::generate();
    let output = Command::new(env!("CARGO_BIN_EXE_loyalty"))
        .arg("serve")
        .env("LOYALTY_TLS_CERT", pki.server_cert_path())
        .env_remove("LOYALTY_TLS_KEY")
        .output()
        .expect("run loyalty");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("LOYALTY_TLS_CERT is set but LOYALTY_TLS_KEY is not"),
        "{stderr}"
    );
}
