//! Greetings: a customer's occasions (birthday, enrolment anniversary, the program's holidays),
//! each on the customer's own local day, and the greeting created once per customer, occasion
//! and year for those who consented. Only the pure rules exist so far (`rules.rs`).

pub mod rules;
