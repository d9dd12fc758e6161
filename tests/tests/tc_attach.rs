//! The TC program's attachment through the daemon's own loader, in a
//! namespace, checked from outside (`ip`, `tc`, the kernel's TCX query): a
//! gateway's filter elsewhere than its fixed place (older versions) is
//! removed before any attach, other programs' filters stay, the clsact
//! filter of kernels without TCX sits at one fixed place so it cannot
//! stack, the attachment stays after its data path (the daemon), and
//! `egress down` leaves the host as found.
//! This kernel has TCX, so the clsact path is entered directly, where a
//! kernel without TCX falls back to it. Needs root.

use anyhow::{Context as _, Result, ensure};
use aya::programs::tc::{NlOptions, TcAttach, TcAttachType};
use egress_user::{
    admission::Admission,
    clsact,
    datapath::{Attached, Datapath, Policy, TC_PROGRAM},
    down,
    host_changes::HostChanges,
    settings::{AttachMode, PortRange},
};
use tests::{
    Attachments, Lab,
    attached::{filter_program, is_gateway_filter},
    exec, in_netns, require_root,
};

const IFACE: &str = "eth0";
/// A classic BPF program that matches nothing, as another tool's filter.
const OTHER_FILTER: &str = "1,6 0 0 0,";
const OTHER_PRIORITY: u16 = 5;

/// A namespace with one interface for the gateway to attach to.
struct Host {
    lab: Lab,
    ns: String,
    ifindex: u32,
    policy: Policy,
}

impl Host {
    fn new() -> Result<Self> {
        require_root()?;
        let mut lab = Lab::new()?;
        let ns = lab.add_ns("tc")?;
        for cmd in [
            format!("ip link add {IFACE} type veth peer name p0"),
            format!("ip link set {IFACE} up"),
            "ip link set p0 up".into(),
            format!("ip addr add 10.1.1.10/24 dev {IFACE}"),
        ] {
            exec(&ns, &cmd)?;
        }
        let ifindex = exec(&ns, &format!("cat /sys/class/net/{IFACE}/ifindex"))?
            .trim()
            .parse()?;
        let policy = Policy {
            tunnel_local: [10, 1, 1, 10].into(),
            snat: vec![[10, 1, 1, 10].into()],
            ports: PortRange {
                min: 20000,
                max: 29999,
            },
            admission: Admission {
                peers: vec![[10, 0, 1, 10].into()],
                client_cidrs: vec!["192.168.250.0/30".parse()?],
                peer_clients: Default::default(),
            },
            max_flows: 1024,
            max_client_flows: 0,
            mss: 1440,
            state_dir: lab.state_dir()?,
            reset_state: false,
        };
        Ok(Self {
            lab,
            ns,
            ifindex,
            policy,
        })
    }

    /// Runs `f` with a freshly loaded data path, on a thread in the
    /// namespace (netlink requests go to the namespace they are made in).
    fn with_datapath<T: Send>(
        &self,
        f: impl FnOnce(&mut Datapath) -> Result<T> + Send,
    ) -> Result<T> {
        in_netns(&self.ns, || f(&mut Datapath::load(&self.policy)?))?
    }

    /// Runs `test` on a new host; a failure keeps the lab's directory.
    fn test(test: impl FnOnce(&Self) -> Result<()>) -> Result<()> {
        let host = Self::new()?;
        let result = test(&host);
        host.lab.keep_logs_on_err(result)
    }

    fn attachments(&self) -> Result<Attachments> {
        Attachments::of(&self.ns, IFACE)
    }

    /// `egress down` on this host's state directory.
    fn down(&self) -> Result<()> {
        in_netns(&self.ns, || {
            down::down(&self.policy.state_dir, Some(IFACE), false)
        })?
    }

    /// The clsact qdisc, as a killed gateway or another tool added it.
    fn add_clsact(&self) -> Result<()> {
        exec(&self.ns, &format!("tc qdisc add dev {IFACE} clsact"))?;
        Ok(())
    }

