//! Flow lookup and creation in the `FLOWS` map.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
};
use egress_common::{
    config::Config,
    flow::{Flow, FlowKey},
    ports::{PORT_TRIES, candidate},
    reason::Reason,
};

use crate::maps::FLOWS;

const EEXIST: i32 = 17;

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The flow stored under `key`, if any.
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<&'static mut Flow> {
    // SAFETY: entries are only deleted by the daemon's garbage collector,
    // after they have been idle for a whole timeout; the fields we write are
    // counters and timestamps, where a lost update is harmless.
    FLOWS.get_ptr_mut(key).map(|f| unsafe { &mut *f })
}

/// Creates the flow for an outbound packet with tuple `key` from `peer`.
///
/// The return-half entry is inserted first with `BPF_NOEXIST`: that claims
/// the translation tuple atomically, and a collision just moves to the next
/// candidate port. The outbound half follows; if another CPU created the
/// same flow meanwhile, our return half is withdrawn and its flow is used, so
/// concurrent first packets end with one mapping and never a half flow.
#[inline(always)]
pub fn create(key: &FlowKey, peer: [u8; 4], cfg: &Config) -> Result<&'static mut Flow, Reason> {
    let t = now();
    let mut flow = Flow {
        client_addr: key.src,
        nat_addr: cfg.snat_for(key.src),
        remote_addr: key.dst,
        peer_addr: peer,
        client_port: key.sport,
        nat_port: [0; 2],
        remote_port: key.dport,
        proto: key.proto,
        _pad: 0,
        created_ns: t,
        last_seen_ns: t,
        packets: 0,
        bytes: 0,
    };
    // SAFETY: no preconditions.
    let random = unsafe { bpf_get_prandom_u32() };
    let client_port = u16::from_be_bytes(key.sport);
    for attempt in 0..PORT_TRIES {
        let port = candidate(client_port, cfg.port_min, cfg.port_max, random, attempt);
        flow.nat_port = port.to_be_bytes();
        let in_key = flow.in_key();
        match FLOWS.insert(&in_key, &flow, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(e) if e == -EEXIST => continue,
            Err(_) => return Err(Reason::TableFull),
        }
        return match FLOWS.insert(key, &flow, BPF_NOEXIST as u64) {
            Ok(()) => find(key).ok_or(Reason::Internal),
            Err(e) => {
                // Withdraw the half we just inserted; it is ours alone, so
                // the delete cannot race with anyone.
                if FLOWS.remove(&in_key).is_err() {
                    return Err(Reason::Internal);
                }
                if e == -EEXIST {
                    find(key).ok_or(Reason::Internal)
                } else {
                    Err(Reason::TableFull)
                }
            }
        };
    }
    Err(Reason::PortsExhausted)
}

/// Accounts one packet of `bytes` to a flow half.
#[inline(always)]
pub fn touch(flow: &mut Flow, bytes: u16) {
    flow.last_seen_ns = now();
    flow.packets += 1;
    flow.bytes += u64::from(bytes);
}
