//! Choice of translation ports.

/// How many candidate ports a new flow tries before it is refused. Bounded so
/// the eBPF loop is small; with a sparsely used range the first try succeeds.
pub const PORT_TRIES: u32 = 16;

/// The `attempt`-th candidate port for a new flow in `[min, max]`.
///
/// Attempt 0 keeps the client's own port when it lies in the range (port
/// preservation, as MASQUERADE does); later attempts walk the range from a
/// random start with an odd stride, so consecutive tries never repeat within
/// the range's size and collisions do not cluster. A range no larger than
/// [`PORT_TRIES`] is walked port by port, so every port of it is tried.
#[inline(always)]
pub fn candidate(client_port: u16, min: u16, max: u16, random: u32, attempt: u32) -> u16 {
    let span = u32::from(max.saturating_sub(min)) + 1;
    if attempt == 0 && (min..=max).contains(&client_port) {
        return client_port;
    }
    let stride = if span <= PORT_TRIES {
        1
    } else {
        (random >> 16) | 1
    };
    let off = random.wrapping_add(attempt.wrapping_mul(stride)) % span;
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

    proptest::proptest! {
        #[test]
        fn a_small_range_is_tried_whole(cp in 0u16.., lo in 1u16..60000, width in 0u16..PORT_TRIES as u16, r in 0u32..) {
            let hi = lo + width;
            let tried: std::collections::HashSet<_> =
                (0..PORT_TRIES).map(|a| candidate(cp, lo, hi, r, a)).collect();
            proptest::prop_assert_eq!(tried.len(), usize::from(width) + 1);
        }

        #[test]
        fn always_in_range(cp in 0u16.., lo in 0u16.., width in 0u16.., r in 0u32.., a in 0u32..PORT_TRIES) {
            let hi = lo.saturating_add(width);
            let p = candidate(cp, lo, hi, r, a);
            proptest::prop_assert!((lo..=hi).contains(&p));
        }

        #[test]
        fn retries_differ_in_a_wide_range(r in 0u32.., cp in 0u16..1000) {
            let ports: std::collections::HashSet<_> =
                (1..PORT_TRIES).map(|a| candidate(cp, 1024, 65535, r, a)).collect();
            proptest::prop_assert_eq!(ports.len() as u32, PORT_TRIES - 1);
        }
    }
}
