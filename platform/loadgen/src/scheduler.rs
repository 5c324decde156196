//! When each order starts: at a fixed concurrency, or at a rate (capped by the concurrency),
//! until the run's orders have all ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt as _};

use crate::client::Client;
use crate::report::Report;
use crate::LoadConfig;

/// Runs the load and reports. Fails only when the gateway cannot be used at all.
pub async fn run(config: &LoadConfig) -> anyhow::Result<Report> {
    let client = Arc::new(Client::connect(config).await?);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let bar = if config.progress {
        let bar = indicatif::ProgressBar::new(config.orders);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} orders, {per_sec}, eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let started = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut results = Vec::with_capacity(config.orders as usize);
    let mut errors = Vec::new();
    let interval = config
        .rate
        .map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
    let mut next_start = Instant::now();
    let mut launched = 0u64;
    while launched < config.orders || !in_flight.is_empty() {
        let can_launch = launched < config.orders && in_flight.len() < config.concurrency.max(1);
        let due = interval.is_none_or(|_| Instant::now() >= next_start);
        if can_launch && due {
            let outcome = config.mix.pick(launched);
            let client = client.clone();
            let run_id = run_id.clone();
            let i = launched;
            in_flight.push(tokio::spawn(async move {
                client.run_order(i, outcome, &run_id).await
            }));
            launched += 1;
            if let Some(interval) = interval {
                next_start += interval;
            }
            continue;
        }
        let wait_for_start = async {
            match (can_launch, interval) {
                (true, Some(_)) => tokio::time::sleep_until(next_start.into()).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            done = in_flight.next(), if !in_flight.is_empty() => {
                match done {
                    Some(Ok(Ok(result))) => results.push(result),
                    Some(Ok(Err(error))) => errors.push(error),
                    Some(Err(panic)) => errors.push(format!("an order task failed: {panic}")),
                    None => {}
                }
                bar.inc(1);
            }
            _ = wait_for_start => {}
        }
    }
    bar.finish_and_clear();
    Report::new(
        config.orders,
        results,
        errors,
        started.elapsed(),
        client.retries(),
    )
}
