//! The load generator: places orders through the REST API like real clients, with a mix of
//! outcomes, verifies payments as soon as it can, and waits for every order's final state
//! (`loadgen`, and the load under `platform chaos`). It can also measure the CPU time of the
//! platform's processes per saga ([`cpu`]) and the stages of a Kafka crossing ([`stages`]).

mod client;
pub mod cpu;
mod mix;
mod report;
mod scheduler;
pub mod stages;
mod stock;

use std::time::Duration;

pub use mix::{Mix, Outcome};
pub use report::{OrderResult, Percentiles, Report};
pub use scheduler::run;
pub use stock::{restock, EMPTY_SKU, IN_STOCK_SKUS};

/// How to run the load.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub gateway: String,
    pub orders: u64,
    /// Orders in flight at once.
    pub concurrency: usize,
    /// Orders started per second instead of a fixed concurrency (then `concurrency` caps what is
    /// in flight).
    pub rate: Option<f64>,
    pub mix: Mix,
    /// Longest one order may take from POST to its final state.
    pub order_timeout: Duration,
    /// Retry POST /orders (with its Idempotency-Key), verify and reads on 5xx and connection
    /// errors, as a careful client does (for runs with failures injected).
    pub retry_transient: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// The gateway's HS256 JWT_SECRET, to sign the customers' tokens with.
    pub jwt_secret: String,
}
