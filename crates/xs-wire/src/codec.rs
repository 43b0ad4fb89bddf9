//! Framing: [`Message`] to bytes and an incremental [`Decoder`] from bytes.

use zerocopy::{FromBytes, IntoBytes};

use crate::abi::{MsgType, XsdSockmsg, HEADER_LEN, XENSTORE_PAYLOAD_MAX};
use crate::error::{WireError, XsErrno};

/// One xenstore message: a header and its payload. Payloads are bytes, since
/// values may be binary; helpers split the NUL-separated forms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The message type.
    pub msg_type: MsgType,
    /// Request id, echoed by the reply.
    pub req_id: u32,
    /// Transaction id, 0 for none.
    pub tx_id: u32,
    /// The payload, at most `XENSTORE_PAYLOAD_MAX` bytes.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message with the payload as given; fails if it is too large.
    pub fn new(msg_type: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Result<Self, WireError> {
        if payload.len() > XENSTORE_PAYLOAD_MAX {
            return Err(WireError::PayloadTooLarge { len: payload.len(), max: XENSTORE_PAYLOAD_MAX });
        }
        Ok(Message { msg_type, req_id, tx_id, payload })
    }

    /// A message whose payload is each part followed by a NUL (the form of
    /// requests such as `XS_READ path\0` or `XS_WATCH path\0token\0`).
    pub fn with_strings(msg_type: MsgType, req_id: u32, tx_id: u32, parts: &[&[u8]]) -> Result<Self, WireError> {
        let mut payload = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
        for p in parts {
            payload.extend_from_slice(p);
            payload.push(0);
        }
        Message::new(msg_type, req_id, tx_id, payload)
    }

    /// An `XS_ERROR` reply for `req`'s ids.
    pub fn error_reply(req_id: u32, tx_id: u32, err: XsErrno) -> Self {
        let mut payload = err.as_str().as_bytes().to_vec();
        payload.push(0);
        Message { msg_type: MsgType::ERROR, req_id, tx_id, payload }
    }

    /// The header as it goes on the wire.
    pub fn header(&self) -> XsdSockmsg {
        XsdSockmsg {
            msg_type: self.msg_type.0.into(),
            req_id: self.req_id.into(),
            tx_id: self.tx_id.into(),
            len: (self.payload.len() as u32).into(),
        }
    }

    /// Header and payload as one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        self.encode_into(&mut out);
        out
    }

    /// Appends header and payload to `out` (for pipelined batches).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.header().as_bytes());
        out.extend_from_slice(&self.payload);
    }

    /// If this is an `XS_ERROR`, the error it carries (unknown strings map to `EINVAL`).
    pub fn as_error(&self) -> Option<XsErrno> {
        (self.msg_type == MsgType::ERROR).then(|| XsErrno::from_wire(&self.payload).unwrap_or(XsErrno::EINVAL))
    }

    /// The payload split at NULs, without the empty piece after a final NUL
    /// (the form of `XS_DIRECTORY` replies and of most requests).
    pub fn strings(&self) -> Vec<&[u8]> {
        split_nul(&self.payload)
    }
}

/// Splits `payload` at NUL bytes, dropping the empty piece after a trailing NUL.
pub fn split_nul(payload: &[u8]) -> Vec<&[u8]> {
    if payload.is_empty() {
        return Vec::new();
    }
    let body = payload.strip_suffix(b"\0").unwrap_or(payload);
    body.split(|&b| b == 0).collect()
}

