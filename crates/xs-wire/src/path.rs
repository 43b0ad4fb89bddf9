//! Path checks done before sending, so that xenstored never sees a request it
//! would reject for its path (and, for a guest connection, count against us).

use crate::abi::{XENSTORE_ABS_PATH_MAX, XENSTORE_REL_PATH_MAX};
use crate::error::WireError;

/// Characters xenstored accepts in a node name (`valid_chars()` in xenstored).
fn valid_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@')
}

/// Checks a path as xenstored's `is_valid_nodename()` does, on the form the
/// client sends: absolute (`/...`), special (`@...`, when `allow_special`), or
/// relative to the connection's home (`/local/domain/<id>`).
pub fn validate_path(path: &str, allow_special: bool) -> Result<(), WireError> {
    let invalid = || WireError::InvalidPath(path.to_string());
    if path.is_empty() {
        return Err(invalid());
    }
    let absolute = path.starts_with('/');
    let special = path.starts_with('@');
    if special && !allow_special {
        return Err(invalid());
    }
    if absolute || special {
        if path.len() > XENSTORE_ABS_PATH_MAX {
            return Err(WireError::PathTooLong { len: path.len(), max: XENSTORE_ABS_PATH_MAX });
        }
    } else if path.len() > XENSTORE_REL_PATH_MAX {
        return Err(WireError::PathTooLong { len: path.len(), max: XENSTORE_REL_PATH_MAX });
    }
    if path.len() > 1 && path.ends_with('/') {
        return Err(invalid());
    }
    if path.contains("//") || !path.bytes().all(valid_char) {
        return Err(invalid());
    }
    Ok(())
}

/// Joins a parent path and a child name as xenstore paths do.
pub fn join(parent: &str, child: &str) -> String {
    if parent.ends_with('/') {
        format!("{parent}{child}")
    } else {
        format!("{parent}/{child}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_paths() {
        for p in ["/", "/local/domain/0", "device/vbd/51712", "@introduceDomain", "/a-b_c@d"] {
            validate_path(p, true).unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    #[test]
    fn rejects_paths_xenstored_rejects() {
        for p in ["", "/a/", "/a//b", "/a b", "/a\nb", "/ä", "/a.b"] {
            assert!(validate_path(p, true).is_err(), "{p:?}");
        }
        assert!(validate_path("@releaseDomain", false).is_err());
    }

    #[test]
    fn enforces_length_limits() {
        let abs = format!("/{}", "a".repeat(XENSTORE_ABS_PATH_MAX - 1));
        assert!(validate_path(&abs, false).is_ok());
        assert!(validate_path(&format!("{abs}a"), false).is_err());
        let rel = "a".repeat(XENSTORE_REL_PATH_MAX);
        assert!(validate_path(&rel, false).is_ok());
        assert!(validate_path(&format!("{rel}a"), false).is_err());
    }
}
