//! Finding a packet's flow half through this CPU's cache (see
//! `egress_common::flow_cache`), and accounting the packet to it.

use egress_common::{
    flow::{DIR_OUT, Flow, FlowKey},
    flow_cache::{CACHE_SLOTS, CachedFlow, slot},
};

use crate::{
    clock,
    maps::{self, FLOW_CACHE},
    state,
};

/// A packet's flow half.
pub enum Found {
    /// Served from this CPU's cache: the packet is counted in the slot.
    Cached(&'static mut CachedFlow),
    /// The table entry, and the key's cache slot, refilled once the packet
    /// is recorded.
    Table(&'static mut Flow, Option<&'static mut CachedFlow>),
}

impl Found {
    /// The flow half just created under `key`.
    #[inline(always)]
    pub fn created(key: &FlowKey) -> Option<Self> {
        state::find(key).map(|f| Self::Table(f, cache_slot(key)))
    }

    /// The table entry, with the key's cache slot (refilled once the
    /// packet is recorded): for a packet that changes the flow itself.
    #[inline(always)]
    pub fn into_table(self, key: &FlowKey) -> Option<Self> {
        match self {
            Self::Cached(c) => state::find(key).map(|f| Self::Table(f, Some(c))),
            table => Some(table),
        }
    }

    /// The translation (from the cache, as of this tick).
    #[inline(always)]
    pub fn flow(&self) -> &Flow {
        match self {
            Self::Cached(c) => &c.flow,
            Self::Table(f, _) => f,
        }
    }
}

#[inline(always)]
fn cache_slot(key: &FlowKey) -> Option<&'static mut CachedFlow> {
    // SAFETY: this CPU's slot; programs do not nest on a CPU.
    FLOW_CACHE
        .get_ptr_mut(maps::this_cpus(slot(key), CACHE_SLOTS))
        .map(|s| unsafe { &mut *s })
}

/// Sends the next packet of the flow half under `key` on this CPU to the
/// table, if this CPU's cache holds it (its entry just changed).
#[inline(always)]
pub fn forget(key: &FlowKey) {
    if let Some(c) = cache_slot(key)
        && c.key == *key
    {
        c.tick = 0;
    }
}

/// The flow half stored under `key`, for a packet with TCP `flags` (0 for
/// other protocols).
#[inline(always)]
pub fn find(key: &FlowKey, flags: u8) -> Option<Found> {
    let slot = cache_slot(key);
    match slot {
        Some(c) if c.serves(key, clock::tick(), flags) => Some(Found::Cached(c)),
        _ => state::find(key).map(|f| Found::Table(f, slot)),
    }
}

/// Accounts a packet of `bytes` with TCP `flags` (0 for other protocols,
/// and for later fragments) to `found`, the flow half under `key`.
#[inline(always)]
pub fn record(found: Found, key: &FlowKey, bytes: u16, flags: u8) {
    match found {
        Found::Cached(c) => {
            c.packets += 1;
            c.bytes += u64::from(bytes);
        }
        Found::Table(flow, slot) => {
            state::touch(flow, bytes, clock::now());
            if key.dir == DIR_OUT {
                state::track_out(flow, flags);
            } else {
                state::track_in(flow, flags);
            }
            if let Some(slot) = slot {
                refill(slot, key, flow);
            }
        }
    }
}

/// Makes `slot` hold the flow half `flow` (under `key`) as of this tick,
/// moving the counts of another flow it held to that flow's entry.
#[inline(always)]
fn refill(slot: &mut CachedFlow, key: &FlowKey, flow: &Flow) {
    if !slot.holds(key, flow) {
        flush(slot);
        slot.packets = 0;
        slot.bytes = 0;
        slot.key = *key;
    }
    slot.flow = *flow;
    slot.tick = clock::tick();
}

/// Adds the slot's counts to its flow's table entry, if it is still there.
/// (Not inlined: it needs a flow table lookup of its own and is rare.)
#[inline(never)]
fn flush(slot: &CachedFlow) {
    if slot.packets == 0 {
        return;
    }
    if let Some(entry) = state::find(&slot.key)
        && entry.created_ns == slot.flow.created_ns
    {
        entry.packets += slot.packets;
        entry.bytes += slot.bytes;
    }
}
