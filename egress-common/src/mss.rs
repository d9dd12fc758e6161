//! TCP maximum segment size clamping (what iptables' `TCPMSS` target does
//! for the classic gateway): finding the MSS option among a SYN's options,
//! and the value to put there.

/// Most bytes of options a TCP header carries (data offset 15 words).
pub const MAX_OPTIONS: usize = 40;

const END_OF_LIST: u8 = 0;
const NO_OPERATION: u8 = 1;
const KIND_MSS: u8 = 2;
const MSS_LEN: usize = 4;

/// Where the MSS option's 2-byte value starts in TCP options of `len`
/// bytes, each read with `byte` (`None`: unreadable).
///
/// `None` when there is no MSS option before the end of the list, or the
/// options are malformed (an option length under 2 or past the end, an MSS
/// option not 4 bytes long): such a segment is left alone. Like `TCPMSS`,
/// only the first MSS option counts.
///
/// Bounded for the BPF verifier: `i` only grows, and never past
/// [`MAX_OPTIONS`]. (No separate step counter: one would make the state at
/// each pass distinct, and the verifier would explore every path of every
/// pass.)
#[inline(always)]
pub fn find(len: usize, mut byte: impl FnMut(usize) -> Option<u8>) -> Option<usize> {
    let len = if len < MAX_OPTIONS { len } else { MAX_OPTIONS };
    // The verifier before Linux 6.8 learns nothing from comparing two
    // variables (`i < len`), only from comparing with a constant: without
    // `i < MAX_OPTIONS` too, it walks paths where `i` grows past any
    // packet (Linux 6.1 rejects the program). The optimizer would drop
    // that check as implied by `i < len`, were `len`'s bound not hidden.
    // SAFETY: a read of a local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    let mut i = 0;
    while i < MAX_OPTIONS && i < len {
        match byte(i)? {
            END_OF_LIST => return None,
            NO_OPERATION => i += 1,
            kind => {
                if i + 1 >= len {
                    return None;
                }
                let n = usize::from(byte(i + 1)?);
                if n < 2 || i + n > len {
                    return None;
                }
                if kind == KIND_MSS {
                    return if n == MSS_LEN { Some(i + 2) } else { None };
                }
                i += n;
            }
        }
    }
    None
}

/// The MSS to write over `mss` under a clamp of `max` (0: clamping off);
/// `None` leaves it, as for any MSS already at or below the clamp.
#[inline(always)]
pub fn clamped(mss: u16, max: u16) -> Option<u16> {
    if max != 0 && mss > max {
        Some(max)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn find_in(options: &[u8]) -> Option<usize> {
        find(options.len(), |i| options.get(i).copied())
    }

    #[test]
    fn typical_syn_options() {
        // Linux: MSS, SACK permitted, timestamps, NOP, window scale.
        let linux = [
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        assert_eq!(find_in(&linux), Some(2));
        // NOP padding first: the value lands at an odd offset.
        assert_eq!(find_in(&[1, 2, 4, 0x05, 0xb4, 0, 0, 0]), Some(3));
        assert_eq!(find_in(&[1, 1, 4, 2, 2, 4, 0x05, 0xb4]), Some(6));
    }

    #[test]
    fn no_mss_or_malformed_is_left_alone() {
        for (what, options) in [
            ("empty", &[][..]),
            ("only padding", &[1, 1, 1, 1]),
            ("after end of list", &[0, 0, 2, 4, 5, 0xb4][..]),
            ("length 0", &[3, 0, 2, 4, 5, 0xb4]),
            ("length 1", &[3, 1, 2, 4, 5, 0xb4]),
            ("length past the end", &[3, 9, 2, 4, 5, 0xb4]),
            ("MSS cut short", &[1, 1, 2, 4, 5]),
            ("MSS of length 3", &[2, 3, 5, 1]),
            ("MSS of length 6", &[2, 6, 5, 0xb4, 0, 0]),
            ("kind without length", &[1, 1, 1, 2]),
        ] {
            assert_eq!(find_in(options), None, "{what}");
        }
    }

    #[test]
    fn first_mss_counts() {
        assert_eq!(find_in(&[2, 4, 5, 0xb4, 2, 4, 0x23, 0x28]), Some(2));
    }

    #[test]
    fn unreadable_bytes_leave_it_alone() {
        let options = [1, 1, 2, 4, 5, 0xb4];
        assert_eq!(find(6, |i| options.get(i).copied().filter(|_| i < 3)), None);
    }

    #[test]
    fn clamps_only_larger_values() {
        assert_eq!(clamped(1460, 1440), Some(1440));
        assert_eq!(clamped(65495, 1440), Some(1440));
        assert_eq!(clamped(1440, 1440), None);
        assert_eq!(clamped(536, 1440), None);
        assert_eq!(clamped(9000, 0), None, "0 turns clamping off");
    }

    /// A well-formed option for the generator: NOP, or a kind other than
    /// END/NOP/MSS with a body.
    fn option() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(vec![NO_OPERATION]),
            (3u8.., proptest::collection::vec(any::<u8>(), 0..10)).prop_map(|(kind, body)| {
                let mut o = vec![kind, body.len() as u8 + 2];
                o.extend(body);
                o
            }),
        ]
    }

    proptest! {
        /// Options built from well-formed parts: the MSS value is found
        /// exactly where it was put, and not at all without one.
        #[test]
        fn finds_the_mss_where_it_was_put(
            before in proptest::collection::vec(option(), 0..6),
            after in proptest::collection::vec(option(), 0..6),
            mss in any::<u16>(),
            with_mss in any::<bool>(),
        ) {
            let mut options: Vec<u8> = before.concat();
            let at = options.len() + 2;
            if with_mss {
                options.extend([KIND_MSS, MSS_LEN as u8]);
                options.extend(mss.to_be_bytes());
            }
            options.extend(after.concat());
            prop_assume!(options.len() <= MAX_OPTIONS);
            let want = with_mss.then_some(at);
            prop_assert_eq!(find_in(&options), want);
            // Anything after an end of list is ignored.
            let mut ended = options.clone();
            ended.truncate(at - 2);
            ended.push(END_OF_LIST);
            ended.extend([KIND_MSS, MSS_LEN as u8, 1, 1]);
            prop_assert_eq!(find_in(&ended), None);
        }

        /// Any bytes at all: the walk ends, and whatever it reports is an
        /// MSS option lying wholly inside the options.
        #[test]
        fn any_bytes_yield_a_sound_answer_or_none(
            options in proptest::collection::vec(any::<u8>(), 0..=MAX_OPTIONS),
        ) {
            if let Some(at) = find_in(&options) {
                prop_assert!(at >= 2 && at + 2 <= options.len());
                prop_assert_eq!(&options[at - 2..at], &[KIND_MSS, MSS_LEN as u8]);
            }
        }
    }
}
