//! Reading and replacing a merchant's program, and the in-memory copy checkout uses.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sqlx::PgConnection;

use crate::error::Error;
use crate::platform::audit;
use crate::platform::caller::{Caller, MerchantId};
use crate::platform::store::commit;
use crate::programs::Programs;
use crate::programs::rules::{Program, ProgramRules};
use crate::programs::store;

/// Programs by merchant. Checkout reads the program's version in the same round trip as the
/// customer, and the full program only when that version is not the one held here, so a
/// change is seen by the very next purchase on every replica.
#[derive(Clone, Default)]
pub struct ProgramCache {
    programs: Arc<RwLock<HashMap<MerchantId, Arc<Program>>>>,
}

impl ProgramCache {
    pub async fn get(
        &self,
        conn: &mut PgConnection,
        merchant: MerchantId,
        version: i64,
    ) -> Result<Arc<Program>, Error> {
        if let Some(program) = self.cached(merchant).filter(|p| p.version == version) {
            return Ok(program);
        }
        let program = Arc::new(
            store::load(conn, merchant)
                .await?
                .ok_or(Error::NotFound("program"))?,
        );
        self.remember(merchant, program.clone());
        Ok(program)
    }

    fn cached(&self, merchant: MerchantId) -> Option<Arc<Program>> {
        self.programs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&merchant)
            .cloned()
    }

    fn remember(&self, merchant: MerchantId, program: Arc<Program>) {
        let mut programs = self.programs.write().unwrap_or_else(|e| e.into_inner());
        let newer = programs
            .get(&merchant)
            .is_none_or(|held| held.version < program.version);
        if newer {
            programs.insert(merchant, program);
        }
    }
}

impl Programs {
    pub async fn get_program(&self, caller: &Caller) -> Result<Program, Error> {
        let mut conn = self.store.acquire().await?;
        store::load(&mut conn, caller.merchant)
            .await?
            .ok_or(Error::NotFound("program"))
    }

    /// Replaces the rules, checking the caller's expected version (0: no check), with an
    /// audit record in the same transaction.
    pub async fn update_program(
        &self,
        caller: &Caller,
        rules: ProgramRules,
        expected_version: i64,
    ) -> Result<Program, Error> {
        let merchant = caller.merchant;
        let mut tx = self.store.begin().await?;
        let Some((currency, version)) = store::lock(&mut tx, merchant).await? else {
            return Err(Error::NotFound("program"));
        };
        if expected_version != 0 && expected_version != version {
            return Err(Error::FailedPrecondition(format!(
                "the program is at version {version}, not {expected_version}; read it again"
            )));
        }
        if currency != rules.currency.code() && store::has_purchases(&mut tx, merchant).await? {
            return Err(Error::FailedPrecondition(format!(
                "the currency cannot change from {currency}: purchases were recorded in it"
            )));
        }
        if let Some(gift_id) = &rules.occasions.birthday_reward.gift_id
            && !crate::gifts::store::gift_exists(&mut tx, merchant, gift_id).await?
        {
            return Err(Error::invalid(
                "program.occasions.birthday_reward.gift_id",
                format!("{gift_id:?} is not a gift of the catalog"),
            ));
        }
        let program = store::replace(&mut tx, merchant, &rules).await?;
        audit::record(
            &mut tx,
            merchant,
            &caller.actor(),
            "program.update",
            serde_json::json!({ "version": program.version }),
        )
        .await?;
        commit(tx).await?;
        self.programs.remember(merchant, Arc::new(program.clone()));
        tracing::info!(%merchant, version = program.version, "program updated");
        Ok(program)
    }
}
