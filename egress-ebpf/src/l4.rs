//! Transport headers: reading a packet's ports (or ICMP echo identifier)
//! and translating one side of an IPv4 packet in place.

pub use egress_common::rewrite::Side;
use egress_common::{
    flow::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
    rewrite,
};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::packet::{Hook, Packet};

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// The first 8 bytes of an ICMP echo request or reply (RFC 792).
#[repr(C)]
pub struct IcmpEcho {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub id: [u8; 2],
    pub seq: [u8; 2],
}

/// The ports that open both TCP and UDP headers.
#[repr(C)]
pub struct PortPair {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

/// What an ICMP error quotes of the transport header (RFC 792).
const QUOTED_L4_LEN: usize = 8;
/// Offsets of the checksum in the TCP and UDP headers.
pub const TCP_CHECK: usize = 16;
/// Offset of TCP's data offset (header length in words, upper nibble).
const TCP_DATA_OFFSET: usize = 12;
pub const UDP_CHECK: usize = 6;
/// Offset of the UDP length (header and data).
const UDP_LEN: usize = 4;
/// Offset of the flags byte (FIN..CWR) in the TCP header.
const TCP_FLAGS: usize = 13;
/// Offset of the protocol in the IPv4 header.
const IP_PROTO: usize = 9;

/// Source and destination "ports" of the transport header at `off`. For
/// ICMP only echo of the expected direction is accepted; its identifier
/// stands on the translated side and the other side's port is 0.
#[inline(always)]
pub fn ports(pkt: Packet, off: usize, proto: u8, side: Side) -> Result<([u8; 2], [u8; 2]), Reason> {
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        // The whole header must be there: its checksum gets rewritten.
        // SAFETY: a read-only bounds check.
        unsafe { pkt.get::<u8>(off + min_len(proto) - 1)? };
    }
    quoted_ports(pkt, off, proto, side)
}

/// As [`ports`], of a transport header of which only the 8 bytes that every
/// ICMP error quotes need be present.
#[inline(always)]
pub fn quoted_ports(
    pkt: Packet,
    off: usize,
    proto: u8,
    side: Side,
) -> Result<([u8; 2], [u8; 2]), Reason> {
    // SAFETY: each header is only read here, and no other reference into the
    // packet is live in this function.
    unsafe {
        match proto {
            IPPROTO_TCP | IPPROTO_UDP => {
                pkt.get::<[u8; QUOTED_L4_LEN]>(off)?;
                let ports: &PortPair = pkt.get(off)?;
                Ok((ports.src, ports.dst))
            }
            IPPROTO_ICMP => {
                let icmp: &IcmpEcho = pkt.get(off)?;
                match (side, icmp.kind, icmp.code) {
                    (Side::Src, ICMP_ECHO_REQUEST, 0) => Ok((icmp.id, [0; 2])),
                    (Side::Dst, ICMP_ECHO_REPLY, 0) => Ok(([0; 2], icmp.id)),
                    _ => Err(Reason::Unsupported),
                }
            }
            _ => Err(Reason::Unsupported),
        }
    }
}

/// The flags of the TCP header at `off` (validated by [`ports`]).
#[inline(always)]
pub fn tcp_flags(pkt: Packet, off: usize) -> u8 {
    // SAFETY: a read-only view of one byte.
    unsafe { pkt.get::<u8>(off + TCP_FLAGS).map_or(0, |f| *f) }
}

/// Checks the TCP or UDP header at `off` (validated by [`ports`]) against
/// `len`, the bytes the IP header says follow it: a UDP length below 8 or
/// beyond them, or a TCP header shorter than 20 bytes or beyond them, is
/// malformed (what conntrack calls invalid). A UDP length short of `len`
/// leaves a surplus area (room for UDP options) that is carried along.
#[inline(always)]
pub fn check_len(pkt: Packet, off: usize, proto: u8, len: u16) -> Result<(), Reason> {
    // SAFETY: read-only views; no other reference into the packet is live.
    let (own, min) = unsafe {
        match proto {
            IPPROTO_UDP => (
                u16::from_be_bytes(*pkt.get::<[u8; 2]>(off + UDP_LEN)?),
                UdpHdr::LEN,
            ),
            IPPROTO_TCP => (
                u16::from(*pkt.get::<u8>(off + TCP_DATA_OFFSET)? >> 4) * 4,
                TcpHdr::LEN,
            ),
            _ => return Ok(()),
        }
    };
    if own < min as u16 || own > len {
        return Err(Reason::BadLength);
    }
    Ok(())
}

