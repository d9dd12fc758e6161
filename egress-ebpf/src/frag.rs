//! Later fragments of translated datagrams (`egress_common::fragment`).

use egress_common::{
    config::Config,
    flow::{Flow, FlowKey},
    fragment::{FragEntry, FragKey, HELD_MAX, HeldFragment},
};

use crate::{
    clock,
    maps::{FRAGMENTS, HELD_FRAGMENTS},
    nat::ETH_LEN,
    packet::Hook,
    state,
};

/// Records that the datagram `key`, whose first fragment this is, belongs
/// to the flow half `flow`. Best effort: without the entry its later
/// fragments are treated as ahead of their first (`outbound`, `inbound`).
#[inline(always)]
pub fn remember(key: &FragKey, flow: &FlowKey, now: u64) {
    let entry = FragEntry {
        flow: *flow,
        first_ns: now,
    };
    // Overwrites an older datagram's entry with the same IP ID.
    let _ = FRAGMENTS.insert(key, &entry, 0);
}

/// The flow half of the datagram `key`, if its first fragment passed within
/// the reassembly time and the flow is still there. Never creates anything.
#[inline(always)]
pub fn find(key: &FragKey) -> Option<&'static mut Flow> {
    // SAFETY: a copy of the value is all that is kept.
    let entry = unsafe { FRAGMENTS.get(key) }.copied()?;
    if !entry.is_fresh(clock::now()) {
        return None;
    }
    state::find(&entry.flow)
}

/// Hands the daemon a copy of the returning later fragment in the hook, of
/// `len` IP bytes, that matched no first fragment (see
/// `egress_user::reorder`). Best effort: without room in the ring, or
/// longer than [`HELD_MAX`], it has only the kernel's copy.
#[inline(always)]
pub fn hold<H: Hook>(hook: &H, cfg: &Config, len: u16) {
    let len = usize::from(len);
    if len == 0 || len > HELD_MAX {
        return;
    }
    let Some(mut held) = HELD_FRAGMENTS.reserve::<HeldFragment>(0) else {
        return;
    };
    let copy = held.as_mut_ptr();
    // SAFETY: the reserved record, written in place (it is far larger than
    // the stack); the copy fills `len` bytes of its packet.
    let copied = unsafe {
        (*copy).tunnel_local = cfg.tunnel_local;
        (*copy).len = len as u16;
        (*copy)._pad = [0; 2];
        hook.load_bytes(ETH_LEN, (&raw mut (*copy).packet).cast(), len)
    };
    match copied {
        Ok(()) => held.submit(0),
        Err(_) => held.discard(0),
    }
}