/// An incremental decoder: feed it bytes as they arrive, cut anywhere, and take
/// whole messages out. It holds at most one frame (`HEADER_LEN +
/// XENSTORE_PAYLOAD_MAX` bytes) and refuses a header that announces more.
#[derive(Debug, Default)]
pub struct Decoder {
    header: Option<XsdSockmsg>,
    buf: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes bytes from `input` and returns a message once one is whole, with
    /// the number of bytes consumed. Call again with the rest of `input`.
    /// After an error the stream is out of sync: drop the connection.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Message>), WireError> {
        let mut used = 0;
        if self.header.is_none() {
            let take = (HEADER_LEN - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..take]);
            used += take;
            if self.buf.len() < HEADER_LEN {
                return Ok((used, None));
            }
            let hdr = XsdSockmsg::read_from_bytes(&self.buf[..HEADER_LEN]).expect("header length checked");
            let len = hdr.len.get() as usize;
            if len > XENSTORE_PAYLOAD_MAX {
                return Err(WireError::PayloadTooLarge { len, max: XENSTORE_PAYLOAD_MAX });
            }
            self.buf.clear();
            self.buf.reserve_exact(len);
            self.header = Some(hdr);
        }
        let hdr = self.header.expect("header present");
        let len = hdr.len.get() as usize;
        let take = (len - self.buf.len()).min(input.len() - used);
        self.buf.extend_from_slice(&input[used..used + take]);
        used += take;
        if self.buf.len() < len {
            return Ok((used, None));
        }
        self.header = None;
        let msg = Message {
            msg_type: MsgType(hdr.msg_type.get()),
            req_id: hdr.req_id.get(),
            tx_id: hdr.tx_id.get(),
            payload: std::mem::take(&mut self.buf),
        };
        Ok((used, Some(msg)))
    }

    /// Decodes every whole message in `input` into `out`; a partial one stays buffered.
    pub fn decode_all(&mut self, mut input: &[u8], out: &mut Vec<Message>) -> Result<(), WireError> {
        loop {
            let (used, msg) = self.decode(input)?;
            input = &input[used..];
            match msg {
                Some(m) => out.push(m),
                None if input.is_empty() => return Ok(()),
                None => unreachable!("decoder stopped with input left and no message"),
            }
        }
    }

    /// Whether part of a frame is buffered.
    pub fn is_mid_frame(&self) -> bool {
        self.header.is_some() || !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_read_request_matches_golden_bytes() {
        let m = Message::with_strings(MsgType::READ, 7, 3, &[b"/a"]).unwrap();
        assert_eq!(m.encode(), [2, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0, b'/', b'a', 0]);
    }

    #[test]
    fn decoder_accepts_one_byte_at_a_time() {
        let a = Message::with_strings(MsgType::WRITE, 1, 0, &[b"/x"]).unwrap();
        let mut a = a;
        a.payload.extend_from_slice(b"v\0al");
        let b = Message::new(MsgType::TRANSACTION_START, 2, 0, Vec::new()).unwrap();
        let mut bytes = a.encode();
        b.encode_into(&mut bytes);
        let mut dec = Decoder::new();
        let mut out = Vec::new();
        for byte in &bytes {
            dec.decode_all(std::slice::from_ref(byte), &mut out).unwrap();
        }
        assert_eq!(out, vec![a, b]);
        assert!(!dec.is_mid_frame());
    }

    #[test]
    fn decoder_rejects_oversized_header_without_allocating_it() {
        let mut bytes = vec![2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        bytes.extend_from_slice(&(XENSTORE_PAYLOAD_MAX as u32 + 1).to_le_bytes());
        let err = Decoder::new().decode(&bytes).unwrap_err();
        assert_eq!(err, WireError::PayloadTooLarge { len: 4097, max: 4096 });
    }

    #[test]
    fn new_rejects_payload_over_max() {
        assert!(Message::new(MsgType::WRITE, 0, 0, vec![0; XENSTORE_PAYLOAD_MAX + 1]).is_err());
        assert!(Message::new(MsgType::WRITE, 0, 0, vec![0; XENSTORE_PAYLOAD_MAX]).is_ok());
    }

    #[test]
    fn error_reply_round_trips_every_errno() {
        for e in XsErrno::ALL {
            let m = Message::error_reply(1, 0, e);
            assert_eq!(m.payload.last(), Some(&0));
            assert_eq!(m.as_error(), Some(e));
        }
    }

    #[test]
    fn split_nul_drops_only_the_final_empty_piece() {
        assert_eq!(split_nul(b"a\0b\0"), vec![&b"a"[..], b"b"]);
        assert_eq!(split_nul(b"a\0\0"), vec![&b"a"[..], b""]);
        assert!(split_nul(b"").is_empty());
    }
}
