//! `nonstop app`: the sample worker service that nonstop protects. It fails the way Tomcat does: a bounded
//! worker pool, a bounded accept queue, a queue timeout, injected failures and stalls, and it writes orders to
//! SQLite or PostgreSQL with idempotency keys.

mod gate;
mod orders;
mod pool;
mod server;
mod stall;
mod stats;
mod store;

pub use gate::{Arrival, GateState};
pub use orders::{Order, BODY_BYTES_MAX};
pub use server::{App, AppConfig, AppError};
pub use stall::StallSchedule;
pub use store::{DbUrl, StoreError};
