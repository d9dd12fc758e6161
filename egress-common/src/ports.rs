//! Choice of translation ports.

/// How many candidate ports a new flow tries at most before it is refused:
/// as many as the kernel's NAT tries (128, then 64, … in all about 256).
/// Candidates are spread through the range, so each hits a used port about
/// as often as the range is full: in a range 95% used a flow is refused
/// once in 500,000, 99% used once in 13. With a sparsely used range the
/// first try succeeds; the bound is what a refused flow costs (each try
/// is one map insert), a hostile client's flood of new flows included.
pub const PORT_TRIES: u32 = 256;

/// Strides for walking a range: primes above 65536, so each is coprime to
/// every range size (at most 65536) and a walk of fewer steps than the
/// range has ports never comes back to a port. Spread out, so flows that
/// start near each other walk apart.
const STRIDES: [u32; 16] = [
    76157, 131927, 201359, 251443, 313679, 390307, 437263, 507599, 576161, 620401, 696569, 748441,
    804059, 867079, 939923, 1000847,
];

/// How many candidates a new flow in `[min, max]` tries: the whole of a
/// range no larger than [`PORT_TRIES`], [`PORT_TRIES`] of a larger one.
#[inline(always)]
pub fn tries(min: u16, max: u16) -> u32 {
    (u32::from(max.saturating_sub(min)) + 1).min(PORT_TRIES)
}

/// The `attempt`-th candidate port for a new flow in `[min, max]`.
///
/// Attempt 0 keeps the client's own port when it lies in the range (port
/// preservation, as MASQUERADE does); later attempts walk the range from a
/// random start with a random stride coprime to the range's size, so
/// [`PORT_TRIES`] tries never repeat a port in a larger range, and
/// collisions do not cluster. A range no larger than [`PORT_TRIES`] is
/// walked port by port (from the client's port if it is in the range), so
/// every port of it is tried.
#[inline(always)]
pub fn candidate(client_port: u16, min: u16, max: u16, random: u32, attempt: u32) -> u16 {
    let span = u32::from(max.saturating_sub(min)) + 1;
    let kept = (min..=max).contains(&client_port);
    if attempt == 0 && kept {
        return client_port;
    }
    let (start, stride) = if span <= PORT_TRIES {
        // Port by port on from the client's own, which was tried first.
        let start = if kept {
            u32::from(client_port - min)
        } else {
            random % span
        };
        (start, 1)
    } else {
        (random % span, STRIDES[(random >> 28) as usize] % span)
    };
    // No overflow: each term is below 2^16 * PORT_TRIES.
    let off = (start + attempt % PORT_TRIES * stride) % span;
    min + off as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_client_port_when_in_range() {
        assert_eq!(candidate(20000, 1024, 32767, 12345, 0), 20000);
    }

    #[test]
    fn moves_into_the_range_otherwise() {
        let p = candidate(40000, 1024, 32767, 777, 0);
        assert!((1024..=32767).contains(&p));
    }

    #[test]
    fn single_port_range() {
        for a in 0..PORT_TRIES {
            assert_eq!(candidate(5, 7, 7, a * 31, a), 7);
        }
    }

    #[test]
    fn a_range_is_tried_whole_up_to_the_bound() {
        assert_eq!(tries(7, 7), 1);
        assert_eq!(tries(20000, 20299), 256);
        assert_eq!(tries(20000, 20254), 255);
        assert_eq!(tries(1024, 65535), PORT_TRIES);
        assert_eq!(tries(0, 65535), PORT_TRIES);
    }

    proptest::proptest! {
        #[test]
        fn a_small_range_is_tried_whole(cp in 0u16.., lo in 1u16..60000, width in 0u16..PORT_TRIES as u16, r in 0u32..) {
            let hi = lo + width;
            let tried: std::collections::HashSet<_> =
                (0..tries(lo, hi)).map(|a| candidate(cp, lo, hi, r, a)).collect();
            proptest::prop_assert_eq!(tried.len(), usize::from(width) + 1);
        }

        #[test]
        fn always_in_range(cp in 0u16.., lo in 0u16.., width in 0u16.., r in 0u32.., a in 0u32..PORT_TRIES) {
            let hi = lo.saturating_add(width);
            let p = candidate(cp, lo, hi, r, a);
            proptest::prop_assert!((lo..=hi).contains(&p));
        }

        #[test]
        fn tries_never_repeat_a_port(r in 0u32.., lo in 0u16.., width in PORT_TRIES as u16.., cp in 0u16..) {
            // Any range larger than the tries, the wide default and small
            // ones whose size shares factors with many strides alike.
            let hi = lo.saturating_add(width);
            // Not a range cut short at 65535 to no more ports than tries.
            proptest::prop_assume!(u32::from(hi - lo) >= PORT_TRIES);
            let ports: std::collections::HashSet<_> =
                (1..PORT_TRIES).map(|a| candidate(cp, lo, hi, r, a)).collect();
            proptest::prop_assert_eq!(ports.len() as u32, PORT_TRIES - 1);
        }

        #[test]
        fn tries_never_repeat_in_small_ranges(r in 0u32.., lo in 0u16..60000, width in PORT_TRIES as u16..PORT_TRIES as u16 + 200) {
            let ports: std::collections::HashSet<_> =
                (1..PORT_TRIES).map(|a| candidate(0, lo, lo + width, r, a)).collect();
            proptest::prop_assert_eq!(ports.len() as u32, PORT_TRIES - 1);
        }
    }
}
