//! What every service binary does at start and stop, and the checks every gRPC edge makes.

pub mod config;
pub mod database;
pub mod error;
pub mod grpc;
pub mod health;
pub mod service;
pub mod shutdown;
pub mod text;

pub use service::Service;

/// `url` with its password masked, for printing configuration.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((credentials, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match credentials.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn masks_only_the_password() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/orders"),
            "postgres://app:***@db:5432/orders"
        );
        assert_eq!(
            redact_url("postgres://app@db/orders"),
            "postgres://app@db/orders"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
