//! The pure part of the xenbus state machine: what the backend does on
//! seeing the frontend's state (`xen_bus::XenbusState`).

use xen_bus::XenbusState;

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
}