    /// Another tool's filter (not a gateway's) on clsact ingress, at
    /// `place` (`pref N`, and `handle H`).
    fn add_other_filter(&self, place: &str) -> Result<()> {
        let file = self.lab.dir().join("other.bpf");
        std::fs::write(&file, OTHER_FILTER)?;
        exec(
            &self.ns,
            &format!(
                "tc filter add dev {IFACE} ingress {place} bpf bytecode-file {}",
                file.display()
            ),
        )?;
        Ok(())
    }

    /// Leaves the gateway's TC program attached at `filter` as a gateway
    /// killed while attached leaves it: its process is gone, the filter
    /// stays.
    fn leave_filter(&self, filter: TcAttach) -> Result<()> {
        self.with_datapath(|dp| {
            let program = dp.tc()?;
            let link = program.attach(self.ifindex, filter)?;
            // The link's drop detaches it; a killed process never runs that.
            std::mem::forget(program.take_link(link)?);
            Ok(())
        })
    }
}

/// Where gateways before TCX support attached: the kernel's choice.
fn automatic_priority() -> TcAttach {
    TcAttach::Netlink {
        parent: TcAttachType::Ingress.into(),
        options: NlOptions::default(),
    }
}

/// Whether `line` is the gateway's filter at its fixed place.
fn at_our_place(line: &str) -> bool {
    is_gateway_filter(line)
        && line.contains(&format!(" pref {} ", clsact::PRIORITY))
        && line.contains(&format!(" handle {:#x} ", u32::from(clsact::HANDLE)))
}

fn other_filter_only(seen: &Attachments) -> bool {
    matches!(&seen.clsact[..], [line] if line.contains(&format!(" pref {OTHER_PRIORITY} ")) && !is_gateway_filter(line))
}

/// The program id of the gateway's filter at its fixed place, if there.
fn program_at_our_place(seen: &Attachments) -> Option<u32> {
    filter_program(seen.clsact.iter().find(|l| at_our_place(l))?)
}

#[test]
fn without_tcx_a_killed_gateways_filter_is_replaced_and_other_filters_stay() -> Result<()> {
    Host::test(|host| {
        host.add_clsact()?;
        host.add_other_filter(&format!("pref {OTHER_PRIORITY}"))?;
        // Killed gateways of this version and of one before it.
        host.leave_filter(clsact::ingress_filter())?;
        host.leave_filter(automatic_priority())?;
        let seen = host.attachments()?;
        ensure!(seen.gateway_tc() == 2 && seen.clsact.len() == 3, "{seen:?}");
        let left = program_at_our_place(&seen);

        let record = host.with_datapath(|dp| {
            dp.attach_tc_clsact(IFACE, host.ifindex)?;
            let seen = host.attachments()?;
            let ours = Some(dp.tc()?.info()?.id());
            ensure!(
                seen.gateway_tc() == 1 && program_at_our_place(&seen) == ours && ours != left,
                "expected one filter at pref {}, running program {ours:?}: {seen:?}",
                clsact::PRIORITY
            );
            ensure!(seen.clsact.len() == 2 && seen.tcx.is_empty(), "{seen:?}");
            dp.clsact().context("no clsact filter recorded")
        })?;
        // It outlives its data path; removed, the qdisc that was there
        // before stays.
        let seen = host.attachments()?;
        ensure!(seen.gateway_tc() == 1, "after the data path: {seen:?}");
        ensure!(!record.added, "{record:?}");
        in_netns(&host.ns, || record.undo(TC_PROGRAM))?;
        let seen = host.attachments()?;
        ensure!(
            other_filter_only(&seen) && seen.clsact_qdisc,
            "after detaching: {seen:?}"
        );
        Ok(())
    })
}

/// Another program's filter at the gateway's place is never replaced: the
/// attach fails rather than take its packets.
#[test]
fn without_tcx_another_programs_filter_at_our_place_stays() -> Result<()> {
    Host::test(|host| {
        host.add_clsact()?;
        host.add_other_filter(&format!(
            "pref {} handle {:#x}",
            clsact::PRIORITY,
            u32::from(clsact::HANDLE)
        ))?;
        let before = host.attachments()?;
        let attached =
            host.with_datapath(|dp| Ok(dp.attach_tc_clsact(IFACE, host.ifindex).is_ok()))?;
        let after = host.attachments()?;
        ensure!(
            !attached && after == before && before.clsact.len() == 1 && before.gateway_tc() == 0,
            "attached: {attached}; before {before:?}, after {after:?}"
        );
        Ok(())
    })
}

