//! `egress`: the IP-in-IP egress NAT gateway daemon.

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use egress_common::reason::Reason;
use egress_user::{
    check, commands,
    flags::GatewayArgs,
    gateway::Gateway,
    gc,
    inspect::Pinned,
    metrics::{self, Collector},
    netlink::HostEvents,
    notify::{self, Notifier},
    reorder::Reorder,
    settings::Settings,
    sweeper::Sweeper,
    tunnel_errors::{self, Kind, TunnelErrors},
};
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
    /// Attach the gateway to an interface and run until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => args
            .gateway
            .settings()
            .and_then(|s| run(s, args.reset_state)),
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

fn run(settings: Settings, reset_state: bool) -> anyhow::Result<()> {
    for warning in settings.warnings() {
        tracing::warn!("{warning}");
    }
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
        .build()
        .context("cannot start the runtime")?;
    let _in_runtime = runtime.enter();
    // Caught from here on, so a stop requested while the gateway starts
    // (or just after it reports ready) still detaches it.
    let mut shutdown = Shutdown::catch()?;
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
                &policy.admission.peers,
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

    runtime.block_on(serve(
        &mut gateway,
        events,
        &timeouts,
        collector,
        &notify,
        &mut shutdown,
    ))?;
    notify(notify::STOPPING);

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
    tracing::info!("detaching");
    drop(gateway);
    Ok(())
}

/// Sweeps idle state (on a thread of its own), reports refused flows and
/// follows the interface until SIGINT or SIGTERM.
async fn serve(
    gateway: &mut Gateway,
    mut events: HostEvents,
    timeouts: &gc::Timeouts,
    metrics: Option<(std::net::TcpListener, Arc<Collector>)>,
    notify: &dyn Fn(&str),
    shutdown: &mut Shutdown,
) -> anyhow::Result<()> {
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
    loop {
        tokio::select! {
            _ = shutdown.requested() => break,
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
                }
                // Remembered routes would answer with the old MTU.
                if errors.iter().any(|e| matches!(e.kind, Kind::TooBig { .. }))
                    && let Err(e) = gateway.datapath().routes_changed()
                {
                    tracing::warn!("cannot retire the data path's remembered routes: {e:#}");
                }
            }
            _ = tick.tick() => match gateway.datapath().stats() {
                Ok(stats) => refused.report(&stats),
                Err(e) => tracing::warn!("cannot read the packet counters: {e:#}"),
            },
        }
    }
    tracing::info!("signal received, shutting down");
    Ok(())
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

/// SIGINT and SIGTERM, each a request to shut down.
struct Shutdown {
    sigint: Signal,
    sigterm: Signal,
}

impl Shutdown {
    fn catch() -> anyhow::Result<Self> {
        Ok(Self {
            sigint: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            sigterm: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    async fn requested(&mut self) {
        tokio::select! {
            _ = self.sigint.recv() => {}
            _ = self.sigterm.recv() => {}
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
