//! The one rule for container, exec and sandbox ids, checked on both sides of the
//! protocol: ids become path components (host and guest), QEMU's `-name` and log fields.
//!
//! containerd's own identifiers are at most 76 characters of `[A-Za-z0-9_.-]` starting with
//! a letter or digit; Kubernetes uses 64 hex digits. vmbox accepts 1-128 characters of
//! `[A-Za-z0-9_.-]`, not starting with `.` (no `.`/`..` path tricks, no comma that could
//! inject a QEMU option, no `/`).

use std::fmt;

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A container, exec or sandbox id that passed [`Id::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(String);

/// An id that breaks the rule; names the field it came from and shows (a bounded prefix of)
/// the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {shown:?}: expected 1-{MAX_ID_LEN} of [A-Za-z0-9_.-], not starting with '.'")]
pub struct IdError {
    pub field: &'static str,
    shown: String,
}

impl Id {
    /// Checks `value`, which came from request field `field` (e.g. `"exec_id"`).
    pub fn parse(field: &'static str, value: &str) -> Result<Id, IdError> {
        if valid_id(value) {
            Ok(Id(value.to_string()))
        } else {
            Err(IdError {
                field,
                shown: value.chars().take(MAX_ID_LEN + 8).collect(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Id {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Id {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Whether `id` follows the rule of this module.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_one_rule() {
        for good in ["a", "abc-1.2_3", &"f".repeat(64), &"x".repeat(MAX_ID_LEN)] {
            assert!(Id::parse("id", good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".x",
            "../x",
            "a/b",
            "a,b",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let e = Id::parse("exec_id", bad).unwrap_err();
            assert!(e.to_string().starts_with("exec_id "), "{e}");
        }
    }
}
