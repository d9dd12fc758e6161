//! The gateway's userspace: settings, loading and attaching the data path,
//! and connection-state upkeep. `main.rs` is the `egress` command over it.

pub mod admission;
pub mod batch;
pub mod carry_over;
pub mod check;
pub mod clock;
pub mod clsact;
pub mod commands;
pub mod datapath;
pub mod down;
pub mod flags;
pub mod gateway;
pub mod gc;
pub mod handover;
pub mod host_changes;
pub mod inspect;
pub mod links;
pub mod metrics;
pub mod neighbours;
pub mod netif;
pub mod netlink;
pub mod notify;
pub mod pinning;
pub mod reorder;
pub mod resize;
pub mod settings;
pub mod state_fit;
pub mod sweeper;
pub mod sysctl;
pub mod tunnel_errors;
pub mod tunnel_relay;
pub mod upgrade;
