//! The durable request queue behind routes marked `queue = "NAME"`: a request is persisted (fsynced, many per
//! commit) before the client gets its 202, then delivered to the route's service by the proxy's dispatcher.
//! [`ledger`] decides, purely, what a delivery's outcome means (done, failed, retry later, dead); [`store`] keeps
//! requests and their status in redb; each request's [`Key`] (128 random bits) is its client-facing id and the
//! Idempotency-Key of its deliveries.

pub mod broker;
pub mod key;
pub mod ledger;
pub mod record;
pub mod store;

pub use key::Key;
pub use ledger::{Outcome, Policy, State, Status};
pub use record::QueuedRequest;
pub use store::{Limits, Store, StoreError};

pub use lapin;
