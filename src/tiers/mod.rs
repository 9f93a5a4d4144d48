//! Tiers: the program's VIP levels (Bronze, Silver, Gold), qualified by spend, visits or points
//! earned over a rolling window, each with an earn multiplier and perks. `rules.rs`: which tier
//! a value qualifies for, upgrade at once and downgrade after a grace, the warning before a
//! downgrade, progress to the next tier. They are applied together with the repeat status by
//! `status::standing` (checkout's statement, returns, the standing sweep).

pub mod rules;
