//! Gateway settings: command-line flags over an optional TOML file, checked
//! once, with errors that name the offending key.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context as _, bail};
use egress_common::config::MAX_SNAT_ADDRS;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::{admission::Admission, gc::Timeouts, pinning::DEFAULT_STATE_DIR};

/// Default translation ports: below Linux's default ephemeral range
/// (32768-60999), so the gateway host's own connections never collide
/// with translated ones on the same address.
pub const DEFAULT_PORTS: PortRange = PortRange {
    min: 1024,
    max: 32767,
};
/// Default flow table capacity (each flow uses two map entries).
pub const DEFAULT_MAX_FLOWS: u32 = 1 << 20;
/// Default cap on one client's flows (RFC 6888 REQ-4): generous for a busy
/// host, a small share of the table.
pub const DEFAULT_MAX_CLIENT_FLOWS: u32 = 65_536;
/// What the tunnel adds to a packet (the outer IPv4 header), and the IPv4
/// and TCP headers of a segment without options: the default MSS clamp is
/// the interface MTU less both.
const OUTER_HEADER: u32 = 20;
const TCP_IP_HEADERS: u32 = 40;
/// Linux's `TCP_MIN_MSS`: stacks raise anything smaller to it anyway.
pub const MIN_MSS: u16 = 88;

/// The MSS clamp that fits a tunnel over an interface of `mtu` bytes:
/// 1440 at the usual 1500.
pub fn mss_for_mtu(mtu: u32) -> u16 {
    let mss = mtu.saturating_sub(OUTER_HEADER + TCP_IP_HEADERS);
    u16::try_from(mss).unwrap_or(u16::MAX).max(MIN_MSS)
}

/// Default number of flows exported one by one on the metrics endpoint.
pub const DEFAULT_METRICS_TOP_FLOWS: usize = 10;

/// An inclusive port range, written `LO-HI`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a range like 1024-32767"))?;
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{p:?} is not a port number"))
        };
        let (min, max) = (parse(lo)?, parse(hi)?);
        if min == 0 || min > max {
            return Err(format!("{s:?} must satisfy 1 <= LO <= HI"));
        }
        Ok(Self { min, max })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Which hook the data path is attached to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) XDP, falling back to TC with a warning.
    #[default]
    Auto,
    /// Native (driver) XDP only.
    Native,
    /// Generic (skb) XDP: works on any interface, slowest.
    Generic,
    /// TC on ingress (a TCX link, or a clsact filter before Linux 6.6):
    /// works on any interface.
    Tc,
}

/// The settings as written in a config file; every key optional.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileSettings {
    pub iface: Option<String>,
    pub peer: Option<Vec<Ipv4Addr>>,
    pub client_cidr: Option<Vec<Ipv4Net>>,
    pub snat: Option<Vec<Ipv4Addr>>,
    pub tunnel_local: Option<Ipv4Addr>,
    pub ports: Option<PortRange>,
    pub attach: Option<AttachMode>,
    pub max_flows: Option<u32>,
    pub max_client_flows: Option<u32>,
    pub mss: Option<u16>,
    pub state_dir: Option<PathBuf>,
    pub metrics: Option<SocketAddr>,
    pub metrics_top_flows: Option<usize>,
    pub peer_clients: Option<BTreeMap<Ipv4Addr, Vec<Ipv4Net>>>,
    #[serde(default)]
    pub timeouts: FileTimeouts,
}

/// The `[timeouts]` table: idle timeouts as human durations ("2h4m", "30s").
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileTimeouts {
    #[serde(default, with = "human_duration")]
    pub tcp_established: Option<Duration>,
    #[serde(default, with = "human_duration")]
    pub tcp_transitory: Option<Duration>,
    #[serde(default, with = "human_duration")]
    pub tcp_reset: Option<Duration>,
    #[serde(default, with = "human_duration")]
    pub udp: Option<Duration>,
    #[serde(default, with = "human_duration")]
    pub icmp: Option<Duration>,
}

/// A duration as written in the config file: "2h4m", "30s".
/// Durations as people write them: read by humantime ("2h4m", "2h 4m"),
/// written without spaces ("2h4m").
mod human_duration {
    use std::time::Duration;

    pub use humantime_serde::deserialize;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&humantime::format_duration(*d).to_string().replace(' ', "")),
            None => s.serialize_none(),
        }
    }
}

