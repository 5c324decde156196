//! payment-svc, asked whether it accepts a payment method before an order is placed.
//!
//! The methods it accepted are remembered for a while (`PAYMENT_METHOD_CACHE_SECS`), so that
//! the orders of a customer paying as before cost no call; a refusal is never remembered.
//! payment-svc stays the authority: a method it stops accepting meanwhile is declined when
//! the saga charges it, and the order is compensated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use messaging::MessageContext;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use proto::payment::v1::ValidatePaymentMethodRequest;
use telemetry::grpc::ClientInterceptor;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;

/// At most this many accepted methods are remembered (a shop has a handful; this bounds what
/// a flood of distinct tokens can take).
const MAX_REMEMBERED: usize = 1024;

#[derive(Clone, Debug)]
pub struct PaymentMethods {
    /// Sends the current span's trace context with every call.
    client: PaymentServiceClient<InterceptedService<Channel, ClientInterceptor>>,
    /// How long an accepted method is taken as accepted; zero asks every time.
    remember_for: Duration,
    /// The methods payment-svc accepted, with when it did.
    accepted: Arc<Mutex<HashMap<String, Instant>>>,
}

impl PaymentMethods {
    /// Connects on first use, so that order-svc may start before payment-svc; `timeout` bounds
    /// connecting and each call; a method accepted is not asked about again for
    /// `remember_for`.
    pub fn connect_lazy(
        url: &str,
        timeout: Duration,
        remember_for: Duration,
    ) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("invalid payment-svc URL {url:?}"))?
            .connect_timeout(timeout)
            .timeout(timeout);
        Ok(Self {
            client: PaymentServiceClient::with_interceptor(
                endpoint.connect_lazy(),
                ClientInterceptor,
            ),
            remember_for,
            accepted: Arc::default(),
        })
    }

    fn remembered(&self, payment_method: &str) -> bool {
        let accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        accepted
            .get(payment_method)
            .is_some_and(|at| at.elapsed() < self.remember_for)
    }

    fn remember(&self, payment_method: &str) {
        if self.remember_for.is_zero() {
            return;
        }
        let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        if accepted.len() >= MAX_REMEMBERED {
            accepted.retain(|_, at| at.elapsed() < self.remember_for);
            if accepted.len() >= MAX_REMEMBERED {
                accepted.clear();
            }
        }
        accepted.insert(payment_method.to_owned(), Instant::now());
    }

    /// `Ok` when payment-svc accepts (or lately accepted) `payment_method`; its refusal is passed on as
    /// [`Error::Invalid`]; unreachable, timed out or overloaded is [`Error::Unavailable`];
    /// any other failure is [`Error::Internal`].
    pub async fn validate(
        &self,
        payment_method: &str,
        context: &MessageContext,
    ) -> Result<(), Error> {
        if self.remembered(payment_method) {
            return Ok(());
        }
        let mut request = tonic::Request::new(ValidatePaymentMethodRequest {
            payment_method: payment_method.to_owned(),
        });
        // The same correlation id and trace across the call (the interceptor replaces the
        // trace context with the current span's when spans have one).
        for (key, value) in [
            ("x-correlation-id", &context.correlation_id),
            ("traceparent", &context.traceparent),
            ("tracestate", &context.tracestate),
        ] {
            if let Ok(value) = MetadataValue::try_from(value.as_str()) {
                if !value.is_empty() {
                    request.metadata_mut().insert(key, value);
                }
            }
        }
        match self.client.clone().validate_payment_method(request).await {
            Ok(_) => {
                self.remember(payment_method);
                Ok(())
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                Err(Error::Invalid(status.message().to_owned()))
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::ResourceExhausted
                ) =>
            {
                Err(Error::Unavailable(format!(
                    "payment-svc cannot check the payment method ({:?}: {}), retry later",
                    status.code(),
                    status.message()
                )))
            }
            Err(status) => Err(Error::Internal(format!(
                "payment-svc failed checking the payment method ({:?}: {})",
                status.code(),
                status.message()
            ))),
        }
    }
}
