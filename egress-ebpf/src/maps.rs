//! Maps, the load-time configuration and the reason counters.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
};
use egress_common::{
    config::Config,
    flow::{Flow, FlowKey},
    reason::Reason,
};

/// Both halves of every flow. Sized by the loader (`FLOW_TABLE_*`); a plain
/// hash map, never an LRU, so entries only go when the daemon expires them.
#[map]
pub static FLOWS: HashMap<FlowKey, Flow> = HashMap::with_max_entries(1024, 0);

/// Outer source addresses allowed to tunnel to us (value unused).
#[map]
pub static PEERS: HashMap<[u8; 4], u8> = HashMap::with_max_entries(256, 0);

/// Inner source ranges that may be translated (value unused).
#[map]
pub static CLIENTS: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(1024, 0);

/// Packets per [`Reason`].
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

/// Rewritten by the loader before the program is loaded.
#[unsafe(no_mangle)]
static CONFIG: Config = Config::UNSET;

#[inline(always)]
pub fn config() -> &'static Config {
    // The volatile read of the address keeps the compiler from folding the
    // placeholder value into the code: the loader patches it at load time.
    // SAFETY: reads a valid pointer to a static.
    unsafe { &*core::ptr::read_volatile(&(&raw const CONFIG)) }
}

#[inline(always)]
pub fn is_peer(addr: [u8; 4]) -> bool {
    // SAFETY: only presence is checked; the value is never read.
    unsafe { PEERS.get(&addr).is_some() }
}

#[inline(always)]
pub fn is_client(addr: [u8; 4]) -> bool {
    CLIENTS.get(&Key::new(32, addr)).is_some()
}

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(n) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no other writer while this program runs.
        unsafe { *n += 1 };
    }
}
