//! `egress`: the IP-in-IP egress NAT gateway daemon.

use std::{
    os::unix::process::CommandExt as _, path::Path, process::ExitCode, sync::Arc, time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use egress_common::reason::Reason;
use egress_user::{
    check, commands, down,
    flags::GatewayArgs,
    gateway::{self, Gateway},
    gc,
    handover::{self, Handover},
    inspect::Pinned,
    metrics::{self, Collector},
    netlink::HostEvents,
    notify::{self, Notifier},
    reorder::Reorder,
    settings::Settings,
    state_fit,
    sweeper::Sweeper,
    tunnel_errors::{self, Kind, TunnelErrors},
    tunnel_relay::Relay,
};
use nix::sys::signal::{SigSet, SigmaskHow, Signal as SignalNumber, sigprocmask};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// How long the garbage collector rests between sweeps.
const GC_INTERVAL: Duration = Duration::from_secs(10);
/// How often refused flows are reported.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Parser)]
#[command(version, about = "eBPF IP-in-IP egress NAT gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the gateway to an interface and run its control plane until
    /// SIGINT/SIGTERM, which leave the data path attached and translating
    /// (`egress down` removes it); SIGHUP reloads (settings and binary).
    Run(Box<RunArgs>),
    /// Remove the gateway a stopped `egress run` left: detach its data
    /// path and restore what it changed on the host (keeps the connection
    /// state unless --reset-state).
    Down(Box<DownArgs>),
    /// Check the settings and this host (kernel, interface, bpffs, sysctls,
    /// routes, MTU); print a fix for each problem, exit non-zero if any.
    Check(Box<GatewayArgs>),
    /// Validate the settings; with --dump, print them as TOML.
    Config(Box<ConfigArgs>),
    /// Print the packet counters of each reason, with its verdict.
    Stats(commands::StatsArgs),
    /// List the live flows, like `conntrack -L`.
    Flows(commands::FlowsArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Start with empty connection state instead of the previous run's
    /// (live connections through the gateway break).
    #[arg(long)]
    reset_state: bool,
}

#[derive(clap::Args)]
struct DownArgs {
    /// The gateway's settings: only its state directory and interface are
    /// used.
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Remove the connection state too.
    #[arg(long)]
    reset_state: bool,
}

#[derive(clap::Args)]
struct ConfigArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// Print the effective configuration, defaults included, as TOML that
    /// --config reads back.
    #[arg(long)]
    dump: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // First, so that what an older image handed over is recorded however
    // this one ends (arguments or settings it refuses included). Read
    // before any thread starts: this clears the environment.
    let reloaded = Handover::receive().is_some();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args
            .gateway
            .settings()
            .and_then(|s| run(s, args.reset_state, reloaded)),
        Command::Down(args) => args
            .gateway
            .place()
            .and_then(|(dir, iface)| down::down(&dir, iface.as_deref(), args.reset_state)),
        Command::Check(args) => return check(*args),
        Command::Config(args) => config(*args),
        Command::Stats(args) => commands::stats(&args),
        Command::Flows(args) => commands::flows(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the findings; the exit code says whether there was a problem.
fn check(args: GatewayArgs) -> ExitCode {
    let settings = match args.settings() {
        Ok(s) => s,
        Err(e) => {
            println!("PROBLEM  configuration: {e:#}");
            println!("         fix: correct it (packaging/gateway.toml documents every key)");
            return ExitCode::FAILURE;
        }
    };
    let report = check::judge(&settings, &check::Facts::gather(&settings));
    print!("{}", report.render());
    match report.count(check::Level::Problem) {
        0 => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

fn config(args: ConfigArgs) -> anyhow::Result<()> {
    let settings = args.gateway.settings()?;
    for warning in settings.warnings() {
        tracing::warn!("{warning}");
    }
    match args.dump {
        true => print!("{}", settings.dump()?),
        false => println!("configuration valid"),
    }
    Ok(())
}

/// The settings `egress run` was started with, read again for a reload.
fn reread_settings() -> anyhow::Result<Settings> {
    match Cli::try_parse_from(std::env::args_os())?.command {
        Command::Run(args) => args.gateway.settings(),
        _ => anyhow::bail!("not started as `egress run`"),
    }
}

fn run(settings: Settings, mut reset_state: bool, reloaded: bool) -> anyhow::Result<()> {
    for warning in settings.warnings() {
        tracing::warn!("{warning}");
    }
    if reloaded && reset_state {
        tracing::warn!("--reset-state ignored on a reload: the connection state is kept");
        reset_state = false;
    }
    // The binary at this path on a reload: a new one after an upgrade.
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let notifier = Notifier::from_env().context("cannot reach systemd's NOTIFY_SOCKET")?;
    // Bound before attaching, so a taken address fails the start cleanly.
    let metrics_listener = settings
        .metrics
        .map(|addr| {
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("--metrics: cannot listen on {addr}"))
        })
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // The handled signals go to this thread only, which blocks them
        // for a handover (see `reload`).
        .on_thread_start(|| {
            if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_signals()), None) {
                tracing::warn!("cannot block signals in a runtime thread: {e}");
            }
        })
        .build()
        .context("cannot start the runtime")?;
    let _in_runtime = runtime.enter();
    // Caught from here on, so a stop requested while the gateway starts
    // (or just after it reports ready) still stops it cleanly.
    let mut shutdown = Shutdown::catch()?;
    // A previous image blocked them for the handover; any that came in
    // the meantime are delivered now.
    sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&handled_signals()), None)
        .context("cannot unblock signals")?;
    // Subscribed before attaching, so no change in between goes unseen.
    let events = HostEvents::subscribe().context("cannot follow the interface over netlink")?;
    let (timeouts, top_flows) = (settings.timeouts, settings.metrics_top_flows);
    let mut gateway = Gateway::start(settings, reset_state)?;
    let collector = match metrics_listener {
        Some(listener) => {
            let policy = gateway.policy();
            let collector = Arc::new(Collector::new(
                Pinned::open(&policy.state_dir)?,
                top_flows,
                u64::from(policy.ports.max - policy.ports.min) + 1,
                gateway.allowed(),
            ));
            tracing::info!(addr = %listener.local_addr()?, "serving metrics on /metrics");
            Some((listener, collector))
        }
        None => None,
    };
    let notify = |state: &str| {
        if let Some(n) = &notifier
            && let Err(e) = n.notify(state)
        {
            tracing::warn!("cannot notify systemd: {e}");
        }
    };
    notify(&notify::ready(&gateway.status()));

    let mut exit = runtime
        .block_on(serve(
            &mut gateway,
            events,
            &timeouts,
            collector,
            &notify,
            &mut shutdown,
        ))
        .inspect_err(|_| tracing::info!("{}", gateway.leave()))?;
    if exit == Exit::Reload {
        // Held from here until the new image can handle them (the mask
        // and pending signals survive exec, and no other thread takes
        // them): a SIGTERM now must stop that image, not kill it half-way.
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled_signals()), None)
            .context("cannot block signals for the handover")?;
        // One that came with the SIGHUP, or since, stops this image: the
        // new one would never hear of it.
        if runtime.block_on(shutdown.stop_requested()) {
            tracing::info!("a stop was requested with the reload: shutting down instead");
            exit = Exit::Stop;
        }
    }
    if exit == Exit::Reload {
        notify(&notify::reloading());
        // Returns only if the new image could not be started.
        let e = reload(&gateway, &exe);
        tracing::error!("reload failed: {e:#}; stopping");
        notify(notify::STOPPING);
        tracing::info!("{}", gateway.leave());
        return Err(e);
    }
    notify(notify::STOPPING);
    // For the next start, and so that the data path stays.
    if let Err(e) = gateway.keep_state_pinned() {
        tracing::warn!("{e:#}: the next start may not find the connection state");
    }

    for (reason, packets) in gateway.datapath().stats()? {
        if packets > 0 {
            tracing::info!(
                reason = reason.as_str(),
                verdict = reason.verdict().as_str(),
                packets,
                "packet counter"
            );
        }
    }
    tracing::info!("stopped: {}", gateway.leave());
    Ok(())
}

