//! Returning later fragments that arrive before their datagram's first
//! fragment (RFC 4787 REQ-14: a NAT handles fragments out of order).
//!
//! Only the first fragment carries the ports that name a flow, and XDP can
//! neither queue a packet nor send two for one, so the data path passes
//! such a fragment to the kernel (it may be the host's own: the kernel
//! reassembles or expires it) and copies it into a ring for this task
//! (`frag::hold` in the eBPF crate). The task holds the copies; once the
//! first fragment has passed and left its entry naming the flow, it sends
//! each on as the data path would have: destination translated back to the
//! client, our hop on its TTL, encapsulated to the flow's peer, through a
//! raw socket, routed by the kernel. Copies whose first fragment does not
//! come within [`HOLD_FOR`] are dropped (the kernel's copy stays).
//!
//! The kernel does not fragment what a raw socket sends whole: a copy too
//! big for the route once encapsulated is cut in two as a router would cut
//! it (the data path leaves such packets to the kernel's forwarding path,
//! which fragments the outer packet instead; either way the client gets
//! the datagram).

use std::{
    collections::VecDeque,
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, RingBuf};
use egress_common::{
    checksum::Incremental,
    flow::{DIR_IN, Flow, FlowKey},
    fragment::{FragEntry, FragKey, HeldFragment, IP_MF, IP_OFFSET},
    headers::{IP_DF, IPV4_LEN, Ipv4},
    rewrite::{self, Side},
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{clock, metrics::Collector};

/// How long a copy waits for its first fragment: reordering on the way
/// delays a packet by milliseconds; a first fragment much later than this
/// would be of little use to the client.
pub const HOLD_FOR: Duration = Duration::from_secs(2);
/// Copies held at most (1.5 KiB each); the oldest give way to new ones.
const MAX_HELD: usize = 1024;
/// How many times a copy too big for the route may be cut in two: a
/// 1500-byte fragment fits any route of 600 bytes or more.
const MAX_CUTS: u32 = 2;
/// A copy looks for its first fragment as it comes, then after waits that
/// double from the first to the longest: a first fragment close behind
/// is found within about a millisecond, and a flood of copies whose first
/// never comes costs 16 map lookups each, not one every millisecond.
const FIRST_WAIT: Duration = Duration::from_millis(1);
const LONGEST_WAIT: Duration = Duration::from_millis(256);

/// What became of a held copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sent on to its client.
    Sent,
    /// No first fragment came in time.
    Expired,
    /// Given way to newer copies.
    Overflow,
    /// Its TTL would run out at this hop, or the kernel refused to send it
    /// (too big with DF set, say).
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Sent,
        Outcome::Expired,
        Outcome::Overflow,
        Outcome::Failed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Expired => "expired",
            Outcome::Overflow => "overflow",
            Outcome::Failed => "failed",
        }
    }
}

/// The data path's maps the task reads: the ring of copies, the first
/// fragments' entries and the flows.
pub struct Maps {
    pub ring: RingBuf<MapData>,
    pub fragments: HashMap<MapData, FragKey, FragEntry>,
    pub flows: HashMap<MapData, FlowKey, Flow>,
}

/// What a held copy does next.
#[derive(Debug, PartialEq, Eq)]
enum Look {
    /// Its first fragment has passed: send it on.
    Send,
    /// No first fragment came in time.
    Expire,
    /// Not yet: wait.
    Wait,
}

/// A copy waiting for its first fragment.
struct Held {
    key: FragKey,
    since: Instant,
    tunnel_local: [u8; 4],
    packet: Vec<u8>,
    /// When it next looks for its first fragment, and how long it waited
    /// before that.
    next_look: Instant,
    wait: Duration,
}

pub struct Reorder {
    ring: AsyncFd<RingBuf<MapData>>,
    fragments: HashMap<MapData, FragKey, FragEntry>,
    flows: HashMap<MapData, FlowKey, Flow>,
    socket: Socket,
    held: VecDeque<Held>,
    metrics: Option<Arc<Collector>>,
}

