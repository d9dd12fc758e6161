//! TCP connection tracking from the flags each direction has seen.
//!
//! Each half of a flow adds the flags of its direction's segments to
//! `Flow::tcp_flags` ([`record`]); the connection's state follows from the
//! two sets. Neither direction ever writes the other's record, so two CPUs
//! updating the halves of one flow cannot lose a transition.

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpState {
    /// The client's SYN went out; no answer yet.
    SynSent,
    /// The server answered with SYN-ACK; the client has not acknowledged it.
    SynReceived,
    Established,
    /// One side has sent FIN.
    Closing,
    /// Both sides have sent FIN.
    Closed,
    /// Either side has sent RST (and nothing after it but RSTs).
    Reset,
}

impl TcpState {
    /// The state of a connection whose outbound half has seen `out` flags and
    /// whose return half has seen `inb`.
    pub const fn of(out: u8, inb: u8) -> Self {
        let all = out | inb;
        if all & RST != 0 {
            Self::Reset
        } else if out & FIN != 0 && inb & FIN != 0 {
            Self::Closed
        } else if all & FIN != 0 {
            Self::Closing
        } else if out & ACK != 0 && inb != 0 {
            // The client acknowledged something the server sent: the SYN-ACK,
            // or, for a connection picked up mid-stream, data.
            Self::Established
        } else if inb & SYN != 0 {
            Self::SynReceived
        } else {
            Self::SynSent
        }
    }

    /// Handshake and teardown states: short idle timeout (RFC 5382 REQ-5
    /// "transitory").
    pub const fn is_transitory(self) -> bool {
        matches!(
            self,
            Self::SynSent | Self::SynReceived | Self::Closing | Self::Closed
        )
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SynSent => "syn_sent",
            Self::SynReceived => "syn_received",
            Self::Established => "established",
            Self::Closing => "closing",
            Self::Closed => "closed",
            Self::Reset => "reset",
        }
    }
}

/// The flags a half records.
pub const TRACKED: u8 = FIN | SYN | RST | ACK;

/// The record of a half that has seen `seen` after a segment with `flags`:
/// the tracked flags added, and a RST forgotten once its sender goes on
/// sending (an ACK without RST). Its receiver ignored it then (out of
/// window, RFC 5961), and the connection lives on, as conntrack would have
/// it; a host that did reset sends nothing more on the connection but RSTs.
pub const fn record(seen: u8, flags: u8) -> u8 {
    let seen = if talks_past_reset(seen, flags) {
        seen & !RST
    } else {
        seen
    };
    seen | (flags & TRACKED)
}

const fn talks_past_reset(seen: u8, flags: u8) -> bool {
    seen & RST != 0 && flags & (RST | ACK) == ACK
}

/// Whether a segment with `flags` may change the record of a half that has
/// seen `seen`: a SYN (handshake time stamps, a reopened connection), a
/// tracked flag the half has not seen, or, after a RST, an ACK (which
/// [`record`] may take as its sender talking past it). One mask, without
/// branches: it decides every packet the flow cache serves.
pub const fn changes_record(seen: u8, flags: u8) -> bool {
    // RST (0x04) shifted onto ACK (0x10).
    const _: () = assert!(RST << 2 == ACK);
    flags & (SYN | (TRACKED & !seen) | ((seen & RST) << 2)) != 0
}

/// Whether an outbound segment with `flags` opens a new connection on a flow
/// whose outbound half has seen `seen`: a SYN after the previous connection
/// on the same 5-tuple ended. Its halves then start their records afresh.
pub const fn reopens(seen: u8, flags: u8) -> bool {
    flags & (SYN | ACK) == SYN && seen & (FIN | RST) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake() {
        assert_eq!(TcpState::of(SYN, 0), TcpState::SynSent);
        assert_eq!(TcpState::of(SYN, SYN | ACK), TcpState::SynReceived);
        assert_eq!(TcpState::of(SYN | ACK, SYN | ACK), TcpState::Established);
    }

    #[test]
    fn teardown() {
        let est = SYN | ACK;
        assert_eq!(TcpState::of(est | FIN, est), TcpState::Closing);
        assert_eq!(TcpState::of(est, est | FIN), TcpState::Closing);
        assert_eq!(TcpState::of(est | FIN, est | FIN), TcpState::Closed);
        assert_eq!(TcpState::of(est, est | RST), TcpState::Reset);
        assert_eq!(TcpState::of(est | FIN | RST, est | FIN), TcpState::Reset);
    }

    #[test]
    fn unanswered_ack_is_not_established() {
        // A mid-stream segment with nothing back from the server yet.
        assert_eq!(TcpState::of(ACK, 0), TcpState::SynSent);
        assert_eq!(TcpState::of(ACK, ACK), TcpState::Established);
    }

    /// Order of the states along a connection's life.
    fn rank(s: TcpState) -> u8 {
        match s {
            TcpState::SynSent => 0,
            TcpState::SynReceived => 1,
            TcpState::Established => 2,
            TcpState::Closing => 3,
            TcpState::Closed => 4,
            TcpState::Reset => 5,
        }
    }

    proptest::proptest! {
        /// Whatever segments each direction sees, in whatever order, the
        /// state never goes back but out of a reset: the halves only add
        /// flags, but for a RST its sender talks past.
        #[test]
        fn state_never_goes_back_but_out_of_a_reset(segments in proptest::collection::vec((proptest::bool::ANY, 0u8..), 0..16)) {
            let (mut out, mut inb) = (0, 0);
            let mut state = TcpState::of(out, inb);
            for (outbound, flags) in segments {
                let half = if outbound { &mut out } else { &mut inb };
                let before = *half;
                *half = record(before, flags);
                proptest::prop_assert_eq!(*half & !RST, (before | flags) & TRACKED & !RST);
                if *half != before || flags & SYN != 0 {
                    proptest::prop_assert!(changes_record(before, flags));
                }
                let next = TcpState::of(out, inb);
                proptest::prop_assert!(rank(next) >= rank(state) || state == TcpState::Reset, "{:?} after {:?}", next, state);
                proptest::prop_assert_eq!(next == TcpState::Reset, (out | inb) & RST != 0);
                state = next;
            }
        }
    }

    #[test]
    fn a_reset_is_forgotten_only_when_its_sender_talks_past_it() {
        let est = SYN | ACK;
        assert_eq!(record(est | RST, ACK), est);
        assert_eq!(record(est | RST, ACK | FIN), est | FIN);
        assert_eq!(record(est | RST, RST | ACK), est | RST, "another RST");
        assert_eq!(record(est | RST, RST), est | RST);
        assert_eq!(record(est | RST, 0), est | RST, "a later fragment");
        assert!(changes_record(est | RST, ACK));
        assert!(!changes_record(est, ACK));
        assert!(!changes_record(est | RST, RST));
    }

    #[test]
    fn only_a_bare_syn_after_an_end_reopens() {
        assert!(reopens(SYN | ACK | FIN, SYN));
        assert!(reopens(SYN | RST, SYN));
        assert!(!reopens(SYN, SYN), "a retransmitted SYN");
        assert!(!reopens(SYN | ACK | FIN, SYN | ACK));
        assert!(!reopens(SYN | ACK | FIN, ACK));
    }
}
