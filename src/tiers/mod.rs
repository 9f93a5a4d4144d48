//! Tiers: the program's VIP levels (Bronze, Silver, Gold), qualified by spend, visits or points
//! earned over a rolling window, each with an earn multiplier and perks. Only the pure rules
//! exist so far (`rules.rs`): which tier a value qualifies for, upgrade at once and downgrade
//! after a grace, the warning before a downgrade, progress to the next tier.

pub mod rules;
