//! Maps, the load-time configuration and the reason counters.

use core::arch::asm;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::bpf_get_smp_processor_id,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
};
use egress_common::{
    config::{Config, MAX_CLIENT_RANGES, MAX_PEERS},
    flow::{Flow, FlowKey, Mapping, PortKey},
    flow_cache::{CACHE_SLOTS, CachedFlow},
    fragment::{FragEntry, FragKey},
    ip_id::{IP_ID_BUCKETS, ip_id_bucket},
    peers::PeerSet,
    reason::Reason,
    route::{ROUTE_SLOTS, Route},
};

// The connection state (`FLOWS`, `MAPPINGS`, `CLIENT_FLOWS`) and the
// counters are pinned by name, so a restarted daemon carries on with them.
// The state maps are sized by the loader and are plain hash maps, never
// LRUs: the kernel never evicts an entry; the daemon's sweep removes them
// (see `egress_user::gc`).

/// Both halves of every flow.
#[map]
pub static FLOWS: HashMap<FlowKey, Flow> = HashMap::pinned(1024, 0);

/// Both halves of every endpoint-independent mapping.
#[map]
pub static MAPPINGS: HashMap<PortKey, Mapping> = HashMap::pinned(1024, 0);

/// Recent flow halves, a direct-mapped cache per CPU in front of [`FLOWS`]
/// (see `egress_common::flow_cache`), [`CACHE_SLOTS`] per CPU (see
/// [`this_cpus`]). Pinned: its slots hold packet counts not yet in
/// [`FLOWS`].
#[map]
pub static FLOW_CACHE: Array<CachedFlow> = Array::pinned(CACHE_SLOTS, 0);

/// Live flows per client address, for the per-client cap. Incremented
/// here, recounted by the daemon's sweeps. Allocated as clients appear: one
/// per flow would be far more than there are clients.
#[map]
pub static CLIENT_FLOWS: HashMap<[u8; 4], u64> = HashMap::pinned(1024, BPF_F_NO_PREALLOC);

/// First fragments' translations, for the rest of their datagrams.
///
/// An LRU, unlike the flow state: an entry is one datagram's, needed for
/// a few milliseconds, so losing one to eviction costs at most that
/// datagram (as a lost fragment would), and a flood of fragments only
/// evicts other fragments' entries, never flows. Entries older than the
/// reassembly time are ignored where they are read, so nothing sweeps
/// them: the LRU reuses them. Pinned, so that a reload of the programs
/// writes where the daemon reads (`egress_user::reorder`).
#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragEntry> = LruHashMap::pinned(16384, 0);

/// Returning later fragments that came before their first, for the
/// daemon (see `frag::hold`): about 170 of them. Pinned, so that a reload
/// of the programs writes where the daemon reads.
#[map]
pub static HELD_FRAGMENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

/// The outer IP ID counters (see `egress_common::ip_id`), shared by every
/// CPU. Pinned, so that a restarted or reloaded gateway counts on (during a
/// reload's handover, the old and the new programs draw from the same
/// counters) rather than start again somewhere that repeats the IDs of the
/// packets just sent; the daemon sets them at random when it makes them.
#[map]
pub static IP_IDS: Array<u64> = Array::pinned(IP_ID_BUCKETS, 0);

/// Remembered FIB answers, a direct-mapped cache per CPU (see
/// `egress_common::route`), [`ROUTE_SLOTS`] per CPU (see [`this_cpus`]).
/// Not pinned: a new program starts with none.
#[map]
pub static ROUTES: Array<Route> = Array::with_max_entries(ROUTE_SLOTS, 0);

/// The routing generation, bumped by the daemon whenever routes,
/// neighbours, links or addresses change: [`ROUTES`] entries of an older
/// generation are ignored.
#[map]
pub static ROUTES_GENERATION: Array<u64> = Array::with_max_entries(1, 0);