/// Hands the data path over to a new image of this program (see
/// `handover`), started with the same arguments, the handled signals
/// blocked; returns only if that fails, the data path still attached.
fn reload(gateway: &Gateway, exe: &Path) -> anyhow::Error {
    let env = match Handover::new(&gateway.policy().state_dir).to_env() {
        Ok(env) => env,
        Err(e) => return e.context("cannot hand the data path over"),
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        command.arg0(arg0);
    }
    tracing::info!(exe = %exe.display(), "handing the data path over to a new image");
    let e = command.args(args).env(handover::ENV, env).exec();
    let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&handled_signals()), None);
    anyhow::Error::new(e).context(format!("cannot run {}", exe.display()))
}

/// Why `serve` returned.
#[derive(PartialEq, Eq)]
enum Exit {
    Stop,
    Reload,
}

/// Sweeps idle state (on a thread of its own), reports refused flows and
/// follows the interface until SIGINT or SIGTERM, or SIGHUP with valid
/// settings (for a reload).
async fn serve(
    gateway: &mut Gateway,
    mut events: HostEvents,
    timeouts: &gc::Timeouts,
    metrics: Option<(std::net::TcpListener, Arc<Collector>)>,
    notify: &dyn Fn(&str),
    shutdown: &mut Shutdown,
) -> anyhow::Result<Exit> {
    let collector = metrics.map(|(listener, collector)| {
        tokio::spawn(metrics::serve(listener, collector.clone()));
        collector
    });
    // Without it the gateway still serves; only returning fragments that
    // come before their first no longer reach their client.
    match Reorder::new(gateway.datapath().reorder_maps()?, collector.clone()) {
        Ok(reorder) => drop(tokio::spawn(reorder.run())),
        Err(e) => tracing::warn!(
            "{e:#}: returning fragments that come before their first are not sent on to \
             their client"
        ),
    }
    let mut tunnel_errors = TunnelErrors::open()
        .inspect_err(|e| {
            tracing::warn!(
                "cannot open a raw socket for IP protocol 4 (needs CAP_NET_RAW): {e}: {}",
                tunnel_errors::WITHOUT
            )
        })
        .ok();
    // Without it routers' errors are still counted and logged; the servers
    // only no longer hear that their replies are lost.
    let mut relay = match Relay::new(gateway.datapath().flows()?, collector.clone()) {
        Ok(relay) => Some(relay),
        Err(e) => {
            tracing::warn!(
                "cannot open a raw socket (needs CAP_NET_RAW): {e}: routers' errors about the \
                 tunnel are not relayed to the Internet hosts whose packets they lost"
            );
            None
        }
    };
    // Stopped when dropped, on the way out.
    let _sweeper = Sweeper::start(
        gateway.datapath().state()?,
        *timeouts,
        gateway.allowed(),
        GC_INTERVAL,
        collector.clone(),
    )
    .context("cannot start the garbage collector's thread")?;
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    let mut refused = Refusals::default();
    // A reload asked for while a new image could not start (the
    // interface gone, or without the address the settings default from)
    // waits until it can.
    let mut reload_pending = false;
    let exit = loop {
        tokio::select! {
            request = shutdown.requested() => match request {
                Exit::Stop => break Exit::Stop,
                Exit::Reload => match reload_when(gateway) {
                    When::Now => break Exit::Reload,
                    When::Later(e) => {
                        tracing::warn!("SIGHUP: reloading once a new image can start: {e:#}");
                        reload_pending = true;
                    }
                    When::Refused => reload_pending = false,
                },
            },
            changed = events.changed() => {
                let changed = changed.context("netlink notifications failed")?;
                if changed.interface {
                    let before = gateway.status();
                    if let Err(e) = gateway.follow() {
                        tracing::error!("{e:#}; trying again at the interface's next change");
                    }
                    let now = gateway.status();
                    if now != before {
                        notify(&notify::status(&now));
                    }
                    if reload_pending {
                        match reload_when(gateway) {
                            When::Now => break Exit::Reload,
                            When::Later(_) => {}
                            When::Refused => reload_pending = false,
                        }
                    }
                }
                if changed.interface || changed.routes {
                    gateway.manage_next_hops();
                }
                // Any of these can change where a packet goes next.
                if let Err(e) = gateway.datapath().routes_changed() {
                    tracing::warn!("cannot retire the data path's remembered routes: {e:#}");
                }
            }
            errors = next_tunnel_errors(&mut tunnel_errors) => {
                let errors = match errors {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(
                            "{e}: closed the tunnel errors socket: {}",
                            tunnel_errors::WITHOUT
                        );
                        tunnel_errors = None;
                        continue;
                    }
                };
                // Only errors about packets to a peer are about the tunnel.
                let peers = &gateway.policy().admission.peers;
                let errors: Vec<_> =
                    errors.into_iter().filter(|e| peers.contains(&e.peer)).collect();
                for e in &errors {
                    if let Some(t) = tunnel_errors.as_mut() {
                        t.tell(e);
                    }
                    if let Some(c) = &collector {
                        c.record_tunnel_error(e.kind);
                    }
                    if let Some(r) = relay.as_mut() {
                        r.relay(e);
                    }
                }
                // Remembered routes would answer with the old MTU.
                if errors.iter().any(|e| matches!(e.kind, Kind::TooBig { .. }))
                    && let Err(e) = gateway.datapath().routes_changed()
                {
                    tracing::warn!("cannot retire the data path's remembered routes: {e:#}");
                }
            }
            _ = tick.tick() => {
                match gateway.datapath().stats() {
                    Ok(stats) => refused.report(&stats),
                    Err(e) => tracing::warn!("cannot read the packet counters: {e:#}"),
                }
                if let Err(e) = gateway.keep_state_pinned() {
                    tracing::warn!("{e:#}: a restart or reload would not find the connection state");
                }
            }
        }
    };
    if exit == Exit::Stop {
        tracing::info!("signal received, shutting down");
    }
    Ok(exit)
}

