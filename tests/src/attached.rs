//! What runs on an interface's receive path, as the kernel tells anyone who
//! asks (not the gateway's own account): XDP from `ip link`, clsact filters
//! and the qdisc from `tc`, TCX programs from the kernel's `BPF_PROG_QUERY`
//! (`tc` lists no TCX program, and Debian 12's `bpftool` predates TCX).

use std::ffi::CString;

use anyhow::{Context as _, Result, bail};
use aya::programs::{SchedClassifier, TcAttachType, loaded_links};

use crate::netns::{exec, in_netns};

/// The gateway's TC program, as its loader names it.
pub const GATEWAY_TC: &str = "egress_tc";

#[derive(Debug, PartialEq, Eq)]
pub struct Attachments {
    /// `prog/xdp id N` from `ip link`, if an XDP program is attached.
    pub xdp: Option<String>,
    /// Whether the interface has a clsact qdisc.
    pub clsact_qdisc: bool,
    /// `tc filter show dev IFACE ingress`: one line per filter.
    pub clsact: Vec<String>,
    /// The names of the programs on TCX ingress, in the order they run.
    pub tcx: Vec<String>,
}

impl Attachments {
    /// What `iface` in namespace `ns` runs now.
    pub fn of(ns: &str, iface: &str) -> Result<Self> {
        let link = exec(ns, &format!("ip -d link show dev {iface}"))?;
        let xdp = link.find("prog/xdp id ").map(|at| {
            link[at..]
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        });
        let qdiscs = exec(ns, &format!("tc qdisc show dev {iface}"))?;
        // A filter's own line has its handle; the line before it heads
        // its priority.
        let clsact = exec(ns, &format!("tc filter show dev {iface} ingress"))?
            .lines()
            .filter(|l| l.contains(" handle "))
            .map(|l| l.trim().to_owned())
            .collect();
        let name = CString::new(iface)?;
        let (_, programs) = in_netns(ns, || {
            SchedClassifier::query_tcx(name.as_c_str(), TcAttachType::Ingress)
        })?
        .with_context(|| format!("query the TCX ingress of {iface} in {ns}"))?;
        let tcx = programs
            .iter()
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect();
        Ok(Self {
            xdp,
            clsact_qdisc: qdiscs.contains("qdisc clsact"),
            clsact,
            tcx,
        })
    }

    /// How many times the gateway's TC program is attached.
    pub fn gateway_tc(&self) -> usize {
        let filters = self.clsact.iter().filter(|l| is_gateway_filter(l));
        let links = self.tcx.iter().filter(|n| *n == GATEWAY_TC);
        filters.count() + links.count()
    }

    /// Nothing attached at all: no XDP, no filter, no TCX program.
    pub fn is_empty(&self) -> bool {
        self.xdp.is_none() && self.clsact.is_empty() && self.tcx.is_empty()
    }
}

/// The gateway's program on `iface` in namespace `ns` (its XDP program,
/// else its TCX one, else its clsact filter's) and the kernel link it runs
/// from, by id; a clsact filter is no link (`None`). A program swapped
/// into a link keeps the link's id; detached and attached again, it gets
/// a new link.
pub fn gateway_link(ns: &str, iface: &str) -> Result<(u32, Option<u32>)> {
    let seen = Attachments::of(ns, iface)?;
    let xdp = seen
        .xdp
        .as_deref()
        .and_then(|x| x.rsplit(' ').next()?.parse().ok());
    let program = match xdp {
        Some(id) => id,
        None if seen.tcx.is_empty() => {
            return match seen.clsact.iter().find(|l| is_gateway_filter(l)) {
                Some(line) => Ok((filter_program(line).context("no program id")?, None)),
                None => bail!("no gateway program on {iface} in {ns}: {seen:?}"),
            };
        }
        None => {
            let name = CString::new(iface)?;
            let (_, programs) = in_netns(ns, || {
                SchedClassifier::query_tcx(name.as_c_str(), TcAttachType::Ingress)
            })??;
            programs
                .iter()
                .find(|p| p.name_as_str() == Some(GATEWAY_TC))
                .map(|p| p.id())
                .with_context(|| format!("no gateway program on {iface} in {ns}: {seen:?}"))?
        }
    };
    // Skipping links that go while listed.
    let link = loaded_links()
        .flatten()
        .find(|l| l.program_id() == program)
        .with_context(|| format!("program {program} on {iface} runs from no link"))?;
    Ok((program, Some(link.id())))
}

/// The id of the program a `tc filter show` line's filter runs.
pub fn filter_program(line: &str) -> Option<u32> {
    line.split_once(" id ")?
        .1
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A `tc filter show` line of a filter running the gateway's program.
pub fn is_gateway_filter(line: &str) -> bool {
    line.split_whitespace().any(|w| w == GATEWAY_TC)
}
