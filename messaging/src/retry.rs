use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delays for retrying a transient failure: exponential from 50 ms to 5 s, with jitter,
/// never giving up (the caller stops on shutdown).
pub(crate) fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
