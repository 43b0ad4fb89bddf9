//! A small argument reader shared by the subcommands (no parser crate: the
//! binary has few flags and must stay small for dom0 images).

use anyhow::{bail, Context, Result};

/// Arguments left to read, front to back.
pub struct Args {
    items: std::collections::VecDeque<String>,
}

#[allow(dead_code)]
impl Args {
    /// Wraps the arguments after the subcommand name.
    pub fn new(items: Vec<String>) -> Self {
        Args { items: items.into() }
    }

    /// Takes the next argument if it is exactly `flag` (e.g. `-p`).
    pub fn flag(&mut self, flag: &str) -> bool {
        if let Some(pos) = self.items.iter().position(|a| a == flag) {
            self.items.remove(pos);
            true
        } else {
            false
        }
    }

    /// Takes `--name VALUE` or `--name=VALUE` from anywhere in the list.
    pub fn value(&mut self, name: &str) -> Result<Option<String>> {
        let prefix = format!("{name}=");
        if let Some(pos) = self.items.iter().position(|a| a == name || a.starts_with(&prefix)) {
            let item = self.items.remove(pos).expect("position is valid");
            if let Some(v) = item.strip_prefix(&prefix) {
                return Ok(Some(v.to_string()));
            }
            let v = self.items.remove(pos).with_context(|| format!("{name} needs a value"))?;
            return Ok(Some(v));
        }
        Ok(None)
    }

    /// Takes `--name VALUE` and parses it.
    pub fn parsed<T: std::str::FromStr>(&mut self, name: &str) -> Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.value(name)? {
            Some(v) => v.parse().map(Some).map_err(|e| anyhow::anyhow!("invalid value {v:?} for {name}: {e}")),
            None => Ok(None),
        }
    }

    /// Every occurrence of `--name VALUE`.
    pub fn values(&mut self, name: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        while let Some(v) = self.value(name)? {
            out.push(v);
        }
        Ok(out)
    }

    /// The remaining positional arguments; fails on a leftover `--flag`.
    pub fn positionals(self) -> Result<Vec<String>> {
        if let Some(f) = self.items.iter().find(|a| a.starts_with("--") && a.len() > 2) {
            bail!("unknown option {f}");
        }
        Ok(self.items.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_takes_both_forms_and_rejects_missing_value() {
        let mut a = Args::new(vec!["--x=1".into(), "p".into(), "--y".into(), "2".into()]);
        assert_eq!(a.value("--x").unwrap().as_deref(), Some("1"));
        assert_eq!(a.parsed::<u32>("--y").unwrap(), Some(2));
        assert_eq!(a.positionals().unwrap(), vec!["p".to_string()]);
        let mut b = Args::new(vec!["--y".into()]);
        assert!(b.value("--y").is_err());
    }

    #[test]
    fn positionals_reject_unknown_long_options() {
        assert!(Args::new(vec!["--what".into()]).positionals().is_err());
    }
}
