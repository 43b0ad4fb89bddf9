//! Reading a device's nodes into plain values: rules written as functions
//! of `Fn(&str) -> Option<String>` (tested without xenstore) read through a
//! [`NodeReader`], which keeps the first xenstore error instead of taking it
//! for an absent node.

use std::cell::RefCell;

use crate::error::DeviceError;

/// Reads nodes through `f`, keeping the first xenstore error (absent nodes
/// are `None`) so the config rules can be plain functions of values.
pub struct NodeReader<F> {
    f: F,
    error: RefCell<Option<DeviceError>>,
}

impl<F: Fn(&str) -> Result<Option<String>, DeviceError>> NodeReader<F> {
    /// Reads through `f` (e.g. `|n| ctx.frontend_str_opt(n)`).
    pub fn new(f: F) -> Self {
        NodeReader { f, error: RefCell::new(None) }
    }

    /// The node's value, `None` if absent or if reading it failed.
    pub fn read(&self, node: &str) -> Option<String> {
        match (self.f)(node) {
            Ok(v) => v,
            Err(e) => {
                self.error.borrow_mut().get_or_insert(e);
                None
            }
        }
    }

    /// The first read that failed, if any: what the rules saw is then not
    /// what xenstore holds.
    pub fn check(self) -> Result<(), DeviceError> {
        self.error.into_inner().map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_nodes_are_none_and_no_error() {
        let reader = NodeReader::new(|_: &str| Ok(None));
        assert_eq!(reader.read("params"), None);
        assert!(reader.check().is_ok());
    }

    #[test]
    fn the_first_xenstore_error_is_kept() {
        let reader = NodeReader::new(|n: &str| match n {
            "a" => Err(DeviceError::msg("first")),
            "b" => Err(DeviceError::msg("second")),
            _ => Ok(Some("v".to_string())),
        });
        assert_eq!(reader.read("c").as_deref(), Some("v"));
        assert_eq!(reader.read("a"), None);
        assert_eq!(reader.read("b"), None);
        assert_eq!(reader.check().unwrap_err().to_string(), "first");
    }
}
