//! The packet tests on Linux 6.1, the oldest kernel the README claims: its
//! verifier refuses programs that the host's kernel loads (bounds it cannot
//! follow, stack frames counted rounded up to 32 bytes). Debian 12's own
//! 6.1 kernel boots in QEMU on the host's root file system, and the
//! `packets` test binary runs there as it does on the host.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    debian::{Cache, Pinned, single_entry},
    initrd,
    packages::{self, ensure_packages},
    test_output::Results,
    vm::{Accel, Outcome, Vm},
    workspace::{Workspace, capture},
};

/// Debian 12's generic 6.1 kernel (the cloud flavour lacks 9p).
const KERNEL: (&str, &str) = ("linux-image-6.1.0-56-amd64-unsigned", "6.1.192-2");
/// The same flavour at any 6.1 ABI: Debian drops a kernel package from its
/// mirror some time after a newer one supersedes it, and any 6.1 verifier
/// will do.
const KERNEL_FAMILY: &str = r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$";
/// Runs the guest's init, and writes the kernel modules' index (`depmod`).
const BUSYBOX: (&str, &str) = ("busybox-static", "1:1.35.0-4+deb12u1+b1");

/// The packet tests run on 6.1 by default: under software emulation each
/// takes 4 to 6 s (most of it the load of its program); all of them
/// (`cargo xtask oldest-kernel --all`) took half an hour when each test
/// loaded both programs and set its namespace up with `ip netns exec`. A
/// test loads the program of its hook alone, so each policy here (the
/// default, a full table, a small port range, a restart on the pinned state) has a test for
/// either hook; these run each hook's main paths and what 6.1 was seen
/// refusing (the MSS walk, the ICMP checksum's `bpf_loop`, the outer IDs'
/// atomic add, the port search's `bpf_loop`, the tunnel error's rewrite) and the helpers behind them
/// (FIB lookup, redirect, head and tail adjustment, map pinning across a
/// restart).
const PACKET_TESTS: &[&str] = &[
    "xdp::tcp_outbound_and_return",
    "tc::tcp_outbound_and_return",
    "tc::icmp_echo_outbound_and_return",
    "tc::route_via_another_interface_is_redirected_there",
    "icmp::xdp::outbound_packets_too_big_for_the_route",
    "icmp::tc::return_packets_too_big_for_the_tunnel",
    "icmp::xdp::long_icmp_errors_are_relayed_whole_both_ways",
    "icmp::tc::icmp_errors_with_a_wrong_checksum_are_dropped",
    "outer_id::xdp::two_cpus_at_once_never_take_the_same_id",
    "outer_id::tc::what_goes_to_a_peer_without_df_takes_the_next_id_of_its_counter",
    "state::xdp::a_full_table_refuses_new_flows_and_keeps_old_ones",
    "state::tc::a_full_table_refuses_new_flows_and_keeps_old_ones",
    "state::xdp::the_last_free_ports_of_a_range_are_found",
    "state::tc::the_last_free_ports_of_a_range_are_found",
    "state::xdp::restart_keeps_flows_and_reset_clears_them",
    "state::tc::restart_keeps_flows_and_reset_clears_them",
    "mss::xdp::syn_and_syn_ack_are_clamped_both_ways",
    "fragments::xdp::later_fragments_before_their_first_are_translated_by_address",
    "malformed::tc::malformed_outbound_frames_are_dropped_with_their_reason",
];

/// How long the VM may run: a hung guest is killed.
const LIMIT_SUBSET: Duration = Duration::from_secs(600);
const LIMIT_ALL: Duration = Duration::from_secs(3600);
/// A guest under KVM speaks within seconds; one that does not is taken as
/// KVM not working here, and the run starts again under emulation.
const KVM_BOOT_LIMIT: Duration = Duration::from_secs(30);

/// Which packet tests run in the VM.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Subset,
    All,
}