impl FileTimeouts {
    /// Sets one timeout from a `KIND=DURATION` flag.
    pub fn set(&mut self, flag: &str) -> Result<(), String> {
        let (kind, value) = flag
            .split_once('=')
            .ok_or_else(|| format!("{flag:?} is not KIND=DURATION, e.g. udp=5m"))?;
        let d = humantime::parse_duration(value.trim())
            .map_err(|e| format!("{value:?} is not a duration like 2h4m or 30s: {e}"))?;
        let slot = match kind.trim() {
            "tcp-established" => &mut self.tcp_established,
            "tcp-transitory" => &mut self.tcp_transitory,
            "tcp-reset" => &mut self.tcp_reset,
            "udp" => &mut self.udp,
            "icmp" => &mut self.icmp,
            k => {
                return Err(format!(
                    "unknown timeout {k:?}: one of tcp-established, tcp-transitory, tcp-reset, udp, icmp"
                ));
            }
        };
        *slot = Some(d);
        Ok(())
    }

    /// These timeouts over `base`'s.
    fn over(&self, base: Timeouts) -> Timeouts {
        Timeouts {
            tcp_established: self.tcp_established.unwrap_or(base.tcp_established),
            tcp_transitory: self.tcp_transitory.unwrap_or(base.tcp_transitory),
            tcp_reset: self.tcp_reset.unwrap_or(base.tcp_reset),
            udp: self.udp.unwrap_or(base.udp),
            icmp: self.icmp.unwrap_or(base.icmp),
        }
    }
}

impl FileSettings {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("config file {}, {e}", path.display()))
    }

    /// Parses a config file's text; an error names the line and the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|mut e| {
            let line = e
                .span()
                .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
            let message = e.message().trim().to_owned();
            // Without the input to quote, the error's text ends with the
            // path of keys it occurred under ("in `timeouts.udp`").
            e.set_input(None);
            let key = e
                .to_string()
                .lines()
                .find_map(|l| Some(l.strip_prefix("in `")?.strip_suffix('`')?.to_owned()))
                // A key given twice is a syntax error, found before any
                // key's value: it is where the error points.
                .or_else(|| {
                    let at = text.get(e.span()?)?;
                    (message == "duplicate key")
                        .then(|| at.trim().trim_matches(['"', '\'']).to_owned())
                });
            match key {
                Some(key) => format!("line {line}, key `{key}`: {message}"),
                None => format!("line {line}: {message}"),
            }
        })
    }
}

/// Complete, validated settings. `snat` and `tunnel_local` may still be
/// empty: they default to the interface's address, known only at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub iface: String,
    pub admission: Admission,
    pub snat: Vec<Ipv4Addr>,
    pub tunnel_local: Option<Ipv4Addr>,
    pub ports: PortRange,
    pub attach: AttachMode,
    pub max_flows: u32,
    pub max_client_flows: u32,
    /// TCP MSS clamp; `None`: from the interface MTU ([`mss_for_mtu`]),
    /// `Some(0)`: off.
    pub mss: Option<u16>,
    pub state_dir: PathBuf,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    pub metrics_top_flows: usize,
    pub timeouts: Timeouts,
}

