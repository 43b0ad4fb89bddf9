//! Requests as the client sends them, checked before they leave, and the
//! parsing of replies. Pure functions: no I/O, so they are unit-tested and
//! fuzzable apart from the connection.

use crate::abi::MsgType;
use crate::codec::split_nul;
use crate::error::WireError;
use crate::path::validate_path;
use crate::perms::{encode_perm_list, Perm};

/// A transaction id; [`TxId::NONE`] (0) means "outside any transaction".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId(pub u32);

impl TxId {
    /// No transaction (`XBT_NULL`).
    pub const NONE: TxId = TxId(0);
}

/// One request, validated: the path is one xenstored accepts and the payload
/// fits `XENSTORE_PAYLOAD_MAX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The message type.
    pub msg_type: MsgType,
    /// The transaction it belongs to.
    pub tx: TxId,
    /// The payload.
    pub payload: Vec<u8>,
}

fn strings(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for p in parts {
        out.extend_from_slice(p);
        out.push(0);
    }
    out
}

fn no_nul(s: &str, what: &'static str) -> Result<(), WireError> {
    if s.as_bytes().contains(&0) {
        return Err(WireError::MalformedPayload(what));
    }
    Ok(())
}

impl Request {
    /// A request with any type and payload; only the size is checked.
    pub fn raw(msg_type: MsgType, tx: TxId, payload: Vec<u8>) -> Result<Self, WireError> {
        if payload.len() > crate::abi::XENSTORE_PAYLOAD_MAX {
            return Err(WireError::PayloadTooLarge { len: payload.len(), max: crate::abi::XENSTORE_PAYLOAD_MAX });
        }
        Ok(Request { msg_type, tx, payload })
    }

    fn on_path(msg_type: MsgType, tx: TxId, path: &str, rest: &[&[u8]]) -> Result<Self, WireError> {
        validate_path(path, false)?;
        let mut parts: Vec<&[u8]> = vec![path.as_bytes()];
        parts.extend_from_slice(rest);
        Request::raw(msg_type, tx, strings(&parts))
    }

    /// `XS_READ path`.
    pub fn read(tx: TxId, path: &str) -> Result<Self, WireError> {
        Request::on_path(MsgType::READ, tx, path, &[])
    }

    /// `XS_WRITE path value` (the value is not NUL-terminated).
    pub fn write(tx: TxId, path: &str, value: &[u8]) -> Result<Self, WireError> {
        validate_path(path, false)?;
        let mut payload = strings(&[path.as_bytes()]);
        payload.extend_from_slice(value);
        Request::raw(MsgType::WRITE, tx, payload)
    }

    /// `XS_MKDIR path`.
    pub fn mkdir(tx: TxId, path: &str) -> Result<Self, WireError> {
        Request::on_path(MsgType::MKDIR, tx, path, &[])
    }

    /// `XS_RM path`.
    pub fn rm(tx: TxId, path: &str) -> Result<Self, WireError> {
        Request::on_path(MsgType::RM, tx, path, &[])
    }

    /// `XS_DIRECTORY path`.
    pub fn directory(tx: TxId, path: &str) -> Result<Self, WireError> {
        Request::on_path(MsgType::DIRECTORY, tx, path, &[])
    }

    /// `XS_DIRECTORY_PART path offset`, the offset in bytes of the child list.
    pub fn directory_part(tx: TxId, path: &str, offset: usize) -> Result<Self, WireError> {
        Request::on_path(MsgType::DIRECTORY_PART, tx, path, &[offset.to_string().as_bytes()])
    }

    /// `XS_GET_PERMS path`.
    pub fn get_perms(tx: TxId, path: &str) -> Result<Self, WireError> {
        Request::on_path(MsgType::GET_PERMS, tx, path, &[])
    }

