//! Who a customer is: the `sub` of the JSON Web Token in `Authorization: Bearer`, verified
//! with the configured key, issuer and audience.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

pub use crate::config::{JwtAlgorithm, JwtConfig};
use crate::error::ApiError;

/// The HS256 secret used when none is configured: for a local platform only, since anyone
/// can read it here. The gateway warns at start when it uses it.
pub const DEV_JWT_SECRET: &str = "order-platform-development-secret-do-not-use-in-production";
pub const DEFAULT_ISSUER: &str = "order-platform";
pub const DEFAULT_AUDIENCE: &str = "order-api";

/// Longest `sub` taken as a customer id (order-svc's limit).
const MAX_CUSTOMER_ID_CHARS: usize = 128;

/// Checks tokens; cheap to clone.
#[derive(Clone)]
pub struct Verifier(Arc<VerifierInner>);

struct VerifierInner {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// The verifier the configuration asks for; refuses a configuration that does not hold
    /// together (a key for another algorithm, an unreadable key file).
    pub fn from_config(config: &JwtConfig) -> anyhow::Result<Verifier> {
        let (algorithm, key) = match config.algorithm {
            JwtAlgorithm::HS256 => {
                if config.public_key_file.is_some() {
                    anyhow::bail!("JWT_PUBLIC_KEY_FILE is for RS256 or ES256; set JWT_ALGORITHM");
                }
                let secret = match config.secret.as_deref() {
                    Some(secret) if !secret.is_empty() => secret,
                    _ => {
                        tracing::warn!(
                            "no JWT_SECRET or JWT_PUBLIC_KEY_FILE: customers' tokens are checked \
                             with the development secret, which anyone can read; \
                             `sagactl token --customer <id>` makes one"
                        );
                        DEV_JWT_SECRET
                    }
                };
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes())?,
                )
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                if config.secret.is_some() {
                    anyhow::bail!(
                        "JWT_SECRET is for HS256; RS256 and ES256 take JWT_PUBLIC_KEY_FILE"
                    );
                }
                let path = config.public_key_file.as_ref().with_context(|| {
                    format!(
                        "JWT_ALGORITHM {:?} needs JWT_PUBLIC_KEY_FILE",
                        config.algorithm
                    )
                })?;
                let pem = std::fs::read(path).with_context(|| {
                    format!("cannot read JWT_PUBLIC_KEY_FILE {}", path.display())
                })?;
                let (algorithm, key) = if config.algorithm == JwtAlgorithm::RS256 {
                    (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem))
                } else {
                    (Algorithm::ES256, DecodingKey::from_ec_pem(&pem))
                };
                let key = key.with_context(|| {
                    format!(
                        "JWT_PUBLIC_KEY_FILE {} is not a {algorithm:?} public key",
                        path.display()
                    )
                })?;
                (algorithm, key)
            }
        };
        // Only the configured algorithm: a token saying `none`, or HS256 with the public key
        // as its secret, is refused before any signature check.
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = config.leeway_secs;
        Ok(Verifier(Arc::new(VerifierInner { key, validation })))
    }

    /// The customer a token is for, or why it is refused (for the client: it names no secret).
    pub fn customer(&self, token: &str) -> Result<CustomerId, ApiError> {
        #[derive(serde::Deserialize)]
        struct Claims {
            sub: String,
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.0.key, &self.0.validation).map_err(
            |e| {
                let why = match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired",
                    ErrorKind::ImmatureSignature => "the token is not valid yet",
                    ErrorKind::InvalidSignature => "the token's signature does not verify",
                    ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
                        "the token is not signed with the algorithm this API takes"
                    }
                    ErrorKind::InvalidAudience => "the token is not for this API (aud)",
                    ErrorKind::InvalidIssuer => "the token is from another issuer (iss)",
                    ErrorKind::MissingRequiredClaim(_) => {
                        "the token lacks a required claim (sub, exp, iss, aud)"
                    }
                    _ => "the token is malformed",
                };
                tracing::debug!(error = %e, "token refused");
                ApiError::Unauthorized(format!("{why}; send `Authorization: Bearer <JWT>`"))
            },
        )?;
        let sub = data.claims.sub;
        if sub.trim().is_empty() || sub.chars().count() > MAX_CUSTOMER_ID_CHARS {
            return Err(ApiError::Unauthorized(format!(
                "the token's sub must be a customer id of 1 to {MAX_CUSTOMER_ID_CHARS} characters"
            )));
        }
        Ok(CustomerId(sub))
    }
}

/// The customer a request is from, as its verified token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CustomerId(pub String);

impl<S> FromRequestParts<S> for CustomerId
where
    S: Send + Sync,
    Verifier: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let verifier = <Verifier as axum::extract::FromRef<S>>::from_ref(state);
        let missing = || {
            ApiError::NoToken(
                "this route needs a customer's token: `Authorization: Bearer <JWT>`".to_owned(),
            )
        };
        let value = parts.headers.get(AUTHORIZATION).ok_or_else(missing)?;
        let value = value.to_str().map_err(|_| missing())?;
        let (scheme, token) = value.trim().split_once(' ').ok_or_else(missing)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(missing());
        }
        verifier.customer(token.trim())
    }
}

