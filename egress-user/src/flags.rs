//! The gateway's settings as command-line flags, shared by `egress run`,
//! `egress check`, `egress config` and `egress down`.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, str::FromStr};

use ipnet::Ipv4Net;

use crate::{
    pinning::DEFAULT_STATE_DIR,
    settings::{AttachMode, FileSettings, FileTimeouts, PortRange, Settings},
};

/// The gateway's settings as flags, shared by `run`, `check`, `config` and
/// `down`.
#[derive(clap::Args, Default)]
pub struct GatewayArgs {
    /// TOML file with the same settings; flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Interface that receives the tunnel and faces the Internet.
    #[arg(long)]
    pub iface: Option<String>,
    /// Outer source address allowed to send IP-in-IP (repeatable).
    #[arg(long = "peer")]
    pub peers: Vec<Ipv4Addr>,
    /// Inner source range that may be translated (repeatable).
    #[arg(long = "client-cidr")]
    pub client_cidrs: Vec<Ipv4Net>,
    /// Binds a peer to some client ranges: it may send only for those
    /// (repeatable) [default: every peer may send for every client range].
    #[arg(long = "peer-clients", value_name = "PEER=CIDR[,CIDR...]")]
    pub peer_clients: Vec<PeerClients>,
    /// Translation address (repeatable) [default: the interface's address].
    #[arg(long)]
    pub snat: Vec<Ipv4Addr>,
    /// Address peers tunnel to [default: the interface's address].
    #[arg(long)]
    pub tunnel_local: Option<Ipv4Addr>,
    /// Translation port range LO-HI [default: 1024-32767].
    #[arg(long)]
    pub ports: Option<PortRange>,
    /// Hook to attach to [default: auto].
    #[arg(long, value_enum)]
    pub attach: Option<AttachMode>,
    /// Flow table capacity [default: 1048576].
    #[arg(long)]
    pub max_flows: Option<u32>,
    /// Most flows one client address may have at once, 0 for no limit [default: 65536].
    #[arg(long)]
    pub max_client_flows: Option<u32>,
    /// Largest TCP MSS a SYN or SYN-ACK may announce through the tunnel, 0 to
    /// leave MSS alone [default: the interface MTU - 60].
    #[arg(long, value_name = "N")]
    pub mss: Option<u16>,
    /// Idle timeout KIND=DURATION, KIND one of tcp-established, tcp-transitory,
    /// tcp-reset, udp, icmp (repeatable) [defaults: 2h4m, 4m, 10s, 5m, 60s].
    #[arg(long = "timeout", value_name = "KIND=DURATION")]
    pub timeouts: Vec<String>,
    /// bpffs directory where the connection state persists across restarts
    /// [default: /sys/fs/bpf/egress].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on ADDR:PORT (/metrics, /healthz).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Flows exported one by one on /metrics, the largest by bytes [default: 10].
    #[arg(long, value_name = "N")]
    pub metrics_top_flows: Option<usize>,
}

impl GatewayArgs {
    /// The flags over the config file (if one is given), validated.
    pub fn settings(self) -> anyhow::Result<Settings> {
        let file = match &self.config {
            Some(path) => FileSettings::read(path)?,
            None => FileSettings::default(),
        };
        let mut timeouts = FileTimeouts::default();
        for flag in &self.timeouts {
            timeouts
                .set(flag)
                .map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
        }
        let cli = FileSettings {
            iface: self.iface,
            peer: Some(self.peers),
            client_cidr: Some(self.client_cidrs),
            peer_clients: Some(bindings(self.peer_clients)),
            snat: Some(self.snat),
            tunnel_local: self.tunnel_local,
            ports: self.ports,
            attach: self.attach,
            max_flows: self.max_flows,
            max_client_flows: self.max_client_flows,
            mss: self.mss,
            state_dir: self.state_dir,
            metrics: self.metrics,
            metrics_top_flows: self.metrics_top_flows,
            timeouts,
        };
        Settings::merge(cli, file)
    }

    /// The state directory and interface these settings name, from the
    /// flags over the file, nothing else read or checked: `egress down`
    /// needs no more, and takes down a gateway whatever its settings.
    pub fn place(&self) -> anyhow::Result<(PathBuf, Option<String>)> {
        let file = match &self.config {
            Some(path) => FileSettings::read(path)?,
            None => FileSettings::default(),
        };
        let state_dir = self.state_dir.clone().or(file.state_dir);
        Ok((
            state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            self.iface.clone().or(file.iface),
        ))
    }
}

/// One `--peer-clients` flag: a peer and client ranges it may send for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerClients {
    peer: Ipv4Addr,
    ranges: Vec<Ipv4Net>,
}

impl FromStr for PeerClients {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (peer, ranges) = s.split_once('=').ok_or_else(|| {
            format!("{s:?} is not PEER=CIDR[,CIDR...], e.g. 10.0.1.11=10.0.7.0/24")
        })?;
        let peer = peer
            .trim()
            .parse()
            .map_err(|_| format!("{peer:?} is not an IPv4 address"))?;
        let ranges = ranges
            .split(',')
            .map(|r| {
                r.trim()
                    .parse()
                    .map_err(|_| format!("{r:?} is not a CIDR range like 10.0.7.0/24"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { peer, ranges })
    }
}

/// The flags as one binding per peer: a peer given twice has the ranges of
/// both.
fn bindings(flags: Vec<PeerClients>) -> BTreeMap<Ipv4Addr, Vec<Ipv4Net>> {
    let mut map = BTreeMap::<_, Vec<_>>::new();
    for f in flags {
        map.entry(f.peer).or_default().extend(f.ranges);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_clients_flags_parse_and_add_up() {
        let flags = [
            "10.0.1.11=10.0.7.0/24, 10.0.8.0/24",
            "10.0.1.12=10.0.9.0/24",
            "10.0.1.11=10.0.10.0/24",
        ]
        .map(|f| f.parse::<PeerClients>().unwrap());
        let map = bindings(flags.into());
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        assert_eq!(
            map[&Ipv4Addr::new(10, 0, 1, 11)],
            [net("10.0.7.0/24"), net("10.0.8.0/24"), net("10.0.10.0/24")]
        );
        assert_eq!(map[&Ipv4Addr::new(10, 0, 1, 12)], [net("10.0.9.0/24")]);
        for (bad, says) in [
            ("10.0.1.11", "PEER=CIDR"),
            ("10.0.1.300=10.0.7.0/24", "not an IPv4 address"),
            ("10.0.1.11=10.0.7.0/33", "not a CIDR range"),
            ("10.0.1.11=", "not a CIDR range"),
        ] {
            let e = bad.parse::<PeerClients>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