    /// `XS_SET_PERMS path perm...`; the list must not be empty.
    pub fn set_perms(tx: TxId, path: &str, perms: &[Perm]) -> Result<Self, WireError> {
        if perms.is_empty() {
            return Err(WireError::MalformedPayload("permission list"));
        }
        validate_path(path, false)?;
        let mut payload = strings(&[path.as_bytes()]);
        payload.extend_from_slice(&encode_perm_list(perms));
        Request::raw(MsgType::SET_PERMS, tx, payload)
    }

    /// `XS_WATCH path token`; the path may be special (`@releaseDomain`).
    pub fn watch(path: &str, token: &str) -> Result<Self, WireError> {
        Request::watch_like(MsgType::WATCH, path, token)
    }

    /// `XS_UNWATCH path token`.
    pub fn unwatch(path: &str, token: &str) -> Result<Self, WireError> {
        Request::watch_like(MsgType::UNWATCH, path, token)
    }

    fn watch_like(msg_type: MsgType, path: &str, token: &str) -> Result<Self, WireError> {
        validate_path(path, true)?;
        no_nul(token, "watch token")?;
        Request::raw(msg_type, TxId::NONE, strings(&[path.as_bytes(), token.as_bytes()]))
    }

    /// `XS_TRANSACTION_START` (payload one NUL, as libxenstore sends).
    pub fn transaction_start() -> Self {
        Request { msg_type: MsgType::TRANSACTION_START, tx: TxId::NONE, payload: vec![0] }
    }

    /// `XS_TRANSACTION_END T|F`.
    pub fn transaction_end(tx: TxId, commit: bool) -> Self {
        let flag: &[u8] = if commit { b"T" } else { b"F" };
        Request { msg_type: MsgType::TRANSACTION_END, tx, payload: strings(&[flag]) }
    }

    /// A request whose payload is decimal numbers, each NUL-terminated.
    fn numbers(msg_type: MsgType, values: &[u64]) -> Self {
        let texts: Vec<String> = values.iter().map(u64::to_string).collect();
        let parts: Vec<&[u8]> = texts.iter().map(|s| s.as_bytes()).collect();
        Request { msg_type, tx: TxId::NONE, payload: strings(&parts) }
    }

    /// `XS_GET_DOMAIN_PATH domid`.
    pub fn get_domain_path(domid: u32) -> Self {
        Request::numbers(MsgType::GET_DOMAIN_PATH, &[domid.into()])
    }

    /// `XS_INTRODUCE domid mfn port`.
    pub fn introduce(domid: u32, mfn: u64, port: u32) -> Self {
        Request::numbers(MsgType::INTRODUCE, &[domid.into(), mfn, port.into()])
    }

    /// `XS_RELEASE domid`.
    pub fn release(domid: u32) -> Self {
        Request::numbers(MsgType::RELEASE, &[domid.into()])
    }

    /// `XS_IS_DOMAIN_INTRODUCED domid`.
    pub fn is_domain_introduced(domid: u32) -> Self {
        Request::numbers(MsgType::IS_DOMAIN_INTRODUCED, &[domid.into()])
    }

    /// `XS_RESUME domid`.
    pub fn resume(domid: u32) -> Self {
        Request::numbers(MsgType::RESUME, &[domid.into()])
    }

    /// `XS_SET_TARGET domid target`.
    pub fn set_target(domid: u32, target: u32) -> Self {
        Request::numbers(MsgType::SET_TARGET, &[domid.into(), target.into()])
    }

    /// `XS_RESET_WATCHES` (payload one NUL, as libxenstore sends).
    pub fn reset_watches() -> Self {
        Request { msg_type: MsgType::RESET_WATCHES, tx: TxId::NONE, payload: vec![0] }
    }

    /// `XS_CONTROL arg...`, each argument NUL-terminated.
    pub fn control(args: &[&[u8]]) -> Result<Self, WireError> {
        if args.iter().any(|a| a.contains(&0)) {
            return Err(WireError::MalformedPayload("control argument"));
        }
        Request::raw(MsgType::CONTROL, TxId::NONE, strings(args))
    }
}