/// When a reload asked for may go.
enum When {
    Now,
    /// Once a new image could start (why it could not now).
    Later(anyhow::Error),
    /// Never (logged): the settings read again do not parse, would move
    /// the state, or do not fit it (another `max-flows`).
    Refused,
}

fn reload_when(gateway: &mut Gateway) -> When {
    match reload_settings(gateway) {
        Ok(s) => gateway::cannot_start(&s).map_or(When::Now, When::Later),
        Err(e) => {
            tracing::error!("SIGHUP: not reloading: {e:#}");
            When::Refused
        }
    }
}

/// The settings a new image would start with, or why it must not start.
fn reload_settings(gateway: &mut Gateway) -> anyhow::Result<Settings> {
    let dir = gateway.policy().state_dir.clone();
    let keep = "still running with the settings it started with";
    let s = reread_settings().map_err(|e| anyhow::anyhow!("{e:#}; {keep}"))?;
    if s.state_dir != dir {
        let (old, new) = (dir.display(), s.state_dir.display());
        anyhow::bail!(
            "state-dir changed ({old} -> {new}); a reload keeps the state where it is; a \
             restart starts with none in {new} (breaking connections) and leaves {old}'s \
             pinned, holding its memory, until removed (rm -r {old})"
        );
    }
    // The new image would fail to load on it, having taken the data path
    // over.
    if let Some((what, fix)) = state_fit::judge(&dir, s.max_flows)?.refusal(&dir) {
        anyhow::bail!("{what}; {fix}; {keep}");
    }
    // It loads the state pinned: this one's.
    gateway.keep_state_pinned()?;
    Ok(s)
}

