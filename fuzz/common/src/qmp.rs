//! Target `qmp`: the device model's QMP server side (`xenbackd::qmp`) on a
//! client stream cut into reads at sizes the input chooses: the [`Decoder`]
//! cuts it into messages, one [`Session`] answers each against a shared
//! [`VmState`].
//!
//! Properties: no panic; every reply is one JSON object followed by `"\r\n"`
//! (libxl splits on that sequence) with exactly one of `return` and `error`,
//! an error has a string `class` and `desc`, and the reply carries the
//! request's `id` exactly when the request had one; nothing but
//! `qmp_capabilities` succeeds before negotiation; `quit` is the last thing
//! answered; the decoder never holds more than `MAX_REQUEST` bytes plus one
//! read; the same stream fed whole gives the same replies when no syntax
//! error resets the decoder.
//!
//! Input: a byte (`% 3`: the run state), a read size byte (`0` means
//! 1 byte), then the client's bytes.

use serde_json::Value;
use xenbackd::qmp::{greeting, Command, Decoder, Effect, Reply, Request, RunState, Session, VmState, MAX_REQUEST};

use crate::input::Input;

fn vm(run: RunState) -> VmState {
    VmState { run, name: Some("guest".into()), chardevs: Vec::new(), package: "xenbackd fuzz".into() }
}

/// Runs the stream through a decoder fed `chunk` bytes at a time; returns
/// the rendered replies and whether a syntax error reset the decoder.
fn replies(run: RunState, stream: &[u8], chunk: usize) -> (Vec<Vec<u8>>, bool) {
    let mut vm = vm(run);
    let mut session = Session::new();
    let mut decoder = Decoder::new();
    let mut out = Vec::new();
    let mut reset = false;
    for piece in stream.chunks(chunk) {
        decoder.feed(piece);
        while let Some(msg) = decoder.next_request() {
            let (reply, id, quit) = match msg {
                Ok(req) => {
                    // The command's name parses back to the command.
                    let again =
                        Request::parse(serde_json::json!({"execute": req.command.name()}).to_string().as_bytes());
                    assert_eq!(again.map(|r| r.command).ok().as_ref(), Some(&req.command), "{:?}", req.command);
                    let negotiated = session.negotiated();
                    let (reply, effect) = session.handle(&mut vm, &req);
                    if !negotiated && req.command != Command::Capabilities {
                        assert!(matches!(reply, Reply::Error { .. }), "{:?} succeeded before negotiation", req.command);
                    }
                    (reply, req.id, effect == Effect::Quit)
                }
                Err(bad) => {
                    reset |= bad.id.is_none();
                    (session.reject(&bad), bad.id, false)
                }
            };
            let bytes = reply.render(id.as_ref());
            check(&bytes, id.as_ref());
            out.push(bytes);
            if quit {
                return (out, reset);
            }
        }
        assert!(decoder.pending() <= MAX_REQUEST + chunk, "decoder holds {} bytes", decoder.pending());
    }
    (out, reset)
}

fn check(bytes: &[u8], id: Option<&Value>) {
    let body = bytes.strip_suffix(b"\r\n").expect("a reply ends with CRLF");
    assert!(!body.windows(2).any(|w| w == b"\r\n"), "CRLF inside a reply");
    let v: Value = serde_json::from_slice(body).expect("a reply is JSON");
    let obj = v.as_object().expect("a reply is an object");
    assert_ne!(obj.contains_key("return"), obj.contains_key("error"), "exactly one of return and error");
    if let Some(e) = obj.get("error") {
        assert!(e["class"].is_string() && e["desc"].is_string(), "error without class and desc: {e}");
    }
    assert_eq!(obj.get("id"), id, "the id is echoed exactly");
}

/// The greeting, what a client reads first: one line, QEMU's shape.
fn check_greeting(package: &str) {
    let bytes = greeting(package);
    let body = bytes.strip_suffix(b"\r\n").expect("the greeting ends with CRLF");
    let v: Value = serde_json::from_slice(body).expect("the greeting is JSON");
    assert_eq!(v["QMP"]["version"]["package"], package);
    assert!(v["QMP"]["version"]["qemu"]["major"].is_u64(), "{v}");
    assert_eq!(v["QMP"]["capabilities"], serde_json::json!([]));
}

/// The harness.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let run = [RunState::Prelaunch, RunState::Paused, RunState::Running][usize::from(input.u8() % 3)];
    check_greeting(&vm(run).package);
    let chunk = usize::from(input.u8()).max(1);
    let stream = input.rest();
    let (cut, reset) = replies(run, stream, chunk);
    if !reset {
        let (whole, _) = replies(run, stream, stream.len().max(1));
        assert_eq!(cut, whole, "replies depend on how the stream was cut");
    }
}

/// Encodes a case.
pub fn encode(run: u8, chunk: u8, stream: &[u8]) -> Vec<u8> {
    let mut out = vec![run, chunk];
    out.extend_from_slice(stream);
    out
}

/// Seeds: libxl's exchanges (create, dm_restrict's query-status, a command
/// QEMU has and we do not), framing variants and broken input.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let create = b"{\"execute\":\"qmp_capabilities\",\"id\":2020437248}\r\n{\"execute\":\"query-chardev\",\"id\":2020437249}\r\n";
    let restrict = b"{\"execute\":\"qmp_capabilities\",\"id\":2020437248}\r\n{\"execute\":\"query-status\",\"id\":2020437249}\r\n{\"execute\":\"cont\",\"id\":3}\r\n";
    let other = b"{\"execute\":\"qmp_capabilities\"}\r\n{\"execute\":\"xen-save-devices-state\",\"arguments\":{\"filename\":\"/var/lib/xen/qemu-save.3\"},\"id\":\"a\"}\r\n{\"execute\":\"quit\",\"id\":[1]}\r\n{\"execute\":\"query-name\"}\r\n";
    let early = b"{\"execute\":\"query-status\",\"id\":1}{\"execute\":\"qmp_capabilities\",\"id\":2}{\"execute\":\"qmp_capabilities\",\"id\":3}";
    let every = b"{\"execute\":\"qmp_capabilities\"}\r\n{\"execute\":\"query-status\",\"id\":1}\r\n{\"execute\":\"query-commands\",\"id\":2}\r\n{\"execute\":\"query-vnc\",\"id\":3}\r\n{\"execute\":\"query-version\",\"id\":4}\r\n{\"execute\":\"query-name\",\"id\":5}\r\n{\"execute\":\"query-chardev\",\"id\":6}\r\n{\"execute\":\"stop\",\"id\":7}\r\n{\"execute\":\"query-status\",\"id\":8}\r\n{\"execute\":\"cont\",\"id\":9}\r\n{\"execute\":\"query-status\",\"id\":10}\r\n";
    let broken = b"{\"execute\":\"qmp_capabilities\"}\r\n{\"execute\":}\r\n{\"execute\":\"query-version\",\"id\":null}\r\n[]\r\n{\"id\":5}\r\n{\"execute\":\"stop\",\"arguments\":{\"x\":1},\"id\":6}\r\n";
    vec![
        ("libxl-create", encode(2, 255, create)),
        ("libxl-create-bytewise", encode(2, 1, create)),
        ("dm-restrict-prelaunch", encode(0, 7, restrict)),
        ("unknown-command-and-quit", encode(2, 16, other)),
        ("no-newlines-before-negotiation", encode(1, 5, early)),
        ("broken-messages", encode(2, 9, broken)),
        ("every-command-paused", encode(1, 64, every)),
        ("every-command-running", encode(2, 200, every)),
    ]
}
