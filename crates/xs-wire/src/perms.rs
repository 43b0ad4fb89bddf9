//! Node permissions: `n0`, `r5`, `w5`, `b0` (`docs/misc/xenstore.txt`).
//!
//! The first entry of a node's list names its owner and the access everyone
//! not listed gets; later entries grant access to one domain each.

use crate::error::WireError;

/// What a permission entry allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n`: nothing.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

impl Access {
    /// The letter on the wire.
    pub fn letter(self) -> char {
        match self {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        }
    }

    /// Whether this grants read access.
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }

    /// Whether this grants write access.
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
}

/// One permission entry: an access letter and a domain id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The access granted.
    pub access: Access,
    /// The domain it is granted to (the owner, for the first entry).
    pub domid: u32,
}

impl Perm {
    /// A permission entry.
    pub fn new(access: Access, domid: u32) -> Self {
        Perm { access, domid }
    }
}

impl core::str::FromStr for Perm {
    type Err = WireError;

    fn from_str(s: &str) -> Result<Self, WireError> {
        let bad = || WireError::InvalidPermission(s.to_string());
        let mut chars = s.chars();
        let access = match chars.next() {
            Some('n') => Access::None,
            Some('r') => Access::Read,
            Some('w') => Access::Write,
            Some('b') => Access::Both,
            _ => return Err(bad()),
        };
        let rest = chars.as_str();
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let domid = rest.parse::<u32>().map_err(|_| bad())?;
        if domid > u32::from(u16::MAX) {
            return Err(bad());
        }
        Ok(Perm { access, domid })
    }
}

impl core::fmt::Display for Perm {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid)
    }
}

/// Parses a `XS_GET_PERMS` reply or `XS_SET_PERMS` tail: NUL-separated entries.
pub fn parse_perm_list(payload: &[u8]) -> Result<Vec<Perm>, WireError> {
    let perms = crate::codec::split_nul(payload)
        .into_iter()
        .map(|p| {
            let s =
                core::str::from_utf8(p).map_err(|_| WireError::InvalidPermission(String::from_utf8_lossy(p).into()))?;
            s.parse()
        })
        .collect::<Result<Vec<Perm>, _>>()?;
    if perms.is_empty() {
        return Err(WireError::MalformedPayload("permission list"));
    }
    Ok(perms)
}

/// Encodes entries as NUL-terminated strings.
pub fn encode_perm_list(perms: &[Perm]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in perms {
        out.extend_from_slice(p.to_string().as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_access_letter() {
        for s in ["n0", "r5", "w5", "b0", "b65535"] {
            assert_eq!(s.parse::<Perm>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_permissions() {
        for s in ["", "x1", "r", "r-1", "r1a", "b65536", "R1", "r 1"] {
            assert!(s.parse::<Perm>().is_err(), "{s:?}");
        }
    }

    #[test]
    fn perm_list_round_trips() {
        let list = vec![Perm::new(Access::None, 0), Perm::new(Access::Read, 7)];
        assert_eq!(parse_perm_list(&encode_perm_list(&list)).unwrap(), list);
        assert!(parse_perm_list(b"").is_err());
    }
}
