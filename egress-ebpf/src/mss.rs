//! TCP MSS clamping: a SYN or SYN-ACK through the tunnel announces at most
//! what fits it, so neither end sends segments that would need fragmenting
//! (or be dropped) once the outer header is added.

use egress_common::{checksum::word_at, flow::IPPROTO_TCP, mss, reason::Reason};
use network_types::tcp::TcpHdr;

use crate::{
    l4::{self, ChecksumUpdate, TCP_CHECK},
    packet::Hook,
};

/// Lowers the MSS option of the TCP SYN or SYN-ACK at `l4` (`l4_len` bytes
/// of it in this packet) to `max` if it is larger, patching the checksum.
/// Leaves alone a segment without an MSS option (none is inserted), with
/// malformed options, or whose header does not fit the packet.
#[inline(always)]
pub fn clamp<H: Hook>(hook: &mut H, l4: usize, l4_len: usize, max: u16) -> Result<(), Reason> {
    if max == 0 {
        return Ok(());
    }
    let pkt = hook.packet();
    // Checked here, before the subtraction, so the verifier sees the
    // options' length bounded too.
    let header = match l4::header_len(pkt, l4, IPPROTO_TCP) {
        Ok(n) if n > TcpHdr::LEN && n <= l4_len => n,
        _ => return Ok(()),
    };
    let options = l4 + TcpHdr::LEN;
    let found = mss::find(header - TcpHdr::LEN, |i| {
        // SAFETY: a read-only view of one byte.
        unsafe { pkt.get::<u8>(options + i).ok().map(|b| *b) }
    });
    let Some(at) = found.map(|i| TcpHdr::LEN + i) else {
        return Ok(());
    };
    // SAFETY: the only live reference into the packet.
    let Ok(value) = (unsafe { pkt.get::<[u8; 2]>(l4 + at) }) else {
        return Ok(());
    };
    let old = *value;
    let Some(new) = mss::clamped(u16::from_be_bytes(old), max) else {
        return Ok(());
    };
    let new = new.to_be_bytes();
    *value = new;
    hook.update_l4_checksum(&ChecksumUpdate {
        at: l4 + TCP_CHECK,
        addr: None,
        word: (word_at(at, old), word_at(at, new)),
        udp: false,
    })
}