/// A token for `customer`, signed with an HS256 `secret`, valid for `ttl`: for local tools
/// and tests (a real identity provider issues customers' tokens in production).
pub fn hs256_token(
    secret: &str,
    issuer: &str,
    audience: &str,
    customer: &str,
    ttl: Duration,
) -> anyhow::Result<String> {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        iss: &'a str,
        aud: &'a str,
        iat: u64,
        exp: u64,
    }
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: customer,
        iss: issuer,
        aud: audience,
        iat: now,
        exp: now + ttl.as_secs(),
    };
    let key = EncodingKey::from_secret(secret.as_bytes())?;
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &key,
    )?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SECRET: &str = "unit-test-secret";

    fn verifier() -> Verifier {
        Verifier::from_config(&JwtConfig::hs256(SECRET)).unwrap()
    }

    fn token_with(claims: serde_json::Value, secret: &str) -> String {
        let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    fn claims(exp_offset: i64) -> serde_json::Value {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        serde_json::json!({"sub": "c-1", "iss": DEFAULT_ISSUER, "aud": DEFAULT_AUDIENCE, "exp": now + exp_offset})
    }

    #[test]
    fn a_token_names_its_customer() {
        let token = hs256_token(
            SECRET,
            DEFAULT_ISSUER,
            DEFAULT_AUDIENCE,
            "c-42",
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(
            verifier().customer(&token).unwrap(),
            CustomerId("c-42".into())
        );
    }

    #[test]
    fn expiry_has_a_small_leeway() {
        assert!(verifier()
            .customer(&token_with(claims(-10), SECRET))
            .is_ok());
        assert!(verifier()
            .customer(&token_with(claims(-120), SECRET))
            .is_err());
    }

    #[test]
    fn bad_tokens_are_unauthorized() {
        let mut wrong_audience = claims(60);
        wrong_audience["aud"] = "another-api".into();
        let mut wrong_issuer = claims(60);
        wrong_issuer["iss"] = "someone".into();
        let mut no_sub = claims(60);
        no_sub.as_object_mut().unwrap().remove("sub");
        let mut empty_sub = claims(60);
        empty_sub["sub"] = "".into();
        // alg none: the header says none, and no signature.
        let b64 = |v: &serde_json::Value| {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let alg_none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
            b64(&claims(60))
        );
        for token in [
            token_with(wrong_audience, SECRET),
            token_with(wrong_issuer, SECRET),
            token_with(no_sub, SECRET),
            token_with(empty_sub, SECRET),
            token_with(claims(60), "another-secret"),
            alg_none,
            "not.a.token".to_owned(),
            String::new(),
        ] {
            let error = verifier().customer(&token).expect_err(&token);
            assert_eq!(error.code(), "unauthorized");
        }
    }

    /// A key pair made for this test only (`openssl ecparam -name prime256v1 -genkey`).
    const ES256_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgUG7nCG7nMYLgESJk\ngSPVLl4dXFvjCDEi8sRid6BoR7qhRANCAARSDNzrfwMaHyY/EIgY9f46mTMwcgxy\n/oW3kQ+87c+VgQN9iTD5sh0EbmoaxAPNV9YKKgYewjYrdyZmPO4JCKCS\n-----END PRIVATE KEY-----";
    const ES256_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEUgzc638DGh8mPxCIGPX+OpkzMHIM\ncv6Ft5EPvO3PlYEDfYkw+bIdBG5qGsQDzVfWCioGHsI2K3cmZjzuCQigkg==\n-----END PUBLIC KEY-----";

    #[test]
    fn es256_tokens_verify_with_the_public_key_and_nothing_else_does() {
        let dir = std::env::temp_dir().join(format!("gateway-es256-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let public_key = dir.join("public.pem");
        std::fs::write(&public_key, ES256_PUBLIC).unwrap();
        let config = JwtConfig {
            algorithm: JwtAlgorithm::ES256,
            secret: None,
            public_key_file: Some(public_key),
            ..JwtConfig::hs256("unused")
        };
        let verifier = Verifier::from_config(&config).unwrap();
        let key = EncodingKey::from_ec_pem(ES256_PRIVATE.as_bytes()).unwrap();
        let signed =
            jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims(60), &key).unwrap();
        assert_eq!(
            verifier.customer(&signed).unwrap(),
            CustomerId("c-1".into())
        );
        // The public key used as an HS256 secret (algorithm confusion) is refused.
        let confused = token_with(claims(60), ES256_PUBLIC);
        assert!(verifier.customer(&confused).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_must_fit_the_algorithm() {
        let mut config = JwtConfig::hs256(SECRET);
        config.algorithm = JwtAlgorithm::RS256;
        assert!(
            Verifier::from_config(&config).is_err(),
            "RS256 with a secret"
        );
        config.secret = None;
        assert!(
            Verifier::from_config(&config).is_err(),
            "RS256 without a key file"
        );
    }
}
