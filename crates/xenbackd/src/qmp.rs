//! The part of QMP (the QEMU Machine Protocol) that libxl speaks to a PV
//! guest's device model, parsed separately from executed: [`Decoder`] cuts a
//! byte stream into [`Request`]s, [`Session`] answers them against a
//! [`VmState`], and [`Reply::render`] writes the answer. Nothing here does I/O,
//! so all of it runs under the fuzzer (`fuzz/common/src/qmp.rs`).
//!
//! What libxl sends and expects (read from `tools/libs/light/libxl_qmp.c`):
//! the server speaks first with a greeting carrying QEMU's version; libxl
//! answers `qmp_capabilities`, then sends one command per connection and
//! closes it. Every message is one JSON object ended by `"\r\n"` (libxl
//! splits its input on that sequence), a reply echoes the command's `id`, and
//! an error is `{"error": {"class": ..., "desc": ...}}`. See
//! `docs/device-model.md` for the commands and when libxl sends each.

use serde_json::{json, Map, Value};

/// The QEMU version announced in the greeting. libxl compares it only to pick
/// argument names of HVM commands (`eject` since 2.8); this is the QEMU of
/// Debian 12, whose QMP behaviour the commands here follow.
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// Bytes a request may take before the connection is given up (libxl's own
/// receive limit, `QMP_MAX_SIZE_RX_BUF`, is 1 MiB).
pub const MAX_REQUEST: usize = 1 << 20;

/// A command as sent by the client.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The client's `id`, echoed in the reply (any JSON value, as in QEMU).
    pub id: Option<Value>,
    /// What to do.
    pub command: Command,
}

/// The commands answered here; everything else is [`Command::Other`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `qmp_capabilities`: leave capabilities negotiation.
    Capabilities,
    /// `query-status`: the run state (libxl: `prelaunch` under `-S`).
    QueryStatus,
    /// `query-chardev`: the character devices (libxl looks for `serial*`).
    QueryChardev,
    /// `query-version`.
    QueryVersion,
    /// `query-name`.
    QueryName,
    /// `query-commands`.
    QueryCommands,
    /// `query-vnc` (sent when the guest has a vfb; we have no VNC server).
    QueryVnc,
    /// `stop`: pause emulation (libxl: HVM pause).
    Stop,
    /// `cont`: leave `prelaunch` or `paused`.
    Cont,
    /// `quit`: exit.
    Quit,
    /// Anything else, by name: answered with `CommandNotFound`.
    Other(String),
}

impl Command {
    /// The names answered here, for `query-commands`.
    pub const NAMES: [&'static str; 10] = [
        "qmp_capabilities",
        "query-status",
        "query-chardev",
        "query-version",
        "query-name",
        "query-commands",
        "query-vnc",
        "stop",
        "cont",
        "quit",
    ];

    fn from_name(name: &str) -> Command {
        match name {
            "qmp_capabilities" => Command::Capabilities,
            "query-status" => Command::QueryStatus,
            "query-chardev" => Command::QueryChardev,
            "query-version" => Command::QueryVersion,
            "query-name" => Command::QueryName,
            "query-commands" => Command::QueryCommands,
            "query-vnc" => Command::QueryVnc,
            "stop" => Command::Stop,
            "cont" => Command::Cont,
            "quit" => Command::Quit,
            other => Command::Other(other.to_string()),
        }
    }

    /// The command's QMP name.
    pub fn name(&self) -> &str {
        match self {
            Command::Capabilities => "qmp_capabilities",
            Command::QueryStatus => "query-status",
            Command::QueryChardev => "query-chardev",
            Command::QueryVersion => "query-version",
            Command::QueryName => "query-name",
            Command::QueryCommands => "query-commands",
            Command::QueryVnc => "query-vnc",
            Command::Stop => "stop",
            Command::Cont => "cont",
            Command::Quit => "quit",
            Command::Other(name) => name,
        }
    }
}