/// Smallest transport header `ports` reads for `proto`.
#[inline(always)]
pub fn min_len(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => TcpHdr::LEN,
        IPPROTO_UDP => UdpHdr::LEN,
        _ => core::mem::size_of::<IcmpEcho>(),
    }
}

/// Where the checksum sits in a TCP or UDP header; other protocols' is
/// never offloaded.
#[inline(always)]
pub fn checksum_offset(proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_TCP => Some(TCP_CHECK),
        IPPROTO_UDP => Some(UDP_CHECK),
        _ => None,
    }
}

/// Length of the transport header at `off`, options included: what each
/// segment of a GSO aggregate repeats.
#[inline(always)]
pub fn header_len(pkt: Packet, off: usize, proto: u8) -> Result<usize, Reason> {
    if proto != IPPROTO_TCP {
        return Ok(min_len(proto));
    }
    // SAFETY: read-only; no other reference into the packet is live here.
    let data_offset: &u8 = unsafe { pkt.get(off + TCP_DATA_OFFSET)? };
    Ok(usize::from(*data_offset >> 4) * 4)
}

/// A TCP or UDP checksum to patch after 2 bytes of the segment changed (a
/// port, the MSS), and with them perhaps an address in the pseudo-header.
pub struct ChecksumUpdate {
    /// Offset of the checksum field in the packet.
    pub at: usize,
    /// Old and new address, if one changed: part of the pseudo-header, not
    /// of the segment.
    pub addr: Option<([u8; 4], [u8; 4])>,
    /// Old and new 16-bit word of the segment, as it adds to the sum
    /// (`checksum::word_at`: bytes at an odd offset swapped).
    pub word: ([u8; 2], [u8; 2]),
    /// UDP, where a zero checksum means "none" and must stay zero.
    pub udp: bool,
}

impl ChecksumUpdate {
    /// Patches a checksum field that holds the complete checksum, as in
    /// every XDP packet (RFC 1624 incremental update).
    #[inline(always)]
    pub fn apply_in_place(&self, pkt: Packet) -> Result<(), Reason> {
        // SAFETY: the only live reference into the packet.
        let check: &mut [u8; 2] = unsafe { pkt.get(self.at)? };
        *check = rewrite::l4_checksum(*check, self.addr, self.word, self.udp);
        Ok(())
    }
}

/// Rewrites `side`'s address and port of the IPv4 packet at `ip_off` (a
/// 20-byte header, transport header already validated by [`ports`]),
/// optionally decrementing the TTL, and patches both checksums. A later
/// fragment has no transport header: `port` `None` rewrites the address
/// only. Packet references taken before the call are invalid afterwards.
#[inline(always)]
pub fn translate<H: Hook>(
    hook: &mut H,
    ip_off: usize,
    side: Side,
    addr: [u8; 4],
    port: Option<[u8; 2]>,
    dec_ttl: bool,
) -> Result<(), Reason> {
    let pkt = hook.packet();
    // SAFETY: the IP header and the transport header do not overlap, and
    // each is the only live reference to its bytes.
    let ip: &mut [u8; Ipv4Hdr::LEN] = unsafe { pkt.get(ip_off)? };
    let l4 = ip_off + Ipv4Hdr::LEN;
    // The IPv4 header checksum is never offloaded: patched in place.
    let old_addr = rewrite::ipv4(ip, side, addr, dec_ttl);
    let proto = ip[IP_PROTO];

    let Some(port) = port else {
        return Ok(());
    };
    // SAFETY: the port pair and the ICMP header are each the only live
    // reference to their bytes.
    unsafe {
        if proto == IPPROTO_ICMP {
            // ICMP echo: no pseudo-header, only the identifier changes, and
            // its checksum is never offloaded.
            let icmp: &mut IcmpEcho = pkt.get(l4)?;
            let old_id = core::mem::replace(&mut icmp.id, port);
            icmp.check = rewrite::echo_checksum(icmp.check, old_id, port);
            return Ok(());
        }
        let ports: &mut PortPair = pkt.get(l4)?;
        let slot = match side {
            Side::Src => &mut ports.src,
            Side::Dst => &mut ports.dst,
        };
        let old_port = core::mem::replace(slot, port);
        let check_at = if proto == IPPROTO_TCP {
            TCP_CHECK
        } else {
            UDP_CHECK
        };
        // Ports sit at even offsets: no byte swap.
        hook.update_l4_checksum(&ChecksumUpdate {
            at: l4 + check_at,
            addr: Some((old_addr, addr)),
            word: (old_port, port),
            udp: proto == IPPROTO_UDP,
        })
    }
}
