//! The standard gRPC health service, telling the truth: a server reports `SERVING` while every
//! dependency it cannot work without answers (its database, its broker), `NOT_SERVING` while
//! one does not, and `NOT_SERVING` from the moment it starts to drain. The gateway's
//! `/readyz` asks every service, so it sees a database outage or a drain behind it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// The service name whose status is `SERVING` as long as the process answers, whatever its
/// dependencies say: for liveness probes, so that an outage of the database does not get every
/// replica restarted.
pub const LIVENESS: &str = "liveness";

/// How often the dependencies are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How long one probe may take before its dependency counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a probe's check returns: `Err` with why the dependency is unreachable.
pub type ProbeResult = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A dependency a server cannot serve without, and how to ask it whether it answers.
#[derive(Clone)]
pub struct Probe {
    name: &'static str,
    check: Arc<dyn Fn() -> ProbeResult + Send + Sync>,
}

impl Probe {
    pub fn new(
        name: &'static str,
        check: impl Fn() -> ProbeResult + Send + Sync + 'static,
    ) -> Self {
        Self {
            name,
            check: Arc::new(check),
        }
    }

    /// The service's database answers a query.
    pub fn database(pool: PgPool) -> Self {
        Self::new("database", move || {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
        })
    }

    /// Why the dependency is unreachable, or `None` when it answers within [`PROBE_TIMEOUT`].
    async fn failure(&self) -> Option<String> {
        match tokio::time::timeout(PROBE_TIMEOUT, (self.check)()).await {
            Ok(Ok(())) => None,
            Ok(Err(error)) => Some(error),
            Err(_) => Some(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    }
}

/// The health service of a server offering `S`: as `probes` find the dependencies now (so a
/// server starts with the truth), then kept up to date every [`PROBE_INTERVAL`], and
/// `NOT_SERVING` once `cancel` (the server drains). With no probes, `SERVING` until `cancel`.
pub async fn serve<S: NamedService>(
    probes: Vec<Probe>,
    cancel: CancellationToken,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    serve_named(S::NAME, probes, cancel).await
}

/// [`serve`] for the service named `service`.
pub async fn serve_named(
    service: &'static str,
    probes: Vec<Probe>,
    cancel: CancellationToken,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, server) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    let serving = update(&reporter, service, &probes, None).await;
    tokio::spawn(watch(reporter, service, probes, serving, cancel));
    server
}

/// Sets the status of `service` and of the server as a whole (the empty service name).
async fn set(reporter: &HealthReporter, service: &str, status: ServingStatus) {
    reporter.set_service_status(service, status).await;
    reporter.set_service_status("", status).await;
}

/// Probes every dependency and sets the status when it changed from `serving` (`None`:
/// never set); returns whether the server is serving now.
async fn update(
    reporter: &HealthReporter,
    service: &'static str,
    probes: &[Probe],
    serving: Option<bool>,
) -> bool {
    let mut failure = None;
    for probe in probes {
        if let Some(error) = probe.failure().await {
            failure = Some((probe.name, error));
            break;
        }
    }
    let now_serving = failure.is_none();
    if serving != Some(now_serving) {
        match &failure {
            Some((dependency, error)) => {
                set(reporter, service, ServingStatus::NotServing).await;
                tracing::warn!(service, dependency, %error, "dependency unreachable: health NOT_SERVING");
            }
            None => {
                set(reporter, service, ServingStatus::Serving).await;
                if serving.is_some() {
                    tracing::info!(service, "dependencies reachable again: health SERVING");
                }
            }
        }
    }
    now_serving
}

async fn watch(
    reporter: HealthReporter,
    service: &'static str,
    probes: Vec<Probe>,
    mut serving: bool,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
        let now = update(&reporter, service, &probes, Some(serving)).await;
        if cancel.is_cancelled() {
            break;
        }
        serving = now;
    }
    // Draining: no new work should be sent here.
    set(&reporter, service, ServingStatus::NotServing).await;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    use super::*;

    /// Stands for a service in the health checks.
    struct Named;
    impl NamedService for Named {
        const NAME: &'static str = "test.v1.Named";
    }

    async fn status(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
        client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .expect("health check")
            .into_inner()
            .status
    }

    async fn until(client: &mut HealthClient<tonic::transport::Channel>, wanted: ServingStatus) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (named, server) = (status(client, Named::NAME).await, status(client, "").await);
            if named == wanted as i32 && server == wanted as i32 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never {wanted:?}: the service {named}, the server {server}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn not_serving_while_a_dependency_fails_and_once_draining() {
        let up = Arc::new(AtomicBool::new(false));
        let probe = {
            let up = up.clone();
            Probe::new("dependency", move || {
                let up = up.load(Ordering::SeqCst);
                Box::pin(async move {
                    if up {
                        Ok(())
                    } else {
                        Err("down".to_owned())
                    }
                })
            })
        };
        let cancel = CancellationToken::new();
        let health = serve::<Named>(vec![probe], cancel.clone()).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(crate::grpc::incoming(listener)),
        );
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut client = HealthClient::new(channel);

        until(&mut client, ServingStatus::NotServing).await;
        assert_eq!(
            status(&mut client, LIVENESS).await,
            ServingStatus::Serving as i32,
            "alive, whatever the dependencies say"
        );
        up.store(true, Ordering::SeqCst);
        until(&mut client, ServingStatus::Serving).await;
        up.store(false, Ordering::SeqCst);
        until(&mut client, ServingStatus::NotServing).await;
        up.store(true, Ordering::SeqCst);
        until(&mut client, ServingStatus::Serving).await;
        // Draining: not serving, whatever the dependencies say.
        cancel.cancel();
        until(&mut client, ServingStatus::NotServing).await;
        server.abort();
    }
}
