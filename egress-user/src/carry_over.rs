//! What a resize's catch-up (see `resize`) carries over to an entry it
//! copied before, when the old data path changed it since: which of the
//! old map's entry (`old`) and the new map's (`new`) says what.
//!
//! Once the new programs run (the last catch-up), every change the old
//! data path made precedes every change the new one made, and a packet
//! recorded stamps `last_seen_ns` with a time no earlier than the last
//! the old path stamped. Before (the first catch-up), the new entry is the
//! copy, and these rules give the old one.

use std::hash::{Hash as _, Hasher as _};

use egress_common::{
    flow::{Flow, Mapping},
    tcp::RST,
};
use rustc_hash::FxHasher;

/// What the old data path changes in a flow half: two of the same
/// fingerprint are (all but surely) the same record.
pub fn fingerprint(f: &Flow) -> u64 {
    let mut h = FxHasher::default();
    (f.last_seen_ns, f.packets, f.bytes, f.tcp_flags).hash(&mut h);
    (f.handshake_ns, f.rtt_ns, f.peer_addr).hash(&mut h);
    h.finish()
}

/// The flow half to write over `new`, if any.
///
/// If the old half saw the later packet, the new data path has recorded
/// none on it since the takeover: the old record is the truth. Otherwise
/// the new record goes on, with what it cannot have seen: the old path's
/// TCP flags (a FIN, say), unless they belong to another connection on
/// the tuple (the two records' handshakes differ: the later one's record
/// is the connection's), and a RST but if its sender went on talking
/// past it on the new path (as `tcp::record` forgets it). Counts are
/// the larger: both count from the copy, so the sum of what each added
/// is lost, not the larger share.
pub fn flow_half(old: &Flow, new: &Flow) -> Option<Flow> {
    if old == new {
        return None;
    }
    let counts = |f: Flow| Flow {
        packets: old.packets.max(new.packets),
        bytes: old.bytes.max(new.bytes),
        ..f
    };
    if old.last_seen_ns > new.last_seen_ns {
        return Some(counts(*old));
    }
    let mut merged = counts(*new);
    if old.handshake_ns > new.handshake_ns {
        (merged.tcp_flags, merged.handshake_ns) = (old.tcp_flags, old.handshake_ns);
        merged.rtt_ns = old.rtt_ns;
    } else if old.handshake_ns == new.handshake_ns {
        let talked_past = new.last_seen_ns > old.last_seen_ns && new.tcp_flags & RST == 0;
        let kept = if talked_past { !RST } else { !0 };
        merged.tcp_flags |= old.tcp_flags & kept;
        if merged.rtt_ns == 0 {
            merged.rtt_ns = old.rtt_ns;
        }
    }
    (merged != *new).then_some(merged)
}

/// The mapping to write over `new`, if any: the later use.
pub fn mapping(old: &Mapping, new: &Mapping) -> Option<Mapping> {
    (old.used_ns > new.used_ns).then_some(Mapping {
        used_ns: old.used_ns,
        ..*new
    })
}

/// A client's flow count to write over `new`, if any, given `old` and the
/// old count the new one accounts for already (`accounted`: the count
/// copied, or carried over last): the flows the old data path counted
/// since are added to those the new one counts. (Only sweeps take counts
/// down, and none runs on the old maps during a resize.)
pub fn client_count(old: u64, new: u64, accounted: u64) -> Option<u64> {
    let gained = old.saturating_sub(accounted);
    (gained > 0).then(|| new.saturating_add(gained))
}

#[cfg(test)]
mod tests {
    use egress_common::tcp::{ACK, FIN, SYN};

    use super::*;

    fn half(last_seen_ns: u64, packets: u64, tcp_flags: u8) -> Flow {
        Flow {
            last_seen_ns,
            packets,
            bytes: packets * 100,
            tcp_flags,
            handshake_ns: 5,
            ..Flow::default()
        }
    }

    const EST: u8 = SYN | ACK;

    #[test]
    fn the_same_record_is_left() {
        let f = half(10, 3, EST);
        assert_eq!(flow_half(&f, &f), None);
    }

