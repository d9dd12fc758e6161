//! Connection-state map layout.
//!
//! `FLOWS` holds two entries per flow (a 5-tuple session), one keyed by the
//! outbound (client-side) tuple and one keyed by the return (Internet-side)
//! tuple. Both carry the whole translation, so either direction rewrites with
//! a single lookup, and the daemon can always derive the twin of an entry it
//! expires. Each half counts its own direction's packets and TCP flags.
//!
//! `MAPPINGS` holds the endpoint-independent mappings (RFC 4787 REQ-1) that
//! flows are created from, again as two entries: client address:port →
//! translation address:port, and the reverse, which reserves the translation
//! port for one client per (protocol, translation address).

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Which half of a flow a key names.
pub const DIR_OUT: u8 = 0;
pub const DIR_IN: u8 = 1;

/// A packet's 5-tuple as seen on the wire. For ICMP echo the identifier takes
/// the place of the port on the client/translated side and the remote "port"
/// is 0, so one key layout serves all three protocols.
///
/// Aligned to 8 (its size is 16 either way): the data path copies and
/// compares keys as two 8-byte words rather than byte by byte, which took
/// about 300 instructions off the programs and 24 bytes off XDP's frame.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub dir: u8,
    pub _pad: [u8; 2],
}

/// The translation of one flow, stored under both of its keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    /// Inner source address and port (or echo identifier) of the client.
    pub client_addr: [u8; 4],
    /// Translation address and port the Internet sees.
    pub nat_addr: [u8; 4],
    /// The Internet host.
    pub remote_addr: [u8; 4],
    /// Tunnel peer that owns the flow: return traffic is encapsulated to it.
    pub peer_addr: [u8; 4],
    pub client_port: [u8; 2],
    pub nat_port: [u8; 2],
    pub remote_port: [u8; 2],
    pub proto: u8,
    /// TCP: the flags seen in this half's direction since the connection's
    /// SYN (see [`crate::tcp`]).
    pub tcp_flags: u8,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC) of creation and of the
    /// last packet through this half of the flow.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Packets and bytes (IP length) through this half of the flow.
    pub packets: u64,
    pub bytes: u64,
    /// TCP handshake time stamps (`bpf_ktime_get_ns`): outbound half, the
    /// client's SYN; return half, the server's SYN-ACK. 0 until seen.
    pub handshake_ns: u64,
    /// TCP round trip measured from the handshake, 0 until known: outbound
    /// half, the tunnel leg (SYN-ACK sent to the client → its ACK); return
    /// half, the Internet leg (SYN sent to the server → its SYN-ACK).
    pub rtt_ns: u64,
}

impl Flow {
    /// Key of the outbound half: client → remote.
    pub fn out_key(&self) -> FlowKey {
        FlowKey {
            src: self.client_addr,
            dst: self.remote_addr,
            sport: self.client_port,
            dport: self.remote_port,
            proto: self.proto,
            dir: DIR_OUT,
            _pad: [0; 2],
        }
    }

    /// Key of the return half: remote → translation address.
    pub fn in_key(&self) -> FlowKey {
        FlowKey {
            src: self.remote_addr,
            dst: self.nat_addr,
            sport: self.remote_port,
            dport: self.nat_port,
            proto: self.proto,
            dir: DIR_IN,
            _pad: [0; 2],
        }
    }
}

/// Key of a `MAPPINGS` entry: an address and port (or echo identifier) of
/// one protocol, on the client side (`DIR_OUT`) or the translated side
/// (`DIR_IN`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortKey {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub dir: u8,
}

/// The other side of a mapping: for a `DIR_OUT` key the translation, for a
/// `DIR_IN` key the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Mapping {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub _pad: [u8; 2],
    /// When a flow last started from this mapping: the daemon keeps a
    /// mapping without flows for a grace period, so a flow being created
    /// from it on another CPU is never orphaned.
    pub used_ns: u64,
}

impl Mapping {
    /// The pair of `MAPPINGS` entries for client `client`:`cport` translated
    /// to `nat`:`nport`: (client-side key, its value), (translated-side key,
    /// its value).
    pub fn pair(
        proto: u8,
        client: ([u8; 4], [u8; 2]),
        nat: ([u8; 4], [u8; 2]),
        used_ns: u64,
    ) -> [(PortKey, Mapping); 2] {
        let entry = |(addr, port): ([u8; 4], [u8; 2]), dir| PortKey {
            addr,
            port,
            proto,
            dir,
        };
        let value = |(addr, port): ([u8; 4], [u8; 2])| Mapping {
            addr,
            port,
            _pad: [0; 2],
            used_ns,
        };
        [
            (entry(client, DIR_OUT), value(nat)),
            (entry(nat, DIR_IN), value(client)),
        ]
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `repr(C)` structs of integers and byte arrays with
    // explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Flow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Mapping {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_a_flow_are_distinct_and_mirror_each_other() {
        let f = Flow {
            client_addr: [192, 168, 250, 2],
            nat_addr: [10, 1, 1, 10],
            remote_addr: [203, 0, 113, 10],
            peer_addr: [10, 0, 1, 10],
            client_port: 40000u16.to_be_bytes(),
            nat_port: 20000u16.to_be_bytes(),
            remote_port: 80u16.to_be_bytes(),
            proto: IPPROTO_TCP,
            ..Flow::default()
        };
        let (o, i) = (f.out_key(), f.in_key());
        assert_ne!(o, i);
        assert_eq!(
            (o.src, o.dst, o.sport, o.dport),
            (f.client_addr, f.remote_addr, f.client_port, f.remote_port)
        );
        assert_eq!(
            (i.src, i.dst, i.sport, i.dport),
            (f.remote_addr, f.nat_addr, f.remote_port, f.nat_port)
        );
    }
}
