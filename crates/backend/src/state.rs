//! Xenbus states (`xen/include/public/io/xenbus.h`, `enum xenbus_state`) and
//! the frontend's ring ABI (`protocol` node, `xen/include/public/io/protocols.h`).

use crate::error::DeviceError;

/// `enum xenbus_state`: the value of a `state` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XenbusState {
    /// `XenbusStateUnknown` (0); also what a missing node reads as.
    Unknown,
    /// `XenbusStateInitialising` (1).
    Initialising,
    /// `XenbusStateInitWait` (2): the backend waits for the frontend's details.
    InitWait,
    /// `XenbusStateInitialised` (3): the frontend published its rings.
    Initialised,
    /// `XenbusStateConnected` (4).
    Connected,
    /// `XenbusStateClosing` (5).
    Closing,
    /// `XenbusStateClosed` (6).
    Closed,
    /// `XenbusStateReconfiguring` (7).
    Reconfiguring,
    /// `XenbusStateReconfigured` (8).
    Reconfigured,
}

impl XenbusState {
    /// The number written to xenstore.
    pub fn as_u32(self) -> u32 {
        match self {
            XenbusState::Unknown => 0,
            XenbusState::Initialising => 1,
            XenbusState::InitWait => 2,
            XenbusState::Initialised => 3,
            XenbusState::Connected => 4,
            XenbusState::Closing => 5,
            XenbusState::Closed => 6,
            XenbusState::Reconfiguring => 7,
            XenbusState::Reconfigured => 8,
        }
    }

    /// From the number; `None` for values Xen does not define.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => XenbusState::Unknown,
            1 => XenbusState::Initialising,
            2 => XenbusState::InitWait,
            3 => XenbusState::Initialised,
            4 => XenbusState::Connected,
            5 => XenbusState::Closing,
            6 => XenbusState::Closed,
            7 => XenbusState::Reconfiguring,
            8 => XenbusState::Reconfigured,
            _ => return None,
        })
    }

    /// Parses a node's value as Linux's `xenbus_read_driver_state` does
    /// (decimal, surrounding whitespace and a trailing NUL tolerated).
    pub fn parse(value: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(value).ok()?;
        let s = s.trim_end_matches('\0').trim();
        Self::from_u32(s.parse().ok()?)
    }
}

impl core::fmt::Display for XenbusState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:?}", self)
    }
}

/// The ring ABI a frontend announces in its `protocol` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// No `protocol` node: the backend's own ABI.
    Native,
    /// `x86_32-abi` (`XEN_IO_PROTO_ABI_X86_32`).
    X86_32,
    /// `x86_64-abi` (`XEN_IO_PROTO_ABI_X86_64`).
    X86_64,
}

impl Protocol {
    /// Parses the node's value; an absent node is [`Protocol::Native`], an
    /// unknown name an error (the device cannot be served).
    pub fn parse(value: Option<&str>) -> Result<Self, DeviceError> {
        match value.map(|v| v.trim_end_matches('\0')) {
            None | Some("") => Ok(Protocol::Native),
            Some("x86_32-abi") => Ok(Protocol::X86_32),
            Some("x86_64-abi") => Ok(Protocol::X86_64),
            Some(other) => Err(DeviceError::UnknownProtocol(other.to_string())),
        }
    }

    /// The name written in the node (`None` for native).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Protocol::Native => None,
            Protocol::X86_32 => Some("x86_32-abi"),
            Protocol::X86_64 => Some("x86_64-abi"),
        }
    }
}

/// What the backend does on seeing the frontend's state (the pure part of
/// the state machine; `docs/backend.md` has the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing to do.
    Nothing,
    /// Tear down if needed and `init` again (InitWait): reconnection after a
    /// close, or a frontend that restarted while Connected (then Closing is
    /// written first).
    Reinitialise {
        /// The backend was Connected.
        close_first: bool,
    },
    /// `connect`, then Connected.
    Connect,
    /// Tear down and write this state (Closing or Closed).
    Close(XenbusState),
}

