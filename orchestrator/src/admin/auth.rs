//! The admin API is for operators only: every request must carry the admin token.

use std::sync::Arc;

use tonic::{Request, Status};

/// Metadata carrying the token, as `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// A tonic interceptor that lets through only requests carrying `authorization: Bearer
/// <token>` with the configured token.
#[derive(Clone)]
pub struct BearerToken {
    token: Arc<str>,
}

impl BearerToken {
    pub fn new(token: &str) -> Self {
        Self {
            token: Arc::from(token),
        }
    }

    fn check(&self, header: Option<&[u8]>) -> Result<(), Status> {
        let Some(header) = header else {
            return Err(Status::unauthenticated(
                "the admin API needs the admin token: send the metadata `authorization: Bearer <token>`",
            ));
        };
        let presented = header
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| header[7..].trim_ascii());
        match presented {
            Some(token) if constant_time_eq(token, self.token.as_bytes()) => Ok(()),
            Some(_) => Err(Status::unauthenticated("the admin token was refused")),
            None => Err(Status::unauthenticated(
                "the authorization metadata must be `Bearer <token>`",
            )),
        }
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(
            request
                .metadata()
                .get(AUTHORIZATION)
                .map(|value| value.as_bytes()),
        )?;
        Ok(request)
    }
}

/// Compares without stopping at the first difference, so that the time taken does not tell how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn only_the_configured_bearer_token_passes() {
        let auth = BearerToken::new("s3cret");
        assert!(auth.check(Some(b"Bearer s3cret")).is_ok());
        assert!(auth.check(Some(b"bearer s3cret ")).is_ok());
        for refused in [
            None,
            Some(&b"Bearer s3crex"[..]),
            Some(b"Bearer "),
            Some(b"s3cret"),
            Some(b"Basic s3cret"),
        ] {
            let status = auth.check(refused).expect_err("refused");
            assert_eq!(status.code(), Code::Unauthenticated, "{refused:?}");
        }
    }
}
