//! Pipelines and scheduled jobs of `nonstop serve`: the Jenkins part, with the deploy as a native step. Runs
//! are recorded before they are acknowledged, executed step by step in fresh workspaces, and marked interrupted,
//! never lost, when a crash cuts them off.
//!
//! The pure parts: the concurrency policy ([`policy`]), secret masking ([`mask`]), webhook verification
//! ([`webhook`]); the schedules are `nonstop-schedule`'s. The I/O shell is [`runner::Runner`]; it reaches the
//! proxy's deployers only through [`Platform`]. A job with a `host` runs its command there over SSH
//! ([`remote`], on `nonstop-hosts`' kept connection of that host).

pub mod exec;
pub mod mask;
pub mod policy;
pub mod record;
pub mod remote;
pub mod runner;
pub mod webhook;

use std::path::PathBuf;

pub use record::{Run, StepRecord};
pub use runner::{Runner, Trigger, Triggered};

/// What the pipelines need of the running proxy: its deployers and listeners.
pub trait Platform: Send + Sync + 'static {
    /// Starts a deploy of `service` to `version`; progress follows as JSON lines, the last with `"done": true`,
    /// `"result"` and `"reason"`.
    fn deploy(
        &self,
        service: &str,
        version: &str,
        env: Vec<(String, String)>,
        strategy: Option<nonstop_config::Strategy>,
    ) -> Result<tokio::sync::broadcast::Receiver<String>, String>;
    /// Rolls `service` back to the version before its current one (or aborts a deploy that runs).
    fn rollback(&self, service: &str) -> Result<tokio::sync::broadcast::Receiver<String>, String>;
    /// The version `service` serves.
    fn version(&self, service: &str) -> Option<String>;
    /// A URL through the proxy that reaches `service`, for verify steps.
    fn service_url(&self, service: &str) -> Option<String>;
    /// `NONSTOP_ARTIFACT` paths of the versions services run or would roll back to: never deleted.
    fn artifacts_in_use(&self) -> Vec<PathBuf>;
}

/// A refused pipeline call, classified for the admin API.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PipelineError {
    #[error("no pipeline or job {0:?} (pipelines and jobs: {1})")]
    NoPipeline(String, String),
    #[error("pipeline {0:?} has no run {1}")]
    NoRun(String, u64),
    #[error("run {1} of {0:?} has already ended ({2})")]
    Finished(String, u64, String),
    #[error("{0}")]
    Invalid(String),
    #[error("the run could not be recorded: {0}")]
    Store(String),
}

impl PipelineError {
    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            PipelineError::NoPipeline(..) | PipelineError::NoRun(..) => 404,
            PipelineError::Finished(..) => 409,
            PipelineError::Invalid(_) => 400,
            PipelineError::Store(_) => 503,
        }
    }
}
