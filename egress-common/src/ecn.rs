//! ECN at the tunnel's exit (RFC 6040 section 4.2, which updates RFC
//! 2003): a congestion mark that a router on the way to us put on the outer
//! header must reach the inner packet, or the flow's ends never learn of
//! that congestion. The kernel's ipip tunnel does the same.

const MASK: u8 = 0b11;
const NOT_ECT: u8 = 0b00;
const ECT_1: u8 = 0b01;
const ECT_0: u8 = 0b10;
const CE: u8 = 0b11;

/// The inner TOS byte once `inner` is decapsulated from under an outer
/// header with TOS `outer` (RFC 6040 figure 4); its DSCP stays. `None`:
/// drop it, a congestion mark over a packet that is not ECN-capable, which
/// could not carry the mark on.
#[inline(always)]
pub const fn decapsulate(outer: u8, inner: u8) -> Option<u8> {
    let ecn = match (outer & MASK, inner & MASK) {
        (CE, NOT_ECT) => return None,
        (_, NOT_ECT) => NOT_ECT,
        (CE, _) => CE,
        (ECT_1, ECT_0) => ECT_1,
        (_, own) => own,
    };
    Some((inner & !MASK) | ecn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6040 figure 4, row by row: the arriving inner ECN field, then
    /// the result under an outer Not-ECT, ECT(0), ECT(1) and CE.
    const FIGURE_4: [(u8, [Option<u8>; 4]); 4] = [
        (NOT_ECT, [Some(NOT_ECT), Some(NOT_ECT), Some(NOT_ECT), None]),
        (ECT_0, [Some(ECT_0), Some(ECT_0), Some(ECT_1), Some(CE)]),
        (ECT_1, [Some(ECT_1), Some(ECT_1), Some(ECT_1), Some(CE)]),
        (CE, [Some(CE), Some(CE), Some(CE), Some(CE)]),
    ];
    const OUTER: [u8; 4] = [NOT_ECT, ECT_0, ECT_1, CE];

    #[test]
    fn follows_rfc_6040_figure_4_and_keeps_the_inner_dscp() {
        for (inner, row) in FIGURE_4 {
            for (outer, want) in OUTER.into_iter().zip(row) {
                for (outer_dscp, inner_dscp) in [(0, 0), (0xb8, 0x28), (0x28, 0xb8), (0xfc, 0)] {
                    assert_eq!(
                        decapsulate(outer_dscp | outer, inner_dscp | inner),
                        want.map(|e| inner_dscp | e),
                        "outer {outer:02b} over inner {inner:02b}"
                    );
                }
            }
        }
    }
}