pub fn test(ws: &Workspace, scope: Scope) -> Result<()> {
    let started = Instant::now();
    eprintln!("==> xtask: Linux 6.1 VM: preparing");
    ensure_packages(ws, packages::VM)?;
    let dir = ws.target_dir.join("linux-6.1");
    let mut cache = Cache::new(ws, dir.join("debs"));
    let busybox = cache
        .unpack(&Pinned::new(BUSYBOX.0, BUSYBOX.1), |_| Ok(()))?
        .join("bin/busybox");
    let kernel = pick_kernel(&mut cache)?;
    let kernel_dir = cache.unpack(&kernel, |dir| depmod(&busybox, dir))?;
    let vmlinuz = single_entry(&kernel_dir.join("boot"), "vmlinuz-")?;
    let modules = single_entry(&kernel_dir.join("lib/modules"), "")?;

    let initrd_path = dir.join("initrd.cpio");
    write_if_changed(&initrd_path, &initrd::build(&busybox, &modules)?)?;
    let packets = packets_binary(ws)?;

    let out_dir = dir.join("out");
    if out_dir.exists() {
        fs::remove_dir_all(&out_dir)?;
    }
    fs::create_dir_all(&out_dir)?;
    let script = dir.join("guest.sh");
    let egress = ws.egress_bin(false)?;
    fs::write(
        &script,
        guest_script(ws, &packets, &egress, &out_dir, scope),
    )?;
    let vm = Vm {
        kernel: vmlinuz,
        initrd: initrd_path,
        append: [
            ("egrun", script.as_path()),
            ("egout", &out_dir),
            ("egmods", &modules),
            ("egkeep", ws.root()),
            ("egkeep", &ws.target_dir),
        ]
        .iter()
        .map(|(key, path)| kernel_arg(key, path))
        .collect::<Result<Vec<_>>>()?
        .join(" "),
        out_dir,
        console_log: dir.join("console.log"),
    };
    let prepared = started.elapsed();

    let limit = match scope {
        Scope::Subset => LIMIT_SUBSET,
        Scope::All => LIMIT_ALL,
    };
    let boot = |accel: Accel, boot_limit: Duration, why_here: &str| {
        eprintln!(
            "==> xtask: Linux 6.1 VM: {} under {}{why_here}",
            kernel.name,
            accel.name()
        );
        vm.run(ws, accel, boot_limit, limit, |line| {
            eprintln!("    6.1 | {line}")
        })
        .with_context(|| format!("the Linux 6.1 VM under {}", accel.name()))
    };
    let mut outcome = Outcome::NoBoot("not tried: /dev/kvm does not open".into());
    if kvm_usable() {
        outcome = boot(Accel::Kvm, KVM_BOOT_LIMIT, "")?;
    }
    if let Outcome::NoBoot(why) = outcome {
        outcome = boot(
            Accel::Tcg,
            limit,
            &format!(" (software emulation; KVM: {why})"),
        )?;
    }
    if let Outcome::NoBoot(why) = outcome {
        bail!(
            "the Linux 6.1 VM did not boot: {why}; the kernel's console: {}",
            vm.console_log.display()
        );
    }
    eprintln!(
        "==> xtask: Linux 6.1 VM: {:.0} s to prepare, {:.0} s in the VM",
        prepared.as_secs_f64(),
        (started.elapsed() - prepared).as_secs_f64()
    );
    let kernel = format!("{} {}", kernel.name, kernel.version);
    judge_packets(&vm.out_dir, scope, &kernel)?;
    judge_daemon(&vm.out_dir, &kernel)
}

