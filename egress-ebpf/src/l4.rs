//! Transport headers: reading a packet's ports (or ICMP echo identifier)
//! and translating one side of an IPv4 packet in place.

use egress_common::{
    checksum::Incremental,
    flow::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    reason::Reason,
};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::packet::Packet;

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

/// Which end of the packet a translation rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Outbound SNAT: source address and port.
    Src,
    /// Return traffic: destination address and port.
    Dst,
}

/// Source and destination "ports" of the transport header at `off`. For
/// ICMP only echo of the expected direction is accepted; its identifier
/// stands on the translated side and the other side's port is 0.
#[inline(always)]
pub fn ports(pkt: Packet, off: usize, proto: u8, side: Side) -> Result<([u8; 2], [u8; 2]), Reason> {
    // SAFETY: each header is only read here, and no other reference into the
    // packet is live in this function.
    unsafe {
        match proto {
            IPPROTO_TCP => {
                let tcp: &TcpHdr = pkt.get(off)?;
                Ok((tcp.source, tcp.dest))
            }
            IPPROTO_UDP => {
                let udp: &UdpHdr = pkt.get(off)?;
                Ok((udp.src, udp.dst))
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

/// Smallest transport header `ports` reads for `proto`.
#[inline(always)]
pub fn min_len(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => TcpHdr::LEN,
        IPPROTO_UDP => UdpHdr::LEN,
        _ => core::mem::size_of::<IcmpEcho>(),
    }
}

/// Rewrites `side`'s address and port of the IPv4 packet at `ip_off` (a
/// 20-byte header, transport header already validated by [`ports`]),
/// optionally decrementing the TTL, and patches both checksums.
#[inline(always)]
pub fn translate(
    pkt: Packet,
    ip_off: usize,
    side: Side,
    addr: [u8; 4],
    port: [u8; 2],
    dec_ttl: bool,
) -> Result<(), Reason> {
    // SAFETY: the IP header and the transport header do not overlap, and
    // each is the only live reference to its bytes.
    let ip: &mut Ipv4Hdr = unsafe { pkt.get(ip_off)? };
    let l4 = ip_off + Ipv4Hdr::LEN;
    let slot = match side {
        Side::Src => &mut ip.src_addr,
        Side::Dst => &mut ip.dst_addr,
    };
    let old_addr = *slot;
    *slot = addr;
    let mut ip_check = Incremental::new(ip.check).replace4(old_addr, addr);
    if dec_ttl {
        let old = [ip.ttl, ip.proto];
        ip.ttl = ip.ttl.saturating_sub(1);
        ip_check = ip_check.replace2(old, [ip.ttl, ip.proto]);
    }
    ip.check = ip_check.finish();

    // SAFETY: see above.
    unsafe {
        match ip.proto {
            IPPROTO_TCP => {
                let tcp: &mut TcpHdr = pkt.get(l4)?;
                let p = match side {
                    Side::Src => &mut tcp.source,
                    Side::Dst => &mut tcp.dest,
                };
                let old_port = core::mem::replace(p, port);
                tcp.check = Incremental::new(tcp.check)
                    .replace4(old_addr, addr)
                    .replace2(old_port, port)
                    .finish();
            }
            IPPROTO_UDP => {
                let udp: &mut UdpHdr = pkt.get(l4)?;
                let p = match side {
                    Side::Src => &mut udp.src,
                    Side::Dst => &mut udp.dst,
                };
                let old_port = core::mem::replace(p, port);
                // Zero means the sender computed no checksum: keep it so.
                if udp.check != [0, 0] {
                    udp.check = Incremental::new(udp.check)
                        .replace4(old_addr, addr)
                        .replace2(old_port, port)
                        .finish_udp();
                }
            }
            _ => {
                // ICMP echo: no pseudo-header, only the identifier changes.
                let icmp: &mut IcmpEcho = pkt.get(l4)?;
                let old_id = core::mem::replace(&mut icmp.id, port);
                icmp.check = Incremental::new(icmp.check).replace2(old_id, port).finish();
            }
        }
    }
    Ok(())
}
