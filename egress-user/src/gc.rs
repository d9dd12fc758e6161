//! Expiry of idle flows. The data path only creates flows and stamps their
//! halves with the last packet's time; the daemon removes flows idle for
//! longer than their protocol's timeout, both halves together.

use std::time::Duration;

use aya::maps::{HashMap, MapData, MapError};
use egress_common::flow::{DIR_OUT, Flow, FlowKey, IPPROTO_ICMP, IPPROTO_TCP};

/// Idle timeouts: RFC 5382 REQ-5 (TCP established ≥ 2 h 4 min), RFC 4787
/// REQ-5 (UDP ≥ 2 min, 5 min recommended), RFC 5508 REQ-6 (ICMP ≥ 60 s).
pub fn timeout(proto: u8) -> Duration {
    match proto {
        IPPROTO_TCP => Duration::from_secs(2 * 3600 + 4 * 60),
        IPPROTO_ICMP => Duration::from_secs(60),
        _ => Duration::from_secs(300),
    }
}

/// Now on the clock `bpf_ktime_get_coarse_ns` reads (CLOCK_MONOTONIC).
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub live: usize,
    pub expired: usize,
}

/// Removes every flow idle past its timeout at time `now_ns`, and any
/// outbound half whose return half is missing (a sweep cut short).
pub fn sweep(
    flows: &mut HashMap<&mut MapData, FlowKey, Flow>,
    now_ns: u64,
) -> Result<Sweep, MapError> {
    let keys: Vec<FlowKey> = flows.keys().collect::<Result<_, _>>()?;
    let mut sweep = Sweep::default();
    for key in keys.into_iter().filter(|k| k.dir == DIR_OUT) {
        let Ok(out) = flows.get(&key, 0) else {
            continue;
        };
        let last_in = flows.get(&out.in_key(), 0).map(|f| f.last_seen_ns);
        let last = out.last_seen_ns.max(*last_in.as_ref().unwrap_or(&0));
        let idle = Duration::from_nanos(now_ns.saturating_sub(last));
        if last_in.is_ok() && idle <= timeout(out.proto) {
            sweep.live += 1;
            continue;
        }
        // Return half first: once it is gone no reply can use the flow.
        remove(flows, &out.in_key())?;
        remove(flows, &key)?;
        sweep.expired += 1;
    }
    Ok(sweep)
}

fn remove(flows: &mut HashMap<&mut MapData, FlowKey, Flow>, key: &FlowKey) -> Result<(), MapError> {
    match flows.remove(key) {
        // Already gone: the twin of a half removed by an earlier sweep.
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}
