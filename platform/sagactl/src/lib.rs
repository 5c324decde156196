//! What operators run against a live platform (the `sagactl` command line): clients of the
//! orchestrator's admin API and of the services, readable renderings of sagas, and the
//! consistency [`audit`].

pub mod audit;
pub mod render;

use std::time::Duration;

use proto::saga::v1::saga_admin_client::SagaAdminClient;
use tonic::codegen::InterceptedService;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// The admin token the orchestrator accepts when `ADMIN_TOKEN` is not set (development only).
pub const DEV_ADMIN_TOKEN: &str = "dev-admin-token";

/// Why an operator's command did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The request was understood and refused: the saga's state does not allow it, or there is
    /// no such saga.
    #[error("{0}")]
    Refused(String),
    /// A service could not be asked: unreachable, the token refused, an invalid argument.
    #[error("{0}")]
    Error(String),
}

impl Failure {
    /// Exit status of `sagactl`: 1 for a refusal (as for violations found by an audit), 2 when
    /// something could not be asked at all.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 1,
            Failure::Error(_) => 2,
        }
    }

    /// An error status of `service` (at `url`), said for an operator.
    pub fn from_status(service: &str, url: &str, status: &Status) -> Failure {
        let message = status.message();
        match status.code() {
            Code::NotFound => Failure::Refused(message.to_owned()),
            Code::FailedPrecondition => Failure::Refused(format!("refused: {message}")),
            Code::Unauthenticated => Failure::Error(format!(
                "the admin token was refused by {service} at {url} ({message}); give the \
                 orchestrator's ADMIN_TOKEN with --admin-token or SAGA_ADMIN_TOKEN"
            )),
            Code::Unavailable => {
                Failure::Error(format!("{service} at {url} is unavailable: {message}"))
            }
            Code::InvalidArgument => Failure::Error(format!("invalid request: {message}")),
            Code::Aborted => Failure::Error(format!("{message} (nothing was changed)")),
            Code::Unimplemented => Failure::Error(format!(
                "{service} at {url} does not offer this call ({message}): is it an older version?"
            )),
            code => Failure::Error(format!("{service} at {url} answered {code:?}: {message}")),
        }
    }
}

/// An error with its causes, which tonic's transport errors keep out of their own message.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A channel to `service` at `url`, connected now so that an unreachable service is said at
/// once. No overall deadline: streams of an audit may take long.
pub async fn connect(service: &str, url: &str) -> Result<Channel, Failure> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| Failure::Error(format!("{service} URL {url:?} is not valid: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    endpoint.connect().await.map_err(|e| {
        Failure::Error(format!(
            "cannot reach {service} at {url}: {}",
            with_causes(&e)
        ))
    })
}

/// Adds the admin token to every request as `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct AdminToken(MetadataValue<Ascii>);

impl AdminToken {
    pub fn new(token: &str) -> Result<AdminToken, Failure> {
        format!("Bearer {}", token.trim())
            .parse()
            .map(AdminToken)
            .map_err(|_| {
                Failure::Error("the admin token has characters metadata cannot carry".into())
            })
    }
}

impl tonic::service::Interceptor for AdminToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type AdminClient = SagaAdminClient<InterceptedService<Channel, AdminToken>>;

/// A client of the orchestrator's admin API at `url`, sending `token`.
pub async fn admin_client(url: &str, token: &str) -> Result<AdminClient, Failure> {
    let token = AdminToken::new(token)?;
    let channel = connect("the orchestrator's admin API", url).await?;
    Ok(SagaAdminClient::with_interceptor(channel, token))
}

/// `ms` (since the Unix epoch) as a UTC time to the millisecond, e.g. `2026-11-21 09:30:00.123`.
pub fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
        .unwrap_or_else(|| "-".to_owned())
}

/// A duration in its largest two units, e.g. `3m12s`, `2h5m`, `4d1h`, `850ms`.
pub fn short_duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_short_and_readable() {
        assert_eq!(short_duration(850), "850ms");
        assert_eq!(short_duration(42_000), "42s");
        assert_eq!(short_duration(192_000), "3m12s");
        assert_eq!(short_duration(7_500_000), "2h5m");
        assert_eq!(short_duration(90_000_000), "1d1h");
        assert_eq!(short_duration(-5), "0ms");
    }

    #[test]
    fn statuses_are_said_for_operators() {
        let refused = Failure::from_status(
            "orchestrator",
            "http://x",
            &Status::failed_precondition("saga is COMPLETED: saga already finished"),
        );
        assert_eq!(refused.exit_code(), 1);
        assert!(refused
            .to_string()
            .starts_with("refused: saga is COMPLETED"));
        let token =
            Failure::from_status("orchestrator", "http://x", &Status::unauthenticated("no"));
        assert_eq!(token.exit_code(), 2);
        assert!(token.to_string().contains("the admin token was refused"));
    }

    #[test]
    fn times_are_utc_to_the_millisecond() {
        assert_eq!(time(1_700_000_000_123), "2023-11-14 22:13:20.123");
    }
}