impl Settings {
    /// Merges flags (`cli`) over the file (`file`): a flag given on the
    /// command line replaces the file's value, lists included.
    pub fn merge(cli: FileSettings, file: FileSettings) -> anyhow::Result<Self> {
        let s = Settings {
            iface: cli
                .iface
                .or(file.iface)
                .context("no interface: give --iface (or `iface` in the config file)")?,
            admission: Admission {
                peers: non_empty(cli.peer).or(file.peer).unwrap_or_default(),
                client_cidrs: non_empty(cli.client_cidr)
                    .or(file.client_cidr)
                    .unwrap_or_default(),
                // Per peer: a flag binds its peer anew and leaves the
                // file's other bindings as they are.
                peer_clients: file
                    .peer_clients
                    .unwrap_or_default()
                    .into_iter()
                    .chain(cli.peer_clients.unwrap_or_default())
                    .collect(),
            },
            snat: non_empty(cli.snat).or(file.snat).unwrap_or_default(),
            tunnel_local: cli.tunnel_local.or(file.tunnel_local),
            ports: cli.ports.or(file.ports).unwrap_or(DEFAULT_PORTS),
            attach: cli.attach.or(file.attach).unwrap_or_default(),
            max_flows: cli
                .max_flows
                .or(file.max_flows)
                .unwrap_or(DEFAULT_MAX_FLOWS),
            max_client_flows: cli
                .max_client_flows
                .or(file.max_client_flows)
                .unwrap_or(DEFAULT_MAX_CLIENT_FLOWS),
            mss: cli.mss.or(file.mss),
            state_dir: cli
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            metrics: cli.metrics.or(file.metrics),
            metrics_top_flows: cli
                .metrics_top_flows
                .or(file.metrics_top_flows)
                .unwrap_or(DEFAULT_METRICS_TOP_FLOWS),
            timeouts: cli.timeouts.over(file.timeouts.over(Timeouts::default())),
        };
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.admission.validate()?;
        if self.snat.len() > MAX_SNAT_ADDRS {
            bail!("snat: at most {MAX_SNAT_ADDRS} translation addresses");
        }
        // Most likely a slip for another address, which then goes missing.
        for (key, what, list) in [
            ("peer", "tunnel peer", &self.admission.peers),
            ("snat", "translation address", &self.snat),
        ] {
            if let Some(addr) = repeated(list) {
                bail!("{key}: {addr} is listed twice; list each {what} once");
            }
        }
        if self.max_flows == 0 || self.max_flows > (u32::MAX / 2) {
            bail!("max-flows: must be between 1 and {}", u32::MAX / 2);
        }
        if let Some(mss @ 1..MIN_MSS) = self.mss {
            bail!("mss: {mss} is below {MIN_MSS}, the least TCP allows; 0 turns clamping off");
        }
        let t = &self.timeouts;
        for (key, d) in [
            ("tcp-established", t.tcp_established),
            ("tcp-transitory", t.tcp_transitory),
            ("tcp-reset", t.tcp_reset),
            ("udp", t.udp),
            ("icmp", t.icmp),
        ] {
            if d.is_zero() {
                bail!("timeouts.{key}: must be longer than zero");
            }
        }
        Ok(())
    }

    /// Settings that work but fall short: below what the RFCs require of
    /// a NAT, or binding some peers to their clients but not all.
    pub fn warnings(&self) -> Vec<Warning> {
        let t = &self.timeouts;
        let rfc = Timeouts::default();
        [
            ("tcp-established", t.tcp_established, rfc.tcp_established, "RFC 5382 REQ-5"),
            ("tcp-transitory", t.tcp_transitory, rfc.tcp_transitory, "RFC 5382 REQ-5"),
            ("udp", t.udp, Duration::from_secs(120), "RFC 4787 REQ-5"),
            ("icmp", t.icmp, rfc.icmp, "RFC 5508 REQ-2"),
        ]
        .into_iter()
        .filter(|&(_, d, min, _)| d < min)
        .map(|(key, d, min, rfc)| {
            let min = humantime::format_duration(min);
            Warning {
                what: format!(
                    "timeouts.{key} = {} is below the {min} that {rfc} requires; long-idle connections will break",
                    humantime::format_duration(d),
                ),
                fix: format!(
                    "raise it to {min} or more in the [timeouts] table (or --timeout {key}=DURATION)"
                ),
            }
        })
        .chain(self.admission.unbound_beside_bound().map(|peer| Warning {
            what: format!(
                "peer {peer} is not in peer-clients: it may still send for every client range, and take over the flows of the bound peers' clients"
            ),
            fix: format!(
                "bind it to its own clients: \"{peer}\" = [\"CIDR\", ...] in the [peer-clients] table (or --peer-clients {peer}=CIDR[,CIDR...])"
            ),
        }))
        .collect()
    }
}

/// A setting that works but falls short, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub what: String,
    pub fix: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)
    }
}

impl Settings {
    /// These settings as a config file would give them, every default
    /// spelled out.
    pub fn to_file(&self) -> FileSettings {
        let t = &self.timeouts;
        FileSettings {
            iface: Some(self.iface.clone()),
            peer: Some(self.admission.peers.clone()),
            client_cidr: Some(self.admission.client_cidrs.clone()),
            snat: non_empty(Some(self.snat.clone())),
            tunnel_local: self.tunnel_local,
            ports: Some(self.ports),
            attach: Some(self.attach),
            max_flows: Some(self.max_flows),
            max_client_flows: Some(self.max_client_flows),
            mss: self.mss,
            state_dir: Some(self.state_dir.clone()),
            metrics: self.metrics,
            metrics_top_flows: Some(self.metrics_top_flows),
            peer_clients: Some(self.admission.peer_clients.clone()).filter(|m| !m.is_empty()),
            timeouts: FileTimeouts {
                tcp_established: Some(t.tcp_established),
                tcp_transitory: Some(t.tcp_transitory),
                tcp_reset: Some(t.tcp_reset),
                udp: Some(t.udp),
                icmp: Some(t.icmp),
            },
        }
    }

