//! Target `xs_decoder`: the xenstore [`Decoder`] on a byte stream cut at
//! arbitrary points must give the same messages (and the same error) as on
//! the stream whole, never panic, and account for every byte.
//!
//! Input: `n` (mod 16), then `n` cut sizes (bytes, used in turn; 0 feeds an
//! empty slice and then one byte), then the stream.

use xs_wire::{Decoder, Message, MsgType, WireError};

use crate::input::Input;

/// Feeds `chunk` to `dec` until it is used up, collecting messages.
fn feed(dec: &mut Decoder, mut chunk: &[u8], out: &mut Vec<Message>) -> Result<(), WireError> {
    loop {
        let (used, msg) = dec.decode(chunk)?;
        assert!(used <= chunk.len(), "decoder used {used} of {} bytes", chunk.len());
        chunk = &chunk[used..];
        match msg {
            Some(m) => {
                assert!(m.payload.len() <= xs_wire::XENSTORE_PAYLOAD_MAX);
                out.push(m);
            }
            None => {
                assert!(chunk.is_empty(), "decoder stopped with {} bytes left", chunk.len());
                return Ok(());
            }
        }
    }
}

/// A decoded message rebuilds through the constructors, and its strings
/// are its payload split at the NULs.
fn check_message(m: &Message) {
    assert_eq!(Message::new(m.msg_type, m.req_id, m.tx_id, m.payload.clone()).as_ref(), Ok(m));
    let parts = m.strings();
    assert_eq!(parts, xs_wire::split_nul(&m.payload));
    let body = m.payload.strip_suffix(b"\0").unwrap_or(&m.payload);
    assert_eq!(parts.is_empty(), m.payload.is_empty());
    if !parts.is_empty() {
        assert_eq!(parts.join(&0u8), body, "strings of {:?}", m.payload);
    }
    if m.payload.ends_with(b"\0") {
        let again = Message::with_strings(m.msg_type, m.req_id, m.tx_id, &parts).expect("fits");
        assert_eq!(&again, m, "with_strings of its strings");
    }
    assert_eq!(m.as_error().is_some(), m.msg_type == MsgType::ERROR);
    if let Some(e) = m.as_error() {
        assert_eq!(Message::error_reply(m.req_id, m.tx_id, e).as_error(), Some(e));
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let n = usize::from(input.u8() % 16);
    let cuts = input.bytes(n).to_vec();
    let stream = input.rest();

    let mut whole = Vec::new();
    let mut whole_dec = Decoder::new();
    let whole_res = whole_dec.decode_all(stream, &mut whole);

    let mut dec = Decoder::new();
    let mut pieces = Vec::new();
    let mut pieces_res = Ok(());
    let (mut pos, mut turn) = (0, 0);
    while pos < stream.len() {
        let mut size = if cuts.is_empty() { stream.len() } else { usize::from(cuts[turn % cuts.len()]) };
        turn += 1;
        if size == 0 {
            assert_eq!(dec.decode(&[]).map(|(used, m)| (used, m.is_none())), Ok((0, true)));
            size = 1;
        }
        let end = (pos + size).min(stream.len());
        pieces_res = feed(&mut dec, &stream[pos..end], &mut pieces);
        if pieces_res.is_err() {
            break;
        }
        pos = end;
    }

    assert_eq!(pieces, whole, "cut decoding gave other messages");
    whole.iter().for_each(check_message);
    assert_eq!(pieces_res, whole_res, "cut decoding gave another result");
    if whole_res.is_ok() {
        // Every byte is in a message or in the one partial frame buffered.
        let encoded: Vec<u8> = whole.iter().flat_map(Message::encode).collect();
        assert_eq!(&stream[..encoded.len()], &encoded[..], "messages do not re-encode to the stream");
        assert_eq!(whole_dec.is_mid_frame(), encoded.len() < stream.len());
        assert_eq!(dec.is_mid_frame(), encoded.len() < stream.len());
    }
}

/// Builds an input: cut sizes, then the stream.
pub fn encode_input(cuts: &[u8], stream: &[u8]) -> Vec<u8> {
    assert!(cuts.len() < 16);
    let mut v = vec![cuts.len() as u8];
    v.extend_from_slice(cuts);
    v.extend_from_slice(stream);
    v
}

fn msg(t: MsgType, req_id: u32, tx_id: u32, parts: &[&[u8]]) -> Vec<u8> {
    Message::with_strings(t, req_id, tx_id, parts).expect("seed message fits").encode()
}

/// Seeds: typical requests and replies, cut in several ways, and one
/// oversized header.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut session = Vec::new();
    session.extend(msg(MsgType::READ, 1, 0, &[b"/local/domain/1/device/vbd/51712/state"]));
    session.extend(msg(MsgType::WATCH, 2, 0, &[b"backend/vbd", b"tok-1"]));
    session.extend(msg(MsgType::TRANSACTION_START, 3, 0, &[]));
    session.extend(msg(MsgType::WRITE, 4, 7, &[b"/local/domain/0/backend/vbd/1/51712/state", b"4"]));
    session.extend(msg(MsgType::WATCH_EVENT, 0, 0, &[b"backend/vbd/1/51712", b"tok-1"]));
    session.extend(Message::error_reply(5, 0, xs_wire::XsErrno::ENOENT).encode());
    let big = Message::new(MsgType::WRITE, 6, 0, vec![0xa5; xs_wire::XENSTORE_PAYLOAD_MAX]).unwrap().encode();
    let mut oversized = vec![2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    oversized.extend_from_slice(&(xs_wire::XENSTORE_PAYLOAD_MAX as u32 + 1).to_le_bytes());
    let mut partial = session.clone();
    partial.extend(&msg(MsgType::DIRECTORY, 9, 0, &[b"/local"])[..20]);
    vec![
        ("session-whole", encode_input(&[], &session)),
        ("session-bytewise", encode_input(&[1], &session)),
        ("session-mixed-cuts", encode_input(&[0, 3, 16, 17, 255, 5], &session)),
        ("max-payload", encode_input(&[200, 16, 0], &big)),
        ("oversized-header", encode_input(&[7], &oversized)),
        ("partial-frame", encode_input(&[15, 1], &partial)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_to_the_expected_messages() {
        let (_, input) = &seeds()[0];
        let mut out = Vec::new();
        Decoder::new().decode_all(&input[1..], &mut out).unwrap();
        assert_eq!(out.len(), 6);
        assert_eq!(out[3].strings()[1], b"4");
    }

    #[test]
    fn harness_accepts_empty_and_garbage_inputs() {
        run(&[]);
        run(&[3]);
        run(&[0xff; 64]);
    }
}
