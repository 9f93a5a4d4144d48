//! Field-level validation shared by every request: what an id, a name or a category may be.
//! Violations name the field with its path in the request (`lines[3].sku`), so a caller can
//! point at the exact input that was wrong.

/// Longest id we accept (external ids, purchase ids, store ids, skus).
pub const MAX_ID_CHARS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Violation {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Input that broke the rules: every violation found, each naming its field. Rules return
/// it; `error.rs` turns it into INVALID_ARGUMENT (rules know nothing of gRPC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub Vec<Violation>);

impl Invalid {
    /// A single-field violation.
    pub fn field(field: impl Into<String>, description: impl Into<String>) -> Invalid {
        Invalid(vec![Violation::new(field, description)])
    }
}

impl From<Violation> for Invalid {
    fn from(violation: Violation) -> Invalid {
        Invalid(vec![violation])
    }
}

/// Collects every violation of one request, so the caller learns about all of them at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<Violation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(Violation::new(field, description));
    }

    /// Records the violation of a failed check and passes a successful value through.
    pub fn check<T>(&mut self, result: Result<T, Violation>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(violation) => {
                self.0.push(violation);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing was recorded, the violations otherwise.
    pub fn finish(self) -> Result<(), Invalid> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Invalid(self.0))
        }
    }

    pub fn into_error(self) -> Invalid {
        Invalid(self.0)
    }
}

/// An identifier chosen by the merchant (customer external id, purchase id, store id, sku):
/// 1 to 128 characters, no control characters, no surrounding whitespace (" 42" and "42"
/// would otherwise be two different customers).
pub fn identifier(field: &str, value: &str) -> Result<String, Violation> {
    if value.is_empty() {
        return Err(Violation::new(field, "must not be empty"));
    }
    if value.chars().count() > MAX_ID_CHARS {
        return Err(Violation::new(
            field,
            format!("must be at most {MAX_ID_CHARS} characters"),
        ));
    }
    if value.trim() != value {
        return Err(Violation::new(
            field,
            "must not start or end with whitespace",
        ));
    }
    no_control_characters(field, value)?;
    Ok(value.to_string())
}

/// Free text (names, categories): bounded length, no control characters. May be empty.
pub fn text(field: &str, value: &str, max_chars: usize) -> Result<String, Violation> {
    if value.chars().count() > max_chars {
        return Err(Violation::new(
            field,
            format!("must be at most {max_chars} characters"),
        ));
    }
    no_control_characters(field, value)?;
    Ok(value.to_string())
}

fn no_control_characters(field: &str, value: &str) -> Result<(), Violation> {
    if value.chars().any(char::is_control) {
        return Err(Violation::new(field, "must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert_eq!(identifier("id", "card-42").unwrap(), "card-42");
        assert_eq!(identifier("id", "Кофе-№1").unwrap(), "Кофе-№1");
        assert_eq!(
            identifier("id", &"é".repeat(128)).unwrap().chars().count(),
            128
        );
        for bad in ["", " 42", "42 ", "a\0b", "a\nb", &"x".repeat(129)] {
            let violation = identifier("external_id", bad).unwrap_err();
            assert_eq!(violation.field, "external_id", "{bad:?}");
        }
    }

    #[test]
    fn text_allows_empty_but_bounds_length() {
        assert_eq!(text("name", "", 10).unwrap(), "");
        assert!(text("name", &"a".repeat(11), 10).is_err());
        assert!(text("name", "tab\there", 10).is_err());
    }

    #[test]
    fn violations_collects_all() {
        let mut v = Violations::default();
        assert_eq!(v.check(identifier("a", "ok")), Some("ok".to_string()));
        assert_eq!(v.check(identifier("b", "")), None);
        v.add("c", "wrong");
        match v.finish() {
            Err(Invalid(list)) => {
                let fields: Vec<_> = list.iter().map(|v| v.field.as_str()).collect();
                assert_eq!(fields, ["b", "c"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