/// Outer source addresses allowed to tunnel to us, each with its index in
/// the [`CLIENTS`] peer sets.
#[map]
pub static PEERS: HashMap<[u8; 4], u8> = HashMap::with_max_entries(MAX_PEERS, 0);

/// Inner source ranges that may be translated, each with the peers that may
/// send for the addresses it is the longest match of.
#[map]
pub static CLIENTS: LpmTrie<[u8; 4], PeerSet> = LpmTrie::with_max_entries(MAX_CLIENT_RANGES, 0);

/// Where `state::create` builds a new flow's value (off its stack).
#[map]
pub static NEW_FLOW: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// Packets per [`Reason`].
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Reason::SLOTS, 0);

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

/// The index of this CPU's `slot` in a per-CPU cache laid out as one
/// array, a block of `slots` per CPU (the loader sizes it for every
/// possible CPU).
///
/// Not a per-CPU array: its lookup first loads the slot's address from a
/// table of them, a dependent load that a packet after a cold spell waits
/// for; here the address is arithmetic on the CPU number, which the
/// verifier (Linux 6.10+) inlines as a load from this CPU's own hot data.
/// Measured: outbound single runs 2.14x -> 2.01x the floor, and over many
/// flows 15-25% less.
#[inline(always)]
pub fn this_cpus(slot: u32, slots: u32) -> u32 {
    // SAFETY: no preconditions.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    cpu * slots + slot
}

#[inline(always)]
pub fn routes_generation() -> u64 {
    ROUTES_GENERATION.get(0).copied().unwrap_or(0)
}

/// The index of the peer at `addr`, if it is one.
#[inline(always)]
pub fn peer_index(addr: [u8; 4]) -> Option<u8> {
    // SAFETY: the value is copied out at once; userspace never changes it
    // while the program is loaded.
    unsafe { PEERS.get(&addr).copied() }
}

/// Whether the peer of index `peer` may send for the client at `addr`.
#[inline(always)]
pub fn may_send_for(peer: u8, addr: [u8; 4]) -> bool {
    CLIENTS
        .get(&Key::new(32, addr))
        .is_some_and(|peers| peers.contains(peer))
}

/// Takes `n` consecutive outer IP IDs for packets to `peer` and returns
/// the first: one per packet that leaves (see `Hook::segments`). Atomic,
/// so two CPUs sending to one peer never get the same ID.
#[inline(always)]
pub fn take_ip_ids(peer: [u8; 4], n: u32) -> u16 {
    let Some(counter) = IP_IDS.get_ptr_mut(ip_id_bucket(peer)) else {
        // Never: every bucket is in the array.
        return 0;
    };
    // SAFETY: a valid, aligned map value, which every CPU updates with
    // this one instruction only.
    unsafe { fetch_add(counter, u64::from(n)) as u16 }
}

/// Adds `n` to the counter at `counter` and returns its value before, as
/// one atomic instruction (BPF_ATOMIC | BPF_FETCH, Linux 5.12+).
///
/// Written out: LLVM emits it from the intrinsic only for BPF CPU v3, and
/// the data path is built for v2 (see the workspace `Cargo.toml`), where a
/// fetch-and-add whose value is used fails to compile ("Invalid usage of
/// the XADD return value"; tried again after the move to v2). Built for v3
/// instead, all of the program's code changed, and the verifier refused it
/// (LLVM stored a register just after a helper call had clobbered it).
///
/// # Safety
/// `counter` must be valid and 8-byte aligned.
#[inline(always)]
unsafe fn fetch_add(counter: *mut u64, n: u64) -> u64 {
    let mut value = n;
    // SAFETY: as the caller guarantees; the instruction touches only
    // `*counter` and `value`'s register.
    unsafe {
        asm!(
            "{value} = atomic_fetch_add((u64 *)({counter} + 0), {value})",
            counter = in(reg) counter,
            value = inout(reg) value,
            options(nostack),
        );
    }
    value
}

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(n) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no other writer while this program runs.
        unsafe { *n += 1 };
    }
}
