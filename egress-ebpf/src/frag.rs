//! Later fragments of translated datagrams (`egress_common::fragment`).

use egress_common::{
    flow::{Flow, FlowKey},
    fragment::{FragEntry, FragKey},
};

use crate::{clock, maps::FRAGMENTS, state};

/// Records that the datagram `key`, whose first fragment this is, belongs
/// to the flow half `flow`. Best effort: without the entry its later
/// fragments are dropped as unmatched, like fragments lost on the way.
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