/// The pinned kernel if apt still has it (or it is unpacked already), else
/// the newest of its flavour, with a warning naming both.
fn pick_kernel(cache: &mut Cache) -> Result<Pinned> {
    let pinned = Pinned::new(KERNEL.0, KERNEL.1);
    if cache.is_unpacked(&pinned) || cache.offers(&pinned)? {
        return Ok(pinned);
    }
    let names = cache.names_matching(KERNEL_FAMILY)?;
    let Some(newest) = cache.newest_of(&names)? else {
        bail!(
            "apt offers neither {} {} nor any other package matching {KERNEL_FAMILY}",
            pinned.name,
            pinned.version
        );
    };
    eprintln!(
        "xtask: warning: {} {} (pinned in xtask/src/oldest_kernel.rs) is no longer offered; \
         using {} {}, the newest 6.1 kernel of the same flavour",
        pinned.name, pinned.version, newest.name, newest.version
    );
    Ok(newest)
}

/// Writes modules.dep (which the package leaves to its install scripts)
/// into an unpacked kernel package.
fn depmod(busybox: &Path, dir: &Path) -> Result<()> {
    let modules = single_entry(&dir.join("lib/modules"), "")?;
    let version = modules
        .file_name()
        .and_then(|n| n.to_str())
        .context("module directory without a name")?;
    capture(
        std::process::Command::new(busybox)
            .args(["depmod", "-b"])
            .arg(dir)
            .arg(version),
    )
    .map(drop)
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Builds the `packets` test binary and returns its path.
fn packets_binary(ws: &Workspace) -> Result<PathBuf> {
    let out = capture(ws.cargo().args([
        "test",
        "-p",
        "tests",
        "--test",
        "packets",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]))?;
    out.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "packets")
        .and_then(|msg| msg["executable"].as_str().map(PathBuf::from))
        .context("cargo built no `packets` test executable")
}

/// What runs in the guest (as root, in the VM's own root network
/// namespace, on the host's files): the packet tests, their whole output to
/// packets.log and each test's line on the way; then the gateway as an
/// operator runs it, `egress check` and `egress run` on a veth until it
/// says it is attached, then SIGTERM: in TC mode (6.1 has no TCX: a
/// clsact filter), then in native XDP mode (the daemon loads only the
/// program it attaches, so each mode has the verifier take its program
/// with the operator's settings). Each part leaves its exit status in
/// OUT/PART.status.
const GUEST_SCRIPT: &str = r#"# Written by cargo xtask (xtask/src/oldest_kernel.rs) for the Linux 6.1 VM.
cd @ROOT@
(@PACKETS@ --test-threads=1 -Z unstable-options --report-time @FILTER@
 echo $? > @OUT@/packets.status) 2>&1 | tee @OUT@/packets.log | grep --line-buffered -E '^(running|test )'

# $1: the attach mode; its log is @OUT@/daemon-$1.log.
daemon() {
  log=@OUT@/daemon-$1.log
  [ -e /sys/class/net/egk0 ] || {
    ip link add egk0 type veth peer name egk1 && ip addr add 10.9.0.1/24 dev egk0 &&
      ip link set egk0 up && ip link set egk1 up && ip route add default via 10.9.0.254
  } || return 1
  set -- --iface egk0 --peer 10.9.0.2 --client-cidr 192.168.250.0/24 --attach $1 --state-dir /sys/fs/bpf/egress-vm
  @EGRESS@ check "$@" || return 1
  @EGRESS@ run "$@" &
  pid=$! up=no
  for _ in $(seq 60); do
    if grep -q 'gateway ready' $log; then up=yes; break; fi
    kill -0 $pid 2>/dev/null || break
    sleep 1
  done
  ip link show dev egk0
  tc filter show dev egk0 ingress
  kill -TERM $pid 2>/dev/null
  wait $pid && [ $up = yes ]
}
for mode in @MODES@; do
  echo "egress check; egress run --attach $mode"
  daemon $mode > @OUT@/daemon-$mode.log 2>&1
  echo $? > @OUT@/daemon-$mode.status
  echo "egress check; egress run --attach $mode: exit $(cat @OUT@/daemon-$mode.status)"
done
"#;

