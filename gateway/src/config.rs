//! Settings, from the command line or the environment, with defaults that run locally.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The gateway's settings (`gateway --help` lists them).
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "gateway",
    about = "REST API of the order platform: forwards to order-svc, inventory-svc and payment-svc over gRPC."
)]
pub struct Config {
    /// Address the REST API listens on (port 0: any free port).
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:3000")]
    pub http_addr: SocketAddr,

    #[command(flatten)]
    pub threads: runtime::config::ThreadsArgs,

    /// gRPC address of order-svc.
    #[arg(long, env = "ORDER_SVC_URL", default_value = "http://127.0.0.1:50051", value_parser = grpc_url)]
    pub order_svc_url: String,

    /// gRPC address of inventory-svc.
    #[arg(long, env = "INVENTORY_SVC_URL", default_value = "http://127.0.0.1:50052", value_parser = grpc_url)]
    pub inventory_svc_url: String,

    /// gRPC address of payment-svc.
    #[arg(long, env = "PAYMENT_SVC_URL", default_value = "http://127.0.0.1:50053", value_parser = grpc_url)]
    pub payment_svc_url: String,

    /// Time a request may take before the gateway answers 504, in milliseconds.
    #[arg(long, env = "REQUEST_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub request_timeout_ms: u64,

    #[command(flatten)]
    pub jwt: JwtConfig,
}

/// How the gateway verifies customers' tokens.
#[derive(clap::Args, Clone, Debug)]
pub struct JwtConfig {
    /// Signature algorithm of customers' tokens: HS256 takes JWT_SECRET, RS256 and ES256 take
    /// JWT_PUBLIC_KEY_FILE.
    #[arg(
        long = "jwt-algorithm",
        env = "JWT_ALGORITHM",
        value_enum,
        default_value = "HS256"
    )]
    pub algorithm: JwtAlgorithm,

    /// HS256 shared secret. Unset: a development secret, with a warning at start.
    #[arg(long = "jwt-secret", env = "JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,

    /// PEM file of the RS256 or ES256 public key.
    #[arg(long = "jwt-public-key-file", env = "JWT_PUBLIC_KEY_FILE")]
    pub public_key_file: Option<PathBuf>,

    /// The `iss` every token must have.
    #[arg(
        long = "jwt-issuer",
        env = "JWT_ISSUER",
        default_value = "order-platform"
    )]
    pub issuer: String,

    /// The `aud` every token must have.
    #[arg(
        long = "jwt-audience",
        env = "JWT_AUDIENCE",
        default_value = "order-api"
    )]
    pub audience: String,

    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[arg(long = "jwt-leeway-secs", env = "JWT_LEEWAY_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=300))]
    pub leeway_secs: u64,
}

impl JwtConfig {
    /// HS256 with `secret`, the default issuer and audience: what tests and local tools use.
    pub fn hs256(secret: &str) -> JwtConfig {
        JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret: Some(secret.to_owned()),
            public_key_file: None,
            issuer: crate::identity::DEFAULT_ISSUER.to_owned(),
            audience: crate::identity::DEFAULT_AUDIENCE.to_owned(),
            leeway_secs: 30,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::upper_case_acronyms)]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    HS256,
    #[value(name = "RS256")]
    RS256,
    #[value(name = "ES256")]
    ES256,
}

impl Config {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Logs the settings (URLs with any password masked).
    pub fn log(&self) {
        tracing::info!(
            http_addr = %self.http_addr,
            worker_threads = self.threads.worker_threads,
            order_svc_url = %runtime::redact_url(&self.order_svc_url),
            inventory_svc_url = %runtime::redact_url(&self.inventory_svc_url),
            payment_svc_url = %runtime::redact_url(&self.payment_svc_url),
            request_timeout_ms = self.request_timeout_ms,
            jwt_algorithm = ?self.jwt.algorithm,
            jwt_secret = if self.jwt.secret.is_some() { "(set)" } else { "(development)" },
            jwt_public_key_file = ?self.jwt.public_key_file,
            jwt_issuer = %self.jwt.issuer,
            jwt_audience = %self.jwt.audience,
            jwt_leeway_secs = self.jwt.leeway_secs,
            "configuration"
        );
    }
}

/// Accepts `http://host:port` (the channels are plaintext HTTP/2).
fn grpc_url(value: &str) -> Result<String, String> {
    let uri: axum::http::Uri = value
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected http://host:port"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err("expected http://host:port".to_owned());
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Config;

    #[test]
    fn defaults_run_locally() {
        let config = Config::parse_from(["gateway"]);
        assert_eq!(config.http_addr.to_string(), "127.0.0.1:3000");
        assert_eq!(config.order_svc_url, "http://127.0.0.1:50051");
        assert_eq!(config.inventory_svc_url, "http://127.0.0.1:50052");
        assert_eq!(config.payment_svc_url, "http://127.0.0.1:50053");
        assert_eq!(config.request_timeout_ms, 10_000);
        assert_eq!(config.jwt.algorithm, super::JwtAlgorithm::HS256);
        assert_eq!(config.jwt.secret, None);
        assert_eq!(config.jwt.issuer, crate::identity::DEFAULT_ISSUER);
        assert_eq!(config.jwt.audience, crate::identity::DEFAULT_AUDIENCE);
    }

    #[test]
    fn refuses_a_url_that_is_not_http() {
        assert!(Config::try_parse_from(["gateway", "--order-svc-url", "localhost:50051"]).is_err());
        assert!(Config::try_parse_from(["gateway", "--order-svc-url", "https://x:1"]).is_err());
        assert!(Config::try_parse_from(["gateway", "--request-timeout-ms", "0"]).is_err());
    }
}