    /// The effective configuration as TOML that `--config` reads back;
    /// settings left to a run-time default are comments saying so.
    pub fn dump(&self) -> anyhow::Result<String> {
        let mut out = String::from("# Effective configuration of the egress gateway.\n");
        if self.snat.is_empty() {
            out += "# snat: not set, the interface's first IPv4 address at start.\n";
        }
        if self.tunnel_local.is_none() {
            out += "# tunnel-local: not set, the interface's first IPv4 address at start.\n";
        }
        if self.mss.is_none() {
            out += "# mss: not set, the interface's MTU - 60 at start.\n";
        }
        if self.metrics.is_none() {
            out += "# metrics: not set, no metrics endpoint.\n";
        }
        if self.admission.peer_clients.is_empty() {
            out += "# peer-clients: not set, every peer may send for every client range.\n";
        }
        out += &toml::to_string(&self.to_file()).context("cannot write the settings as TOML")?;
        Ok(out)
    }
}

/// Settings for unit tests: a minimal valid file (eth0, one peer, one
/// client range) followed by `extra` lines.
#[cfg(test)]
pub(crate) fn for_test(extra: &str) -> Settings {
    let text = format!(
        "iface = \"eth0\"\npeer = [\"10.0.1.10\"]\nclient-cidr = [\"10.0.0.0/16\"]\n{extra}"
    );
    Settings::merge(FileSettings::default(), FileSettings::parse(&text).unwrap()).unwrap()
}

/// The first address that `list` holds more than once.
fn repeated(list: &[Ipv4Addr]) -> Option<Ipv4Addr> {
    let mut seen = BTreeSet::new();
    list.iter().copied().find(|a| !seen.insert(*a))
}

