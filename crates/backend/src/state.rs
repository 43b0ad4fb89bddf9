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
    /// `arm-abi` (`XEN_IO_PROTO_ABI_ARM`): Linux writes it on Arm and arm64,
    /// where it is `XEN_IO_PROTO_ABI_NATIVE`. Its ring layouts are
    /// x86_64's. Accepted only by a backend built for Arm: no x86 host runs
    /// Arm guests.
    Arm,
}

/// Whether `arm-abi` is this build's native ABI (`io/protocols.h`).
const ARM_IS_NATIVE: bool = cfg!(any(target_arch = "arm", target_arch = "aarch64"));

impl Protocol {
    /// Parses the node's value; an absent node is [`Protocol::Native`], an
    /// unknown name an error (the device cannot be served).
    pub fn parse(value: Option<&str>) -> Result<Self, DeviceError> {
        Self::parse_bytes(value.map(str::as_bytes))
    }

    /// [`Protocol::parse`] on the node's bytes, as Linux's blkback reads it
    /// (`xenbus_scanf(..., "%63s")`, [`crate::scan::scan_word`]): the first
    /// word counts (`x86_32-abi\0garbage` and `x86_32-abi trailing` are
    /// `x86_32-abi`), an empty value is native, and a value of only white
    /// space is an unknown (empty) protocol, as in Linux.
    pub fn parse_bytes(value: Option<&[u8]>) -> Result<Self, DeviceError> {
        match value.and_then(|v| crate::scan::scan_word(v, 63)) {
            None => Ok(Protocol::Native),
            Some(b"x86_32-abi") => Ok(Protocol::X86_32),
            Some(b"x86_64-abi") => Ok(Protocol::X86_64),
            Some(b"arm-abi") if ARM_IS_NATIVE => Ok(Protocol::Arm),
            Some(other) => Err(DeviceError::UnknownProtocol(String::from_utf8_lossy(other).into_owned())),
        }
    }

    /// The name written in the node (`None` for native).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Protocol::Native => None,
            Protocol::X86_32 => Some("x86_32-abi"),
            Protocol::X86_64 => Some("x86_64-abi"),
            Protocol::Arm => Some("arm-abi"),
        }
    }
}