/// QMP error classes (QEMU's `QapiErrorClass`), as libxl maps them to its
/// `ERROR_QMP_*` codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Malformed input, wrong arguments, or a failure.
    GenericError,
    /// No such command, or not in this phase.
    CommandNotFound,
}

impl ErrorClass {
    fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// Why a message is not a request. The message is answered with a
/// `GenericError` carrying this text, as QEMU does.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON.
    #[error("JSON parse error, {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("QMP input must be a JSON object")]
    NotObject,
    /// No `execute` member.
    #[error("QMP input lacks member 'execute'")]
    NoExecute,
    /// `execute` is not a string.
    #[error("QMP input member 'execute' must be a string")]
    ExecuteNotString,
    /// `arguments` is not an object.
    #[error("QMP input member 'arguments' must be an object")]
    ArgumentsNotObject,
    /// A member other than `execute`, `arguments` and `id`.
    #[error("QMP input member '{0}' is unexpected")]
    UnexpectedMember(String),
    /// An argument given to a command that takes none.
    #[error("Parameter '{0}' is unexpected")]
    UnexpectedArgument(String),
    /// More than [`MAX_REQUEST`] bytes without a complete message.
    #[error("QMP input is too long")]
    TooLong,
}

/// A message that could not be parsed: its `id` if one was readable, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRequest {
    /// The `id` member, if the message was an object with one.
    pub id: Option<Value>,
    /// What was wrong.
    pub error: ParseError,
}

impl Request {
    /// Parses one JSON value as a request (pure: no state, no I/O).
    pub fn from_value(value: Value) -> Result<Request, BadRequest> {
        let Value::Object(mut map) = value else {
            return Err(BadRequest { id: None, error: ParseError::NotObject });
        };
        let id = map.remove("id");
        let bad = |error| BadRequest { id: id.clone(), error };
        let execute = match map.remove("execute") {
            Some(Value::String(s)) => s,
            Some(_) => return Err(bad(ParseError::ExecuteNotString)),
            None => return Err(bad(ParseError::NoExecute)),
        };
        let arguments = match map.remove("arguments") {
            Some(Value::Object(a)) => a,
            Some(_) => return Err(bad(ParseError::ArgumentsNotObject)),
            None => Map::new(),
        };
        if let Some(member) = map.keys().next() {
            return Err(bad(ParseError::UnexpectedMember(member.clone())));
        }
        let command = Command::from_name(&execute);
        // None of the commands answered here takes an argument; QEMU refuses
        // unexpected ones. Commands we do not have keep theirs unchecked.
        if !matches!(command, Command::Other(_)) {
            if let Some(arg) = arguments.keys().next() {
                return Err(bad(ParseError::UnexpectedArgument(arg.clone())));
            }
        }
        Ok(Request { id, command })
    }

    /// Parses one complete message.
    pub fn parse(bytes: &[u8]) -> Result<Request, BadRequest> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| BadRequest { id: None, error: ParseError::Json(e.to_string()) })?;
        Request::from_value(value)
    }
}

/// Cuts a byte stream into messages: JSON values one after the other, with
/// or without the `"\r\n"` libxl puts after each, split anywhere by reads.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Appends bytes read from the connection.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not form a complete message yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next complete message, if one is buffered. A syntax error
    /// discards everything buffered (the stream cannot be resynchronised
    /// inside a broken value), as does a message longer than
    /// [`MAX_REQUEST`]; the caller answers the error and goes on.
    pub fn next_request(&mut self) -> Option<Result<Request, BadRequest>> {
        let start = self.buf.iter().position(|b| !b.is_ascii_whitespace());
        let Some(start) = start else {
            self.buf.clear();
            return None;
        };
        let mut stream = serde_json::Deserializer::from_slice(&self.buf[start..]).into_iter::<Value>();
        match stream.next() {
            None => {
                self.buf.clear();
                None
            }
            Some(Ok(value)) => {
                let used = start + stream.byte_offset();
                self.buf.drain(..used);
                Some(Request::from_value(value))
            }
            Some(Err(e)) if e.is_eof() => {
                if self.buf.len() > MAX_REQUEST {
                    self.buf.clear();
                    return Some(Err(BadRequest { id: None, error: ParseError::TooLong }));
                }
                None
            }
            Some(Err(e)) => {
                self.buf.clear();
                Some(Err(BadRequest { id: None, error: ParseError::Json(e.to_string()) }))
            }
        }
    }
}

