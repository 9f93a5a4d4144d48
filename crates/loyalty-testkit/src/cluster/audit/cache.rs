//! The cache against the truth: each customer's Redis entry absent or exactly the committed
//! state, and GetBalance showing the committed state (rules 7 and 9).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use loyalty::pb;

use super::super::*;
use super::Committed;

/// Waits up to `within` for the cache to hold only committed states (or nothing), then reads
/// every balance through the server and checks the cache those reads refilled. Returns when
/// it converged, what is still wrong, and how many entries the cache holds.
pub(super) async fn check(
    cluster: &Cluster,
    committed: &HashMap<String, Committed>,
    within: Duration,
) -> (Option<Duration>, Vec<String>, usize) {
    let mut violations = Vec::new();
    let mut redis = cluster.redis.connection().await;
    let started = Instant::now();
    let mut converged_after = None;
    let mut stale = loop {
        let stale = stale_entries(cluster, &mut redis, committed).await;
        if stale.is_empty() {
            converged_after = Some(started.elapsed());
            break stale;
        }
        if started.elapsed() > within {
            break stale;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    violations.append(&mut stale);

    // What customers are shown: a fresh GetBalance equals Postgres. Then the cache, which
    // those reads refilled, must hold exactly the committed state.
    let mut client = cluster.client(&Record::shared(), Duration::from_secs(5));
    for (customer, state) in committed {
        let call = Call::Balance(pb::GetBalanceRequest {
            external_id: customer.clone(),
            min_version: 0,
        });
        match client
            .call(&call, Instant::now() + Duration::from_secs(10))
            .await
        {
            Ok(Reply::Balance(reply)) => {
                let b = reply.balance.unwrap_or_default();
                let shown = Committed {
                    available: b.available,
                    pending: b.pending,
                    lifetime_earned: b.lifetime_earned,
                    lifetime_redeemed: b.lifetime_redeemed,
                    purchase_count: reply.purchase_count,
                    version: b.version,
                };
                if shown != *state {
                    violations.push(format!(
                        "{customer}: GetBalance shows {shown:?}, committed {state:?}"
                    ));
                }
            }
            other => violations.push(format!("{customer}: GetBalance failed: {other:?}")),
        }
    }
    let mut stale = stale_entries(cluster, &mut redis, committed).await;
    violations.append(&mut stale);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", cluster.key_prefix))
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    (converged_after, violations, keys.len())
}

/// Customers whose cache entry exists and differs from the committed state.
async fn stale_entries(
    cluster: &Cluster,
    redis: &mut redis::aio::MultiplexedConnection,
    committed: &HashMap<String, Committed>,
) -> Vec<String> {
    let mut stale = Vec::new();
    for (customer, state) in committed {
        let key = cluster.cache_key(redis, customer).await;
        // The numbers of the entry; the standing ('st', binary: `loyalty::status::cached`) is
        // not a balance figure.
        let fields: HashMap<String, Vec<u8>> =
            match redis::cmd("HGETALL").arg(key).query_async(redis).await {
                Ok(fields) => fields,
                Err(e) => {
                    stale.push(format!("{customer}: cache unreadable: {e}"));
                    continue;
                }
            };
        let fields: HashMap<String, i64> = match fields
            .into_iter()
            .filter(|(name, _)| name != "st")
            .map(|(name, value)| {
                let number = std::str::from_utf8(&value)
                    .map_err(|e| e.to_string())?
                    .parse::<i64>()
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((name, number))
            })
            .collect()
        {
            Ok(fields) => fields,
            Err(e) => {
                stale.push(format!("{customer}: cache unreadable: {e}"));
                continue;
            }
        };
        if fields.is_empty() {
            continue;
        }
        let field = |name: &str| fields.get(name).copied();
        let cached = (
            field("v"),
            field("a"),
            field("p"),
            field("le"),
            field("lr"),
            field("pc"),
        );
        let expected = (
            Some(state.version),
            Some(state.available),
            Some(state.pending),
            Some(state.lifetime_earned),
            Some(state.lifetime_redeemed),
            Some(state.purchase_count),
        );
        if cached != expected {
            stale.push(format!(
                "{customer}: cache holds (v, a, p, le, lr, pc) = {cached:?}, committed {expected:?}"
            ));
        }
    }
    stale.sort();
    stale
}