/// The step for frontend state `fe`, backend state `be`, and `online`.
pub(crate) fn step(fe: XenbusState, be: XenbusState, online: bool) -> Step {
    use XenbusState as S;
    match (fe, be) {
        (S::Initialising, S::Closing | S::Closed | S::Connected) if online => {
            Step::Reinitialise { close_first: be == S::Connected }
        }
        (S::Initialised | S::Connected, S::InitWait) => Step::Connect,
        (S::Closing, S::Unknown | S::Closing | S::Closed) => Step::Nothing,
        (S::Closing, _) => Step::Close(S::Closing),
        (S::Closed | S::Unknown, S::Unknown | S::Closed) => Step::Nothing,
        (S::Closed | S::Unknown, _) => Step::Close(S::Closed),
        _ => Step::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_every_defined_value() {
        for v in 0..=8 {
            assert_eq!(XenbusState::from_u32(v).map(XenbusState::as_u32), Some(v));
        }
        assert_eq!(XenbusState::from_u32(9), None);
    }

    #[test]
    fn state_parse_tolerates_nul_and_rejects_garbage() {
        assert_eq!(XenbusState::parse(b"4\0"), Some(XenbusState::Connected));
        assert_eq!(XenbusState::parse(b" 3 "), Some(XenbusState::Initialised));
        assert_eq!(XenbusState::parse(b"abc"), None);
        assert_eq!(XenbusState::parse(b"-1"), None);
        assert_eq!(XenbusState::parse(b"\xff"), None);
    }

    #[test]
    fn frontend_ready_connects_only_from_init_wait() {
        use XenbusState as S;
        assert_eq!(step(S::Initialised, S::InitWait, true), Step::Connect);
        assert_eq!(step(S::Connected, S::InitWait, true), Step::Connect);
        assert_eq!(step(S::Initialised, S::Initialising, true), Step::Nothing);
        assert_eq!(step(S::Connected, S::Connected, true), Step::Nothing);
        assert_eq!(step(S::Initialised, S::Closed, true), Step::Nothing);
    }

    #[test]
    fn frontend_closing_or_gone_closes_from_any_live_state() {
        use XenbusState as S;
        for be in [S::Initialising, S::InitWait, S::Connected] {
            assert_eq!(step(S::Closing, be, true), Step::Close(S::Closing));
            assert_eq!(step(S::Closed, be, true), Step::Close(S::Closed));
            assert_eq!(step(S::Unknown, be, false), Step::Close(S::Closed));
        }
        assert_eq!(step(S::Closed, S::Closing, true), Step::Close(S::Closed));
        assert_eq!(step(S::Closed, S::Closed, true), Step::Nothing);
        assert_eq!(step(S::Closing, S::Closed, true), Step::Nothing);
    }

    #[test]
    fn frontend_initialising_again_reconnects_only_when_online() {
        use XenbusState as S;
        assert_eq!(step(S::Initialising, S::Closed, true), Step::Reinitialise { close_first: false });
        assert_eq!(step(S::Initialising, S::Connected, true), Step::Reinitialise { close_first: true });
        assert_eq!(step(S::Initialising, S::Closed, false), Step::Nothing);
        assert_eq!(step(S::Initialising, S::InitWait, true), Step::Nothing);
    }

    #[test]
    fn protocol_absent_is_native_and_unknown_is_error() {
        assert_eq!(Protocol::parse(None).unwrap(), Protocol::Native);
        assert_eq!(Protocol::parse(Some("x86_32-abi")).unwrap(), Protocol::X86_32);
        assert_eq!(Protocol::parse(Some("x86_64-abi")).unwrap(), Protocol::X86_64);
        assert!(matches!(Protocol::parse(Some("arm-abi")), Err(DeviceError::UnknownProtocol(p)) if p == "arm-abi"));
    }
}