/// A reply to one message.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// `{"return": value}`.
    Return(Value),
    /// `{"error": {"class": ..., "desc": ...}}`.
    Error {
        /// The class.
        class: ErrorClass,
        /// The text.
        desc: String,
    },
}

impl Reply {
    fn error(class: ErrorClass, desc: impl Into<String>) -> Reply {
        Reply::Error { class, desc: desc.into() }
    }

    /// The reply as sent: one JSON object, the `id` echoed if there was one,
    /// then `"\r\n"`.
    pub fn render(&self, id: Option<&Value>) -> Vec<u8> {
        let mut obj = Map::new();
        match self {
            Reply::Return(v) => {
                obj.insert("return".into(), v.clone());
            }
            Reply::Error { class, desc } => {
                obj.insert("error".into(), json!({"class": class.as_str(), "desc": desc}));
            }
        }
        if let Some(id) = id {
            obj.insert("id".into(), id.clone());
        }
        line(&Value::Object(obj))
    }
}

/// The greeting the server sends when a client connects.
pub fn greeting(package: &str) -> Vec<u8> {
    let (major, minor, micro) = QEMU_VERSION;
    line(&json!({"QMP": {
        "version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": package},
        "capabilities": []
    }}))
}

fn line(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("a Value always serialises");
    out.extend_from_slice(b"\r\n");
    out
}

/// QEMU's run states, as far as a PV device model has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Started with `-S`, before `cont` (libxl checks for this under
    /// `dm_restrict`).
    Prelaunch,
    /// Paused by `stop`, or waiting after `-incoming` with `-S`.
    Paused,
    /// Running.
    Running,
}

impl RunState {
    /// The name `query-status` gives.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Paused => "paused",
            RunState::Running => "running",
        }
    }
}

/// A character device as `query-chardev` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChardevInfo {
    /// The `id=` of `-chardev`.
    pub label: String,
    /// QEMU's description (`unix:/path,server=on`, `fd:N`, ...).
    pub filename: String,
}

/// What the device model is, as QMP shows it: shared by every connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmState {
    /// The run state.
    pub run: RunState,
    /// `-name`, if given.
    pub name: Option<String>,
    /// The character devices.
    pub chardevs: Vec<ChardevInfo>,
    /// The package string of `query-version` and the greeting.
    pub package: String,
}

/// What the caller must do after a reply has been sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing.
    None,
    /// The run state became Running (write the `state` node).
    Started,
    /// `quit`: exit.
    Quit,
}

