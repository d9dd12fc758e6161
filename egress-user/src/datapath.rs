//! The eBPF side as the daemon sees it: load with settings, fill the
//! policy maps, attach, read counters and flows.

use std::net::Ipv4Addr;

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{Xdp, XdpMode},
};
use egress_common::{
    config::Config,
    flow::{Flow, FlowKey},
    reason::Reason,
};
use ipnet::Ipv4Net;

use crate::settings::{AttachMode, PortRange};

/// The compiled eBPF object, built by build.rs.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/egress-datapath"));

/// Name of the XDP program in [`OBJECT`].
pub const XDP_PROGRAM: &str = "egress_xdp";

/// Everything the data path is configured with.
#[derive(Clone, Debug)]
pub struct Policy {
    pub tunnel_local: Ipv4Addr,
    pub snat: Vec<Ipv4Addr>,
    pub ports: PortRange,
    pub peers: Vec<Ipv4Addr>,
    pub client_cidrs: Vec<Ipv4Net>,
    pub max_flows: u32,
}

impl Policy {
    fn config(&self) -> Config {
        let mut c = Config::UNSET;
        c.tunnel_local = self.tunnel_local.octets();
        c.port_min = self.ports.min;
        c.port_max = self.ports.max;
        c.snat_count = self.snat.len() as u32;
        for (slot, a) in c.snat_addrs.iter_mut().zip(&self.snat) {
            *slot = a.octets();
        }
        c
    }
}

pub struct Datapath {
    ebpf: Ebpf,
}

impl Datapath {
    /// Loads the programs with `policy` and fills the policy maps.
    pub fn load(policy: &Policy) -> anyhow::Result<Self> {
        let config = policy.config();
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            // Two entries per flow: the outbound and the return half.
            .map_max_entries("FLOWS", policy.max_flows.saturating_mul(2))
            .load(OBJECT)
            .context("cannot load the eBPF programs (needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel with BTF)")?;

        let mut peers: HashMap<_, [u8; 4], u8> = HashMap::try_from(map(&mut ebpf, "PEERS")?)?;
        for p in &policy.peers {
            peers
                .insert(&p.octets(), &1, 0)
                .with_context(|| format!("cannot add peer {p}"))?;
        }
        let mut clients: LpmTrie<_, [u8; 4], u8> = LpmTrie::try_from(map(&mut ebpf, "CLIENTS")?)?;
        for c in &policy.client_cidrs {
            let key = Key::new(u32::from(c.prefix_len()), c.network().octets());
            clients
                .insert(&key, &1, 0)
                .with_context(|| format!("cannot add client range {c}"))?;
        }

        let mut datapath = Self { ebpf };
        datapath
            .xdp()?
            .load()
            .context("the kernel verifier rejected the XDP program")?;
        Ok(datapath)
    }

    /// Attaches the XDP program to `ifindex`; returns the mode it got.
    pub fn attach(&mut self, ifindex: u32, mode: AttachMode) -> anyhow::Result<&'static str> {
        let prog = self.xdp()?;
        match mode {
            AttachMode::Native => {
                prog.attach(ifindex, XdpMode::Driver)
                    .context("native XDP attach failed")?;
                Ok("native")
            }
            AttachMode::Generic => {
                prog.attach(ifindex, XdpMode::Skb)
                    .context("generic XDP attach failed")?;
                Ok("generic")
            }
            AttachMode::Auto => match prog.attach(ifindex, XdpMode::Driver) {
                Ok(_) => Ok("native"),
                Err(e) => {
                    tracing::warn!(
                        "native XDP unavailable ({e}); falling back to generic XDP, which is slower"
                    );
                    prog.attach(ifindex, XdpMode::Skb)
                        .context("generic XDP attach failed")?;
                    Ok("generic")
                }
            },
        }
    }

    /// The loaded XDP program (for `BPF_PROG_TEST_RUN` in tests and benchmarks).
    pub fn xdp(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .context("XDP program missing from the eBPF object")?
            .try_into()?)
    }

    /// Packets per reason, summed over CPUs.
    pub fn stats(&self) -> anyhow::Result<Vec<(Reason, u64)>> {
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("STATS").context("STATS map missing")?)?;
        Reason::ALL
            .iter()
            .map(|&r| Ok((r, stats.get(&(r as u32), 0)?.iter().sum())))
            .collect()
    }

    /// The flow table.
    pub fn flows(&mut self) -> anyhow::Result<HashMap<&mut MapData, FlowKey, Flow>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, "FLOWS")?)?)
    }
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("{name} map missing from the eBPF object"))
}
