//! payment-svc, asked whether it accepts a payment method before an order is placed.

use std::time::Duration;

use anyhow::Context as _;
use messaging::MessageContext;
use proto::payment::v1::payment_service_client::PaymentServiceClient;
use proto::payment::v1::ValidatePaymentMethodRequest;
use telemetry::grpc::ClientInterceptor;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;

#[derive(Clone, Debug)]
pub struct PaymentMethods {
    /// Sends the current span's trace context with every call.
    client: PaymentServiceClient<InterceptedService<Channel, ClientInterceptor>>,
}

impl PaymentMethods {
    /// Connects on first use, so that order-svc may start before payment-svc; `timeout` bounds
    /// connecting and each call.
    pub fn connect_lazy(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("invalid payment-svc URL {url:?}"))?
            .connect_timeout(timeout)
            .timeout(timeout);
        Ok(Self {
            client: PaymentServiceClient::with_interceptor(
                endpoint.connect_lazy(),
                ClientInterceptor,
            ),
        })
    }

    /// `Ok` when payment-svc accepts `payment_method`; its refusal is passed on as
    /// [`Error::Invalid`]; unreachable, timed out or overloaded is [`Error::Unavailable`];
    /// any other failure is [`Error::Internal`].
    pub async fn validate(
        &self,
        payment_method: &str,
        context: &MessageContext,
    ) -> Result<(), Error> {
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
            Ok(_) => Ok(()),
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
