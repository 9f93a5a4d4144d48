//! The `loyalty` binary itself: the operator commands, and a served process that logs no
//! secrets or contact data and stops cleanly on SIGTERM.

use loyalty_testkit as common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestDb;
use common::cluster::free_port;
use loyalty::pb;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_loyalty");

fn loyalty(db: &TestDb, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("LOYALTY_LOG_FORMAT", "json")
        .output()
        .expect("run loyalty")
}

fn json(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_create_merchants_and_manage_keys() {
    let db = TestDb::create().await;
    let migrated = loyalty(&db, &["migrate"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let merchant = json(&loyalty(
        &db,
        &[
            "merchant",
            "create",
            "Café Nord",
            "--currency",
            "EUR",
            "--json",
        ],
    ));
    let merchant_id = merchant["merchant_id"].as_i64().unwrap();
    assert!(merchant["admin_key"].as_str().unwrap().starts_with("lk_"));

    let key = json(&loyalty(
        &db,
        &[
            "key",
            "create",
            "--merchant",
            &merchant_id.to_string(),
            "--scope",
            "pos",
            "--json",
        ],
    ));
    assert_eq!(key["scope"], "pos");
    let key_id = key["key_id"].as_i64().unwrap();
    let secret = key["key"].as_str().unwrap().to_string();

    // Only the hash is stored.
    let pool = db.pool().await;
    let stored: Vec<(Vec<u8>, String)> =
        sqlx::query_as("SELECT key_hash, key_prefix FROM api_keys")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 2);
    for (hash, prefix) in &stored {
        assert_eq!(hash.len(), 32);
        assert!(
            secret.starts_with(prefix.as_str())
                || merchant["admin_key"]
                    .as_str()
                    .unwrap()
                    .starts_with(prefix.as_str())
        );
        assert!(!String::from_utf8_lossy(hash).contains(&secret));
    }

    let revoked = loyalty(&db, &["key", "revoke", &key_id.to_string()]);
    assert!(revoked.status.success());
    let revoked_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1")
            .bind(key_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(revoked_at.is_some());

    // Mistakes are reported, with a non-zero exit.
    for args in [
        vec!["key", "create", "--merchant", "999999", "--scope", "pos"],
        vec![
            "key",
            "create",
            "--merchant",
            &merchant_id.to_string(),
            "--scope",
            "root",
        ],
        vec!["key", "revoke", "999999"],
        vec!["merchant", "create", "Bad", "--currency", "EURO"],
    ] {
        let output = loyalty(&db, &args);
        assert!(!output.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("error:"), "{args:?}: {stderr}");
    }
    pool.close().await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_process_logs_no_secrets_and_stops_on_sigterm() {
    let db = TestDb::create().await;
    let merchant = json(&loyalty(
        &db,
        &["merchant", "create", "Shop", "--currency", "EUR", "--json"],
    ));
    let admin_key = merchant["admin_key"].as_str().unwrap().to_string();

    let port = free_port();
    let mut server = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "",
        ])
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", common::redis_url())
        .env("LOYALTY_REDIS_PREFIX", format!("test:{}", db.name))
        .env("LOYALTY_LOG_FORMAT", "json")
        .env("RUST_LOG", "trace,h2=info,hyper=info,tower=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let output = common::DrainedOutput::of(&mut server);

    let endpoint = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let channel = loop {
        if let Ok(channel) = Channel::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
        {
            break channel;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {admin_key}").parse().unwrap();
    let with_key = move |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        Ok(request)
    };
    let mut member = pb::member_service_client::MemberServiceClient::with_interceptor(
        channel.clone(),
        with_key.clone(),
    );
    member
        .enroll_customer(pb::EnrollCustomerRequest {
            external_id: "card-1".into(),
            display_name: "Secret Name".into(),
            email: "secret.person@example.com".into(),
            phone: "+4915199999999".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    member
        .get_customer(pb::GetCustomerRequest {
            external_id: "card-1".into(),
        })
        .await
        .unwrap();
    let mut checkout =
        pb::checkout_service_client::CheckoutServiceClient::with_interceptor(channel, with_key);
    checkout
        .record_purchase(common::purchase("card-1", "r-1", 1000))
        .await
        .unwrap();
    // A bad key is logged about without being echoed.
    let mut bad = pb::member_service_client::MemberServiceClient::new(
        Channel::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut request = tonic::Request::new(pb::GetBalanceRequest {
        external_id: "card-1".into(),
        min_version: 0,
    });
    request.metadata_mut().insert(
        "authorization",
        "Bearer lk_guessed-key-12345".parse().unwrap(),
    );
    bad.get_balance(request).await.unwrap_err();
    // A customer token is minted and used without ever being logged.
    let token = member
        .issue_customer_token(pb::IssueCustomerTokenRequest {
            external_id: "card-1".into(),
            ttl_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut request = tonic::Request::new(pb::GetCustomerRequest {
        external_id: "card-1".into(),
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    bad.get_customer(request).await.unwrap();

    let health = Command::new(BIN)
        .args(["health", "--endpoint", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "{}",
        String::from_utf8_lossy(&health.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");

    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "server did not stop after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let health = Command::new(BIN)
        .args(["health", "--endpoint", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(
        !health.status.success(),
        "a stopped server must not report healthy"
    );
    let (_, stderr) = output.finish();
    let logs = String::from_utf8_lossy(&stderr);
    assert!(logs.contains("serving gRPC"), "{logs}");
    assert!(logs.contains("SIGTERM received"), "{logs}");
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    for secret in [
        admin_key.as_str(),
        token.as_str(),
        "lk_guessed-key-12345",
        "secret.person@example.com",
        "+4915199999999",
        "Secret Name",
    ] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
    }
    db.drop_database().await;
}
