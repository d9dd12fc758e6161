//! `egress check` on a namespace set up wrong, then right: each problem is
//! named with its fix and fails the check; the fixed host passes. Needs
//! root.

use anyhow::{Context as _, Result, ensure};
use aya::maps::{HashMap as BpfHashMap, IterableMap as _, MapData};
use egress_common::flow::{Flow, FlowKey, Mapping, PortKey};
use nix::mount::{MsFlags, mount};
use tests::{Lab, exec, exec_output, require_root};

const IFACE: &str = "eth0";
const PEER: &str = "10.0.1.10";

/// Runs `egress check` in `ns` for a gateway on `IFACE`; returns whether
/// it passed, and what it printed.
fn check(lab: &Lab, ns: &str) -> Result<(bool, String)> {
    check_with(lab, ns, "")
}

/// [`check`] with `extra` arguments.
fn check_with(lab: &Lab, ns: &str, extra: &str) -> Result<(bool, String)> {
    let out = exec_output(
        ns,
        &format!(
            "{} check --iface {IFACE} --peer {PEER} --client-cidr 10.0.0.0/16 --state-dir {} \
             {extra}",
            tests::egress_bin()?.display(),
            lab.state_dir()?.display()
        ),
    )?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.stderr.is_empty(),
        "check wrote to stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// The `PROBLEM` and `warning` lines, each with the `fix:` line under it.
fn findings(report: &str, tag: &str) -> Vec<String> {
    let lines: Vec<&str> = report.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with(tag))
        .map(|(i, l)| format!("{l}\n{}", lines.get(i + 1).unwrap_or(&"")))
        .collect()
}

/// Whether `report` has a problem saying `what`, with a fix saying `fix`.
fn has_problem(report: &str, what: &str, fix: &str) -> Result<()> {
    ensure!(
        findings(report, "PROBLEM")
            .iter()
            .any(|p| p.contains(what) && p.contains(fix)),
        "no problem {what:?} with {fix:?} in:\n{report}"
    );
    Ok(())
}

#[test]
fn names_each_problem_of_a_broken_host_then_passes_the_fixed_one() -> Result<()> {
    require_root()?;
    let mut lab = Lab::new()?;
    let ns = lab.add_ns("check")?;
    let result = (|| {
        // Down, no address, no routes; a new namespace has ip_forward=0.
        exec(
            &ns,
            &format!("ip link add {IFACE} type veth peer name uplink"),
        )?;
        let (passed, report) = check(&lab, &ns)?;
        ensure!(!passed, "a broken host passed:\n{report}");
        let problems = findings(&report, "PROBLEM");
        let expected = [
            ("interface eth0 is down", "fix: ip link set eth0 up"),
            ("eth0 has no IPv4 address", "fix: ip addr add"),
            ("no route to peer 10.0.1.10", "fix: ip route add 10.0.1.10"),
            ("no route to the Internet", "fix: ip route add default"),
        ];
        for (what, fix) in expected {
            has_problem(&report, what, fix)?;
        }
        ensure!(
            problems.len() == expected.len(),
            "other problems than expected:\n{report}"
        );
        let warnings = findings(&report, "warning");
        ensure!(
            warnings.len() == 1 && warnings[0].contains("net.ipv4.ip_forward=0"),
            "expected the ip_forward warning:\n{report}"
        );

        for cmd in [
            format!("ip link set {IFACE} up"),
            "ip link set uplink up".into(),
            format!("ip addr add 10.1.1.10/24 dev {IFACE}"),
            "ip route add default via 10.1.1.1".into(),
            "sysctl -qw net.ipv4.ip_forward=1".into(),
        ] {
            exec(&ns, &cmd)?;
        }
        let (passed, report) = check(&lab, &ns)?;
        ensure!(passed, "the fixed host failed:\n{report}");
        for line in [
            "ok       interface eth0 exists and is up",
            "ok       eth0 has IPv4 address 10.1.1.10: snat and tunnel-local default to it",
            "ok       route to peer 10.0.1.10: via 10.1.1.1 dev eth0",
            "ok       eth0's driver runs XDP natively: attach auto tries native XDP first",
            "ready to run (0 warnings)",
        ] {
            ensure!(report.contains(line), "no {line:?} in:\n{report}");
        }
        Ok(())
    })();
    lab.keep_logs_on_err(result)
}

/// A state directory on a read-only BPF filesystem (as under a unit's
/// `ProtectSystem=strict` outside /sys) is a problem: `egress run` could
/// not pin its state there (it passed the check, then failed to start).
#[test]
fn a_read_only_state_dir_is_a_problem() -> Result<()> {
    require_root()?;
    let mut lab = Lab::new()?;
    let ns = lab.add_ns("check-ro")?;
    let result = (|| {
        let state_dir = lab.state_dir()?;
        let bpffs = state_dir
            .parent()
            .context("the state-dir is in the lab's bpffs")?;
        mount(
            None::<&str>,
            bpffs,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )?;
        let (passed, report) = check(&lab, &ns)?;
        ensure!(!passed, "a read-only state-dir passed:\n{report}");
        let expected = format!("state-dir {} cannot be written", state_dir.display());
        has_problem(&report, &expected, "fix: ")
    })();
    lab.keep_logs_on_err(result)
}