/// The payload without one trailing NUL.
fn trim_nul(payload: &[u8]) -> &[u8] {
    payload.strip_suffix(b"\0").unwrap_or(payload)
}

/// A NUL-terminated text reply (`XS_GET_DOMAIN_PATH`, `XS_TRANSACTION_START`).
pub fn parse_text(payload: &[u8], what: &'static str) -> Result<String, WireError> {
    let body = trim_nul(payload);
    if body.contains(&0) {
        return Err(WireError::MalformedPayload(what));
    }
    String::from_utf8(body.to_vec()).map_err(|_| WireError::MalformedPayload(what))
}

/// The id in an `XS_TRANSACTION_START` reply; 0 is refused since it means "none".
pub fn parse_tx_id(payload: &[u8]) -> Result<TxId, WireError> {
    let text = parse_text(payload, "transaction id")?;
    match text.parse::<u32>() {
        Ok(id) if id != 0 && text.bytes().all(|b| b.is_ascii_digit()) => Ok(TxId(id)),
        _ => Err(WireError::MalformedPayload("transaction id")),
    }
}

/// A `T`/`F` reply (`XS_IS_DOMAIN_INTRODUCED`).
pub fn parse_bool(payload: &[u8]) -> Result<bool, WireError> {
    match trim_nul(payload) {
        b"T" => Ok(true),
        b"F" => Ok(false),
        _ => Err(WireError::MalformedPayload("boolean")),
    }
}

fn name(bytes: &[u8]) -> Result<String, WireError> {
    std::str::from_utf8(bytes).map(str::to_string).map_err(|_| WireError::MalformedPayload("directory"))
}

/// An `XS_DIRECTORY` reply: child names, NUL-separated.
pub fn parse_directory(payload: &[u8]) -> Result<Vec<String>, WireError> {
    split_nul(payload).into_iter().map(name).collect()
}

/// One `XS_DIRECTORY_PART` reply, split.
#[derive(Debug, PartialEq, Eq)]
pub struct DirectoryPart<'a> {
    /// The node's generation: the listing restarts if it changes between parts.
    pub generation: &'a [u8],
    /// The bytes of child names in this part (each NUL-terminated).
    pub names: &'a [u8],
    /// Whether this part ends the list (an empty name followed it).
    pub last: bool,
}

/// Splits an `XS_DIRECTORY_PART` reply: `generation\0` then names, each
/// NUL-terminated; an empty name (a second NUL in a row) ends the list.
pub fn parse_directory_part(payload: &[u8]) -> Result<DirectoryPart<'_>, WireError> {
    let bad = || WireError::MalformedPayload("directory part");
    let gen_end = payload.iter().position(|&b| b == 0).ok_or_else(bad)?;
    let generation = &payload[..gen_end];
    let rest = &payload[gen_end + 1..];
    if generation.is_empty() || rest.is_empty() {
        return Err(bad());
    }
    // The list ends where an empty name starts: at position 0, or after a NUL.
    if rest[0] == 0 {
        return Ok(DirectoryPart { generation, names: &rest[..0], last: true });
    }
    if let Some(i) = rest.windows(2).position(|w| w == b"\0\0") {
        return Ok(DirectoryPart { generation, names: &rest[..i + 1], last: true });
    }
    if rest.last() != Some(&0) {
        return Err(bad());
    }
    Ok(DirectoryPart { generation, names: rest, last: false })
}

/// Turns the collected name bytes of all parts into names.
pub fn names_from_parts(bytes: &[u8]) -> Result<Vec<String>, WireError> {
    parse_directory(bytes)
}

