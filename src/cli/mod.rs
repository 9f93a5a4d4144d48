//! The operator subcommands: `migrate`, `merchant create`, `key create`, `key revoke`.
//! Secrets are printed to stdout once and nowhere else (never to the log).

use std::time::Duration;

use crate::access;
use crate::config::{DatabaseArgs, KeyCommand, MerchantCommand};
use crate::error::Error;
use crate::platform::caller::{MerchantId, Scope};
use crate::platform::store::Store;

async fn store(database: &DatabaseArgs) -> Result<Store, Error> {
    let mut config = database
        .config()
        .map_err(|e| Error::invalid("database", e))?;
    config.acquire_timeout = config.acquire_timeout.max(Duration::from_secs(5));
    Store::connect_lazy(&config)
}

pub async fn migrate(database: &DatabaseArgs) -> Result<(), Error> {
    let store = store(database).await?;
    store.migrate().await?;
    println!("migrations applied");
    Ok(())
}

pub async fn merchant(command: MerchantCommand) -> Result<(), Error> {
    match command {
        MerchantCommand::Create {
            name,
            currency,
            json,
            database,
        } => {
            let store = store(&database).await?;
            let (merchant, key) = access::create_merchant(&store, &name, &currency).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "merchant_id": merchant.0,
                        "admin_key_id": key.key_id,
                        "admin_key": key.secret.expose(),
                    })
                );
            } else {
                println!("merchant_id: {merchant}");
                println!("admin_key_id: {}", key.key_id);
                println!("admin_key: {}", key.secret.expose());
                println!("(the key is shown only this once; store it now)");
            }
            Ok(())
        }
    }
}

pub async fn key(command: KeyCommand) -> Result<(), Error> {
    match command {
        KeyCommand::Create {
            merchant,
            scope,
            json,
            database,
        } => {
            let scope = Scope::parse(&scope).ok_or_else(|| {
                Error::invalid("scope", "must be one of pos, app, scheduler, admin")
            })?;
            let store = store(&database).await?;
            let key = access::create_key(&store, MerchantId(merchant), scope).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "key_id": key.key_id,
                        "scope": scope.as_str(),
                        "key": key.secret.expose(),
                    })
                );
            } else {
                println!("key_id: {}", key.key_id);
                println!("scope: {scope}");
                println!("key: {}", key.secret.expose());
                println!("(the key is shown only this once; store it now)");
            }
            Ok(())
        }
        KeyCommand::Revoke { key_id, database } => {
            let store = store(&database).await?;
            let merchant = access::revoke_key(&store, key_id).await?;
            println!("key {key_id} of merchant {merchant} revoked");
            Ok(())
        }
    }
}

/// Exit status 0 when the server at `endpoint` reports SERVING for `service`.
pub async fn health(
    endpoint: &str,
    service: &str,
    ca_cert: Option<&str>,
    tls_domain: Option<&str>,
) -> Result<(), Error> {
    use tonic::transport::{Certificate, ClientTlsConfig};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let mut target = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| Error::invalid("endpoint", e.to_string()))?;
    if endpoint.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match ca_cert.filter(|path| !path.is_empty()) {
            Some(path) => {
                let pem = crate::platform::tls::read_setting_file(
                    "LOYALTY_HEALTH_CA_CERT",
                    std::path::Path::new(path),
                )
                .map_err(|e| Error::invalid("ca_cert", e))?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        if let Some(domain) = tls_domain.filter(|d| !d.is_empty()) {
            tls = tls.domain_name(domain);
        }
        target = target
            .tls_config(tls)
            .map_err(|e| Error::invalid("endpoint", e.to_string()))?;
    }
    let channel = target
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach {endpoint}: {e}")))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|status| Error::Unavailable(format!("health check failed: {}", status.message())))?
        .into_inner();
    match ServingStatus::try_from(reply.status) {
        Ok(ServingStatus::Serving) => {
            println!("SERVING");
            Ok(())
        }
        Ok(status) => Err(Error::Unavailable(status.as_str_name().to_string())),
        Err(_) => Err(Error::Unavailable(format!(
            "unknown status {}",
            reply.status
        ))),
    }
}
