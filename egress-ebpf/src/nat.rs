//! The translation logic both hooks run: classify the packet, then hand it
//! to the outbound (decapsulate + SNAT) or return (un-NAT + encapsulate) path.

use egress_common::{
    checksum::ipv4_header_valid,
    flow::IPPROTO_IPIP,
    headers::IP_DF,
    reason::{Reason, Verdict},
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    fib::NextHop,
    inbound, maps, outbound,
    packet::{Action, Hook, Packet},
};

pub const ETH_LEN: usize = EthHdr::LEN;
pub const IP_LEN: usize = Ipv4Hdr::LEN;
/// Flags and fragment offset bits other than DF: MF and the offset.
pub const IP_MF_OFFSET: u16 = 0x3fff;

/// Whether the header has "don't fragment" set.
#[inline(always)]
pub fn has_df(ip: &Ipv4Hdr) -> bool {
    u16::from_be_bytes(ip.frags) & IP_DF != 0
}

/// A packet the program acts on, and the counter that records why.
pub struct Outcome {
    pub action: Action,
    pub reason: Reason,
}

/// A packet passed or dropped untranslated for `reason`.
impl From<Reason> for Outcome {
    #[inline(always)]
    fn from(reason: Reason) -> Self {
        let action = match reason.verdict() {
            Verdict::Passed => Action::Pass,
            _ => Action::Drop,
        };
        Self { action, reason }
    }
}

/// Counts the reason for a processed packet and returns what the hook
/// should do with it.
///
/// `Err` is an [`Outcome`] too, converted from the reason where it arose:
/// with a bare reason there, paths that end in a shared return would carry
/// no value for the `Ok` fields, and LLVM may then copy an unset register,
/// which the verifier rejects.
#[inline(always)]
pub fn conclude(result: Result<Outcome, Outcome>) -> Action {
    let (Ok(Outcome { action, reason }) | Err(Outcome { action, reason })) = result;
    maps::count(reason);
    action
}

/// Why an IPv4 header other than a plain 20-byte one is refused: not an
/// IPv4 header at all (version, IHL below 5), else `options` for its
/// options.
#[inline(always)]
pub fn refusal(ip: &Ipv4Hdr, options: Reason) -> Reason {
    if ip.version() != 4 || ip.ihl() < IP_LEN as u8 {
        Reason::BadHeader
    } else {
        options
    }
}

/// Whether the 20-byte IPv4 header at `off` carries a right checksum: the
/// kernel drops a header with a wrong one, and so do we, rather than
/// translate fields that may be corrupt.
#[inline(always)]
pub fn checksum_valid(pkt: Packet, off: usize) -> Result<bool, Reason> {
    // SAFETY: a read-only view; other views of the header are only read
    // while it lives.
    let words: &[u16; 10] = unsafe { pkt.get(off)? };
    Ok(ipv4_header_valid(words))
}

/// Runs the gateway on the hook's packet. `Err` is a packet passed or
/// dropped untranslated.
#[inline(always)]
pub fn process<H: Hook>(hook: &mut H) -> Result<Outcome, Outcome> {
    let cfg = maps::config();
    if cfg.snat_count == 0 {
        return Err(Reason::NotOurs.into());
    }
    let pkt = hook.packet();
    // SAFETY: read-only peeks; no other packet reference is live.
    let (proto, dst) = unsafe {
        let eth: &EthHdr = pkt.get(0)?;
        if eth.ether_type != EtherType::Ipv4 as u16 {
            return Err(Reason::NotIpv4.into());
        }
        let ip: &Ipv4Hdr = pkt.get(ETH_LEN)?;
        (ip.proto, ip.dst_addr)
    };
    if proto == IPPROTO_IPIP && dst == cfg.tunnel_local {
        outbound::handle(hook, cfg)
    } else if cfg.is_snat(dst) {
        inbound::handle(hook, cfg)
    } else {
        Err(Reason::NotOurs.into())
    }
}

/// Turns a next hop into the hook's action, writing the Ethernet header of
/// the (already rewritten) packet. A packet the kernel must forward (no
/// neighbour yet, or to be fragmented) keeps the frame's original addresses,
/// which makes the kernel accept it as addressed to us.
#[inline(always)]
pub fn send(pkt: Packet, hop: &NextHop, orig: &EthHdr, reason: Reason) -> Result<Outcome, Outcome> {
    // SAFETY: the only live reference into the packet.
    let eth: &mut EthHdr = unsafe { pkt.get(0)? };
    eth.ether_type = EtherType::Ipv4 as u16;
    let to_kernel = match *hop {
        NextHop::Resolved {
            ifindex,
            back_out,
            src_mac,
            dst_mac,
        } => {
            eth.src_addr = src_mac;
            eth.dst_addr = dst_mac;
            let action = if back_out {
                Action::Tx
            } else {
                Action::Redirect(ifindex)
            };
            return Ok(Outcome { action, reason });
        }
        NextHop::Unresolved => Reason::NoNeighbour,
        NextHop::TooBig { .. } => Reason::KernelFragments,
    };
    eth.src_addr = orig.src_addr;
    eth.dst_addr = orig.dst_addr;
    Ok(Outcome {
        action: Action::Pass,
        reason: to_kernel,
    })
}