/// On a kernel without TCX the filter stays after its data path (a daemon
/// that exits), the next one swaps its program into it, keeping the
/// record that a gateway added the qdisc, which goes with the filter.
#[test]
fn without_tcx_the_next_data_path_swaps_its_program_into_the_filter() -> Result<()> {
    Host::test(|host| {
        let untouched = host.attachments()?;
        let attach = || {
            host.with_datapath(|dp| {
                dp.attach_tc_clsact(IFACE, host.ifindex)?;
                let record = dp.clsact().context("no clsact filter recorded")?;
                Ok((record, dp.tc()?.info()?.id()))
            })
        };
        let (first_record, first) = attach()?;
        let seen = host.attachments()?;
        ensure!(
            seen.gateway_tc() == 1 && program_at_our_place(&seen) == Some(first),
            "the filter should stay with program {first}: {seen:?}"
        );
        ensure!(first_record.added, "the qdisc was added: {first_record:?}");

        let (second_record, second) = attach()?;
        let seen = host.attachments()?;
        ensure!(
            seen.gateway_tc() == 1 && program_at_our_place(&seen) == Some(second),
            "expected the filter to run program {second} (was {first}): {seen:?}"
        );
        let record = second_record.merge(Some(first_record));
        ensure!(record.added, "{record:?}");
        HostChanges {
            clsact: Some(record),
            ..HostChanges::default()
        }
        .store(&host.policy.state_dir)?;
        host.down()?;
        ensure!(host.attachments()? == untouched, "after egress down");
        Ok(())
    })
}

#[test]
fn any_attach_removes_a_killed_gateways_filter() -> Result<()> {
    Host::test(|host| {
        host.add_clsact()?;
        for mode in [AttachMode::Tc, AttachMode::Generic] {
            host.leave_filter(automatic_priority())?;
            let (hook, seen) = host.with_datapath(|dp| {
                let hook = dp.attach(IFACE, host.ifindex, mode, &host.policy.state_dir)?;
                Ok((hook, host.attachments()?))
            })?;
            let ok = match hook {
                Attached::Tcx => seen.tcx == [TC_PROGRAM] && seen.xdp.is_none(),
                Attached::GenericXdp => seen.tcx.is_empty() && seen.xdp.is_some(),
                _ => false,
            };
            ensure!(
                ok && seen.clsact.is_empty(),
                "{mode:?} attached as {hook:?}: {seen:?}"
            );
            host.down()?;
            let after = host.attachments()?;
            ensure!(after.is_empty(), "{mode:?} left {after:?}");
        }
        Ok(())
    })
}

#[test]
fn the_host_is_left_as_found() -> Result<()> {
    Host::test(|host| {
        let untouched = host.attachments()?;
        ensure!(
            untouched.is_empty() && !untouched.clsact_qdisc,
            "{untouched:?}"
        );
        let seen = host.with_datapath(|dp| {
            ensure!(
                dp.attach(IFACE, host.ifindex, AttachMode::Tc, &host.policy.state_dir)?
                    == Attached::Tcx
            );
            host.attachments()
        })?;
        // TCX needs no qdisc; its link, pinned, stays after the data path.
        ensure!(seen.tcx == [TC_PROGRAM] && !seen.clsact_qdisc, "{seen:?}");
        ensure!(host.attachments()? == seen, "after the TCX data path");
        host.down()?;
        ensure!(host.attachments()? == untouched, "TCX detach");

        let (seen, record) = host.with_datapath(|dp| {
            dp.attach_tc_clsact(IFACE, host.ifindex)?;
            Ok((host.attachments()?, dp.clsact()))
        })?;
        ensure!(seen.clsact_qdisc && seen.gateway_tc() == 1, "{seen:?}");
        ensure!(host.attachments()? == seen, "after the clsact data path");
        // The qdisc we added goes with the filter.
        HostChanges {
            clsact: record,
            ..HostChanges::default()
        }
        .store(&host.policy.state_dir)?;
        host.down()?;
        ensure!(host.attachments()? == untouched, "clsact detach");
        Ok(())
    })
}