    #[test]
    fn an_old_half_with_the_later_packet_is_the_truth() {
        // The copy (what the new map holds) saw 3 packets; the old path
        // then a FIN.
        let (old, new) = (half(20, 4, EST | FIN), half(10, 3, EST));
        assert_eq!(flow_half(&old, &new), Some(old));
        // A count the new path added without a packet stamp (a cache
        // flush) is kept.
        let new = half(10, 9, EST);
        let merged = flow_half(&old, &new).unwrap();
        assert_eq!((merged.packets, merged.tcp_flags), (9, EST | FIN));
    }

    #[test]
    fn a_new_half_keeps_its_record_with_the_old_fin_added() {
        // FIN through the old path, then more packets through the new one.
        let (old, new) = (half(20, 4, EST | FIN), half(30, 5, EST));
        let merged = flow_half(&old, &new).unwrap();
        assert_eq!(merged.tcp_flags, EST | FIN);
        assert_eq!((merged.last_seen_ns, merged.packets), (30, 5));
        // Seen in the same tick of the coarse clock: still added.
        let new = half(20, 3, EST);
        let merged = flow_half(&old, &new).unwrap();
        assert_eq!((merged.tcp_flags, merged.packets), (EST | FIN, 4));
        // Nothing the new one lacks: left alone.
        assert_eq!(flow_half(&half(20, 4, EST), &half(30, 5, EST | FIN)), None);
    }

    #[test]
    fn an_old_reset_stays_unless_its_sender_talked_past_it_on_the_new_path() {
        let old = half(20, 4, EST | RST);
        assert_eq!(flow_half(&old, &half(30, 5, EST)), None);
        let same_tick = flow_half(&old, &half(20, 4, EST)).unwrap();
        assert_eq!(same_tick.tcp_flags, EST | RST);
        let another = flow_half(&old, &half(30, 5, EST | RST));
        assert_eq!(another, None);
    }

    #[test]
    fn flags_of_another_connection_on_the_tuple_are_not_mixed() {
        // The new path saw a new handshake (the tuple reopened): the old
        // FIN was the previous connection's.
        let old = half(20, 4, EST | FIN);
        let new = Flow {
            handshake_ns: 25,
            ..half(30, 1, SYN)
        };
        assert_eq!(
            flow_half(&old, &new),
            Some(Flow {
                packets: 4,
                bytes: 400,
                ..new
            })
        );
        // The old path saw it, after the copy the new record goes on from.
        let old = Flow {
            handshake_ns: 15,
            rtt_ns: 7,
            ..half(20, 2, SYN | ACK)
        };
        let new = half(30, 5, EST | FIN);
        let merged = flow_half(&old, &new).unwrap();
        assert_eq!(
            (merged.tcp_flags, merged.handshake_ns, merged.rtt_ns),
            (SYN | ACK, 15, 7)
        );
    }

    #[test]
    fn a_mapping_takes_the_later_use() {
        let m = |used_ns| Mapping {
            addr: [10, 0, 0, 1],
            port: [1, 2],
            used_ns,
            ..Mapping::default()
        };
        assert_eq!(mapping(&m(20), &m(10)), Some(m(20)));
        assert_eq!(mapping(&m(10), &m(20)), None);
        assert_eq!(mapping(&m(10), &m(10)), None);
    }

    #[test]
    fn a_client_count_gains_what_the_old_path_counted_since() {
        // 3 copied, the old path counted 2 more, the new one 1.
        assert_eq!(client_count(5, 4, 3), Some(6));
        // Before the new path runs, the new count is the copy's.
        assert_eq!(client_count(5, 3, 3), Some(5));
        assert_eq!(client_count(3, 4, 3), None);
        // A count a sweep took down (none should run meanwhile).
        assert_eq!(client_count(2, 4, 3), None);
    }

    #[test]
    fn fingerprints_tell_a_changed_half() {
        let f = half(10, 3, EST);
        assert_eq!(fingerprint(&f), fingerprint(&f.clone()));
        for changed in [half(11, 3, EST), half(10, 4, EST), half(10, 3, EST | FIN)] {
            assert_ne!(fingerprint(&f), fingerprint(&changed));
        }
    }
}