/// A list flag that was not given arrives as an empty list: treat it as unset.
fn non_empty<T>(v: Option<Vec<T>>) -> Option<Vec<T>> {
    v.filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use egress_common::config::{MAX_CLIENT_RANGES, MAX_PEERS};

    use super::*;

    fn cli() -> FileSettings {
        FileSettings {
            iface: Some("eth0".into()),
            peer: Some(vec![Ipv4Addr::new(10, 0, 1, 10)]),
            client_cidr: Some(vec!["10.0.0.0/16".parse().unwrap()]),
            ..FileSettings::default()
        }
    }

    #[test]
    fn port_range_parses_and_rejects() {
        assert_eq!(
            "1024-2048".parse::<PortRange>(),
            Ok(PortRange {
                min: 1024,
                max: 2048
            })
        );
        assert!("2048-1024".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("80".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }

    #[test]
    fn flags_override_file_lists() {
        let file: FileSettings = toml::from_str(
            "iface = \"ens5\"\npeer = [\"10.9.9.9\"]\nclient-cidr = [\"10.0.0.0/8\"]\nports = \"2000-3000\"\n",
        )
        .unwrap();
        let s = Settings::merge(cli(), file).unwrap();
        assert_eq!(s.iface, "eth0");
        assert_eq!(s.admission.peers, vec![Ipv4Addr::new(10, 0, 1, 10)]);
        assert_eq!(
            s.ports,
            PortRange {
                min: 2000,
                max: 3000
            }
        );
        assert_eq!(s.max_flows, DEFAULT_MAX_FLOWS);
    }

    #[test]
    fn peer_clients_from_file_or_flags_are_checked() {
        let file = |extra: &str| {
            parsed(&format!(
                "iface = \"eth0\"\npeer = [\"10.0.1.10\", \"10.0.1.11\"]\nclient-cidr = [\"10.0.0.0/16\"]\n{extra}"
            ))
        };
        let bound = "[peer-clients]\n\"10.0.1.11\" = [\"10.0.7.0/24\"]\n";
        let s = Settings::merge(FileSettings::default(), file(bound)).unwrap();
        let (free, peer) = (Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 0, 1, 11));
        let other_client = Ipv4Addr::new(10, 0, 8, 1);
        assert!(s.admission.allows(free, other_client));
        assert!(!s.admission.allows(peer, other_client));
        let warnings = s.warnings();
        assert!(
            warnings.len() == 1
                && warnings[0]
                    .what
                    .contains("peer 10.0.1.10 is not in peer-clients"),
            "{warnings:?}"
        );
        // A flag binds its own peer anew; the file's other bindings stay.
        let flags = FileSettings {
            peer_clients: Some([(peer, vec!["10.0.8.0/24".parse().unwrap()])].into()),
            ..FileSettings::default()
        };
        let both = "[peer-clients]\n\"10.0.1.11\" = [\"10.0.7.0/24\"]\n\"10.0.1.10\" = [\"10.0.9.0/24\"]\n";
        let s = Settings::merge(flags, file(both)).unwrap();
        assert!(s.admission.allows(peer, other_client));
        assert!(!s.admission.allows(peer, Ipv4Addr::new(10, 0, 7, 1)));
        assert!(
            !s.admission.allows(free, other_client),
            "the file's binding of the other peer went"
        );
        assert!(s.warnings().is_empty(), "every peer bound");
        let e = Settings::merge(
            FileSettings::default(),
            file("[peer-clients]\n\"10.0.1.11\" = [\"10.1.0.0/24\"]\n"),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("not inside any `client-cidr`"),
            "{e}"
        );
        rejected("[peer-clients]\n\"10.0.1\" = []", "peer-clients");
    }

    #[test]
    fn timeouts_from_file_and_flags() {
        let file: FileSettings =
            toml::from_str("[timeouts]\nudp = \"2m 30s\"\ntcp-established = \"3h\"\n").unwrap();
        let mut c = cli();
        c.timeouts.set("udp=45s").unwrap();
        let s = Settings::merge(c, file).unwrap();
        assert_eq!(s.timeouts.udp, Duration::from_secs(45));
        assert_eq!(s.timeouts.tcp_established, Duration::from_secs(3 * 3600));
        assert_eq!(s.timeouts.icmp, Timeouts::default().icmp);
        let warnings = s.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].what.contains("timeouts.udp"), "{warnings:?}");
        assert!(FileTimeouts::default().set("tcp=1m").is_err());
        assert!(FileTimeouts::default().set("udp=soon").is_err());
        let e = toml::from_str::<FileSettings>("[timeouts]\nudp = \"5 parsecs\"").unwrap_err();
        assert!(e.to_string().contains("udp"), "{e}");
    }

    #[test]
    fn mss_from_mtu_flag_or_file() {
        assert_eq!(mss_for_mtu(1500), 1440);
        assert_eq!(mss_for_mtu(9001), 8941);
        assert_eq!(mss_for_mtu(68), MIN_MSS);
        let s = Settings::merge(cli(), FileSettings::default()).unwrap();
        assert_eq!(s.mss, None, "unset: from the interface MTU at run time");
        let file: FileSettings = toml::from_str("mss = 1200").unwrap();
        assert_eq!(Settings::merge(cli(), file).unwrap().mss, Some(1200));
        let mut c = cli();
        c.mss = Some(0);
        let file: FileSettings = toml::from_str("mss = 1200").unwrap();
        assert_eq!(
            Settings::merge(c, file).unwrap().mss,
            Some(0),
            "flag wins; 0 is off"
        );
        let mut c = cli();
        c.mss = Some(40);
        let e = Settings::merge(c, FileSettings::default()).unwrap_err();
        assert!(format!("{e:#}").contains("mss"), "{e:#}");
    }

    #[test]
    fn missing_peer_is_a_clear_error() {
        let mut c = cli();
        c.peer = None;
        let e = Settings::merge(c, FileSettings::default()).unwrap_err();
        assert!(format!("{e:#}").contains("--peer"));
    }

    /// Parses `text` as a config file that must be well-formed.
    fn parsed(text: &str) -> FileSettings {
        FileSettings::parse(text).unwrap()
    }

    /// Parses `text` as a config file and expects an error naming `key`.
    fn rejected(text: &str, key: &str) -> String {
        let e = FileSettings::parse(text).expect_err(text);
        assert!(e.contains(&format!("`{key}`")), "{text:?}: {e}");
        e
    }

    #[test]
    fn every_kind_of_mistake_names_the_key() {
        // Unknown keys, at the top and in a table.
        rejected("peers = []", "peers");
        rejected("[timeouts]\ntcp = \"1m\"", "tcp");
        // Bad CIDR, also in a list spread over lines.
        let e = rejected(
            "client-cidr = [\n  \"10.0.0.0/8\",\n  \"10.0.0.0/33\",\n]",
            "client-cidr",
        );
        assert!(e.starts_with("line 3,"), "{e}");
        // Bad port ranges.
        rejected("ports = \"2048-1024\"", "ports");
        rejected("ports = \"1024\"", "ports");
        rejected("ports = \"1-70000\"", "ports");
        // Bad durations.
        rejected("[timeouts]\nudp = \"5 parsecs\"", "timeouts.udp");
        rejected("[timeouts]\nicmp = 60", "timeouts.icmp");
        // Bad addresses.
        rejected("peer = [\"10.0.1.256\"]", "peer");
        rejected("tunnel-local = \"eth0\"", "tunnel-local");
        rejected("snat = [\"10.1.1.10/32\"]", "snat");
        rejected("metrics = \"127.0.0.1\"", "metrics");
        // Wrong types.
        rejected("max-flows = \"many\"", "max-flows");
        rejected("max-client-flows = -1", "max-client-flows");
        rejected("peer = \"10.0.1.10\"", "peer");
        rejected("attach = \"fast\"", "attach");
        rejected("iface = 0", "iface");
        // A key given twice, at the top and in a table.
        rejected("iface = \"eth0\"\niface = \"eth1\"", "iface");
        rejected("[timeouts]\nudp = \"5m\"\nudp = \"6m\"", "udp");
        rejected(
            "[peer-clients]\n\"10.0.1.10\" = []\n\"10.0.1.10\" = []",
            "10.0.1.10",
        );
    }

    #[test]
    fn invalid_values_are_named_after_merging() {
        let merged = |text: &str| {
            Settings::merge(FileSettings::default(), FileSettings::parse(text).unwrap())
                .unwrap_err()
                .to_string()
        };
        let valid = "iface = \"eth0\"\npeer = [\"10.0.1.10\"]\nclient-cidr = [\"10.0.0.0/16\"]\n";
        assert!(merged(&format!("{valid}max-flows = 0")).contains("max-flows"));
        assert!(merged(&format!("{valid}[timeouts]\nudp = \"0s\"")).contains("timeouts.udp"));
        assert!(merged("peer = [\"10.0.1.10\"]").contains("iface"));
        // More than the policy maps hold.
        let list = |n: u32, item: &dyn Fn(u32) -> String| {
            let items: Vec<String> = (0..n).map(|i| format!("\"{}\"", item(i))).collect();
            format!("[{}]", items.join(", "))
        };
        let peers = list(MAX_PEERS + 1, &|i| format!("10.0.{}.{}", i / 256, i % 256));
        let ranges = list(MAX_CLIENT_RANGES + 1, &|i| {
            format!("10.{}.{}.0/24", i / 256, i % 256)
        });
        let many_peers =
            format!("iface = \"eth0\"\npeer = {peers}\nclient-cidr = [\"10.0.0.0/16\"]");
        assert!(merged(&many_peers).contains("peer: at most 256"));
        let many_ranges =
            format!("iface = \"eth0\"\npeer = [\"10.0.1.10\"]\nclient-cidr = {ranges}");
        assert!(merged(&many_ranges).contains("client-cidr: at most 1024"));
    }

    /// A peer or translation address given twice, in the file or by
    /// flags, is refused with its name: it is most likely a slip for
    /// another address, which would go missing unnoticed.
    #[test]
    fn an_address_listed_twice_is_refused_by_name() {
        let file = |lists: &str| {
            parsed(&format!(
                "iface = \"eth0\"\nclient-cidr = [\"10.0.0.0/16\"]\n{lists}"
            ))
        };
        let (peer, snat) = (Ipv4Addr::new(10, 0, 1, 10), Ipv4Addr::new(10, 1, 1, 10));
        let flags = |peers: Vec<Ipv4Addr>, snats: Vec<Ipv4Addr>| FileSettings {
            peer: Some(peers),
            snat: Some(snats),
            ..FileSettings::default()
        };
        let twice_peer = "peer: 10.0.1.10 is listed twice; list each tunnel peer once";
        let twice_snat = "snat: 10.1.1.10 is listed twice; list each translation address once";
        for (cli, file, says) in [
            (
                FileSettings::default(),
                file("peer = [\"10.0.1.10\", \"10.0.1.11\", \"10.0.1.10\"]"),
                twice_peer,
            ),
            (flags(vec![peer, peer], vec![]), file(""), twice_peer),
            (
                FileSettings::default(),
                file("peer = [\"10.0.1.10\"]\nsnat = [\"10.1.1.10\", \"10.1.1.10\"]"),
                twice_snat,
            ),
            (flags(vec![peer], vec![snat, snat]), file(""), twice_snat),
        ] {
            let e = Settings::merge(cli, file).unwrap_err().to_string();
            assert_eq!(e, says);
        }
        let s = Settings::merge(flags(vec![peer], vec![snat]), file("")).unwrap();
        assert_eq!((s.admission.peers, s.snat), (vec![peer], vec![snat]));
    }

    #[test]
    fn dump_reads_back_as_the_same_settings() {
        let mut c = cli();
        c.timeouts.set("udp=2m 30s").unwrap();
        c.metrics = Some("127.0.0.1:9464".parse().unwrap());
        c.mss = Some(1400);
        c.snat = Some(vec![
            Ipv4Addr::new(10, 1, 1, 10),
            Ipv4Addr::new(10, 1, 1, 11),
        ]);
        c.peer_clients = Some(
            [(
                Ipv4Addr::new(10, 0, 1, 10),
                vec!["10.0.7.0/24".parse().unwrap()],
            )]
            .into(),
        );
        for settings in [
            Settings::merge(cli(), FileSettings::default()).unwrap(),
            Settings::merge(c, FileSettings::default()).unwrap(),
        ] {
            let text = settings.dump().unwrap();
            let back =
                Settings::merge(FileSettings::default(), FileSettings::parse(&text).unwrap());
            assert_eq!(back.unwrap(), settings, "{text}");
        }
    }

    /// Every key a dump of `settings` can hold, with every optional one
    /// set (a `[timeouts]` key stands for itself, a `[peer-clients]` key
    /// is a peer).
    fn every_key(settings: &Settings) -> Vec<String> {
        let mut full = settings.to_file();
        full.snat = Some(vec![Ipv4Addr::new(10, 1, 1, 10)]);
        full.tunnel_local = Some(Ipv4Addr::new(10, 1, 1, 10));
        full.metrics = Some("127.0.0.1:9464".parse().unwrap());
        full.mss = Some(1440);
        full.peer_clients = Some(
            [(
                Ipv4Addr::new(10, 0, 1, 10),
                vec!["10.0.0.0/24".parse().unwrap()],
            )]
            .into(),
        );
        let table: toml::Table = toml::from_str(&toml::to_string(&full).unwrap()).unwrap();
        let mut keys: Vec<String> = Vec::new();
        for (key, value) in &table {
            match value.as_table() {
                Some(inner) if key == "timeouts" => keys.extend(inner.keys().cloned()),
                _ => keys.push(key.clone()),
            }
        }
        keys
    }

    /// Whether the TOML line `line` sets `key` (or opens its table).
    fn sets(line: &str, key: &str) -> bool {
        line == format!("[{key}]")
            || line
                .strip_prefix(key)
                .is_some_and(|rest| rest.starts_with(" ="))
    }

    /// A dump spells out every setting: its value, or a comment saying
    /// what it defaults to at run time.
    #[test]
    fn a_dump_names_every_key() {
        let settings = Settings::merge(cli(), FileSettings::default()).unwrap();
        let text = settings.dump().unwrap();
        for key in every_key(&settings) {
            let named = text
                .lines()
                .any(|l| sets(l, &key) || l.starts_with(&format!("# {key}: not set, ")));
            assert!(named, "key {key} is missing from the dump:\n{text}");
        }
    }

    const SAMPLE: &str = include_str!("../../packaging/gateway.toml");

    #[test]
    fn the_sample_config_parses_and_documents_every_key() {
        let sample = FileSettings::parse(SAMPLE).unwrap();
        let settings = Settings::merge(FileSettings::default(), sample).unwrap();
        assert!(settings.warnings().is_empty(), "{:?}", settings.warnings());
        // Every key a dump can hold appears in the sample, set or commented.
        for key in every_key(&settings) {
            let documented = SAMPLE
                .lines()
                .any(|l| sets(l.trim_start_matches(['#', ' ']), &key));
            assert!(
                documented,
                "key {key} is missing from packaging/gateway.toml"
            );
        }
    }
}