/// What the backend does on seeing the frontend's state (the pure part of
/// the state machine; `docs/backend.md` has the table, row by row against
/// Linux's blkback and QEMU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing to do.
    Nothing,
    /// Tear down if needed and `init` again (InitWait), which then looks at
    /// the frontend once more: a frontend already Initialised or Connected
    /// is connected next. Reconnection after a close, a frontend that
    /// restarted while Connected (then Closing is written first), and a
    /// frontend whose Initialising we never saw.
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
///
/// Decided from the current pair alone, never from the frontend's previous
/// value: watch events coalesce (ours by design, Linux's when two fire in
/// close succession), so the backend may see any subsequence of the
/// frontend's writes that ends in its last, and every such subsequence must
/// lead where the whole sequence does. A frontend that is Initialised or
/// Connected is therefore connected from any backend state but Connected,
/// as Linux's blkback does ("Ensure we connect even when two watches fire in
/// close succession and we miss the intermediate value of frontend_state").
pub(crate) fn step(fe: XenbusState, be: XenbusState, online: bool) -> Step {
    use XenbusState as S;
    match (fe, be) {
        (S::Initialising, S::Closing | S::Closed | S::Connected) if online => {
            Step::Reinitialise { close_first: be == S::Connected }
        }
        (S::Initialised | S::Connected, S::InitWait) => Step::Connect,
        (S::Initialised | S::Connected, S::Connected) => Step::Nothing,
        // Offline, a Closed backend is being removed by the toolstack: it
        // stays Closed whatever the frontend wants.
        (S::Initialised | S::Connected, S::Unknown | S::Initialising | S::Closing | S::Closed) if online => {
            Step::Reinitialise { close_first: false }
        }
        // As Linux and QEMU: Closing is mirrored even from Closed (a frontend
        // closing after a failure waits for it).
        (S::Closing, S::Unknown | S::Closing) => Step::Nothing,
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
    fn frontend_ready_connects_from_init_wait_and_stays_connected() {
        use XenbusState as S;
        assert_eq!(step(S::Initialised, S::InitWait, true), Step::Connect);
        assert_eq!(step(S::Connected, S::InitWait, true), Step::Connect);
        assert_eq!(step(S::Connected, S::Connected, true), Step::Nothing);
        assert_eq!(step(S::Initialised, S::Connected, true), Step::Nothing);
    }

    #[test]
    fn frontend_ready_reconnects_from_any_other_state_when_online() {
        use XenbusState as S;
        for fe in [S::Initialised, S::Connected] {
            for be in [S::Unknown, S::Initialising, S::Closing, S::Closed] {
                assert_eq!(step(fe, be, true), Step::Reinitialise { close_first: false }, "{fe} {be}");
            }
            // Offline: the toolstack is removing the device.
            assert_eq!(step(fe, S::Closed, false), Step::Nothing);
            assert_eq!(step(fe, S::Initialising, false), Step::Nothing);
        }
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
        assert_eq!(step(S::Closing, S::Closing, true), Step::Nothing);
        assert_eq!(step(S::Closing, S::Closed, true), Step::Close(S::Closing));
    }

    /// The backend state after the xenbus thread acts on `fe`, as
    /// `Xenbus::frontend_changed` does: `init` (InitWait) re-reads the
    /// frontend, so a Reinitialise may connect at once.
    fn act(be: XenbusState, fe: XenbusState, online: bool) -> XenbusState {
        match step(fe, be, online) {
            Step::Nothing => be,
            Step::Reinitialise { .. } => act(XenbusState::InitWait, fe, online),
            Step::Connect => XenbusState::Connected,
            Step::Close(s) => s,
        }
    }

    /// Where the backend ends once the frontend settles on `fe` (online).
    fn settled(fe: XenbusState) -> XenbusState {
        use XenbusState as S;
        match fe {
            S::Initialising => S::InitWait,
            S::Initialised | S::Connected => S::Connected,
            S::Closing => S::Closing,
            S::Closed | S::Unknown => S::Closed,
            S::InitWait | S::Reconfiguring | S::Reconfigured => unreachable!("not a frontend state"),
        }
    }

    /// Every frontend sequence of up to 6 states, and every subsequence of
    /// it that ends in its last value (what coalesced watch events may show
    /// the backend), from InitWait: the backend ends where the frontend's
    /// last state says, whatever it missed.
    #[test]
    fn every_subsequence_of_frontend_states_converges_to_the_same_end() {
        use XenbusState as S;
        const FE: [XenbusState; 6] = [S::Initialising, S::Initialised, S::Connected, S::Closing, S::Closed, S::Unknown];
        let mut checked = 0u64;
        for len in 1..=6u32 {
            for code in 0..FE.len().pow(len) {
                let seq: Vec<XenbusState> = (0..len).map(|i| FE[code / FE.len().pow(i) % FE.len()]).collect();
                let last = *seq.last().unwrap();
                // Bit i of `mask` keeps seq[i]; the last value is always seen.
                for mask in 0..1u32 << (len - 1) {
                    let seen = seq[..seq.len() - 1]
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| mask & 1 << i != 0)
                        .map(|(_, s)| *s)
                        .chain([last]);
                    let end = seen.fold(S::InitWait, |be, fe| act(be, fe, true));
                    assert_eq!(end, settled(last), "{seq:?} seen as mask {mask:b}");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, (1..=6u32).map(|n| 6u64.pow(n) << (n - 1)).sum::<u64>());
    }

    /// Offline (the toolstack is removing the device), a Closed backend
    /// never connects again, whatever the frontend writes.
    #[test]
    fn offline_closed_backend_stays_closed() {
        use XenbusState as S;
        for fe in [S::Initialising, S::Initialised, S::Connected, S::Closing, S::Closed, S::Unknown] {
            let end = act(S::Closed, fe, false);
            assert!(matches!(end, S::Closed | S::Closing), "{fe}: {end}");
            assert_eq!(act(end, S::Initialised, false), end);
        }
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
        assert!(matches!(Protocol::parse(Some("mips-abi")), Err(DeviceError::UnknownProtocol(p)) if p == "mips-abi"));
        assert!(matches!(Protocol::parse(Some("native")), Err(DeviceError::UnknownProtocol(_))));
    }

    /// Values Linux's blkback accepts with `%63s` (issue 13).
    #[test]
    fn protocol_is_read_as_linux_reads_it() {
        assert_eq!(Protocol::parse_bytes(Some(b"x86_32-abi\0garbage")).unwrap(), Protocol::X86_32);
        assert_eq!(Protocol::parse(Some("x86_32-abi trailing")).unwrap(), Protocol::X86_32);
        assert_eq!(Protocol::parse(Some("  x86_64-abi\n")).unwrap(), Protocol::X86_64);
        assert_eq!(Protocol::parse(Some("")).unwrap(), Protocol::Native);
        assert_eq!(Protocol::parse_bytes(Some(b"\0x86_32-abi")).unwrap(), Protocol::Native);
        assert!(matches!(Protocol::parse(Some("   ")), Err(DeviceError::UnknownProtocol(p)) if p.is_empty()));
        assert!(Protocol::parse_bytes(Some(b"x86_32-abi\xff")).is_err());
    }

    #[test]
    fn arm_abi_is_accepted_only_where_it_is_native() {
        let p = Protocol::parse(Some("arm-abi"));
        if cfg!(any(target_arch = "arm", target_arch = "aarch64")) {
            assert_eq!(p.unwrap(), Protocol::Arm);
            assert_eq!(Protocol::Arm.name(), Some("arm-abi"));
        } else {
            let err = p.unwrap_err();
            assert!(matches!(&err, DeviceError::UnknownProtocol(p) if p == "arm-abi"));
            assert!(err.to_string().contains("Arm"), "{err}");
        }
    }
}
