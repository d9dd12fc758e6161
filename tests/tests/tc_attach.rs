//! The TC program's attachment through the daemon's own loader, in a
//! namespace, checked from outside (`ip`, `tc`, the kernel's TCX query): a
//! gateway's filter elsewhere than its fixed place (older versions) is
//! removed before any attach, other programs' filters stay, the clsact
//! filter of kernels without TCX sits at one fixed place so it cannot
//! stack, the attachment stays after its data path (the daemon), and
//! `egress down` leaves the host as found, detaches the data path even
//! when it cannot read the record of host changes, and says what it
//! removed.
//! This kernel has TCX, so the clsact path is entered directly, where a
//! kernel without TCX falls back to it. Needs root.

use std::sync::Mutex;

use anyhow::{Context as _, Result, bail, ensure};
use aya::{
    maps::{Array, MapData},
    programs::tc::{NlOptions, TcAttach, TcAttachType},
};
use egress_user::{
    admission::Admission,
    clsact::{self, ClsactRecord},
    datapath::{Attached, Datapath, Policy, TC_PROGRAM},
    down,
    host_changes::{self, HostChanges},
    settings::{AttachMode, PortRange},
};
use tests::{
    Attachments, Lab,
    attached::{filter_program, is_gateway_filter},
    exec, exec_output, in_netns, require_root,
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

    /// `egress down` run as an operator runs it: whether it succeeded,
    /// what it printed, and what it logged.
    fn egress_down(&self) -> Result<(bool, String, String)> {
        let out = exec_output(
            &self.ns,
            &format!(
                "{} down --iface {IFACE} --state-dir {}",
                tests::egress_bin()?.display(),
                self.policy.state_dir.display()
            ),
        )?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        Ok((out.status.success(), text(&out.stdout), text(&out.stderr)))
    }

    /// Records what a clsact attach may leave, as the gateway does.
    fn record_attaching(&self, intent: ClsactRecord) -> Result<()> {
        let mut changes = HostChanges::load(&self.policy.state_dir)?;
        changes.attaching(intent);
        changes.store(&self.policy.state_dir)?;
        Ok(())
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

/// A clsact attach's record that records nothing, for tests of the attach
/// alone.
fn unrecorded(_: ClsactRecord) -> Result<()> {
    Ok(())
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
            dp.attach_tc_clsact(IFACE, host.ifindex, &mut unrecorded)?;
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
        let attached = host.with_datapath(|dp| {
            Ok(dp
                .attach_tc_clsact(IFACE, host.ifindex, &mut unrecorded)
                .is_ok())
        })?;
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
                dp.attach_tc_clsact(IFACE, host.ifindex, &mut unrecorded)?;
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
                let hook = dp.attach(
                    IFACE,
                    host.ifindex,
                    mode,
                    &host.policy.state_dir,
                    &mut unrecorded,
                )?;
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
                dp.attach(
                    IFACE,
                    host.ifindex,
                    AttachMode::Tc,
                    &host.policy.state_dir,
                    &mut unrecorded
                )? == Attached::Tcx
            );
            host.attachments()
        })?;
        // TCX needs no qdisc; its link, pinned, stays after the data path.
        ensure!(seen.tcx == [TC_PROGRAM] && !seen.clsact_qdisc, "{seen:?}");
        ensure!(host.attachments()? == seen, "after the TCX data path");
        host.down()?;
        ensure!(host.attachments()? == untouched, "TCX detach");

        let (seen, record) = host.with_datapath(|dp| {
            dp.attach_tc_clsact(IFACE, host.ifindex, &mut unrecorded)?;
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

/// What a clsact attach may leave is recorded before it makes anything:
/// a daemon killed just after recording it leaves it recorded but not
/// made, which `egress down` passes over without a warning; one killed
/// after the attach but before recording it as done leaves the qdisc it
/// added recorded, which `egress down` removes.
#[test]
fn without_tcx_what_an_attach_may_leave_is_recorded_before_it_is_made() -> Result<()> {
    Host::test(|host| {
        let untouched = host.attachments()?;
        ensure!(!untouched.clsact_qdisc, "{untouched:?}");
        // Killed right after the record.
        let attached = host.with_datapath(|dp| {
            Ok(dp
                .attach_tc_clsact(IFACE, host.ifindex, &mut |intent| {
                    host.record_attaching(intent)?;
                    bail!("killed")
                })
                .is_ok())
        })?;
        ensure!(!attached && host.attachments()? == untouched);
        let (ok, out, log) = host.egress_down()?;
        ensure!(
            ok && !log.contains("WARN") && host.attachments()? == untouched,
            "egress down on what was recorded but not made: {out}{log}"
        );

        // The next start, killed once attached: the record holds what its
        // attach recorded first, which it saw before anything was made.
        let seen = Mutex::new(Vec::new());
        host.with_datapath(|dp| {
            dp.attach_tc_clsact(IFACE, host.ifindex, &mut |intent| {
                seen.lock().unwrap().push((intent, host.attachments()?));
                host.record_attaching(intent)
            })
        })?;
        let seen = seen.into_inner().unwrap();
        ensure!(
            matches!(&seen[..], [(intent, then)] if intent.added && *then == untouched),
            "recorded after something was made: {seen:?}"
        );
        let attached = host.attachments()?;
        ensure!(
            attached.clsact_qdisc && attached.gateway_tc() == 1,
            "{attached:?}"
        );
        let (ok, out, log) = host.egress_down()?;
        ensure!(
            ok && out.contains("gateway down: its data path is detached")
                && host.attachments()? == untouched,
            "egress down left {:?}: {out}{log}",
            host.attachments()?
        );
        Ok(())
    })
}

/// `egress down` detaches the data path even when the record of what the
/// gateway changed on the host cannot be read (here a map of another
/// shape pinned in its place), and fails naming what it could not
/// restore; the record stays.
#[test]
fn egress_down_detaches_the_data_path_without_its_record() -> Result<()> {
    Host::test(|host| {
        let dir = &host.policy.state_dir;
        host.with_datapath(|dp| {
            dp.attach(IFACE, host.ifindex, AttachMode::Tc, dir, &mut unrecorded)
        })?;
        // And a filter a killed gateway left.
        host.add_clsact()?;
        host.leave_filter(clsact::ingress_filter())?;
        ensure!(host.attachments()?.gateway_tc() == 2);
        let record = dir.join(host_changes::PIN);
        Array::<MapData, u32>::create(1, 0)?.pin(&record)?;

        let (ok, out, log) = host.egress_down()?;
        let seen = host.attachments()?;
        ensure!(
            !ok && seen.is_empty(),
            "egress down (ok: {ok}) left {seen:?}: {out}{log}"
        );
        let record = record.display();
        for words in [
            format!("the host settings the gateway changed are not restored (cannot read {record}"),
            "/proc/sys/net/ipv4/conf/eth0/forwarding".into(),
            format!("rm {record}"),
        ] {
            ensure!(log.contains(&words), "no {words:?} in: {log}");
        }
        ensure!(
            out.contains(
                "the egress_tc filter a gateway left unrecorded on eth0's clsact ingress is removed"
            ),
            "{out}"
        );
        ensure!(dir.join(host_changes::PIN).exists(), "the record went");
        Ok(())
    })
}

/// A filter a gateway left without recording it is removed by `egress
/// down`, which says so (it said "nothing attached").
#[test]
fn egress_down_names_the_unrecorded_filter_it_removes() -> Result<()> {
    Host::test(|host| {
        std::fs::create_dir_all(&host.policy.state_dir)?;
        host.add_clsact()?;
        host.leave_filter(clsact::ingress_filter())?;
        let (ok, out, log) = host.egress_down()?;
        ensure!(
            ok && out.starts_with(
                "gateway down: the egress_tc filter a gateway left unrecorded on eth0's clsact \
                 ingress is removed;"
            ) && host.attachments()?.gateway_tc() == 0,
            "{out}{log}"
        );
        Ok(())
    })
}