/// State pinned with another `max-flows` (a flow table of 2 x 2048
/// entries, holding 3 flows) is information: a start resizes it, and the
/// line says what it copies. A `max-flows` below its flows is a problem:
/// `egress run` would refuse it, and a reload (`systemctl reload` runs
/// `egress check` first) would stop the gateway; so is a map of another
/// layout (another version's state format). A state lacking maps
/// (removed by hand) is a warning.
#[test]
fn a_state_made_with_another_max_flows_is_resized_unless_it_does_not_fit() -> Result<()> {
    require_root()?;
    let mut lab = Lab::new()?;
    let ns = lab.add_ns("check-state")?;
    let result = (|| {
        let dir = lab.state_dir()?;
        std::fs::create_dir_all(&dir)?;
        let mut flows = BpfHashMap::<MapData, FlowKey, Flow>::create(4096, 0)?;
        for port in 1..=6u16 {
            let key = FlowKey {
                sport: port.to_be_bytes(),
                ..FlowKey::default()
            };
            flows.insert(&key, &Flow::default(), 0)?;
        }
        flows.pin(dir.join("FLOWS"))?;

        let (_, report) = check_with(&lab, &ns, "--max-flows 65536")?;
        let info = format!(
            "info     the connection state in {} was made with max-flows 2048: a start \
             resizes it to max-flows 65536, copying its 3 flows (6 entries: FLOWS 6)",
            dir.display()
        );
        ensure!(
            report.contains(&info)
                && findings(&report, "PROBLEM")
                    .iter()
                    .all(|p| !p.contains("connection state")),
            "no {info:?} in:\n{report}"
        );
        let lacks = "lacks MAPPINGS, CLIENT_FLOWS, STATS (removed by hand?)";
        ensure!(
            findings(&report, "warning")
                .iter()
                .any(|w| w.contains(lacks)),
            "no warning {lacks:?} in:\n{report}"
        );

        let (_, report) = check_with(&lab, &ns, "--max-flows 2")?;
        let problem = format!(
            "the connection state in {} holds 3 flows, more than max-flows 2 holds (it was \
             made with max-flows 2048)",
            dir.display()
        );
        has_problem(&report, &problem, "fix: run with max-flows 3 or more")?;

        let (_, report) = check_with(&lab, &ns, "--max-flows 2048")?;
        ensure!(
            !report.contains("was made with") && report.contains("the gateway resumes it"),
            "the state fits max-flows 2048:\n{report}"
        );

        // Another layout is refused, as are the sizes with it.
        let mappings = BpfHashMap::<MapData, PortKey, u64>::create(4096, 0)?;
        mappings.pin(dir.join("MAPPINGS"))?;
        let (_, report) = check_with(&lab, &ns, "--max-flows 65536")?;
        let problem = format!(
            "the connection state in {} was made with other settings (--max-flows) or by a \
             version with another state format: FLOWS: max_entries is 4096, expected 131072; \
             MAPPINGS: value_size is 8, expected 16",
            dir.display()
        );
        has_problem(&report, &problem, "fix: run with those settings")?;
        Ok(())
    })();
    lab.keep_logs_on_err(result)
}

/// The tables an interrupted resize left pinned are a warning naming each
/// (what the next start does with it) and how to remove them; nothing
/// to fail a start for. Here the flow table was replaced by its copy, the
/// old one pinned aside, and the mapping table's copy never put in place.
#[test]
fn an_interrupted_resize_s_tables_are_a_warning() -> Result<()> {
    require_root()?;
    let mut lab = Lab::new()?;
    let ns = lab.add_ns("check-resize")?;
    let result = (|| {
        let dir = lab.state_dir()?;
        std::fs::create_dir_all(&dir)?;
        let old = BpfHashMap::<MapData, FlowKey, Flow>::create(1024, 0)?;
        let old_pin = dir.join(format!("resize-old-FLOWS-{}", old.map().info()?.id()));
        old.pin(&old_pin)?;
        BpfHashMap::<MapData, FlowKey, Flow>::create(4096, 0)?.pin(dir.join("FLOWS"))?;
        let new_pin = dir.join("resize-new-MAPPINGS");
        BpfHashMap::<MapData, PortKey, Mapping>::create(4096, 0)?.pin(&new_pin)?;

        let (_, report) = check_with(&lab, &ns, "--max-flows 2048")?;
        let warnings: Vec<_> = findings(&report, "warning")
            .into_iter()
            .filter(|w| w.contains("interrupted resize"))
            .collect();
        let file = |pin: &std::path::Path| pin.file_name().unwrap().display().to_string();
        for words in [
            format!(
                "an interrupted resize of the connection state left tables pinned in {}, \
                 holding kernel memory until the next start: ",
                dir.display()
            ),
            format!(
                "{} (the old FLOWS table, replaced by its copy: the next start copies what the \
                 previous data path added to it after the copy, then removes it)",
                file(&old_pin)
            ),
            format!(
                "{} (a table the resize left unused: the next start removes it)",
                file(&new_pin)
            ),
            "fix: none needed: the next `egress run` finishes the resize".into(),
            format!("{} ", old_pin.display()),
            format!("{} ", new_pin.display()),
        ] {
            ensure!(
                warnings.len() == 1 && warnings[0].contains(&words),
                "no warning {words:?} in:\n{report}"
            );
        }
        ensure!(
            findings(&report, "PROBLEM")
                .iter()
                .all(|p| !p.contains("resize")),
            "a problem of the resize in:\n{report}"
        );
        Ok(())
    })();
    lab.keep_logs_on_err(result)
}