/// The next routers' errors about tunnel packets, or never without the
/// socket.
async fn next_tunnel_errors(
    socket: &mut Option<TunnelErrors>,
) -> std::io::Result<Vec<tunnel_errors::TunnelError>> {
    match socket {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// SIGINT and SIGTERM, each a request to shut down; SIGHUP, to reload.
struct Shutdown {
    sigint: Signal,
    sigterm: Signal,
    sighup: Signal,
}

/// The signals [`Shutdown`] handles.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        SignalNumber::SIGINT,
        SignalNumber::SIGTERM,
        SignalNumber::SIGHUP,
    ] {
        set.add(s);
    }
    set
}

impl Shutdown {
    fn catch() -> anyhow::Result<Self> {
        Ok(Self {
            sigint: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            sigterm: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
            sighup: signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
        })
    }

    /// Whether SIGINT or SIGTERM came and was not yet seen (its handler
    /// ran already if it is blocked now): the runtime's driver reads what
    /// the handlers wrote before `yield_now` returns.
    async fn stop_requested(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = self.sigint.recv() => true,
            _ = self.sigterm.recv() => true,
            () = tokio::task::yield_now() => false,
        }
    }

    async fn requested(&mut self) -> Exit {
        tokio::select! {
            _ = self.sigint.recv() => Exit::Stop,
            _ = self.sigterm.recv() => Exit::Stop,
            _ = self.sighup.recv() => Exit::Reload,
        }
    }
}

/// New flows refused for lack of room, logged once per tick at most.
#[derive(Default)]
struct Refusals(std::collections::HashMap<Reason, u64>);

impl Refusals {
    fn report(&mut self, stats: &[(Reason, u64)]) {
        for &(reason, total) in stats {
            let why = match reason {
                Reason::PortsExhausted => "no free translation port",
                Reason::TableFull => "the flow table is full (--max-flows)",
                Reason::ClientLimit => "the client is at its flow cap (--max-client-flows)",
                _ => continue,
            };
            let seen = self.0.insert(reason, total).unwrap_or(total);
            if total > seen {
                tracing::warn!(
                    refused = total - seen,
                    reason = reason.as_str(),
                    "new flows refused since the last report: {why}"
                );
            }
        }
    }
}
