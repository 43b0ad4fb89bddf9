//! Xenbus states (`xen/include/public/io/xenbus.h`, `enum xenbus_state`)
//! and domain ids (`domid_t`, `xen/include/public/xen.h`).

/// A Xen domain id (`domid_t`).
pub type DomId = u16;

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
}