/// An `XS_WATCH_EVENT` payload: `path\0token\0`.
pub fn parse_watch_event(payload: &[u8]) -> Result<(String, String), WireError> {
    let bad = || WireError::MalformedPayload("watch event");
    let parts = split_nul(payload);
    if parts.len() != 2 {
        return Err(bad());
    }
    let path = std::str::from_utf8(parts[0]).map_err(|_| bad())?;
    let token = std::str::from_utf8(parts[1]).map_err(|_| bad())?;
    if path.is_empty() {
        return Err(bad());
    }
    Ok((path.to_string(), token.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perms::Access;

    #[test]
    fn requests_have_libxenstore_payloads() {
        assert_eq!(Request::read(TxId(3), "/a").unwrap().payload, b"/a\0");
        assert_eq!(Request::write(TxId::NONE, "/a", b"v\0x").unwrap().payload, b"/a\0v\0x");
        assert_eq!(Request::directory_part(TxId::NONE, "/a", 12).unwrap().payload, b"/a\x0012\0");
        assert_eq!(Request::watch("@releaseDomain", "t 1").unwrap().payload, b"@releaseDomain\0t 1\0");
        assert_eq!(Request::transaction_end(TxId(4), false).payload, b"F\0");
        assert_eq!(Request::introduce(1, 0x1234, 5).payload, b"1\x004660\x005\0");
        assert_eq!(
            Request::set_perms(TxId::NONE, "/a", &[Perm::new(Access::None, 0), Perm::new(Access::Read, 3)])
                .unwrap()
                .payload,
            b"/a\0n0\0r3\0"
        );
    }

    #[test]
    fn requests_reject_bad_paths_tokens_and_sizes_before_sending() {
        assert!(Request::read(TxId::NONE, "/a b").is_err());
        assert!(Request::write(TxId::NONE, "@special", b"").is_err());
        assert!(Request::watch("/a", "bad\0token").is_err());
        assert!(Request::set_perms(TxId::NONE, "/a", &[]).is_err());
        let big = vec![b'x'; crate::abi::XENSTORE_PAYLOAD_MAX];
        assert!(matches!(Request::write(TxId::NONE, "/a", &big), Err(WireError::PayloadTooLarge { .. })));
        assert!(Request::control(&[b"a\0b"]).is_err());
    }

    #[test]
    fn tx_id_reply_must_be_a_nonzero_number() {
        assert_eq!(parse_tx_id(b"17\0").unwrap(), TxId(17));
        for bad in [&b"0\0"[..], b"", b"x\0", b"+1\0", b"99999999999\0"] {
            assert!(parse_tx_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn directory_part_finds_the_terminating_empty_name() {
        let mid = parse_directory_part(b"7\0a\0bc\0").unwrap();
        assert_eq!(mid, DirectoryPart { generation: b"7", names: b"a\0bc\0", last: false });
        let end = parse_directory_part(b"7\0d\0\0").unwrap();
        assert_eq!(end, DirectoryPart { generation: b"7", names: b"d\0", last: true });
        let empty = parse_directory_part(b"7\0\0").unwrap();
        assert!(empty.last && empty.names.is_empty());
    }

    #[test]
    fn directory_part_rejects_truncated_replies() {
        for bad in [&b""[..], b"7", b"\0a\0", b"7\0", b"7\0ab"] {
            assert!(parse_directory_part(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn watch_event_needs_exactly_path_and_token() {
        assert_eq!(parse_watch_event(b"/a\0tok\0").unwrap(), ("/a".to_string(), "tok".to_string()));
        assert_eq!(parse_watch_event(b"/a\0\0").unwrap(), ("/a".to_string(), String::new()));
        for bad in [&b""[..], b"/a\0", b"/a\0t\0x\0", b"\0t\0", b"/\xff\0t\0"] {
            assert!(parse_watch_event(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn directory_and_bool_replies_parse() {
        assert_eq!(parse_directory(b"a\0b\0").unwrap(), vec!["a", "b"]);
        assert!(parse_directory(b"").unwrap().is_empty());
        assert!(parse_directory(b"\xff\0").is_err());
        assert!(parse_bool(b"T\0").unwrap());
        assert!(!parse_bool(b"F").unwrap());
        assert!(parse_bool(b"X\0").is_err());
    }
}