/// One client connection's protocol state.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    /// A new connection, in capabilities negotiation.
    pub fn new() -> Self {
        Session::default()
    }

    /// Whether `qmp_capabilities` has been accepted.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Answers a parse failure.
    pub fn reject(&self, bad: &BadRequest) -> Reply {
        Reply::error(ErrorClass::GenericError, bad.error.to_string())
    }

    /// Answers one request; `vm` changes with `stop` and `cont`.
    pub fn handle(&mut self, vm: &mut VmState, req: &Request) -> (Reply, Effect) {
        if !self.negotiated {
            if req.command == Command::Capabilities {
                self.negotiated = true;
                return (Reply::Return(json!({})), Effect::None);
            }
            let desc = "Expecting capabilities negotiation with 'qmp_capabilities'";
            return (Reply::error(ErrorClass::CommandNotFound, desc), Effect::None);
        }
        let ok = |v: Value| (Reply::Return(v), Effect::None);
        match &req.command {
            Command::Capabilities => (
                Reply::error(
                    ErrorClass::CommandNotFound,
                    "Capabilities negotiation is already complete, command ignored",
                ),
                Effect::None,
            ),
            Command::QueryStatus => ok(json!({
                "status": vm.run.as_str(),
                "running": vm.run == RunState::Running,
                "singlestep": false,
            })),
            Command::QueryChardev => ok(Value::Array(
                vm.chardevs
                    .iter()
                    .map(|c| json!({"label": c.label, "filename": c.filename, "frontend-open": true}))
                    .collect(),
            )),
            Command::QueryVersion => {
                let (major, minor, micro) = QEMU_VERSION;
                ok(json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": vm.package}))
            }
            Command::QueryName => match &vm.name {
                Some(n) => ok(json!({"name": n})),
                None => ok(json!({})),
            },
            Command::QueryCommands => ok(Value::Array(Command::NAMES.iter().map(|n| json!({"name": n})).collect())),
            Command::QueryVnc => ok(json!({"enabled": false})),
            Command::Stop => {
                if vm.run == RunState::Running {
                    vm.run = RunState::Paused;
                }
                ok(json!({}))
            }
            Command::Cont => {
                let was = vm.run;
                vm.run = RunState::Running;
                (Reply::Return(json!({})), if was == RunState::Running { Effect::None } else { Effect::Started })
            }
            Command::Quit => (Reply::Return(json!({})), Effect::Quit),
            Command::Other(name) => (
                Reply::error(ErrorClass::CommandNotFound, format!("The command {name} has not been found")),
                Effect::None,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmState {
        VmState {
            run: RunState::Running,
            name: Some("guest".into()),
            chardevs: vec![ChardevInfo { label: "libxl-cmd".into(), filename: "unix:/x,server=on".into() }],
            package: "xenbackd".into(),
        }
    }

    fn as_json(bytes: &[u8]) -> Value {
        assert!(bytes.ends_with(b"\r\n"), "every message ends with CRLF");
        serde_json::from_slice(&bytes[..bytes.len() - 2]).unwrap()
    }

    #[test]
    fn parse_takes_libxl_command_form() {
        let req = Request::parse(br#"{"execute":"query-status","id":2020437248}"#).unwrap();
        assert_eq!(req.command, Command::QueryStatus);
        assert_eq!(req.id, Some(json!(2020437248u32)));
    }

    #[test]
    fn parse_rejects_non_objects_and_bad_members() {
        assert_eq!(Request::parse(b"[1]").unwrap_err().error, ParseError::NotObject);
        assert_eq!(Request::parse(br#"{"id":1}"#).unwrap_err().error, ParseError::NoExecute);
        assert_eq!(Request::parse(br#"{"execute":3}"#).unwrap_err().error, ParseError::ExecuteNotString);
        assert_eq!(
            Request::parse(br#"{"execute":"quit","arguments":[]}"#).unwrap_err().error,
            ParseError::ArgumentsNotObject
        );
        let bad = Request::parse(br#"{"execute":"quit","x":1,"id":"a"}"#).unwrap_err();
        assert_eq!(bad.error, ParseError::UnexpectedMember("x".into()));
        assert_eq!(bad.id, Some(json!("a")), "the id is kept for the error reply");
        assert!(matches!(Request::parse(b"{").unwrap_err().error, ParseError::Json(_)));
    }

    #[test]
    fn parse_rejects_arguments_to_commands_without_any() {
        let bad = Request::parse(br#"{"execute":"query-status","arguments":{"a":1}}"#).unwrap_err();
        assert_eq!(bad.error, ParseError::UnexpectedArgument("a".into()));
        let other = Request::parse(br#"{"execute":"eject","arguments":{"id":"ide-5632"}}"#).unwrap();
        assert_eq!(other.command, Command::Other("eject".into()));
    }

    #[test]
    fn decoder_joins_split_reads_and_splits_joined_messages() {
        let mut d = Decoder::new();
        d.feed(br#"{"execute":"qmp_capa"#);
        assert!(d.next_request().is_none());
        d.feed(b"bilities\",\"id\":1}\r\n{\"execute\":\"quit\"}");
        assert_eq!(d.next_request().unwrap().unwrap().command, Command::Capabilities);
        assert_eq!(d.next_request().unwrap().unwrap().command, Command::Quit);
        assert!(d.next_request().is_none());
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn decoder_discards_after_syntax_error_and_recovers() {
        let mut d = Decoder::new();
        d.feed(b"}}\r\n");
        assert!(matches!(d.next_request(), Some(Err(BadRequest { error: ParseError::Json(_), .. }))));
        d.feed(b"{\"execute\":\"quit\"}\r\n");
        assert_eq!(d.next_request().unwrap().unwrap().command, Command::Quit);
    }

    #[test]
    fn decoder_gives_up_on_endless_message() {
        let mut d = Decoder::new();
        d.feed(b"[\"");
        d.feed(&vec![b'a'; MAX_REQUEST]);
        assert!(matches!(d.next_request(), Some(Err(BadRequest { error: ParseError::TooLong, .. }))));
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn session_demands_capabilities_first() {
        let mut s = Session::new();
        let mut vm = vm();
        let req = Request { id: Some(json!(1)), command: Command::QueryStatus };
        let (reply, _) = s.handle(&mut vm, &req);
        assert!(matches!(reply, Reply::Error { class: ErrorClass::CommandNotFound, .. }));
        let (reply, _) = s.handle(&mut vm, &Request { id: None, command: Command::Capabilities });
        assert_eq!(reply, Reply::Return(json!({})));
        let (reply, _) = s.handle(&mut vm, &req);
        assert_eq!(as_json(&reply.render(req.id.as_ref()))["return"]["status"], json!("running"));
    }

    #[test]
    fn prelaunch_until_cont_then_started_once() {
        let mut s = Session::new();
        s.handle(&mut vm(), &Request { id: None, command: Command::Capabilities });
        let mut vm = VmState { run: RunState::Prelaunch, ..vm() };
        let status = |s: &mut Session, vm: &mut VmState| match s
            .handle(vm, &Request { id: None, command: Command::QueryStatus })
            .0
        {
            Reply::Return(v) => v["status"].clone(),
            e => panic!("{e:?}"),
        };
        assert_eq!(status(&mut s, &mut vm), json!("prelaunch"));
        assert_eq!(s.handle(&mut vm, &Request { id: None, command: Command::Cont }).1, Effect::Started);
        assert_eq!(s.handle(&mut vm, &Request { id: None, command: Command::Cont }).1, Effect::None);
        assert_eq!(status(&mut s, &mut vm), json!("running"));
    }

    #[test]
    fn unknown_command_is_command_not_found_with_id() {
        let mut s = Session::new();
        let mut vm = vm();
        s.handle(&mut vm, &Request { id: None, command: Command::Capabilities });
        let req = Request::parse(br#"{"execute":"xen-save-devices-state","id":7}"#).unwrap();
        let (reply, effect) = s.handle(&mut vm, &req);
        let out = as_json(&reply.render(req.id.as_ref()));
        assert_eq!(out["error"]["class"], json!("CommandNotFound"));
        assert_eq!(out["id"], json!(7));
        assert_eq!(effect, Effect::None);
    }

    #[test]
    fn float_id_is_echoed_exactly() {
        let req = Request::parse(br#"{"execute":"quit","id":202043E248}"#).unwrap();
        let out = as_json(&Reply::Return(json!({})).render(req.id.as_ref()));
        assert_eq!(Some(&out["id"]), req.id.as_ref());
    }

    #[test]
    fn greeting_has_the_version_libxl_reads() {
        let g = as_json(&greeting("xenbackd"));
        assert_eq!(g["QMP"]["version"]["qemu"]["major"], json!(QEMU_VERSION.0));
        assert_eq!(g["QMP"]["capabilities"], json!([]));
    }

    #[test]
    fn query_chardev_lists_labels() {
        let mut s = Session::new();
        let mut vm = vm();
        s.handle(&mut vm, &Request { id: None, command: Command::Capabilities });
        let (reply, _) = s.handle(&mut vm, &Request { id: None, command: Command::QueryChardev });
        assert_eq!(as_json(&reply.render(None))["return"][0]["label"], json!("libxl-cmd"));
    }
}
