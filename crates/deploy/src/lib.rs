//! Supervised app instances and zero-downtime deploys. A [`Deployer`] runs the instances of one service through a
//! [`driver::Driver`], and moves traffic between versions through the proxy's pool, seen here only as the
//! [`Traffic`] trait: rolling, blue-green or canary, gated by readiness and a soak analysis, rolled back
//! automatically by switching traffic to the old instances, which stay warm until the new version has passed.
//! The decisions are pure ([`plan`], [`analysis`], [`restart`]); [`Deployer`] is the I/O shell around them.

pub mod analysis;
pub mod docker;
pub mod driver;
mod engine;
pub mod history;
pub mod logfile;
pub mod plan;
pub mod restart;

use std::net::SocketAddr;

pub use engine::{DeployError, DeployRequest, Deployer, Events};

/// What a server of the pool is to a deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes requests as usual.
    Serving,
    /// Takes requests, on trial: a 5xx from it is retried elsewhere (for requests that may be), preferably on a
    /// standby server.
    Trial,
    /// Drained but kept warm for a rollback; takes only retries of requests that failed on a server on trial.
    Standby,
    /// Drained, about to be stopped.
    Draining,
}

/// One change to a pool; a list of them applies atomically.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Adds a server. `warm`: it takes its full share at once (otherwise it slow-starts).
    Add {
        addr: SocketAddr,
        warm: bool,
        role: Role,
    },
    Role {
        addr: SocketAddr,
        role: Role,
    },
    Remove(SocketAddr),
    /// Sends `percent` of requests to these servers and the rest to the others (canary); `None` ends the split.
    Split(Option<(Vec<SocketAddr>, u32)>),
}

/// The proxy's pool of one service, as a deploy sees it.
pub trait Traffic: Send + Sync {
    fn apply(&self, changes: Vec<Change>);
    /// Requests in flight on a server.
    fn in_flight(&self, addr: SocketAddr) -> u32;
    /// The try counters of these servers, summed.
    fn sample(&self, addrs: &[SocketAddr]) -> analysis::Sample;
    /// The server's process exited: take it out of rotation now (health checks bring it back).
    fn exited(&self, addr: SocketAddr);
    /// Whether the server is up by health checks; `None` when it is not in the pool.
    fn healthy(&self, addr: SocketAddr) -> Option<bool>;
}
