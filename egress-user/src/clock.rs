//! The kernel's monotonic clock, the one the data path stamps flows with
//! (`bpf_ktime_get_coarse_ns`).
//!
//! A process in a time namespace reads CLOCK_MONOTONIC moved by the
//! namespace's offset; BPF helpers never are. Read as it is, a daemon a day
//! ahead would find every flow a day idle and remove it, one behind would
//! remove none. So the offset is taken off.

use std::sync::OnceLock;

const NS_PER_SEC: i128 = 1_000_000_000;

/// Now on the kernel's CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    static OFFSET_NS: OnceLock<i128> = OnceLock::new();
    let offset = *OFFSET_NS.get_or_init(|| {
        std::fs::read_to_string("/proc/self/timens_offsets")
            .ok()
            .and_then(|offsets| monotonic_offset_ns(&offsets))
            // Without the file the kernel has no time namespaces.
            .unwrap_or(0)
    });
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    let ns = i128::from(t.tv_sec()) * NS_PER_SEC + i128::from(t.tv_nsec()) - offset;
    ns.clamp(0, u64::MAX.into()) as u64
}

/// The monotonic offset in `/proc/self/timens_offsets` ("monotonic <s>
/// <ns>" lines, seconds possibly negative).
fn monotonic_offset_ns(offsets: &str) -> Option<i128> {
    offsets.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != "monotonic" {
            return None;
        }
        let secs: i64 = words.next()?.parse().ok()?;
        let nanos: u32 = words.next()?.parse().ok()?;
        Some(i128::from(secs) * NS_PER_SEC + i128::from(nanos))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_monotonic_offset_is_read_with_its_sign() {
        let file = "monotonic       -86400        500\nboottime          7         0\n";
        assert_eq!(monotonic_offset_ns(file), Some(-86_400 * NS_PER_SEC + 500));
        assert_eq!(
            monotonic_offset_ns("monotonic 0 0\nboottime 0 0\n"),
            Some(0)
        );
        assert_eq!(monotonic_offset_ns("boottime 5 0\n"), None);
    }
}
