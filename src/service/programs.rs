//! Reading and replacing a merchant's program, and the in-memory copy checkout uses.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use sqlx::PgConnection;

use crate::domain::program::{Program, ProgramRules};
use crate::error::Error;
use crate::service::{Caller, Loyalty};
use crate::storage::{MerchantId, programs};

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
            programs::load(conn, merchant)
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

impl Loyalty {
    pub async fn get_program(&self, caller: &Caller) -> Result<Program, Error> {
        let mut conn = self.store.acquire().await?;
        programs::load(&mut conn, caller.merchant)
            .await?
            .ok_or(Error::NotFound("program"))
    }

    pub async fn update_program(
        &self,
        caller: &Caller,
        rules: ProgramRules,
        expected_version: i64,
    ) -> Result<Program, Error> {
        let program = programs::update(
            self.store.pool(),
            caller.merchant,
            &rules,
            expected_version,
            &caller.actor(),
        )
        .await?;
        self.programs
            .remember(caller.merchant, Arc::new(program.clone()));
        tracing::info!(merchant = %caller.merchant, version = program.version, "program updated");
        Ok(program)
    }
}