impl Reorder {
    pub fn new(maps: Maps, metrics: Option<Arc<Collector>>) -> anyhow::Result<Self> {
        // IPPROTO_RAW: we write the IP header ourselves (IP_HDRINCL); the
        // kernel fills in a zero ID, the checksum and the total length.
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
        .context("cannot open a raw socket (needs CAP_NET_RAW)")?;
        // A full socket buffer costs the copy, never the event loop.
        socket.set_nonblocking(true)?;
        Ok(Self {
            // SAFETY: the ring owns its descriptor (and the memory mapped
            // from it) and keeps both for as long as the `AsyncFd` holds it.
            ring: unsafe { AsyncFd::register_with_interest(maps.ring, Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("cannot poll the held fragments' ring")?,
            fragments: maps.fragments,
            flows: maps.flows,
            socket,
            held: VecDeque::new(),
            metrics,
        })
    }

    /// Takes copies from the ring and sends them on as their first
    /// fragments pass, until the ring fails.
    pub async fn run(mut self) {
        loop {
            let next_look = self.held.iter().map(|h| h.next_look).min();
            tokio::select! {
                ready = self.ring.readable_mut() => match ready {
                    Ok(mut guard) => {
                        guard.clear_ready();
                        self.take_new();
                    }
                    Err(e) => {
                        tracing::error!("cannot poll the held fragments' ring: {e}; reordered fragments are no longer sent on");
                        return;
                    }
                },
                _ = tokio::time::sleep_until(next_look.unwrap_or_else(Instant::now).into()),
                    if next_look.is_some() => {}
            }
            self.send_completed(Instant::now());
        }
    }

    fn take_new(&mut self) {
        let since = Instant::now();
        let (ring, held) = (self.ring.get_mut(), &mut self.held);
        let mut overflow = 0;
        while let Some(record) = ring.next() {
            let Some(copy) = Held::new(&record, since) else {
                continue;
            };
            if held.len() == MAX_HELD {
                held.pop_front();
                overflow += 1;
            }
            held.push_back(copy);
        }
        for _ in 0..overflow {
            self.count(Outcome::Overflow);
        }
    }

    /// Sends on the copies whose first fragment has passed, of those due to
    /// look; drops those that waited [`HOLD_FOR`].
    fn send_completed(&mut self, now: Instant) {
        let now_ns = clock::monotonic_ns();
        let mut outcomes = Vec::new();
        self.held.retain_mut(|h| {
            if now < h.next_look {
                return true;
            }
            let flow = self
                .fragments
                .get(&h.key, 0)
                .ok()
                .filter(|e| e.is_fresh(now_ns))
                .and_then(|e| self.flows.get(&e.flow, 0).ok());
            let outcome = match (h.look(now, flow.is_some()), flow) {
                (Look::Send, Some(flow)) => send(&self.socket, h, &flow),
                (Look::Expire, _) => Outcome::Expired,
                _ => return true,
            };
            outcomes.push(outcome);
            false
        });
        for outcome in outcomes {
            self.count(outcome);
        }
    }

    fn count(&self, outcome: Outcome) {
        if let Some(m) = &self.metrics {
            m.record_held(outcome);
        }
    }
}

impl Held {
    /// The copy in a ring record (a `HeldFragment`), taken at `since`.
    fn new(record: &[u8], since: Instant) -> Option<Self> {
        let (tunnel_local, packet) = HeldFragment::read(record)?;
        let h = packet.get(..IPV4_LEN)?;
        let key = FragKey {
            src: h[12..16].try_into().ok()?,
            dst: h[16..20].try_into().ok()?,
            id: [h[4], h[5]],
            proto: h[9],
            dir: DIR_IN,
        };
        Some(Self {
            key,
            since,
            tunnel_local,
            packet: packet.to_vec(),
            next_look: since,
            wait: Duration::ZERO,
        })
    }

    /// What to do, looking at `now` (due), whether its first fragment has
    /// passed; a copy that waits on is due again after a longer wait.
    fn look(&mut self, now: Instant, first_passed: bool) -> Look {
        if first_passed {
            return Look::Send;
        }
        if now.duration_since(self.since) >= HOLD_FOR {
            return Look::Expire;
        }
        self.wait = (self.wait * 2).clamp(FIRST_WAIT, LONGEST_WAIT);
        self.next_look = now + self.wait;
        Look::Wait
    }
}

fn send(socket: &Socket, held: &Held, flow: &Flow) -> Outcome {
    match send_fragment(socket, &held.packet, held.tunnel_local, flow, MAX_CUTS) {
        Ok(()) => Outcome::Sent,
        Err(e) => {
            let peer = std::net::Ipv4Addr::from(flow.peer_addr);
            tracing::debug!("cannot send a reordered fragment to {peer}: {e}");
            Outcome::Failed
        }
    }
}

/// Sends the later fragment `packet` of `flow`, encapsulated from
/// `tunnel_local`; too big for the route, cut in two (at most `cuts` times
/// over) unless it has DF set.
fn send_fragment(
    socket: &Socket,
    packet: &[u8],
    tunnel_local: [u8; 4],
    flow: &Flow,
    cuts: u32,
) -> std::io::Result<()> {
    let to = SocketAddrV4::new(flow.peer_addr.into(), 0);
    let out = encapsulated(packet, flow.client_addr, flow.peer_addr, tunnel_local)
        .ok_or_else(|| std::io::Error::other("its TTL runs out here"))?;
    match socket.send_to(&out, &to.into()) {
        Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) && cuts > 0 => {
            let Some(halves) = split(packet) else {
                return Err(e);
            };
            for half in halves {
                send_fragment(socket, &half, tunnel_local, flow, cuts - 1)?;
            }
            Ok(())
        }
        sent => sent.map(drop),
    }
}

/// The fragment `packet` (a plain 20-byte header) cut in two fragments of
/// the same datagram, as a router on the way may cut it (RFC 791): the
/// first half's data a multiple of 8 bytes, the second keeping the
/// original's "more fragments". `None` if it has DF set or too little data.
pub fn split(packet: &[u8]) -> Option<[Vec<u8>; 2]> {
    let (header, data) = packet.split_at_checked(IPV4_LEN)?;
    let frags = u16::from_be_bytes([header[6], header[7]]);
    let half = data.len() / 16 * 8;
    if frags & IP_DF != 0 || half == 0 {
        return None;
    }
    let offset = frags & IP_OFFSET;
    let piece = |data: &[u8], frags: u16| {
        let mut out = header.to_vec();
        let old = [[out[2], out[3]], [out[6], out[7]]];
        let len = ((IPV4_LEN + data.len()) as u16).to_be_bytes();
        let frags = frags.to_be_bytes();
        out[2..4].copy_from_slice(&len);
        out[6..8].copy_from_slice(&frags);
        let check = Incremental::new([out[10], out[11]])
            .replace2(old[0], len)
            .replace2(old[1], frags)
            .finish();
        out[10..12].copy_from_slice(&check);
        out.extend_from_slice(data);
        out
    };
    let second = (offset + (half / 8) as u16) | (frags & IP_MF);
    Some([
        piece(&data[..half], offset | IP_MF),
        piece(&data[half..], second),
    ])
}

/// The later fragment `packet` (a plain 20-byte header, checked by the data
/// path) as the data path sends one that follows its first: the
/// destination translated back to `client`, our hop on the TTL, and an RFC
/// 2003 outer header from `tunnel_local` to `peer` (its ID left for the
/// kernel). `None` if the TTL would run out here.
pub fn encapsulated(
    packet: &[u8],
    client: [u8; 4],
    peer: [u8; 4],
    tunnel_local: [u8; 4],
) -> Option<Vec<u8>> {
    let mut inner = packet.to_vec();
    let header: &mut [u8; IPV4_LEN] = inner.get_mut(..IPV4_LEN)?.try_into().ok()?;
    if header[8] <= 1 {
        return None;
    }
    let (tos, df) = (
        header[1],
        u16::from_be_bytes([header[6], header[7]]) & IP_DF != 0,
    );
    rewrite::ipv4(header, Side::Dst, client, true);
    let mut outer = [0u16; IPV4_LEN / 2];
    let len = u16::try_from(packet.len()).ok()?;
    Ipv4::tunnel(tos, len, df, 0, tunnel_local, peer).write(&mut outer);
    let mut out: Vec<u8> = outer.iter().flat_map(|w| w.to_ne_bytes()).collect();
    out.extend_from_slice(&inner);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{IpFragOffset, IpNumber, Ipv4Header};

    const SERVER: [u8; 4] = [203, 0, 113, 10];
    const NAT: [u8; 4] = [172, 31, 0, 5];
    const CLIENT: [u8; 4] = [10, 0, 1, 2];
    const PEER: [u8; 4] = [172, 16, 0, 2];
    const GW: [u8; 4] = [172, 16, 0, 1];

    /// A later fragment from the server to the translation address.
    fn later_fragment(ttl: u8, df: bool) -> Vec<u8> {
        let payload: Vec<u8> = (0..600u32).map(|i| (i % 253) as u8).collect();
        let mut h = Ipv4Header::new(payload.len() as u16, ttl, IpNumber::UDP, SERVER, NAT).unwrap();
        h.identification = 0x1234;
        h.dont_fragment = df;
        h.dscp = etherparse::IpDscp::try_new(10).unwrap();
        h.fragment_offset = IpFragOffset::try_new(185).unwrap();
        h.header_checksum = h.calc_header_checksum();
        let mut out = h.to_bytes().to_vec();
        out.extend_from_slice(&payload);
        out
    }

    /// A ring record of `packet` held with tunnel address `GW`, laid out by
    /// hand as `HeldFragment`.
    fn record(packet: &[u8]) -> Vec<u8> {
        let mut r = vec![0; size_of::<HeldFragment>()];
        r[..4].copy_from_slice(&GW);
        r[4..6].copy_from_slice(&(packet.len() as u16).to_ne_bytes());
        r[8..8 + packet.len()].copy_from_slice(packet);
        r
    }

    #[test]
    fn a_held_fragment_leaves_as_the_data_path_sends_a_later_fragment() {
        for df in [false, true] {
            let packet = later_fragment(50, df);
            let out = encapsulated(&packet, CLIENT, PEER, GW).unwrap();
            let (outer, rest) = Ipv4Header::from_slice(&out).unwrap();
            assert_eq!((outer.source, outer.destination), (GW, PEER));
            assert_eq!(outer.protocol, IpNumber::IPV4);
            assert_eq!(outer.time_to_live, 64);
            assert_eq!(outer.dont_fragment, df, "DF copied");
            assert_eq!(outer.dscp.value(), 10, "TOS copied");
            assert_eq!(usize::from(outer.total_len), out.len());
            assert_eq!(outer.header_checksum, outer.calc_header_checksum());
            let (inner, payload) = Ipv4Header::from_slice(rest).unwrap();
            let (sent, sent_payload) = Ipv4Header::from_slice(&packet).unwrap();
            let want = Ipv4Header {
                destination: CLIENT,
                time_to_live: 49,
                ..sent.clone()
            };
            assert_eq!(
                Ipv4Header {
                    header_checksum: 0,
                    ..inner.clone()
                },
                Ipv4Header {
                    header_checksum: 0,
                    ..want
                }
            );
            assert_eq!(inner.header_checksum, inner.calc_header_checksum());
            assert_eq!(payload, sent_payload);
        }
    }

    #[test]
    fn a_held_fragment_whose_ttl_runs_out_here_is_not_sent() {
        assert!(encapsulated(&later_fragment(1, false), CLIENT, PEER, GW).is_none());
        assert!(encapsulated(&later_fragment(2, false), CLIENT, PEER, GW).is_some());
    }

    #[test]
    fn a_ring_record_gives_the_datagram_the_fragment_belongs_to() {
        let packet = later_fragment(50, false);
        let held = Held::new(&record(&packet), Instant::now()).unwrap();
        assert_eq!(held.packet, packet);
        assert_eq!(held.tunnel_local, GW);
        let key = FragKey {
            src: SERVER,
            dst: NAT,
            id: [0x12, 0x34],
            proto: 17,
            dir: DIR_IN,
        };
        assert_eq!(held.key, key);
    }

    #[test]
    fn a_copy_looks_at_once_then_after_doubling_waits_until_it_expires() {
        let since = Instant::now();
        let mut held = Held::new(&record(&later_fragment(50, false)), since).unwrap();
        assert_eq!(held.next_look, since, "looks as it comes");
        let mut waits = Vec::new();
        let mut now = since;
        while held.look(now, false) == Look::Wait {
            waits.push(held.wait.as_millis());
            now = held.next_look;
        }
        assert_eq!(&waits[..10], [1, 2, 4, 8, 16, 32, 64, 128, 256, 256]);
        // Each look a map lookup: the last one finds it expired.
        assert_eq!(waits.len() + 1, 16, "looks in all");
        assert!(now.duration_since(since) >= HOLD_FOR);
        assert!(now.duration_since(since) < HOLD_FOR + LONGEST_WAIT);
        assert_eq!(
            held.look(now, true),
            Look::Send,
            "sent whenever its first passed"
        );
    }

    #[test]
    fn a_fragment_too_big_is_cut_in_two_pieces_of_the_same_datagram() {
        for more in [false, true] {
            let mut packet = later_fragment(50, false);
            if more {
                packet[6] |= 0x20;
                let (h, _) = Ipv4Header::from_slice(&packet).unwrap();
                packet[10..12].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
            }
            let [a, b] = split(&packet).unwrap();
            let (sent, data) = Ipv4Header::from_slice(&packet).unwrap();
            let (ha, da) = Ipv4Header::from_slice(&a).unwrap();
            let (hb, db) = Ipv4Header::from_slice(&b).unwrap();
            for (h, bytes) in [(&ha, &a), (&hb, &b)] {
                assert_eq!(h.header_checksum, h.calc_header_checksum());
                assert_eq!(usize::from(h.total_len), bytes.len());
                assert_eq!(
                    (h.source, h.destination, h.identification, h.protocol),
                    (
                        sent.source,
                        sent.destination,
                        sent.identification,
                        sent.protocol
                    )
                );
            }
            assert_eq!(da.len() % 8, 0);
            assert_eq!([da, db].concat(), data);
            assert_eq!(ha.fragment_offset, sent.fragment_offset);
            assert!(ha.more_fragments);
            let after = sent.fragment_offset.value() + (da.len() / 8) as u16;
            assert_eq!(hb.fragment_offset.value(), after);
            assert_eq!(hb.more_fragments, more, "the second keeps the original's");
        }
        assert!(split(&later_fragment(50, true)).is_none(), "DF set");
        assert!(
            split(&later_fragment(50, false)[..IPV4_LEN + 15]).is_none(),
            "too little data"
        );
    }
}