/// The attach modes the guest runs the daemon in, each loading its own
/// program.
const DAEMON_MODES: [&str; 2] = ["tc", "native"];

fn guest_script(ws: &Workspace, packets: &Path, egress: &Path, out: &Path, scope: Scope) -> String {
    let filter = match scope {
        Scope::Subset => format!("--exact {}", PACKET_TESTS.join(" ")),
        Scope::All => String::new(),
    };
    GUEST_SCRIPT
        .replace("@ROOT@", &ws.root().display().to_string())
        .replace("@PACKETS@", &packets.display().to_string())
        .replace("@FILTER@", &filter)
        .replace("@EGRESS@", &egress.display().to_string())
        .replace("@OUT@", &out.display().to_string())
        .replace("@MODES@", &DAEMON_MODES.join(" "))
}

/// `key=path` for the kernel command line, which splits at spaces.
fn kernel_arg(key: &str, path: &Path) -> Result<String> {
    let path = path.to_str().context("non-UTF-8 path")?;
    if path.contains(char::is_whitespace) {
        bail!("the VM cannot take a path with spaces: {path}");
    }
    Ok(format!("{key}={path}"))
}

/// Whether /dev/kvm can make a VM at all (a host can have it and still
/// not run guests: see [`KVM_BOOT_LIMIT`]).
fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Fails unless every test ran and passed; prints the failures' output,
/// each cut to its start and its end (where the verifier's message is).
fn judge_packets(out: &Path, scope: Scope, kernel: &str) -> Result<()> {
    let log = out.join("packets.log");
    let text = fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let results = Results::parse(&text);
    if !results.failed.is_empty() {
        eprintln!("{}", results.failure_report("on Linux 6.1", &log));
    }
    if scope == Scope::Subset {
        let missing: Vec<&str> = PACKET_TESTS
            .iter()
            .copied()
            .filter(|t| !results.ran(t))
            .collect();
        if !missing.is_empty() {
            bail!(
                "packet tests named in xtask/src/oldest_kernel.rs did not run on {kernel} \
                 (renamed or gone?): {}",
                missing.join(", ")
            );
        }
    }
    if !results.failed.is_empty() {
        bail!(
            "{} of {} packet tests failed on {kernel} (above: each test's line, then their \
             output)",
            results.failed.len(),
            results.passed.len() + results.failed.len(),
        );
    }
    let status = part_status(out, "packets")?;
    if status != "0" || results.passed.is_empty() {
        bail!(
            "the packet tests on {kernel} exited with {status}, {} passed; the whole output: {}",
            results.passed.len(),
            log.display()
        );
    }
    eprintln!(
        "==> xtask: Linux 6.1 VM: {} packet tests passed on {kernel}",
        results.passed.len()
    );
    Ok(())
}

/// Fails unless, in each of [`DAEMON_MODES`], `egress check` passed and
/// `egress run` attached and stopped cleanly; prints their output if not.
fn judge_daemon(out: &Path, kernel: &str) -> Result<()> {
    for mode in DAEMON_MODES {
        let part = format!("daemon-{mode}");
        let status = part_status(out, &part)?;
        let what = format!("egress check; egress run --attach {mode}");
        if status != "0" {
            let log = out.join(format!("{part}.log"));
            let text = fs::read_to_string(&log).unwrap_or_default();
            eprintln!("---- {what} on Linux 6.1 ----\n{text}");
            bail!("{what} failed on {kernel} (exit {status}; above: its output)");
        }
        eprintln!("==> xtask: Linux 6.1 VM: {what}: checked, attached and stopped on {kernel}");
    }
    Ok(())
}

/// The exit status the guest script left for one of its parts.
fn part_status(out: &Path, part: &str) -> Result<String> {
    let path = out.join(format!("{part}.status"));
    fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .with_context(|| {
            format!(
                "the VM's script left no {} (it stopped early?)",
                path.display()
            )
        })
}
